"""The one registry of backends: where a bucket's payload meets, by name.

Every place that names a backend reads it here: the optimizers' configs, the catalogue, the
training job's config and CLI, the overlap and ``attach`` checks, and the exchanges in this
folder (which sign-bit topology votes, whether a server combines, whether buckets shard).
Adding a backend is one entry here, its topology in this folder, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlion.aggregate.votes import ALLGATHER, SHARDED, Server, Topology
from dlion.checks import one_of
from dlion.wire import WORD_BYTES

# What an optimizer sends, and so which backends can carry it.
SIGNS = "signs"  # DistributedLion's packed sign bits
CODES = "codes"  # TernGrad's 2-bit codes
SPARSE = "sparse"  # DGC's sparse messages


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """One backend: what it carries and what the worker must know of it before it plans."""

    name: str
    carries: frozenset[str]
    shards: bool = False  # each rank combines one shard: buckets align to whole words per rank
    in_backward: bool = False  # fixed-order collectives only: a vote may start during backward
    server: bool = False  # a parameter server combines (rank 0, or a process of its own)
    # How one group's ranks vote sign bits; None where the vote is not one group's
    # (hierarchical: node and cross-node groups, dlion.aggregate.hierarchy).
    topology: Topology | None = None
    summary: str = ""


_ALL = (
    BackendSpec(
        name="allgather",
        carries=frozenset({SIGNS, CODES, SPARSE}),
        in_backward=True,
        topology=ALLGATHER,
        summary="every rank gathers every rank's payload and combines it locally",
    ),
    BackendSpec(
        name="sharded",
        carries=frozenset({SIGNS}),
        shards=True,
        in_backward=True,
        topology=SHARDED,
        summary="all_to_all of bits, each rank votes its shard, all_gather of the voted shards",
    ),
    BackendSpec(
        name="server",
        carries=frozenset({SIGNS, CODES, SPARSE}),
        server=True,
        topology=Server(),
        summary="a parameter server gathers, combines and broadcasts the result",
    ),
    BackendSpec(
        name="hierarchical",
        carries=frozenset({SIGNS}),
        shards=True,
        summary="ranks of a node average, nodes vote sharded across nodes",
    ),
)
BACKENDS: dict[str, BackendSpec] = {b.name: b for b in _ALL}


def names_for(payload: str) -> tuple[str, ...]:
    """The backends that carry ``payload``, in the registry's order."""
    return tuple(b.name for b in _ALL if payload in b.carries)


def backend_spec(name: object, payload: str | None = None) -> BackendSpec:
    """The backend called ``name``; a ValueError naming it and the choices if there is none
    (that carries ``payload``, when given)."""
    allowed = names_for(payload) if payload is not None else tuple(BACKENDS)
    one_of("backend", name, allowed)
    return BACKENDS[str(name)]


def sign_topology(name: object) -> Topology:
    """The topology that votes sign bits on backend ``name``; a ValueError if it has none."""
    spec = backend_spec(name, SIGNS)
    if spec.topology is None:
        raise ValueError(
            f"backend {spec.name!r} votes over node and cross-node groups (dlion.aggregate.hierarchy), "
            "not one group's topology"
        )
    return spec.topology


def align_bytes(backend: str, world_size: int) -> int:
    """Bucket sizes are multiples of this: whole 16-byte words per rank's shard."""
    return WORD_BYTES * world_size if backend_spec(backend).shards else WORD_BYTES
