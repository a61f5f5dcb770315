"""Distributed Lion: each rank sends one bit per parameter, all ranks apply the same vote."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dlion.aggregate.meta import StepMeta, changed_code, first_nonfinite_on_device, local_code
from dlion.compress.buckets import Bucket
from dlion.server import Hello, ServerClient, ServerLink
from dlion.transport import Comm
from dlion.worker.core.base import CommOptimizer, Grads
from dlion.worker.core.checks import GradientChangedError, first_nonfinite
from dlion.worker.core.config import Vote, check_lion_hyperparameters, config_of
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.overlap import Launching
from dlion.worker.lion.plan import LionPlan, World, plan_lion
from dlion.worker.lion.runners import Encoded, Voted, lion_alone, stage_all

NO_REPLICAS = (
    "DistributedLion: no replicas to vote across (the parameters are sharded on a 1-D mesh): each "
    "shard takes plain Lion on FSDP's mean gradient and dlion sends nothing; pass a 2-D "
    "(replicate, shard) mesh to fully_shard to compress between nodes"
)
NOT_ATTACHED = (
    "DistributedLion over FSDP-sharded parameters without dlion.attach(model, optimizer): FSDP "
    "all-reduces every gradient across the replicas before the vote, so the vote saves no bytes "
    "(the result is still the same on every rank); attach after building the optimizer"
)


@dataclass
class LionStep:
    """A step the ranks agreed to take: which tensors any rank has a gradient for, and what
    overlap already voted. Agreed on the device, ``present`` is a device bool[T] and ``go``
    the device flag that gates every write."""

    grads: Grads
    present: Any  # bool[T]: NumPy, or a device tensor
    early: list[Voted] | None
    n_buckets: int
    go: torch.Tensor | None = None


class DistributedLion(CommOptimizer[LionStep]):
    """Distributed Lion (Liu et al., NeurIPS 2024): a drop-in torch.optim.Optimizer.

    Every rank keeps its own Lion momentum. Per step, with N ranks:

      1-2. Check and agree: the skeleton's (dlion.worker.core.base), the same for every
         optimizer. A tensor no rank has a gradient for is skipped as in torch.optim; a rank
         without one for a tensor others have votes 0.
      Phases 3-6 run per bucket along the bucket's route, chosen once when the optimizer
      plans (dlion.worker.lion.plan, routes): ``encode``, ``exchange``, ``apply``.
      3. Encode: the fused sign step c = b1*m + (1-b1)*g, its sign packed to one bit per
         parameter, m <- b2*m + (1-b2)*g (one kernel per flat CUDA bucket, else per tensor:
         dlion.worker.lion.runners); a c of exactly 0 takes a seeded fair coin (bit 1 =
         positive), so it adds no drift. The encoder (dlion.worker.lion.encoder) holds what a
         rank sends: ``binarize="stochastic"`` (dlion-sto) a seeded coin, positive with
         probability (1 + clip(c / mean|c|, -1, 1)) / 2, so averaged signs are unbiased;
         ``byzantine`` attacking ranks corrupt their bits, not their momentum.
      4. Exchange, by ``backend``: "allgather" gathers every rank's bits ((N-1)/8 bytes per
         parameter each way); "sharded" runs all_to_all, a vote of this rank's shard, and an
         all_gather of the voted shards (2 (N-1)/N / 8 bytes per parameter); "server" sends
         the bits to a parameter server (rank 0, or with ``server=`` a process of its own:
         call ``close()`` after the last step), which sends the vote back (1/8 up, B/8 down);
         "hierarchical": a node's ranks average, nodes vote (dlion.worker.lion.route_hier).
      5. Combine, where the exchange puts it, on the packed words, identical on all ranks
         and across backends: "majority" = sign of the sum (even splits by ``tie``),
         "average" = mean of the signs (counts of +1 votes, ceil(log2(N+1)) bit planes).
      6. Apply: p <- p*(1 - lr*wd) - lr*update, with each param group's lr and wd (with
         ``cautious_wd``, no decay where the update and p have opposite signs).

    With ``overlap=True`` (or under dlion.attach) phases 3-5 of a bucket start in backward as
    its gradients arrive (dlion.worker.lion.overlap); the momentum is committed once the step
    goes ahead, so results are the same; a gradient changed after its vote began raises on every
    rank. ``vote_bucket`` is phases 3-5 of one bucket, for outside step().

    At world size 1 (or without a process group; not ``force_comm``) phases 2-5 are skipped:
    the update is ``dlion.Lion``'s. ``ledger`` records every collective's bytes per step.
    """

    STATE_KEY = "dlion"
    _changed_here = -1  # on the device path, this rank's first gradient changed since backward
    PER_RANK_STATE = True  # each rank's momentum is its own
    TRAINS_SHARDS = True  # FSDP2's DTensors: each shard voted across its replicas (module doc)
    sharded_attached = False  # dlion.attach silenced FSDP's all-reduce across replicas

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        vote: Vote | None = None,
        process_group: Any = None,
        *,
        config: DistributedLionConfig | None = None,
        server: ServerLink | None = None,
        **options: Any,
    ) -> None:
        """``config``: how the ranks communicate (DistributedLionConfig); or, the keyword form,
        its fields as keywords (``vote="average", backend="allgather"``), not both.
        ``server``: a dedicated parameter server's link (backend "server"; the config's
        ``dedicated_server`` follows it)."""
        check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
        if vote is not None:  # the fifth positional argument, as before configs came whole
            options["vote"] = vote
        dedicated = server is not None
        if getattr(config, "dedicated_server", False) and not dedicated:
            raise ValueError("config.dedicated_server=True needs server= (the dedicated server's link)")
        config = config_of(
            DistributedLionConfig, config, options, owner="DistributedLion", dedicated_server=dedicated
        )
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        self.launching = Launching(self.vote_bucket)  # before the start: the fingerprint reads it
        super().__init__(params, defaults, config=config, process_group=process_group)
        self.config: DistributedLionConfig = config
        self._server = ServerClient(server, self.ledger) if server is not None else None
        self._early: list[Voted] | None = None  # what overlap voted during this step's backward
        self._params_changed()
        if self._sharding.sharded and self._sharding.replicas == 1:
            warnings.warn(NO_REPLICAS, stacklevel=2)

    def _params_changed(self) -> None:
        """Plan the buckets and each bucket's route (dlion.worker.lion.plan), and what starts
        them during backward, for the parameters and the world of now."""
        cfg = self.config
        world = World(self._comm, self.rank, self.world_size, self.ledger, self._server, self._sharding)
        self.plan: LionPlan = plan_lion(self, self._local_pairs(), cfg, world)
        params = [[p for p, _ in self.pairs(b)] for b in self.plan.buckets]
        indices = [[s.index for s in b.slots] for b in self.plan.buckets]
        possible = cfg.launches_in_backward and self.communicates and self.plan.deferrable
        self.launching.plan(params, indices, hooks=cfg.overlap, possible=possible)

    @property
    def communicates(self) -> bool:
        # A dedicated server waits for every worker's bits, even with a single worker.
        forced = self._server is not None or self.config.force_comm
        return self._comm is not None and (self._comm.world_size > 1 or forced)

    # ---- what the runners read (dlion.worker.lion.runners.Owner)

    def pairs(self, bucket: Bucket) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Each slot's tensor (a DTensor's local shard) and param group."""
        local = self._sharding.local
        return [(local(p), group) for p, group in (self._flat[s.index] for s in bucket.slots)]

    def momentum(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s momentum, of its local shard's shape: keyed by the parameter itself,
        so state_dict and DCP find it."""
        return self._fp32_state(self._flat[index][0], "exp_avg")

    def has_momentum(self, index: int) -> bool:
        return "exp_avg" in self.state.get(self._flat[index][0], {})

    def _local_pairs(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [(self._sharding.local(p), group) for p, group in self._flat]

    # ---- the plan's hooks

    def _step_alone(self, grads: Grads) -> bool:
        """A world of one: plain Lion, the update of dlion.Lion, nothing sent."""
        pairs = zip(self._flat, grads, strict=True)
        local = self._sharding.local

        def tensors() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]:
            return [
                (local(p), g, self._fp32_state(p, "exp_avg"), group)
                for (p, group), g in pairs
                if g is not None
            ]

        bad = lion_alone(self.plan.runners, self._per_bucket(grads), grads, tensors, self.config.cautious_wd)
        if bad >= 0:
            self._nonfinite(0, bad)
        return True

    def _local(self, grads: Grads) -> int:
        """Stage the flat buckets and scan: one fused check when every bucket is flat. With
        overlap, launch what backward did not, in the same order on every rank, before the
        metadata exchange."""
        changed = self.launching.changed()  # before staging, which may move the gradients
        ok = stage_all(self.plan.runners, self._per_bucket(grads))
        bad = -1 if ok is not None and bool(ok) else first_nonfinite(grads)
        self._early = self.launching.collect()
        return local_code(bad, changed)

    def _agrees_on_device(self) -> bool:
        # A learning step's verdict is read on the host: it decides where later votes run.
        return self.plan.on_device and not self.launching.learning

    def _local_on_device(self, grads: Grads) -> torch.Tensor:
        """Stage every bucket, launch what backward did not (overlap), and scan on the device."""
        changed = self.launching.changed()  # before staging, which may move the gradients
        for runner, bucket_grads in zip(self.plan.runners, self._per_bucket(grads), strict=True):
            runner.bind()
            runner.stage(bucket_grads)
        self._early = self.launching.collect()
        bad = first_nonfinite_on_device(grads, self._flat[0][0].device)
        self._changed_here = changed  # gates every rank's writes; raised here in _prepare
        return bad if changed < 0 else torch.where(bad >= 0, bad, changed_code(changed))

    def _config_extra(self) -> dict[str, object]:
        # Ranks voting in backward and ranks voting in step() would pair different collectives.
        return {"ddp_hook": self.launching.from_ddp, "vote_in_step": self.launching.vote_in_step}

    def _first_contact(self, comm: Comm) -> None:
        if self._sharding.sharded and not self.sharded_attached:
            warnings.warn(NOT_ATTACHED, stacklevel=4)
        if self._server is not None:
            cfg = self.config
            self._server.hello(Hello.of(comm.world_size, cfg.vote, cfg.tie, cfg.seed, self.plan.wires))

    def _grads_changed(self, rank: int, index: int) -> None:
        if not self.launching.learning:
            super()._grads_changed(rank, index)
        self.launching.decide(changed=True)  # this step votes in step() anyway, as all later ones

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> LionStep:
        if self._changed_here >= 0:  # agreed on the device: the others raise once they read it
            changed, self._changed_here = self._changed_here, -1
            raise GradientChangedError(self.rank, self._names[changed], self.steps_taken)
        if self.launching.learning:
            self.launching.decide(changed=False)
        if self._server is not None:
            self._server.begin_step(self.steps_taken)
        return LionStep(grads, meta.present, self._early, len(self.plan.buckets), meta.go)

    def _encode(self, work: LionStep, k: int) -> Encoded | None:
        if work.early is not None:
            return None  # overlap ran phases 3-5 of this bucket during backward
        # Agreed on the device: every tensor votes, the momentum waits for the device's word.
        present, defer = (None, True) if work.go is not None else (work.present, False)
        return self.plan.routes[k].encode(
            self._bucket_grads(k, work.grads), present, self.steps_taken, defer=defer
        )

    def _exchange(self, comm: Comm | None, work: LionStep, k: int, packet: Encoded | None) -> Voted:
        if work.early is not None:
            return work.early[k]
        assert packet is not None
        return self.plan.routes[k].exchange(packet, self.steps_taken, deferred=work.go is not None)

    def _apply(self, work: LionStep, k: int, voted: Voted) -> None:
        self.plan.routes[k].apply(voted, work.present, work.go)

    def _after_step(self) -> None:
        self._early = None
        self.launching.arm()  # the first step has checked the fingerprint

    # ---- one bucket, from outside step() (gradient hooks)

    def vote_bucket(self, k: int, grads: Grads, *, defer: bool = True) -> Voted:
        """Phases 3-5 of bucket k, outside step() (overlap's gradient hooks): ``grads`` are
        the bucket's, in slot order (None: no gradient on this rank). With ``defer`` the new
        momentum waits for the route's ``apply``, which keeps it only if the step goes ahead."""
        if not self.ledger.in_step:
            self.ledger.begin_step()
        route = self.plan.routes[k]
        route.runner.bind()
        return route.exchange(
            route.encode(grads, None, self.steps_taken, defer=defer), self.steps_taken, deferred=defer
        )

    def _bucket_grads(self, k: int, grads: Grads) -> Grads:
        return [grads[s.index] for s in self.plan.buckets[k].slots]

    def _per_bucket(self, grads: Grads) -> list[Grads]:
        return [self._bucket_grads(k, grads) for k in range(len(self.plan.buckets))]

    def close(self) -> dict[str, Any] | None:
        """End of training, on every worker after the last step: a dedicated parameter server
        stops once every worker closes, and returns its traffic totals (None without one; a
        second call returns them again). Gradient and DDP hooks stop launching buckets."""
        self.launching.stop()
        return self._server.close() if self._server is not None else None
