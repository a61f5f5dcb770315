"""The sign-bit topologies, the rank-0 server round and the backend registry, on 2-4 ranks
(threads and Gloo processes) against one process that holds every rank's input: the same
bits on every rank, the same collectives in the same order, and the ledger's records."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch

from dlion.aggregate import rank0
from dlion.aggregate.backends import BACKENDS, SIGNS, align_bytes, names_for, sign_topology
from dlion.aggregate.codes import exchange_codes
from dlion.aggregate.sparse import exchange_sparse
from dlion.aggregate.votes import BucketWire, Server
from dlion.compress import dgc, sign, terngrad
from dlion.compress.buckets import plan_buckets
from dlion.compress.sign_ops import CpuSignOps
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.transport.threads import ThreadGroup

from multiproc import run_ok

NUMELS = [37, 100, 8, 250]
VOTES = [("majority", "random"), ("majority", "zero"), ("average", "random")]
SERVER_ON_LAST = ("majority", "random")  # this vote's server runs on the last rank, not rank 0
TIE_KEY = 0x5EED
L = 24  # int32 elements of a generic server round's message
Call = tuple[Any, ...]  # (op, shape, dtype[, root]) of one collective
Outcome = tuple[Any, list[CollectiveRecord], list[Call]]  # what a rank returns, records, calls


class Recording:
    """A Comm that notes each collective (op, shape, dtype, root) before passing it on."""

    def __init__(self, comm: Any) -> None:
        self.comm, self.calls = comm, list[Call]()
        self.rank, self.world_size = comm.rank, comm.world_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.comm, name)

    def _note(self, op: str, buf: torch.Tensor, *root: int) -> None:
        self.calls.append((op, tuple(buf.shape), buf.dtype, *root))

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        self._note("all_gather", send)
        return self.comm.all_gather(send, what)

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        self._note("all_to_all", send)
        return self.comm.all_to_all(send, what)

    def gather(self, send: torch.Tensor, root: int, what: str) -> torch.Tensor | None:
        self._note("gather", send, root)
        return self.comm.gather(send, root, what)

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        self._note("broadcast", buf, root)
        return self.comm.broadcast(buf, root, what)


def _rng(world: int, rank: int, salt: str) -> np.random.Generator:
    return np.random.default_rng([world, rank, *salt.encode()])


def _bucket(backend: str, world: int) -> BucketWire:
    return BucketWire.of("bucket0", plan_buckets(NUMELS, 10**6, align_bytes(backend, world))[0])


def _bits(world: int, rank: int, nbytes: int) -> torch.Tensor:
    return torch.from_numpy(_rng(world, rank, "bits").integers(0, 256, nbytes, dtype=np.uint8))


def _ints(world: int, rank: int) -> torch.Tensor:
    return torch.from_numpy(_rng(world, rank, "ints").integers(0, L, L, dtype=np.int32))


def _codes(world: int, rank: int, layout: terngrad.CodeLayout) -> np.ndarray:
    c = _rng(world, rank, "codes").integers(0, 3, (layout.nbytes, 4)).astype(np.uint8)  # 00, 01, 10
    return c[:, 0] << 6 | c[:, 1] << 4 | c[:, 2] << 2 | c[:, 3]


DGC_LAYOUT = dgc.plan_wire([300, 7, 50], [20, None, 5], torch.float32)
CODE_LAYOUT = terngrad.plan_layout([0, 1], [33, 70])


def _message(world: int, rank: int) -> torch.Tensor:
    rng = _rng(world, rank, "dgc")
    picks = [rng.choice(n, int(rng.integers(0, k + 1)), replace=False) for n, k in ((300, 20), (50, 5))]
    values = [torch.from_numpy(rng.standard_normal(p.size).astype(np.float32)) for p in picks]
    dense = torch.from_numpy(rng.standard_normal(7).astype(np.float32))
    return dgc.encode(DGC_LAYOUT, [torch.from_numpy(p) for p in picks], values, [dense])


def _each(rows: torch.Tensor) -> list[Traffic]:
    """A generic message of variable length: its first element says how many it carries."""
    return [Traffic(payload=32 * int(r[0]), padding=32 * (L - int(r[0]))) for r in rows]


def _generic(root: int, variable: bool) -> rank0.RootRound:
    return rank0.RootRound(
        up_name="msg", down_name="reply", gather_what="msg gather", broadcast_what="reply broadcast",
        up=_each if variable else Traffic(payload=32 * L - 8, padding=8), down=Traffic(payload=2 * 64 * L),
        reply_shape=(2, L), reply_dtype=torch.int64, root=root,
    )  # fmt: skip


def _sum_and_max(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([gathered.sum(0), gathered.max(0).values]).to(torch.int64), gathered.clone()


def _vote_case(comm: Any, led: Ledger, backend: str, vote: str, tie: str) -> list[np.ndarray]:
    n = comm.world_size
    wire, result = _bucket(backend, n), sign.result_layout(vote=vote, tie=tie, n_workers=n)
    send = _bits(n, comm.rank, wire.nbytes)

    def combine(packets: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return CpuSignOps().combine(packets, vote=vote, tie=tie, tie_key=TIE_KEY, start=start)

    if backend == "server" and (vote, tie) == SERVER_ON_LAST:
        voted = Server(root=n - 1).vote(comm, send, wire, combine, led, result)
    else:
        voted = sign_topology(backend).vote(comm, send, wire, combine, led, result)
    return [x.numpy() for x in voted]


def _rank0_case(comm: Any, led: Ledger, variable: bool) -> tuple[np.ndarray, np.ndarray | None]:
    n = comm.world_size
    plan = _generic(n - 1 if variable else 0, variable)
    reply, kept = rank0.exchange_at_root(comm, _ints(n, comm.rank), plan, _sum_and_max, led)
    return reply.numpy(), None if kept is None else kept.numpy()


def _codes_case(comm: Any, led: Ledger, backend: str) -> np.ndarray:
    packet = _codes(comm.world_size, comm.rank, CODE_LAYOUT)
    return exchange_codes(comm, packet, CODE_LAYOUT, backend, led)


def _dgc_case(comm: Any, led: Ledger) -> np.ndarray:
    msg = _message(comm.world_size, comm.rank)
    return exchange_sparse(comm, msg, torch.empty(0), DGC_LAYOUT, "server", led).numpy()


# Every exchange under test, by name: (comm, ledger) -> this rank's outputs (NumPy).
CASES: dict[str, Callable[[Any, Ledger], Any]] = {
    **{
        f"bits/{b}/{v}/{t}": functools.partial(_vote_case, backend=b, vote=v, tie=t)
        for b in ("allgather", "sharded", "server")
        for v, t in VOTES
    },
    "rank0/fixed": functools.partial(_rank0_case, variable=False),
    "rank0/variable": functools.partial(_rank0_case, variable=True),
    "codes/allgather": functools.partial(_codes_case, backend="allgather"),
    "codes/server": functools.partial(_codes_case, backend="server"),
    "dgc/server": _dgc_case,
}


def _run_cases(comm: Any) -> dict[str, Outcome]:
    out = {}
    for name, case in CASES.items():
        rec, led = Recording(comm), Ledger()
        led.begin_step()
        value = case(rec, led)
        led.end_step()
        out[name] = (value, led.steps[0], rec.calls)
    return out


def _gloo_rank(rank: int, world: int) -> Any:
    from dlion.transport import TorchComm

    return _run_cases(TorchComm(None, timedelta(seconds=60)))


def _threads(world: int, fn: Callable[[Any], Any]) -> list[Any]:
    group = ThreadGroup(world, timeout=timedelta(seconds=60))
    try:
        return group.run(lambda r: fn(group.comms[r]))
    finally:
        group.close()


# The single-process reference: every rank's inputs in one place, the cost model by hand.


def _traffic(wire: BucketWire, lo: int, hi: int, planes: int = 1) -> Traffic:
    """Payload and padding bits of bucket bytes [lo, hi), counted on an element mask."""
    mask = np.zeros(8 * wire.nbytes, bool)
    for a, b in wire.payload_ranges:
        mask[a:b] = True
    payload = int(mask[8 * lo : 8 * hi].sum())
    return Traffic(payload=planes * payload, padding=planes * (8 * (hi - lo) - payload))


def _server_records(
    n: int, me: int, root: int, names: tuple[str, str], up: list[Traffic], down: Traffic
) -> list[CollectiveRecord]:
    """A server round: the server receives every other rank's message and sends N-1 replies."""
    none = Traffic()
    if me == root:
        got = sum((t for r, t in enumerate(up) if r != root), none)
        return [
            CollectiveRecord(f"{names[0]}[server]", "gather", n, none, got),
            CollectiveRecord(f"{names[1]}[server]", "broadcast", n, down * (n - 1), none),
        ]
    return [
        CollectiveRecord(names[0], "gather", n, up[me], none),
        CollectiveRecord(names[1], "broadcast", n, none, down),
    ]


