"""DistributedLion's plan and per-bucket phases 3-5: which runner and wire each bucket has,
whether the ranks agree on the device, and the sign step and vote of one bucket.

Made once per plan (DistributedLion._params_changed: at build, after add_param_group, when
the transport comes late); the phases run from step() or, for overlap and the DDP hook,
from outside it (DistributedLion.vote_bucket).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlion.aggregate.topology import BucketWire, Combine, align_bytes, vote_bits
from dlion.compress.buckets import Bucket, plan_buckets
from dlion.compress.sign import result_layout
from dlion.transport import Comm
from dlion.wire import TIE_STREAM, ZERO_STREAM, derive_key, extend_key
from dlion.worker.core.byzantine import corrupt_bucket
from dlion.worker.lion.runners import Encoded, Runner, TensorRunner, Voted, can_be_flat


@dataclass
class LionPlan:
    buckets: list[Bucket]
    wires: list[BucketWire]
    runners: list[Runner]
    slot_ids: list[torch.Tensor]  # per bucket, its tensors' indices (device int64)
    on_device: bool  # the ranks agree on the device (every bucket flat, a torch transport)


def make_plan(opt: Any) -> LionPlan:
    """The buckets of ``opt``'s parameters for its world of now, a runner and a wire each."""
    cfg = opt.config
    align = align_bytes(cfg.backend, opt.world_size)
    buckets = plan_buckets([p.numel() for p, _ in opt._flat], cfg.bucket_numel, align)
    runners = [_runner(opt, b) for b in buckets]
    dev = opt._flat[0][0].device
    return LionPlan(
        buckets,
        [BucketWire.of(f"bucket{k}", b) for k, b in enumerate(buckets)],
        runners,
        [torch.tensor([s.index for s in b.slots], dtype=torch.int64, device=dev) for b in buckets],
        # Nothing the host must decide per bucket: no dedicated server's header, no attacker.
        all(r.flat for r in runners)
        and opt._comm is not None
        and opt._comm.torch_group is not None
        and opt._server is None
        and opt._attack is None,
    )


def _runner(opt: Any, bucket: Bucket) -> Runner:
    """How a bucket runs, for the life of the plan: flat CUDA buffers, or per tensor."""
    if opt.stochastic or opt.config.backend == "hierarchical":
        return TensorRunner(opt, bucket)
    if can_be_flat([p for p, _ in opt.pairs(bucket)]):
        from dlion.worker.lion.flat import FlatRunner  # loads the CUDA kernels: flat buckets only

        return FlatRunner(opt, bucket)
    return TensorRunner(opt, bucket)


def sign_step(opt: Any, k: int, grads: list[Any], present: np.ndarray | None, *, defer: bool) -> Encoded:
    """Phase 3 of bucket k (its grads, slot order) into its send buffer. ``present`` (None:
    every tensor) says which tensors any rank has a gradient for; this rank votes with g = 0
    where it has none."""
    bucket = opt._buckets[k]
    live = [present is None or bool(present[s.index]) for s in bucket.slots]
    send = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=opt._flat[0][0].device)
    prefix = derive_key(opt.config.seed, ZERO_STREAM, opt.steps_taken, opt.rank)
    keys = [extend_key(prefix, s.index) for s in bucket.slots]
    keep = opt._runners[k].sign_step(grads, live, send, keys, defer=defer)
    if opt._attack is not None:
        at = {"seed": opt.config.seed, "step": opt.steps_taken, "rank": opt.rank}
        corrupt_bucket(send, bucket.slots, live, opt._attack, **at)
    return Encoded(send, keep)


def combiner(opt: Any, k: int) -> Combine:
    """The vote of bucket k's packets (``start``: the bucket byte they begin at)."""
    cfg, ops = opt.config, opt.sign_ops()
    tie_key = derive_key(cfg.seed, TIE_STREAM, opt.steps_taken, k)

    def combine(packets: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.combine(packets, vote=cfg.vote, tie=cfg.tie, tie_key=tie_key, start=start)

    return combine


def vote(opt: Any, comm: Comm, k: int, encoded: Encoded, *, deferred: bool) -> Voted:
    """Phases 4-5 of bucket k: the exchange picks where the vote (``combine``) runs."""
    cfg = opt.config
    # Workers size a server's reply before it arrives: no length on the wire.
    result = result_layout(vote=cfg.vote, tie=cfg.tie, n_workers=comm.world_size)
    if opt._server is not None:
        planes = opt._server.exchange(encoded.send, opt._wires[k], result[0])
        return Voted(planes, torch.from_numpy(result[1]), deferred, encoded.keep)
    planes, table = vote_bits(
        cfg.backend, comm, encoded.send, opt._wires[k], combiner(opt, k), opt.ledger, result
    )
    return Voted(planes, table, deferred, encoded.keep)
