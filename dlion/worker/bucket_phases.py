"""Phases 3 to 6 of DistributedLion for one bucket: sign bits, exchange and vote, apply.

A mixin of DistributedLion, so that step() (and, with ``overlap``, a gradient hook) reads
as the plan in its docstring while the per-bucket work lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dlion.aggregate.topology import TOPOLOGIES, server_vote
from dlion.compress.sign import result_layout
from dlion.compress.sign_ops import SignOps
from dlion.transport import TorchComm
from dlion.wire import TIE_STREAM, ZERO_STREAM, derive_key, extend_key
from dlion.worker.byzantine import attack_key, corrupt_signs


@dataclass
class Voted:
    """A bucket after phase 5: the update as planes + table, and momenta not yet committed
    (``defer``: the sign step ran before every rank agreed the step goes ahead)."""

    planes: torch.Tensor
    table: torch.Tensor
    flat_deferred: bool = False
    deferred: dict[int, torch.Tensor] = field(default_factory=dict)  # tensor index -> momentum

    def record_stream(self, stream: Any) -> None:
        for t in (self.planes, self.table, *self.deferred.values()):
            if t.is_cuda:
                t.record_stream(stream)


class BucketPhases:
    # Set by DistributedLion.__init__.
    config: Any
    ledger: Any
    steps_taken: int
    _flat: list[tuple[torch.Tensor, dict[str, Any]]]
    _flats: Any
    _buckets: list[Any]
    _wires: list[Any]
    _server: Any
    _attack: str | None
    state: Any

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ops(self) -> SignOps:
        raise NotImplementedError

    def _vote_bucket(
        self,
        comm: TorchComm,
        k: int,
        grads: list[torch.Tensor | None],
        present: np.ndarray | None,
        *,
        defer: bool,
    ) -> Voted:
        """Phases 3 to 5 for bucket k. ``present`` (None: every tensor) says which tensors
        any rank has a gradient for; this rank votes with g = 0 where it has none."""
        cfg, ops, bucket = self.config, self._ops(), self._buckets[k]
        send = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=self._flat[0][0].device)
        deferred: dict[int, torch.Tensor] = {}
        live = [s for s in bucket.slots if present is None or present[s.index]]
        flat = self._flats.item(k) if len(live) == len(bucket.slots) else None
        prefix = derive_key(cfg.seed, ZERO_STREAM, self.steps_taken, comm.rank)
        # Phase 3: fused sign step into the bucket's send buffer (one launch if flat).
        if flat is not None:
            flat.stage([grads[s.index] for s in bucket.slots])  # a no-op once staged
            keys = [extend_key(prefix, s.index) for s in bucket.slots]
            flat.sign_step(send, self._flats.scalars(k)[0], keys, defer=defer)
        for s in live:
            bits = send[s.byte_offset : s.byte_offset + s.nbytes]
            if flat is None:
                p, group = self._flat[s.index]
                g = grads[s.index]
                if defer:  # a copy, and no state yet for a tensor the step may skip
                    has = "exp_avg" in self.state.get(p, {})
                    m = self._momentum(p).clone() if has else torch.zeros(p.shape, device=p.device)
                    deferred[s.index] = m
                else:
                    m = self._momentum(p)
                b1, b2 = group["betas"]
                key = extend_key(prefix, s.index)
                ops.sign_step(g if g is not None else torch.zeros_like(p), m, bits, b1, b2, key)
            if self._attack is not None:
                corrupt_signs(
                    bits, s.numel, self._attack, attack_key(cfg.seed, self.steps_taken, comm.rank, s.index)
                )
        # Phases 4-5: exchange the packed bits and vote, by the chosen topology.
        tie_key = derive_key(cfg.seed, TIE_STREAM, self.steps_taken, k)

        def combine(packets: torch.Tensor, start: int, key: int = tie_key) -> Any:
            return ops.combine(packets, vote=cfg.vote, tie=cfg.tie, tie_key=key, start=start)

        planes, table = self._exchange(comm, send, k, combine)
        return Voted(planes, table, flat_deferred=defer and flat is not None, deferred=deferred)

    def _apply_bucket(self, k: int, voted: Voted, present: np.ndarray) -> None:
        """Phase 6: the same update on every rank, then any deferred momentum."""
        cfg, ops, bucket = self.config, self._ops(), self._buckets[k]
        flat = self._flats.item(k) if all(present[s.index] for s in bucket.slots) else None
        if flat is not None:
            flat.apply(voted.planes, voted.table, self._flats.scalars(k)[1], cfg.cautious_wd)
        else:
            for s in bucket.slots:
                if present[s.index]:
                    p, group = self._flat[s.index]
                    bits = voted.planes[:, s.byte_offset : s.byte_offset + s.nbytes]
                    ops.apply(p, bits, voted.table, group["lr"], group["weight_decay"], cfg.cautious_wd)
        if voted.flat_deferred:
            self._flats.item(k).commit([bool(present[s.index]) for s in bucket.slots])
        for index, m in voted.deferred.items():
            if present[index]:
                self._momentum(self._flat[index][0]).copy_(m)

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