def _expect_bits(n: int, me: int) -> dict[str, Outcome]:
    out = {}
    for backend in ("allgather", "sharded", "server"):
        wire = _bucket(backend, n)
        s, full = wire.nbytes // n, _traffic(wire, 0, wire.nbytes)
        packets = np.stack([_bits(n, r, wire.nbytes).numpy() for r in range(n)])
        for vote, tie in VOTES:
            c = sign.combine(packets, vote=vote, tie=tie, tie_key=TIE_KEY)
            b, shape = c.planes.shape[0], (wire.nbytes,)
            recs: list[CollectiveRecord]
            calls: list[Call]
            if backend == "allgather":
                recs = [CollectiveRecord("bucket0", "all_gather", n, full * (n - 1), full * (n - 1))]
                calls = [("all_gather", shape, torch.uint8)]
            elif backend == "sharded":  # ring all_gather: forward all but the next rank's chunk
                shard = [_traffic(wire, j * s, (j + 1) * s, 1) for j in range(n)]
                voted = [_traffic(wire, j * s, (j + 1) * s, b) for j in range(n)]
                others = [j for j in range(n) if j != me]
                forwarded = [j for j in range(n) if j != (me + 1) % n]
                sent, got = _total(voted, forwarded), _total(voted, others)
                recs = [
                    CollectiveRecord(
                        "bucket0.shards", "all_to_all", n, _total(shard, others), shard[me] * (n - 1)
                    ),
                    CollectiveRecord("bucket0.result", "all_gather", n, sent, got),
                ]
                calls = [("all_to_all", shape, torch.uint8), ("all_gather", (b * s,), torch.uint8)]
            else:
                root = n - 1 if (vote, tie) == SERVER_ON_LAST else 0
                down = _traffic(wire, 0, wire.nbytes, b)
                recs = _server_records(n, me, root, ("bucket0", "bucket0"), [full] * n, down)
                calls = [
                    ("gather", shape, torch.uint8, root),
                    ("broadcast", (b, wire.nbytes), torch.uint8, root),
                ]
            out[f"bits/{backend}/{vote}/{tie}"] = ([c.planes, c.table], recs, calls)
    return out


