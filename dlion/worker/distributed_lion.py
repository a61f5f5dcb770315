"""Distributed Lion: each rank sends one bit per parameter, all ranks apply the same vote."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from dlion.aggregate.meta import StepMeta
from dlion.aggregate.topology import BucketWire, align_bytes, vote_bits
from dlion.compress.buckets import Bucket, plan_buckets
from dlion.compress.sign import result_layout
from dlion.compress.sign_ops import SignOps, ops_for
from dlion.server import Hello, ServerClient, ServerLink
from dlion.transport import Comm
from dlion.wire import TIE_STREAM, ZERO_STREAM, derive_key, extend_key
from dlion.worker.base import CommOptimizer, Grads
from dlion.worker.byzantine import Byzantine, attack_of, corrupt_bucket
from dlion.worker.checks import first_nonfinite
from dlion.worker.config import (
    Backend,
    Binarize,
    DistributedLionConfig,
    NonFinite,
    Start,
    Tie,
    Transport,
    Vote,
    check_lion_hyperparameters,
)
from dlion.worker.overlap import Launching
from dlion.worker.runners import Encoded, Runner, TensorRunner, Voted, can_be_flat, lion_alone, stage_all


@dataclass
class LionStep:
    """A step the ranks agreed to take: which tensors any rank has a gradient for, and what
    overlap already voted."""

    grads: Grads
    present: np.ndarray  # bool[T]
    early: list[Voted] | None
    n_buckets: int


class DistributedLion(CommOptimizer[LionStep]):
    """Distributed Lion (Liu et al., NeurIPS 2024): a drop-in torch.optim.Optimizer.

    Every rank keeps its own Lion momentum. Per step, with N ranks:

      1-2. Check and agree (dlion.worker.base): NaN/Inf scans (flat CUDA buckets: staged,
         then one fused check), the fingerprint once (and, by ``start``, rank 0's parameters
         broadcast to every rank, or checked equal), the step metadata every step; every
         rank raises, skips the step or goes on alike. A tensor no rank has a gradient for
         is skipped as in torch.optim; a rank without one for a tensor others have votes g = 0.
      3. Encode, per bucket: the fused sign step c = b1*m + (1-b1)*g, its sign packed to one
         bit per parameter, m <- b2*m + (1-b2)*g (one kernel per bucket for flat CUDA
         buckets, else per tensor: dlion.worker.runners). A c of exactly 0 takes a seeded
         fair coin (bit 1 = positive) so it adds no drift. With ``binarize="stochastic"``
         (dlion-sto) the bit is a seeded coin, positive with probability
         (1 + clip(c / mean|c|, -1, 1)) / 2, so the averaged signs are unbiased. With ``byzantine``, the attacking
         ranks then corrupt their bits (dlion.worker.byzantine); their momentum stays honest.
      4. Exchange, by ``backend``: "allgather" gathers every rank's bits ((N-1)/8 bytes per
         parameter each way); "sharded" runs all_to_all, a vote of this rank's shard, and an
         all_gather of the voted shards (2 (N-1)/N / 8 bytes per parameter for a 1-bit
         result); "server" sends the bits to a parameter server, which votes and sends the
         result back (1/8 byte up, B/8 down). The server is rank 0 (gather, broadcast), or
         with ``server=`` a process of its own (``dlion.server``; call ``close()`` after the
         last step so it stops).
      5. Combine, where the exchange puts it, on the packed words, identical on all ranks
         and across backends: "majority" = sign of the sum (even splits by ``tie``),
         "average" = mean of the signs (counts of +1 votes, ceil(log2(N+1)) bit planes).
      6. Apply: p <- p*(1 - lr*wd) - lr*update, with each param group's lr and wd (with
         ``cautious_wd``, no decay where the update and p have opposite signs).

    With ``overlap=True``, phases 3-5 of a bucket start from gradient hooks as soon as its
    gradients are in (dlion.worker.overlap), and step() runs phase 2 after them; the new
    momentum is committed only once the step goes ahead, so results are the same. The same
    per-bucket phases are ``vote_bucket`` and ``apply_bucket``, callable from outside step().

    With world size 1 (or no process group) and ``force_comm=False``, phases 2-5 are
    skipped and the update is exactly ``dlion.Lion``'s. ``ledger`` records every
    collective's bytes (payload, padding, metadata) per step.
    """

    STATE_KEY = "dlion"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        vote: Vote = "majority",
        process_group: Any = None,
        *,
        tie: Tie = "random",
        backend: Backend = "sharded",
        transport: Transport = "torch",
        nonfinite: NonFinite = "raise",
        seed: int = 0,
        bucket_numel: int = 1 << 25,
        force_comm: bool = False,
        timeout: timedelta | None = None,
        server: ServerLink | None = None,
        cautious_wd: bool = False,
        byzantine: Byzantine | None = None,
        overlap: bool = False,
        start: Start = "broadcast",
        binarize: Binarize = "sign",
    ) -> None:
        check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
        config = DistributedLionConfig(
            vote=vote, tie=tie, backend=backend, transport=transport, nonfinite=nonfinite, seed=seed,
            bucket_numel=bucket_numel, force_comm=force_comm, timeout=timeout, cautious_wd=cautious_wd,
            byzantine=byzantine, overlap=overlap, dedicated_server=server is not None, start=start,
            binarize=binarize,
        )  # fmt: skip
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults, config=config, process_group=process_group)
        self.config: DistributedLionConfig = config
        self._server = ServerClient(server, self.ledger) if server is not None else None
        self._early: list[Voted] | None = None  # what overlap voted during this step's backward
        self.launching = Launching(self.vote_bucket)  # what starts buckets during backward
        self._params_changed()

    def _params_changed(self) -> None:
        """Plan the buckets, their wires and runners (chosen once per plan), and what starts
        them during backward, for the parameters and the world of now."""
        cfg = self.config
        self._attack = attack_of(cfg.byzantine, self.rank, self.world_size)
        align = align_bytes(cfg.backend, self.world_size)
        self._buckets: list[Bucket] = plan_buckets(
            [p.numel() for p, _ in self._flat], cfg.bucket_numel, align
        )
        self._wires = [BucketWire.of(f"bucket{k}", b) for k, b in enumerate(self._buckets)]
        self._runners: list[Runner] = [self._runner(b) for b in self._buckets]
        params = [[p for p, _ in self.pairs(b)] for b in self._buckets]
        self.launching.plan(
            params, hooks=cfg.overlap, possible=cfg.launches_in_backward and self.communicates
        )

    @property
    def communicates(self) -> bool:
        # A dedicated server waits for every worker's bits, even with a single worker.
        forced = self._server is not None or self.config.force_comm
        return self._comm is not None and (self._comm.world_size > 1 or forced)

    def _runner(self, bucket: Bucket) -> Runner:
        """How a bucket runs, for the life of the optimizer: flat CUDA buffers, or per tensor."""
        if self.stochastic:
            return TensorRunner(self, bucket)
        if can_be_flat([p for p, _ in self.pairs(bucket)]):
            from dlion.worker.flat import FlatRunner  # loads the CUDA kernels: flat buckets only

            return FlatRunner(self, bucket)
        return TensorRunner(self, bucket)

    # ---- what the runners read (dlion.worker.runners.Owner)

    def pairs(self, bucket: Bucket) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [self._flat[s.index] for s in bucket.slots]

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        return self._fp32_state(p, "exp_avg")

    @property
    def stochastic(self) -> bool:
        return self.config.binarize == "stochastic"

    def sign_ops(self) -> SignOps:
        # torch.optim refuses an empty parameter list, so there is always a first tensor.
        return ops_for(self._flat[0][0].device)

    # ---- the plan's hooks

    def _step_alone(self, grads: Grads) -> bool:
        """A world of one: plain Lion, the update of dlion.Lion, nothing sent."""
        pairs = zip(self._flat, grads, strict=True)

        def tensors() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]:
            return [(p, g, self.momentum(p), group) for (p, group), g in pairs if g is not None]

        bad = lion_alone(self._runners, self._per_bucket(grads), grads, tensors, self.config.cautious_wd)
        if bad >= 0:
            self._nonfinite(0, bad)
        return True

    def _local(self, grads: Grads) -> int:
        """Stage the flat buckets and scan: one fused check when every bucket is flat. With
        overlap, launch what backward did not, in the same order on every rank, before the
        metadata exchange."""
        ok = stage_all(self._runners, self._per_bucket(grads))
        bad = -1 if ok is not None and bool(ok) else first_nonfinite(grads)
        self._early = self.launching.collect()
        return bad

    def _first_contact(self, comm: Comm) -> None:
        if self._server is not None:
            cfg = self.config
            self._server.hello(Hello.of(comm.world_size, cfg.vote, cfg.tie, cfg.seed, self._wires))

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> LionStep:
        if self._server is not None:
            self._server.begin_step(self.steps_taken)
        return LionStep(grads, meta.present, self._early, len(self._buckets))

    def _encode(self, work: LionStep, k: int) -> Encoded | None:
        if work.early is not None:
            return None  # overlap ran phases 3-5 of this bucket during backward
        return self._sign_step(k, self._bucket_grads(k, work.grads), work.present, defer=False)

    def _exchange(self, comm: Comm | None, work: LionStep, k: int, packet: Encoded | None) -> Voted:
        if work.early is not None:
            return work.early[k]
        assert comm is not None and packet is not None
        return self._vote(comm, k, packet, deferred=False)

    def _apply(self, work: LionStep, k: int, voted: Voted) -> None:
        self.apply_bucket(k, voted, work.present)

    def _after_step(self) -> None:
        self._early = None
        self.launching.arm()  # the first step has checked the fingerprint

    # ---- one bucket, from step() or from outside it (gradient hooks)

    def vote_bucket(self, k: int, grads: Grads, *, defer: bool = True) -> Voted:
        """Phases 3-5 of bucket k, outside step() (overlap's gradient hooks): ``grads`` are
        the bucket's, in slot order (None: no gradient on this rank). With ``defer`` the new
        momentum waits for ``apply_bucket``, which keeps it only if the step goes ahead."""
        assert self._comm is not None
        if not self.ledger.in_step:
            self.ledger.begin_step()
        self._runners[k].bind()
        return self._vote(self._comm, k, self._sign_step(k, grads, None, defer=defer), deferred=defer)

    def apply_bucket(self, k: int, voted: Voted, present: np.ndarray) -> None:
        """Phase 6 of bucket k: the same update on every rank, then any deferred momentum."""
        live = [bool(present[s.index]) for s in self._buckets[k].slots]
        self._runners[k].apply(voted.planes, voted.table, live, self.config.cautious_wd)
        if voted.deferred:
            self._runners[k].commit(live)

    def _bucket_grads(self, k: int, grads: Grads) -> Grads:
        return [grads[s.index] for s in self._buckets[k].slots]

    def _per_bucket(self, grads: Grads) -> list[Grads]:
        return [self._bucket_grads(k, grads) for k in range(len(self._buckets))]

    def _sign_step(self, k: int, grads: Grads, present: np.ndarray | None, *, defer: bool) -> Encoded:
        """Phase 3 of bucket k (its grads, slot order) into its send buffer. ``present`` (None:
        every tensor) says which tensors any rank has a gradient for; this rank votes with
        g = 0 where it has none."""
        bucket = self._buckets[k]
        live = [present is None or bool(present[s.index]) for s in bucket.slots]
        send = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=self._flat[0][0].device)
        prefix = derive_key(self.config.seed, ZERO_STREAM, self.steps_taken, self.rank)
        keys = [extend_key(prefix, s.index) for s in bucket.slots]
        keep = self._runners[k].sign_step(grads, live, send, keys, defer=defer)
        if self._attack is not None:
            at = {"seed": self.config.seed, "step": self.steps_taken, "rank": self.rank}
            corrupt_bucket(send, bucket.slots, live, self._attack, **at)
        return Encoded(send, keep)

    def _vote(self, comm: Comm, k: int, encoded: Encoded, *, deferred: bool) -> Voted:
        """Phases 4-5 of bucket k: the exchange picks where the vote (``combine``) runs."""
        cfg, ops = self.config, self.sign_ops()
        tie_key = derive_key(cfg.seed, TIE_STREAM, self.steps_taken, k)

        def combine(packets: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
            return ops.combine(packets, vote=cfg.vote, tie=cfg.tie, tie_key=tie_key, start=start)

        # Workers size a server's reply before it arrives: no length on the wire.
        result = result_layout(vote=cfg.vote, tie=cfg.tie, n_workers=comm.world_size)
        if self._server is not None:
            planes = self._server.exchange(encoded.send, self._wires[k], result[0])
            return Voted(planes, torch.from_numpy(result[1]), deferred, encoded.keep)
        planes, table = vote_bits(
            cfg.backend, comm, encoded.send, self._wires[k], combine, self.ledger, result
        )
        return Voted(planes, table, deferred, encoded.keep)

    def close(self) -> dict[str, Any] | None:
        """End of training, on every worker after the last step: a dedicated parameter server
        stops once every worker closes, and returns its traffic totals (None without one; a
        second call returns them again). Gradient and DDP hooks stop launching buckets."""
        self.launching.stop()
        return self._server.close() if self._server is not None else None

    def stop_launching(self) -> None:
        """No more buckets start during backward: gradient hooks removed, DDP hooks detached."""
        self.launching.stop()

    def _state_extra(self) -> dict[str, int]:
        return {"world_size": self.world_size, "rank": self.rank}
