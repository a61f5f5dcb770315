"""Distributed Lion: each rank sends one bit per parameter, all ranks apply the same vote."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dlion.compress.sign import TIE_STREAM, ZERO_STREAM, result_layout
from dlion.compress.sign_ops import SignOps, ops_for
from dlion.kernels.reference import derive_key, extend_key
from dlion.server.comm import TorchComm, world_comm
from dlion.server.ledger import Ledger
from dlion.server.meta import check_fingerprint, exchange_step_meta
from dlion.server.ps import Hello, ServerClient, ServerLink
from dlion.server.topology import TOPOLOGIES, BucketWire, align_bytes, server_vote
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
from dlion.worker.buckets import Bucket, plan_buckets
from dlion.worker.byzantine import Byzantine, attack_key, attack_of, corrupt_signs
from dlion.worker.config import DistributedLionConfig, Tie, Vote, check_lion_hyperparameters
from dlion.worker.flat import FlatBuckets
from dlion.worker.lion import lion_update, run_closure

__all__ = ["DistributedLion", "NonFiniteGradientError"]  # the error lives in agreement


class DistributedLion(CommRanks, torch.optim.Optimizer):
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
        self._comm: TorchComm | None = world_comm(process_group, timeout, transport)
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
        cfg = self.config
        ops = self._ops()
        self.ledger.begin_step()
        try:
            # Phase 1: local checks, and once, the fingerprint exchange.
            if not self._checked:
                check_fingerprint(comm, [p for p, _ in self._flat], self._config_text(), self.ledger)
                if self._server is not None:
                    self._server.hello(self._hello(comm.world_size))
                self._checked = True
            present = np.array([g is not None for g in grads], dtype=bool)
            flats = self._flats.bind(self.state)
            bad = self._flats.stage_and_scan(grads)
            # Phase 2: metadata exchange; all ranks branch alike.
            meta = exchange_step_meta(comm, present, bad, self.ledger)
            if meta.bad_rank >= 0 and self._nonfinite(rank=meta.bad_rank, index=meta.bad_index):
                return
            if self._server is not None:
                self._server.begin_step(self.steps_taken)
            for k, bucket in enumerate(self._buckets):
                # Phase 3: fused sign step into the bucket's send buffer.
                send = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=self._flat[0][0].device)
                flat = flats[k] if all(meta.present[s.index] for s in bucket.slots) else None
                if flat is not None:
                    prefix = derive_key(cfg.seed, ZERO_STREAM, self.steps_taken, comm.rank)
                    keys = [extend_key(prefix, s.index) for s in bucket.slots]
                    flat.sign_step(send, self._flats.scalars(k)[0], keys)
                for s in bucket.slots:
                    if not meta.present[s.index]:
                        continue
                    p, group = self._flat[s.index]
                    g = grads[s.index]
                    if flat is None:
                        b1, b2 = group["betas"]
                        key = derive_key(cfg.seed, ZERO_STREAM, self.steps_taken, comm.rank, s.index)
                        ops.sign_step(
                            g if g is not None else torch.zeros_like(p),
                            self._momentum(p),
                            send[s.byte_offset : s.byte_offset + s.nbytes],
                            b1,
                            b2,
                            key,
                        )
                    if self._attack is not None:
                        where = send[s.byte_offset : s.byte_offset + s.nbytes]
                        bad_key = attack_key(cfg.seed, self.steps_taken, comm.rank, s.index)
                        corrupt_signs(where, s.numel, self._attack, bad_key)
                # Phases 4-5: exchange the packed bits and vote, by the chosen topology.
                tie_key = derive_key(cfg.seed, TIE_STREAM, self.steps_taken, k)

                def combine(packets: torch.Tensor, start: int, key: int = tie_key) -> Any:
                    return ops.combine(packets, vote=cfg.vote, tie=cfg.tie, tie_key=key, start=start)

                planes, table = self._exchange(comm, send, k, combine)
                # Phase 6: apply the same update on every rank.
                if flat is not None:
                    flat.apply(planes, table, self._flats.scalars(k)[1], cfg.cautious_wd)
                    continue
                for s in bucket.slots:
                    if meta.present[s.index]:
                        p, group = self._flat[s.index]
                        ops.apply(
                            p,
                            planes[:, s.byte_offset : s.byte_offset + s.nbytes],
                            table,
                            group["lr"],
                            group["weight_decay"],
                            cfg.cautious_wd,
                        )
        finally:
            self.ledger.end_step()

    def _exchange(self, comm: TorchComm, send: torch.Tensor, k: int, combine: Any) -> Any:
        cfg = self.config
        if cfg.backend == "server":
            # Workers size the server's reply before it arrives: no length on the wire.
            planes, table = result_layout(vote=cfg.vote, tie=cfg.tie, n_workers=comm.world_size)
            if self._server is not None:
                return self._server.exchange(send, self._wires[k], planes), torch.from_numpy(table)
            return server_vote(
                comm, send, self._wires[k], combine, self.ledger,
                result_planes=planes, table=torch.from_numpy(table).to(send.device),
            )  # fmt: skip
        return TOPOLOGIES[cfg.backend](comm, send, self._wires[k], combine, self.ledger)

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
        (None without a dedicated server); calling it again returns them again.
        """
        return self._server.close() if self._server is not None else None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dlion"] = counters_state(self) | {"world_size": self.world_size, "rank": self.rank}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(restore_counters(self, state_dict, "dlion"))
        self._flat = params_with_groups(self.param_groups)
        self._flats.groups_from(self._flat)