def _total(parts: list[Traffic], which: list[int]) -> Traffic:
    return sum((parts[j] for j in which), Traffic())


def _expect_rank0(n: int, me: int) -> dict[str, Outcome]:
    out = {}
    ints = torch.stack([_ints(n, r) for r in range(n)])
    reply = _sum_and_max(ints)[0].numpy()
    for variable, root in ((False, 0), (True, n - 1)):
        up = _each(ints) if variable else [Traffic(payload=32 * L - 8, padding=8)] * n
        kept = ints.numpy() if me == root else None
        recs = _server_records(n, me, root, ("msg", "reply"), up, _generic(root, variable).down)
        calls: list[Call] = [("gather", (L,), torch.int32, root), ("broadcast", (2, L), torch.int64, root)]
        out[f"rank0/{'variable' if variable else 'fixed'}"] = ((reply, kept), recs, calls)
    return out


def _expect_codes(n: int, me: int) -> dict[str, Outcome]:
    codes = np.stack([_codes(n, r, CODE_LAYOUT) for r in range(n)])
    sums, up = terngrad.sum_codes(codes), CODE_LAYOUT.code_traffic()
    gathered: list[Call] = [("all_gather", (CODE_LAYOUT.nbytes,), torch.uint8)]
    everyone = [CollectiveRecord("codes", "all_gather", n, up * (n - 1), up * (n - 1))]
    reply = (terngrad.level_bits(n), CODE_LAYOUT.sums_bytes())
    served: list[Call] = [
        ("gather", (CODE_LAYOUT.nbytes,), torch.uint8, 0),
        ("broadcast", reply, torch.uint8, 0),
    ]
    at_server = _server_records(n, me, 0, ("codes", "sums"), [up] * n, CODE_LAYOUT.sums_traffic(n))
    return {"codes/allgather": (sums, everyone, gathered), "codes/server": (sums, at_server, served)}


