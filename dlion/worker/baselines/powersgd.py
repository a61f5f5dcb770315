"""The practitioner's compressed baseline: AdamW after torch's own DDP PowerSGD hook.

PowerSGD (Vogels et al., NeurIPS 2019) reaches users as a DDP communication hook, so this
baseline is that hook, unchanged: ``wrap(module)`` puts a module whose forward returns the
loss in DistributedDataParallel with ``powerSGD_hook`` (rank-r approximation, error feedback, warm
start), and ``step()`` is AdamW's. What changes is only that every byte the hook all-reduces
is in the ledger, the same ledger as dlion's.

Per step, with N ranks:
  1. Backward, per DDP bucket (torch's hook): during the first ``start_iter`` steps the whole
     bucket is all-reduced in fp32 (the uncompressed warm-up); after them, the bucket's
     vectors and the matrices too small to gain are all-reduced in fp32, then P (n x r per
     n x m matrix), orthogonalised, then Q (m x r), and M ~ P Q^T with error feedback.
  2. Record: each all-reduce at the ring's cost, 2 (N-1)/N x 32 bits per element each way
     (the length rounded up to N whole chunks), sized from what the hook allocated for the
     bucket (its P and Q memory).
  3. Step: AdamW on the averaged gradients, identical on every rank.

DDP also broadcasts rank 0's parameters once when it wraps the model (a one-off, in the
totals, as dlion's own start broadcast); its construction-time check of shapes across ranks
(a few bytes per tensor, once) is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from dlion.checks import check_int, check_number
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_reduce_traffic


@dataclass(frozen=True, kw_only=True)
class PowerSGDConfig:
    """rank: the approximation's rank r; start_iter: steps of uncompressed fp32 all-reduce
    first (torch needs >= 2 with error feedback); min_compression_rate: a matrix is
    compressed only if (n m) / ((n + m) r) exceeds it."""

    rank: int = 4
    start_iter: int = 10
    min_compression_rate: float = 2.0
    bucket_cap_mb: float = 25.0  # DDP's bucket size (torch's default)

    def __post_init__(self) -> None:
        check_int("PowerSGD rank", self.rank, low=1)
        check_int("PowerSGD start_iter", self.start_iter, low=2)
        # inf is a rate too: no matrix is ever compressed.
        check_number("PowerSGD min_compression_rate", self.min_compression_rate, low=1, finite=False)
        check_number("PowerSGD bucket_cap_mb", self.bucket_cap_mb, low=0, low_open=True)


class PowerSGD(torch.optim.Optimizer):
    """AdamW on gradients averaged by torch's DDP PowerSGD hook; see the module docstring.
    Call ``wrap(module)`` once, before the first backward, and compute the loss through what
    it returns."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        process_group: Any = None,
        *,
        config: PowerSGDConfig | None = None,
    ) -> None:
        self.inner = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        self.config = config or PowerSGDConfig()
        self.group = process_group
        self.ledger = Ledger(n_params=sum(p.numel() for g in self.param_groups for p in g["params"]))
        self.hook_state: psgd.PowerSGDState | None = None
        self.ddp: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, module: nn.Module) -> nn.parallel.DistributedDataParallel:
        """DDP over ``module``, whose forward returns the loss to differentiate, with the
        PowerSGD hook; returns the DDP module: call it as ``module`` to train through."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "the powersgd baseline runs inside DistributedDataParallel and needs an initialised "
                "torch.distributed process group (launch with torchrun or dlion train --workers N)"
            )
        n, numel = dist.get_world_size(self.group), self.ledger.n_params
        self.ddp = nn.parallel.DistributedDataParallel(
            module, process_group=self.group, bucket_cap_mb=self.config.bucket_cap_mb
        )
        full = Traffic(payload=32 * numel)
        sent, received = (full * (n - 1), Traffic()) if dist.get_rank(self.group) == 0 else (Traffic(), full)
        self.ledger.record_extra(CollectiveRecord("start[ddp]", "broadcast", n, sent, received))
        cfg = self.config
        self.hook_state = psgd.PowerSGDState(
            process_group=self.group,
            matrix_approximation_rank=cfg.rank,
            start_powerSGD_iter=cfg.start_iter,
            min_compression_rate=cfg.min_compression_rate,
            use_error_feedback=True,
            warm_start=True,
        )
        # Unannotated: DDP compares a hook's annotations with dist.GradBucket, and postponed
        # annotations are strings.
        self.ddp.register_comm_hook(self.hook_state, lambda state, bucket: self._hook(state, bucket))
        return self.ddp

    def _hook(self, state: psgd.PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not self.ledger.in_step:
            self.ledger.begin_step()
        warm = state.iter < state.start_powerSGD_iter  # read before the hook counts the step
        fut = psgd.powerSGD_hook(state, bucket)
        if dist.get_backend(self.group) == "gloo":
            # The hook chains its all-reduces in callbacks, which Gloo runs as they finish:
            # with several DDP buckets, ranks then issued collectives in different orders
            # (hangs; "Received data size doesn't match" at N = 4). One bucket at a time.
            fut.wait()
        n = dist.get_world_size(self.group)
        if warm:
            self._record("bucket", bucket.buffer().numel(), n)
        else:
            k = bucket.index()
            self._record("uncompressed", self._uncompressed(bucket.gradients()), n)
            self._record("P", state.p_memory_dict[k].numel(), n)
            self._record("Q", state.q_memory_dict[k].numel(), n)
        return fut

    def _uncompressed(self, grads: list[torch.Tensor]) -> int:
        """Elements the hook all-reduces uncompressed: vectors, and matrices too small to gain."""
        total = 0
        for g in grads:
            rows, cols = (g.shape[0], g.numel() // g.shape[0]) if g.ndim > 1 else (0, 0)
            compress = (
                g.ndim > 1
                and psgd._should_compress(rows, cols, self.config.rank, self.config.min_compression_rate)[0]
            )
            total += 0 if compress else g.numel()
        return total

    def _record(self, name: str, numel: int, n: int) -> None:
        # The ring's cost model needs N whole chunks: the remainder counts as padding.
        padded = -(-numel // n) * n
        sent, received = all_reduce_traffic(Traffic(payload=32 * numel, padding=32 * (padded - numel)), n)
        self.ledger.record(CollectiveRecord(name, "all_reduce", n, sent, received))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.ddp is None:
            raise RuntimeError("PowerSGD.step() before wrap(module): the gradients were never averaged")
        loss = self.inner.step(closure)
        if not self.ledger.in_step:  # a backward with no bucket (no gradient anywhere)
            self.ledger.begin_step()
        self.ledger.end_step()
        return loss
