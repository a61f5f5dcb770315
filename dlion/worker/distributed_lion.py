"""Distributed Lion: each rank sends one bit per parameter, all ranks apply the same vote."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dlion.aggregate.meta import check_fingerprint, exchange_step_meta
from dlion.aggregate.topology import BucketWire, align_bytes
from dlion.compress.sign import result_layout
from dlion.compress.sign_ops import SignOps, ops_for
from dlion.ledger import Ledger
from dlion.server import Hello, ServerClient, ServerLink
from dlion.transport import TorchComm, make_comm
from dlion.worker.agreement import (
    CommRanks,
    NonFiniteGradientError,
    config_text,
    counters_state,
    first_nonfinite,
    params_with_groups,
    raise_nonfinite,
    restore_counters,
)
from dlion.worker.bucket_phases import BucketPhases, Voted
from dlion.worker.buckets import Bucket, plan_buckets
from dlion.worker.byzantine import Byzantine, attack_of
from dlion.worker.config import DistributedLionConfig, Tie, Vote, check_lion_hyperparameters
from dlion.worker.flat import FlatBuckets
from dlion.worker.lion import lion_update, run_closure
from dlion.worker.overlap import Overlap

__all__ = ["DistributedLion", "NonFiniteGradientError"]  # the error lives in agreement


class DistributedLion(BucketPhases, CommRanks, torch.optim.Optimizer):
    """Distributed Lion (Liu et al., NeurIPS 2024): a drop-in torch.optim.Optimizer.

    Every rank keeps its own Lion momentum. Per step, with N ranks:

      1. Local checks. Gradients must be dense floating point; each tensor is scanned
         for NaN/Inf. On the first step a fingerprint all_gather (5 int64 per rank)
         checks that all ranks hold the same parameter list and config.
      2. Metadata all_gather (4 + ceil(T/8) bytes per rank for T tensors): which tensors
         have a gradient on each rank and the first non-finite one. Every rank then takes
         the same branch: raise NonFiniteGradientError, skip the step (nonfinite="skip"),
         or go on. A tensor no rank has a gradient for is skipped like in torch.optim;
         a rank without a gradient for a tensor others have one for votes with g = 0.
      3. Sign step (fused kernel per tensor): c = b1*m + (1-b1)*g, its sign packed to one
         bit per parameter in the tensor's flat bucket, m <- b2*m + (1-b2)*g. A c of
         exactly 0 takes a seeded fair coin (bit 1 = positive) so it adds no drift.
         With ``byzantine``, the attacking ranks then corrupt their bits
         (dlion.worker.byzantine); their momentum stays honest.
      4. Exchange per bucket, by ``backend``: "allgather" gathers every rank's bits
         ((N-1)/8 bytes per parameter each way); "sharded" runs all_to_all, a vote of
         this rank's shard, and an all_gather of the voted shards (2 (N-1)/N / 8 bytes
         per parameter for a 1-bit result); "server" sends the bits to a parameter
         server, which votes and sends the result back (1/8 byte up, B/8 down). The
         server is rank 0 (gather, broadcast), or with ``server=`` a process of its own
         (``dlion.server.ps``; call ``close()`` after the last step so it stops).
      5. Vote on the packed words, identical on all ranks and across backends: "majority"
         = sign of the sum (even splits by ``tie``), "average" = mean of the signs
         (counts of +1 votes, ceil(log2(N+1)) bit planes).
      6. Apply: p <- p*(1 - lr*wd) - lr*update, with each param group's lr and wd
         (with ``cautious_wd``, no decay where the update and p have opposite signs).

    With ``overlap=True``, phases 3-5 of a bucket start from gradient hooks as soon as its
    gradients are in (dlion.worker.overlap), and step() runs phase 2 after them; the new
    momentum is committed only once the step goes ahead, so results are the same.

    With world size 1 (or no process group) and ``force_comm=False``, steps 1-2 and 4-5
    are skipped and the update is exactly ``dlion.Lion``'s. ``ledger`` records every
    collective's bytes (payload, padding, metadata) per step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        vote: Vote = "majority",
        process_group: dist.ProcessGroup | None = None,
        *,
        tie: Tie = "random",
        backend: str = "allgather",
        transport: str = "torch",
        nonfinite: str = "raise",
        seed: int = 0,
        bucket_numel: int = 1 << 25,
        force_comm: bool = False,
        timeout: timedelta | None = None,
        server: ServerLink | None = None,
        cautious_wd: bool = False,
        byzantine: Byzantine | None = None,
        overlap: bool = False,
    ) -> None:
        check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
        self.config = DistributedLionConfig(
            vote=vote,
            tie=tie,
            backend=backend,  # type: ignore[arg-type]
            transport=transport,  # type: ignore[arg-type]
            nonfinite=nonfinite,  # type: ignore[arg-type]
            seed=seed,
            bucket_numel=bucket_numel,
            force_comm=force_comm,
            timeout=timeout,
            cautious_wd=cautious_wd,
            byzantine=byzantine,
            overlap=overlap,
        )
        if server is not None and backend != "server":
            raise ValueError(
                f"server= is a dedicated parameter server; it needs backend='server', not {backend!r}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self._flat = params_with_groups(self.param_groups)
        self._names = [self._param_name(i) for i in range(len(self._flat))]
        for i, (p, _) in enumerate(self._flat):
            if not p.is_floating_point():
                raise TypeError(
                    f"DistributedLion needs floating-point parameters; {self._names[i]} is {p.dtype}"
                )
        self._comm: TorchComm | None = make_comm(process_group, timeout, transport)
        self._attack = attack_of(byzantine, self.rank, self.world_size)
        align = align_bytes(backend, self.world_size)
        self._buckets: list[Bucket] = plan_buckets([p.numel() for p, _ in self._flat], bucket_numel, align)
        self._wires = [
            BucketWire(
                f"bucket{k}",
                b.nbytes,
                tuple((8 * s.byte_offset, 8 * s.byte_offset + s.numel) for s in b.slots),
            )
            for k, b in enumerate(self._buckets)
        ]
        self.ledger = Ledger(n_params=sum(p.numel() for p, _ in self._flat))
        self._server = ServerClient(server, self.ledger) if server is not None else None
        self._flats = FlatBuckets(self._buckets, self._flat)  # CUDA: one launch per bucket
        self._overlap: Overlap | None = None
        if overlap and self._comm is not None and (self._comm.world_size > 1 or force_comm):
            params = [[self._flat[s.index][0] for s in b.slots] for b in self._buckets]
            self._overlap = Overlap(params, self._overlap_launch)
        self.steps_taken = 0  # steps that ran (skipped ones included): keys the coins
        self.skipped_steps = 0
        self._checked = False

    def _param_name(self, i: int) -> str:
        count = 0
        for group in self.param_groups:
            names = group.get("param_names")
            if i < count + len(group["params"]):
                j = i - count
                shape = tuple(group["params"][j].shape)
                return f"parameter {names[j]!r} {shape}" if names else f"parameter #{i} {shape}"
            count += len(group["params"])
        raise IndexError(i)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        grads = [self._checked_grad(i, p) for i, (p, _) in enumerate(self._flat)]
        # A dedicated server waits for every worker's bits, even with a single worker.
        solo = self._server is None and not self.config.force_comm
        if self._comm is None or (self._comm.world_size == 1 and solo):
            self._step_local(grads)
        else:
            self._step_distributed(self._comm, grads)
        self.steps_taken += 1
        return loss

    def _checked_grad(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        g = p.grad
        if g is None:
            return None
        if g.is_sparse:
            raise TypeError(f"DistributedLion does not support sparse gradients ({self._names[i]})")
        if not g.is_floating_point():
            raise TypeError(f"gradient of {self._names[i]} is {g.dtype}; expected a floating-point dtype")
        return g

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        m = state.get("exp_avg")
        if m is None:
            m = state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        elif m.dtype != torch.float32 or not m.is_contiguous():
            # torch's load_state_dict casts state to the parameter dtype; momentum stays fp32.
            m = state["exp_avg"] = m.to(torch.float32).contiguous()
        return m

    def _step_local(self, grads: list[torch.Tensor | None]) -> None:
        """World size 1: plain Lion, no bits."""
        self._flats.bind(self.state)
        if self._flats.all_flat and all(g is not None for g in grads):
            if not bool(self._flats.lion(grads, self.config.cautious_wd)):  # read after the launches
                self._nonfinite(rank=0, index=first_nonfinite(grads))
            return
        bad = first_nonfinite(grads)
        if bad >= 0 and self._nonfinite(rank=0, index=bad):
            return
        for (p, group), g in zip(self._flat, grads, strict=True):
            if g is None:
                continue
            b1, b2 = group["betas"]
            lion_update(
                p,
                g,
                self._momentum(p),
                lr=group["lr"],
                beta1=b1,
                beta2=b2,
                weight_decay=group["weight_decay"],
                cautious=self.config.cautious_wd,
            )

    def _ops(self) -> SignOps:
        # torch.optim refuses an empty parameter list, so there is always a first tensor.
        return ops_for(self._flat[0][0].device)

    def _nonfinite(self, *, rank: int, index: int) -> bool:
        """Raise, or return True to skip the step; the same on every rank."""
        where = f"rank {rank}, {self._names[index]}"
        raise_nonfinite(self.config.nonfinite, where=where, step=self.steps_taken)
        self.skipped_steps += 1
        return True

    def _step_distributed(self, comm: TorchComm, grads: list[torch.Tensor | None]) -> None:
        if not self.ledger.in_step:  # a gradient hook may have opened it (overlap)
            self.ledger.begin_step()
        try:
            # Phase 1: local checks, and once, the fingerprint exchange.
            if not self._checked:
                check_fingerprint(comm, [p for p, _ in self._flat], self._config_text(), self.ledger)
                if self._server is not None:
                    self._server.hello(self._hello(comm.world_size))
                self._checked = True
            present = np.array([g is not None for g in grads], dtype=bool)
            self._flats.bind(self.state)
            bad = self._flats.stage_and_scan(grads)
            # With overlap, buckets whose gradients all came in during backward already
            # ran phases 3-5 from the gradient hooks; the rest run now, in the same order.
            early = self._overlap.collect() if self._overlap is not None and self._overlap.armed else None
            # Phase 2: metadata exchange; all ranks branch alike.
            meta = exchange_step_meta(comm, present, bad, self.ledger)
            if meta.bad_rank >= 0 and self._nonfinite(rank=meta.bad_rank, index=meta.bad_index):
                return  # deferred momenta are dropped: the step never happened
            if self._server is not None:
                self._server.begin_step(self.steps_taken)
            for k in range(len(self._buckets)):
                # Phases 3-5: sign bits, exchange, vote (unless overlap ran them); phase 6: apply.
                if early is not None:
                    voted = early[k]
                else:
                    voted = self._vote_bucket(comm, k, grads, meta.present, defer=False)
                self._apply_bucket(k, voted, meta.present)
        finally:
            self.ledger.end_step()
            if self._overlap is not None:
                self._overlap.armed = True  # the first step has checked the fingerprint

    def _overlap_launch(self, k: int, bucket_grads: list[torch.Tensor | None]) -> Voted:
        """From a gradient hook: phases 3-5 of bucket k, its momentum deferred."""
        assert self._comm is not None
        if not self.ledger.in_step:
            self.ledger.begin_step()
        grads: list[torch.Tensor | None] = [None] * len(self._flat)
        for s, g in zip(self._buckets[k].slots, bucket_grads, strict=True):
            grads[s.index] = g
        return self._vote_bucket(self._comm, k, grads, None, defer=True)

    def _config_text(self) -> str:
        return config_text(self.config, server="dedicated" if self._server is not None else "rank 0")

    def _hello(self, n_workers: int) -> Hello:
        cfg = self.config
        planes, _ = result_layout(vote=cfg.vote, tie=cfg.tie, n_workers=n_workers)
        buckets = tuple((w.nbytes, w.payload_bits_in(0, w.nbytes)) for w in self._wires)
        return Hello(n_workers, cfg.vote, cfg.tie, cfg.seed, planes, buckets)

    def close(self) -> dict[str, Any] | None:
        """End of training: a dedicated parameter server stops once every worker closes.

        Call it on every worker after the last step. Returns the server's traffic totals
        (None without a dedicated server); calling it again returns them again. With
        ``overlap``, it also removes the gradient hooks.
        """
        if self._overlap is not None:
            self._overlap.remove()
            self._overlap = None
        return self._server.close() if self._server is not None else None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dlion"] = counters_state(self) | {"world_size": self.world_size, "rank": self.rank}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(restore_counters(self, state_dict, "dlion"))
        self._flat = params_with_groups(self.param_groups)
        self._flats.groups_from(self._flat)