def _expect_dgc(n: int, me: int) -> dict[str, Outcome]:
    msgs = torch.stack([_message(n, r) for r in range(n)])
    total = DGC_LAYOUT.total_numel
    padded = -(-total // 4) * 4  # fp32 in whole 16-byte words
    up = [dgc.message_traffic(DGC_LAYOUT, v) for v in dgc.valid_slots(DGC_LAYOUT, msgs)]
    down = Traffic(payload=32 * total, padding=32 * (padded - total))
    calls: list[Call] = [
        ("gather", (DGC_LAYOUT.nbytes,), torch.uint8, 0),
        ("broadcast", (padded,), torch.float32, 0),
    ]
    avg = dgc.decode_sum(DGC_LAYOUT, msgs).div_(n).numpy()
    return {"dgc/server": (avg, _server_records(n, me, 0, ("dgc", "dgc"), up, down), calls)}


def _expected(n: int, me: int) -> dict[str, Outcome]:
    return {**_expect_bits(n, me), **_expect_rank0(n, me), **_expect_codes(n, me), **_expect_dgc(n, me)}


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    if want is None or got is None:
        return got is want
    return bool(np.asarray(got).dtype == np.asarray(want).dtype and np.array_equal(got, want))


def _check(results: list[Any], world: int) -> None:
    for rank, got in enumerate(results):
        want = _expected(world, rank)
        assert got.keys() == want.keys()
        for name, (value, records, calls) in want.items():
            assert _same(got[name][0], value), (world, rank, name)
            assert got[name][1] == records, (world, rank, name)
            assert got[name][2] == calls, (world, rank, name)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_thread_ranks_match_one_process(world: int) -> None:
    _check(_threads(world, _run_cases), world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_ranks_match_one_process(world: int) -> None:
    _check(run_ok(_gloo_rank, world), world)


def test_a_reply_of_the_wrong_shape_is_named_on_the_server() -> None:
    plan = _generic(0, False)

    def short(gathered: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros((1, L), dtype=torch.int64), None

    with pytest.raises(RuntimeError, match=r"msg: the server's reply is \(1, 24\).*expect \(2, 24\)"):
        _threads(2, lambda comm: rank0.exchange_at_root(comm, _ints(2, comm.rank), plan, short, _ledger()))


def _ledger() -> Ledger:
    led = Ledger()
    led.begin_step()
    return led


@pytest.mark.parametrize("root", [-1, True, 1.0])
def test_a_round_refuses_a_root_that_is_no_rank(root: Any) -> None:
    with pytest.raises(ValueError, match="root must be a rank"):
        rank0.RootRound(**{**_generic(0, False).__dict__, "root": root})


def test_a_root_past_the_world_is_refused() -> None:
    plan = _generic(2, False)
    with pytest.raises(ValueError, match="root must be a rank below the world size 2, got 2"):
        _threads(
            2, lambda comm: rank0.exchange_at_root(comm, _ints(2, comm.rank), plan, _sum_and_max, _ledger())
        )


def test_the_registry_maps_each_sign_backend_to_its_topology() -> None:
    for name in names_for(SIGNS):
        spec = BACKENDS[name]
        if name == "hierarchical":
            with pytest.raises(ValueError, match="'hierarchical' votes over node and cross-node groups"):
                sign_topology(name)
            continue
        topology = sign_topology(name)
        assert topology is spec.topology
        assert isinstance(topology, Server) == spec.server
        assert align_bytes(name, 4) == (64 if spec.shards else 16)
    assert align_bytes("hierarchical", 3) == 48
    with pytest.raises(
        ValueError, match="backend must be one of allgather, sharded, server, hierarchical; got 'ring'"
    ):
        sign_topology("ring")
    with pytest.raises(ValueError, match="got 'ring'"):
        align_bytes("ring", 2)
    with pytest.raises(ValueError, match="got 'sharded'"):
        exchange_codes(None, np.zeros(16, np.uint8), CODE_LAYOUT, "sharded", _ledger())  # type: ignore[arg-type]


def _node_groups_rank(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from dlion.aggregate.hierarchy import NodeLayout, node_groups_for
    from dlion.transport import TorchComm

    made: list[list[int]] = []
    real = dist.new_group

    def counted(ranks: list[int], *args: Any, **kwargs: Any) -> Any:
        made.append(list(ranks))
        return real(ranks, *args, **kwargs)

    dist.new_group = counted  # type: ignore[assignment]
    try:
        comm, out = TorchComm(), dict[str, Any]()
        pairs = NodeLayout.of(rank, world, 2)
        node, cross = node_groups_for(comm, pairs, None)
        out["first"] = len(made)
        out["again_same"] = node_groups_for(comm, pairs, None) == (node, cross)
        out["again"] = len(made)
        out["members"] = [c.all_gather(torch.tensor([rank]), "who").view(-1).tolist() for c in (node, cross)]
        node_groups_for(comm, NodeLayout.of(rank, world, 4), None)
        out["relaid"] = len(made)
        other = TorchComm()
        node_groups_for(other, pairs, None)
        out["other"] = len(made)
        gone = weakref.ref(other)
        del other
        gc.collect()
        out["released"] = gone() is None
        return out
    finally:
        dist.new_group = real


def test_node_groups_are_made_once_per_transport_and_layout() -> None:
    for rank, got in enumerate(run_ok(_node_groups_rank, 4)):
        # 2 x 2: two node groups and two cross groups; 1 x 4: one node group and four cross.
        assert (got["first"], got["again"], got["relaid"], got["other"]) == (4, 4, 9, 13)
        assert got["again_same"]
        assert got["members"] == [[2 * (rank // 2), 2 * (rank // 2) + 1], [rank % 2, rank % 2 + 2]]
        assert got["released"]
