"""DistributedLion's typed, validated configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlion.aggregate.backends import BACKENDS, SIGNS, backend_spec
from dlion.checks import check_bool, check_instance, check_int
from dlion.worker.core.byzantine import Byzantine
from dlion.worker.core.config import TIES, VOTES, CommConfig, Tie, Vote, one_of

Backend = Literal["allgather", "sharded", "server", "hierarchical"]
Binarize = Literal["sign", "stochastic"]
BINARIZE: tuple[str, ...] = ("sign", "stochastic")


@dataclass(frozen=True, kw_only=True)
class DistributedLionConfig(CommConfig):
    """How DistributedLion communicates; per-group lr/betas/weight_decay live in param groups.
    transport, nonfinite, seed and timeout: as in CommConfig (seed keys the tie and
    zero-sign coins).

    vote:         "majority" (MaVo, 1-bit result) or "average" (counts of positive votes).
    backend:      "sharded" (the default: the fewest bits at every N, the same parameters
                  as the others bit for bit), "allgather" or "server". "allgather": every
                  rank gathers all ranks' bits and votes locally,
                  (N-1) bits per parameter each way. "sharded": all_to_all of bits, each
                  rank votes its shard, all_gather of the results: 2 (N-1)/N bits each way
                  under majority vote, whatever N. "server": a parameter server on rank
                  0 gathers the bits, votes, and broadcasts the result (1 bit up, B down
                  per worker; N-1 times that at the server).
    dedicated_server: the server is a process of its own (DistributedLion's ``server=``
                  link), not rank 0; backend "server" only.
    tie:          majority vote with an even number of workers can split evenly.
                  "random": a fair coin seeded by (seed, step, position), identical on all
                  ranks, keeps the result at 1 bit per parameter. "zero": no update on a
                  tie, exactly sign(0) = 0; free with backend="allgather" (every rank votes
                  locally), 2 bits per parameter on any backend that sends the result down.
    bucket_numel: parameters per flat bucket (one collective per bucket).
    force_comm:   communicate even with a world size of 1 (tests, benchmarks).
    cautious_wd:  cautious weight decay (Chen, Li, Liang et al., 2025): decay only where the
                  voted update and the parameter do not have opposite signs. Both are the
                  same on every rank, so ranks stay bit-identical.
    byzantine:    the last K ranks send corrupted bits (dlion.worker.core.byzantine), for
                  measuring robustness; None: every rank is honest.
    overlap:      start each bucket's sign step and exchange from gradient hooks, during
                  backward (dlion.worker.lion.overlap); one backward per step. allgather and
                  sharded backends, torch transport.
    procs_per_node: with backend "hierarchical", the ranks per node K (None: the launcher's
                  LOCAL_WORLD_SIZE): nodes vote, each on its K ranks' mean gradient
                  (dlion.aggregate.hierarchy); torch transport.
    binarize:     what a worker sends: "sign", the sign of its Lion direction c (a c of 0
                  takes a fair coin), or "stochastic" (dlion-sto): a random sign, positive
                  with probability (1 + clip(c / mean|c|, -1, 1)) / 2, unbiased for that
                  clipped direction (dlion.kernels.stochastic); per tensor, not flat CUDA.
    """

    vote: Vote = "majority"
    tie: Tie = "random"
    backend: Backend = "sharded"
    bucket_numel: int = 1 << 25
    force_comm: bool = False
    cautious_wd: bool = False
    byzantine: Byzantine | None = None
    overlap: bool = False
    dedicated_server: bool = False
    binarize: Binarize = "sign"
    procs_per_node: int | None = None

    @property
    def launches_in_backward(self) -> bool:
        """Whether a bucket's vote can start before step(): its collectives then run in one
        fixed order from gradient hooks (a server's steps begin with a header in step())."""
        return BACKENDS[self.backend].in_backward and self.transport == "torch"

    def __post_init__(self) -> None:
        one_of("vote", self.vote, VOTES)
        one_of("tie", self.tie, TIES)
        backend_spec(self.backend, SIGNS)
        one_of("binarize", self.binarize, BINARIZE)
        super().__post_init__()
        check_int("bucket_numel", self.bucket_numel, low=128)
        for name in ("force_comm", "cautious_wd", "overlap", "dedicated_server"):
            check_bool(name, getattr(self, name))
        check_instance("byzantine", self.byzantine, Byzantine, or_none=True)
        check_int("procs_per_node", self.procs_per_node, low=1, or_none=True)
        if self.dedicated_server and self.backend != "server":
            raise ValueError(
                f"server= (a dedicated parameter server) needs backend='server', not {self.backend!r}"
            )
        if self.backend == "hierarchical" and (
            self.transport != "torch" or self.byzantine is not None or self.binarize != "sign"
        ):
            raise ValueError(
                "backend 'hierarchical' makes torch.distributed subgroups, and its nodes sign their mean "
                "gradient plainly, with no byzantine workers; got transport "
                f"{self.transport!r}, byzantine {self.byzantine!r}, binarize {self.binarize!r}"
            )
        if self.overlap and not self.launches_in_backward:
            raise ValueError(
                f"overlap=True needs backend 'allgather' or 'sharded' with transport 'torch', "
                f"got backend={self.backend!r}, transport={self.transport!r}"
            )
