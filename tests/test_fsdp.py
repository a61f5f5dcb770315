"""FSDP2 (fully_shard) with DistributedLion under dlion.attach, on forked Gloo CPU ranks.

Against the hierarchical backend on the unsharded model (tests/fsdp_ranks.py): on an R x S
(replicate, shard) mesh each replica's shard group is one node, so HSDP + attach must equal
backend="hierarchical" with procs_per_node=S bit for bit. FSDP's reduce-scatter gives each
rank its shard of the node's mean gradient, the hierarchical backend forms that same mean,
and with S = 2 both are one float: FSDP's fp32 reduce-scatter averages two terms
(ReduceOp.AVG), the hierarchical backend sums two and divides by 2, and a + b rounds the
same in either order while halving is exact (a/2 + b/2 too). The replicas then vote per
shard what the nodes vote per tensor. (With S = 3 a sum of three depends on its order: 2x3
is checked for equal ranks and its ledger, not against the reference.)

Against a cost model written from the shard shapes: every step's ledger, FSDP's collectives
inside the shard group ("node") and dlion's across replicas ("net"). Against FSDP2's own
switches, measured: what each leaves in p.grad. Against dlion.Lion for a 1-D mesh (no
replicas). And DCP checkpoints (resume, reshard, refusal), FSDP2's features (mixed
precision, clipping, accumulation, activation checkpointing, LambdaLR, torch.compile), and
the refusals, each a named error. And the edges: a non-finite gradient in one shard group
(skipped or raised on every rank), attach twice and detach, a no_grad forward after step(),
GradScaler and dlion's own savers refused, DCP's flattened form, parameters swapped in after
fully_shard (Accelerate), a 1-D mesh under torchrun's environment.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import fsdp_ranks as fr
import pytest
import torch

from dlion.worker.lion.distributed_lion import NO_REPLICAS, NOT_ATTACHED

from multiproc import run_ok

Record = tuple[str, str, str, int, int]

JOBS_2X2 = {  # train_sharded's options, all on one 2x2 world (tests/fsdp_ranks.several)
    "average": {},
    "tie_zero": {"vote": "majority", "tie": "zero"},  # 2 voters: ties, no update on them
    "reshard_off": {"reshard": False},
    "mixed": {"mixed": True},
    "clip": {"clip": 1e-3},
    "accumulate": {"micro": 2},
    "wrapper": {"checkpoint": "wrapper"},
    "function": {"checkpoint": "function"},
    "lambda_lr": {"lr_schedule": True},
    "unattached": {"attach": False},
    "server": {"backend": "server"},
    "allgather": {"backend": "allgather"},
}
REFS_2X2 = {
    "average": {},
    "tie_zero": {"vote": "majority", "tie": "zero"},
    "accumulate": {"micro": 2},
    "lambda_lr": {"lr_schedule": True},
}
JOBS_6 = {  # on one 6-rank world
    "average": {"replicas": 3, "vote": "average"},
    "majority": {"replicas": 3, "vote": "majority"},  # 3 voters: no ties
    "2x3": {"replicas": 2, "vote": "average"},  # 10 rows over 3 shards: 4, 4, 2 (FSDP pads to 4)
}
VOTES_3X2 = ("average", "majority")


def _by_name(names: Any, per_rank: list[list[Any]]) -> dict[str, list[Any]]:
    """{name: [rank 0's, rank 1's, ...]} from each rank's list in ``names`` order."""
    return {name: [r[j] for r in per_rank] for j, name in enumerate(names)}


@pytest.fixture(scope="module")
def hsdp_4ranks() -> dict[str, list[dict[str, Any]]]:
    jobs = [{"replicas": 2, **kw} for kw in JOBS_2X2.values()]
    return _by_name(JOBS_2X2, run_ok(fr.several, 4, jobs=jobs))


@pytest.fixture(scope="module")
def hier_4ranks() -> dict[str, list[list[torch.Tensor]]]:
    jobs = [{"per_node": 2, **kw} for kw in REFS_2X2.values()]
    return _by_name(REFS_2X2, run_ok(fr.hierarchical_runs, 4, jobs=jobs))


@pytest.fixture(scope="module")
def hsdp_6ranks() -> dict[str, list[dict[str, Any]]]:
    return _by_name(JOBS_6, run_ok(fr.several, 6, jobs=list(JOBS_6.values())))


@pytest.fixture(scope="module")
def hier_6ranks() -> dict[str, list[list[torch.Tensor]]]:
    jobs = [{"per_node": 2, "vote": v} for v in VOTES_3X2]
    return _by_name(VOTES_3X2, run_ok(fr.hierarchical_runs, 6, jobs=jobs))


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit (-0.0 is not 0.0 here), tensor by tensor."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


def assert_ranks_equal(results: list[dict[str, Any]]) -> None:
    """Every rank's full parameters are rank 0's, bit for bit, and training moved them."""
    for rank, got in enumerate(results):
        assert same_bits(got["params"], results[0]["params"]), rank
    assert not same_bits(results[0]["params"], [p.detach() for p in fr.make_model().parameters()])


# ---- the cost model


def shard_rows(rows: int, shards: int, s: int) -> tuple[int, int]:
    """[start, end) of the dim-0 rows shard s holds: FSDP2 splits as torch.chunk does."""
    per = -(-rows // shards)
    return min(rows, s * per), min(rows, (s + 1) * per)


def fsdp_records(shards: int, *, gathers: int, param_bytes: int = 4) -> Counter[Record]:
    """FSDP's records of one step: per Linear (one FSDP group) an all_gather of the group's
    dim-0 shards, each padded to ceil(rows / S) rows, in the parameter dtype, ``gathers``
    times (forward, and backward again after reshard_after_forward, per micro-batch), a ring:
    (S - 1) chunks each way; one fp32 reduce-scatter of the same padded size, which Gloo runs
    as an all-reduce of the whole input: 2 (S - 1) chunks each way. With them, the optimizer's
    one all_gather of the step's verdict (2 int64) over the shard group."""
    out: Counter[Record] = Counter({verdict_record(shards): 1})
    for shapes in fr.linear_shapes():
        numel = sum(-(-s[0] // shards) * math.prod(s[1:]) for s in shapes)
        ag, rs = 8 * numel * param_bytes * (shards - 1), 8 * numel * 4 * 2 * (shards - 1)
        out[("fsdp.all_gather", "all_gather", "node", ag, ag)] += gathers
        out[("fsdp.reduce_scatter", "reduce_scatter", "node", rs, rs)] += 1
    return out


def verdict_record(shards: int) -> Record:
    """Every shard group agrees on the step's verdict: one all_gather of 2 int64 per step."""
    bits = 8 * 16 * (shards - 1)
    return ("shard.verdict", "all_gather", "node", bits, bits)


def dlion_records(rank: int, replicas: int, shards: int, vote: str, first: bool) -> list[Record]:
    """dlion's records of one step across the R replicas of this rank's shard, in order: the
    fingerprint (first step: 6 int64), the step metadata (4 + ceil(T/8) bytes), and the
    sharded vote of one bucket of the local shards' bits (each tensor from a byte boundary,
    the bucket padded to 16 R bytes): all_to_all then all_gather of the voted planes, (R-1)
    chunks of bucket/R bytes each way (majority: 1 plane, 2 under tie "zero"; average:
    ceil(log2(R + 1)))."""
    numels = []
    for shapes in fr.linear_shapes():
        for shape in shapes:
            lo, hi = shard_rows(shape[0], shards, rank % shards)
            numels.append((hi - lo) * math.prod(shape[1:]))
    align = 16 * replicas
    nbytes = sum((n + 7) // 8 for n in numels)
    chunk = 8 * max(align, -(-nbytes // align) * align) // replicas * (replicas - 1)
    planes = {"majority": 1, "tie_zero": 2}.get(vote, math.ceil(math.log2(replicas + 1)))
    meta = 8 * (4 + -(-len(numels) // 8)) * (replicas - 1)
    out = [("fingerprint", "all_gather", "net", 64 * 6 * (replicas - 1))] if first else []
    out += [("meta", "all_gather", "net", meta), ("bucket0.shards", "all_to_all", "net", chunk)]
    out += [("bucket0.result", "all_gather", "net", planes * chunk)]
    return [(*r, r[-1]) for r in out]  # the same bits received as sent


def assert_ledger(got: dict[str, Any], rank: int, replicas: int, shards: int, **model: Any) -> None:
    """Every step's records: FSDP's as a multiset (their order is FSDP's prefetching), then
    dlion's, in order, exactly."""
    vote, micro, passes = model.get("vote", "average"), model.get("micro", 1), model.get("passes", 2)
    fsdp = fsdp_records(shards, gathers=passes * micro, param_bytes=model.get("param_bytes", 4))
    assert len(got["records"]) == fr.STEPS
    for step, recs in enumerate(got["records"]):
        ours = dlion_records(rank, replicas, shards, vote, step == 0) if replicas > 1 else []
        assert Counter(recs) == fsdp + Counter(ours), (rank, step)
        net = [r for r in recs if r[2] == "net"]
        assert net[len(net) - len(ours) :] == ours, (rank, step)


# ---- 1. HSDP + attach against the hierarchical backend


@pytest.mark.parametrize(
    ("world", "vote"), [(4, "average"), (4, "tie_zero"), (6, "average"), (6, "majority")]
)
def test_hsdp_equals_hierarchical_bit_for_bit(world: int, vote: str, request: pytest.FixtureRequest) -> None:
    """R x 2 HSDP + attach: every rank's full parameters equal, and equal to backend
    "hierarchical" with procs_per_node=2 on the unsharded model, bit for bit (module doc).
    Majority at R = 3: an odd number of voters, no ties; at R = 2 with tie="zero" (with
    tie="random" a tie's coin is keyed by its position in the bucket, here of local shards,
    there of whole tensors: other coins, as valid). Each rank's momentum has its local
    shard's shape and is its replica's own."""
    ours = request.getfixturevalue(f"hsdp_{world}ranks")[vote]
    ref = request.getfixturevalue(f"hier_{world}ranks")[vote]
    assert_ranks_equal(ours)
    for rank in range(world):
        assert same_bits(ours[rank]["params"], ref[rank]), rank
        assert same_bits(ref[rank], ref[0]), rank
        shapes = [tuple(m.shape) for m in ours[rank]["momenta"]]
        assert shapes == [tuple(t.shape) for t in ours[rank]["local"]], rank
        for shape, full in zip(shapes, fr.make_model().parameters(), strict=True):
            lo, hi = shard_rows(full.shape[0], 2, rank % 2)
            assert shape == (hi - lo, *full.shape[1:]), rank
    # The shard group's ranks hold different rows; the replicas of one shard, their own momenta.
    assert [t.shape for t in ours[0]["local"]] != [t.shape for t in ours[1]["local"]]
    assert not same_bits(ours[0]["momenta"], ours[2]["momenta"])
    assert all(got["warnings"] == [] for got in ours)


def test_uneven_shards_2x3_train_with_ranks_equal(hsdp_6ranks: dict[str, Any]) -> None:
    """2x3 HSDP: 10 rows over 3 shards are 4, 4 and 2 rows, 3 rows are 1 each; every rank's
    momentum has its shard's shape and the replicas end equal."""
    results = hsdp_6ranks["2x3"]
    assert_ranks_equal(results)
    for rank, got in enumerate(results):
        for m, full in zip(got["momenta"], fr.make_model().parameters(), strict=True):
            lo, hi = shard_rows(full.shape[0], 3, rank % 3)
            assert tuple(m.shape) == (hi - lo, *full.shape[1:]), rank
    assert [tuple(m.shape) for m in results[2]["momenta"]][:2] == [(2, fr.IN), (2,)]


@pytest.mark.parametrize("backend", ["server", "allgather"])
def test_other_backends_under_hsdp_vote_the_same(
    backend: str, hsdp_4ranks: dict[str, Any], hier_4ranks: dict[str, Any]
) -> None:
    """backend "server" (rank 0 of the replicate group votes) and "allgather" under 2x2 HSDP
    train, every rank equal, to the same parameters as the hierarchical reference."""
    assert_ranks_equal(hsdp_4ranks[backend])
    for rank, got in enumerate(hsdp_4ranks[backend]):
        assert same_bits(got["params"], hier_4ranks["average"][rank]), rank


# ---- 2. the ledger against the cost model


@pytest.mark.parametrize(
    ("world", "job", "model"),
    [
        (4, "average", {}),
        (4, "tie_zero", {"vote": "tie_zero"}),
        (4, "reshard_off", {"passes": 1}),  # no all_gather again in backward
        (4, "mixed", {"param_bytes": 2}),  # bf16 all_gathers, fp32 reduce-scatters
        (4, "accumulate", {"micro": 2}),  # two forwards and backwards, one reduce-scatter
        (6, "average", {}),
        (6, "majority", {"vote": "majority"}),
        (6, "2x3", {"replicas": 2, "shards": 3}),
    ],
)
def test_ledger_matches_the_cost_model_every_step(
    world: int, job: str, model: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """Every step's records, every rank, against the cost model (fsdp_records, dlion_records)."""
    results = request.getfixturevalue(f"hsdp_{world}ranks")[job]
    model = dict(model)
    replicas, shards = model.pop("replicas", world // 2), model.pop("shards", 2)
    for rank, got in enumerate(results):
        assert_ledger(got, rank, replicas, shards, **model)


# ---- 3. FSDP2's own switches, against attach


def test_fsdp2_switches_against_attach() -> None:
    """2x2 HSDP, one backward each, the same data: plain FSDP all-reduces across replicas
    (ranks 0 and 2 hold the same shard: equal gradients); set_requires_all_reduce(False)
    leaves p.grad None; set_all_reduce_hook sees the all-reduced gradient (equal across
    replicas: its bytes are spent); under dlion.attach each replica keeps its shard group's
    mean (they differ, and their mean is the all-reduced gradient, bit for bit), and FSDP's
    collectives of that backward alone are in the ledger; after detach FSDP all-reduces again."""
    got = run_ok(fr.switches, 4)
    pairs = [(0, 2), (1, 3)]  # (replica 0, replica 1) of shard 0 and of shard 1
    for a, b in pairs:
        for phase in ("plain", "hooked_grads", "detached"):
            assert all(g is not None for g in got[a][phase]), phase
            assert same_bits(got[a][phase], got[b][phase]), phase
        assert same_bits(got[a]["detached"], got[a]["plain"])
        assert got[a]["no_all_reduce"] == [None] * 6
        assert len(got[a]["hooked"]) == 3  # one per FSDP group (Linear)
        assert same_bits(got[a]["hooked"], got[b]["hooked"])
        att_a, att_b = got[a]["attached"], got[b]["attached"]
        assert all(g is not None for g in att_a + att_b)
        assert all(not torch.equal(x, y) for x, y in zip(att_a, att_b, strict=True))
        assert same_bits([(x + y) / 2 for x, y in zip(att_a, att_b, strict=True)], got[a]["plain"])
    for rank, r in enumerate(got):
        (step,) = r["records"]
        assert Counter(x for x in step if x[2] == "node") == fsdp_records(2, gathers=2), rank
        assert [x for x in step if x[2] == "net"] == dlion_records(rank, 2, 2, "average", True)


# ---- 4. a 1-D mesh: no replicas


def test_1d_mesh_is_plain_lion_on_each_shard() -> None:
    """FSDP on 2 ranks (replicas = 1): each shard takes plain Lion on FSDP's mean gradient,
    equal bit for bit to dlion.Lion on the unsharded model fed (g0 + g1)/2 (exact: module
    doc), momenta too; NO_REPLICAS is warned once (at build); dlion sends nothing: every
    record is FSDP's, inside the shard group, as the cost model says."""
    got = run_ok(fr.train_sharded, 2, replicas=1)
    params, momenta = fr.lion_reference(2)
    assert_ranks_equal(got)
    for rank, r in enumerate(got):
        assert same_bits(r["params"], params), rank
        rows = [shard_rows(m.shape[0], 2, rank) for m in momenta]
        assert same_bits(r["momenta"], [m[lo:hi] for m, (lo, hi) in zip(momenta, rows, strict=True)])
        assert r["warnings"] == [NO_REPLICAS], rank
        assert r["counters"] == (fr.STEPS, 0)
        assert_ledger(r, rank, 1, 2)
        assert all(x[2] == "node" for step in r["records"] for x in step)


# ---- 5. without attach


def test_without_attach_trains_and_warns(hsdp_4ranks: dict[str, Any]) -> None:
    """No dlion.attach: FSDP all-reduces across replicas before the vote. It still trains,
    every rank equal; NOT_ATTACHED is warned once per rank; FSDP's collectives are not
    counted (only an attachment counts them), dlion's are."""
    results = hsdp_4ranks["unattached"]
    assert_ranks_equal(results)
    for rank, got in enumerate(results):
        assert got["warnings"].count(NOT_ATTACHED) == 1, rank
        for step, recs in enumerate(got["records"]):
            assert [r for r in recs if r[2] == "net"] == dlion_records(rank, 2, 2, "average", step == 0)
            assert [r for r in recs if r[2] == "node"] == [verdict_record(2)], (rank, step)


def test_without_attach_warns_only_not_attached(hsdp_4ranks: dict[str, Any]) -> None:
    for got in hsdp_4ranks["unattached"]:
        assert got["warnings"] == [NOT_ATTACHED]


# ---- 6. FSDP2's features


def test_mixed_precision_and_clipping_train_with_ranks_equal(hsdp_4ranks: dict[str, Any]) -> None:
    """MixedPrecisionPolicy(bf16 parameters, fp32 reduce): ranks equal, parameters and
    momenta stay fp32 (the all_gathers are bf16: the ledger test). clip_grad_norm_ on the
    DTensor gradients before step() (each replica clips its shard group's mean by its norm):
    ranks equal, and the parameters differ from the unclipped run's."""
    for job in ("mixed", "clip"):
        assert_ranks_equal(hsdp_4ranks[job])
        assert all(p.dtype == torch.float32 for r in hsdp_4ranks[job] for p in r["params"] + r["momenta"])
    assert not same_bits(hsdp_4ranks["clip"][0]["params"], hsdp_4ranks["average"][0]["params"])


@pytest.mark.parametrize("job", ["accumulate", "lambda_lr"])
def test_accumulation_and_lr_schedule_equal_the_reference(
    job: str, hsdp_4ranks: dict[str, Any], hier_4ranks: dict[str, Any]
) -> None:
    """Gradient accumulation, set_requires_gradient_sync(False) on the first of 2
    micro-batches: FSDP sums the unsharded gradients (g1 + g2, as p.grad accumulates) and
    reduce-scatters once (the ledger test: no reduce-scatter on the first); equal bit for
    bit to the hierarchical reference fed the accumulated gradient. LambdaLR on the
    DistributedLion: equal to the reference under the same schedule."""
    for rank, got in enumerate(hsdp_4ranks[job]):
        assert same_bits(got["params"], hier_4ranks[job][rank]), rank
        assert not same_bits(got["params"], hier_4ranks["average"][rank]), rank
    assert hsdp_4ranks["lambda_lr"][0]["lrs"] == [fr.LR * fr.schedule(fr.STEPS)]


@pytest.mark.parametrize("checkpoint", ["wrapper", "function"])
def test_activation_checkpointing_changes_nothing(checkpoint: str, hsdp_4ranks: dict[str, Any]) -> None:
    """checkpoint_wrapper around each Linear (sharded as one), or torch.utils.checkpoint over
    the whole forward: the same parameters as without, bit for bit, on every rank."""
    for rank, got in enumerate(hsdp_4ranks[checkpoint]):
        assert same_bits(got["params"], hsdp_4ranks["average"][rank]["params"]), rank


def _compiled(backend: str, hier_4ranks: dict[str, Any]) -> None:
    got = run_ok(fr.train_sharded, 4, replicas=2, compile_with=backend, timeout_s=300)
    for rank, r in enumerate(got):
        assert r["compiled"], rank  # graphs reached the backend: not eager behind a graph break
        assert same_bits(r["params"], hier_4ranks["average"][rank]), rank
        assert_ledger(r, rank, 2, 2)


def test_torch_compile_per_layer_aot_eager(hier_4ranks: dict[str, Any]) -> None:
    """Each layer torch.compile'd (fullgraph) before fully_shard, as torchtitan does (AOT
    autograd, no code generation): the same parameters and ledger as eager."""
    _compiled("aot_eager", hier_4ranks)


@pytest.mark.slow
def test_torch_compile_per_layer_inductor(hier_4ranks: dict[str, Any]) -> None:
    """The same with Inductor's C++ kernels (about 10 s of compiling on 2 cores)."""
    _compiled("inductor", hier_4ranks)


# ---- 7. DCP checkpoints


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """2x2: 4 steps unbroken; 2 steps, dcp.save, a fresh model and optimizer loading it, 2 more."""
    path = tmp_path_factory.mktemp("dcp") / "step2"
    return path, run_ok(fr.dcp_resume, 4, replicas=2, k=2, path=str(path))


def test_dcp_resume_equals_the_unbroken_run_bit_for_bit(resumed: tuple[Path, list[dict[str, Any]]]) -> None:
    """get/set_model_state_dict and get/set_optimizer_state_dict through dcp.save/load: every
    replica's momentum is saved and comes back to its own ranks; DCP's _init_optim_state (one
    step of zero gradients at lr 0 on the fresh optimizer) changes no parameter and counts
    one step, which the loaded counters (in the param groups) then replace; the resumed run
    ends where the unbroken one does, parameters and momenta bit for bit."""
    _, results = resumed
    for rank, got in enumerate(results):
        load = got["load"]
        assert load["init_changed"] == [False] * 6 and load["init_lrs"] == [fr.LR], rank
        assert load["init_counters"] == (1, 0) and load["counters"] == (2, 0), rank
        assert same_bits(load["loaded"], got["saved"]["params"]), rank
        assert same_bits(load["loaded_momenta"], got["saved"]["momenta"]), rank
        assert same_bits(got["resumed"]["params"], got["whole"]["params"]), rank
        assert same_bits(got["resumed"]["momenta"], got["whole"]["momenta"]), rank
        assert got["resumed"]["counters"] == (4, 0)
    assert_ranks_equal([got["resumed"] for got in results])
    assert not same_bits(results[0]["load"]["loaded_momenta"], results[2]["load"]["loaded_momenta"])


def test_dcp_init_step_warns_nothing(resumed: tuple[Path, list[dict[str, Any]]]) -> None:
    for got in resumed[1]:
        assert got["load"]["init_warnings"] == []


def test_dcp_reshards_the_shard_dimension(tmp_path: Path) -> None:
    """Saved on a 1-D mesh of 2 shards, loaded on 4 (rows 3, 3, 3, 1 of 10; 1, 1, 1, 0 of 3):
    each rank's momentum is its rows of the saved full momentum, the parameters and counters
    are the saved ones, and training goes on (FSDP's records those of 4 shards)."""
    saved = run_ok(fr.dcp_save, 2, replicas=1, k=2, path=str(tmp_path))
    full = [torch.cat([saved[0]["momenta"][i], saved[1]["momenta"][i]]) for i in range(6)]
    loaded = run_ok(fr.dcp_load, 4, replicas=1, k=2, path=str(tmp_path))
    for rank, got in enumerate(loaded):
        rows = [shard_rows(m.shape[0], 4, rank) for m in full]
        want = [m[lo:hi] for m, (lo, hi) in zip(full, rows, strict=True)]
        assert same_bits(got["load"]["loaded_momenta"], want), rank
        assert same_bits(got["load"]["loaded"], saved[0]["params"]), rank
        assert got["load"]["counters"] == (2, 0) and got["counters"] == (4, 0), rank
        assert not same_bits(got["params"], saved[0]["params"])
        assert Counter(got["records"][-1]) == fsdp_records(4, gathers=2), rank
    assert [tuple(m.shape) for m in loaded[3]["momenta"]][-2:] == [(0, fr.HIDDEN), (0,)]
    assert_ranks_equal(loaded)


def test_dcp_refuses_another_replica_count(resumed: tuple[Path, list[dict[str, Any]]]) -> None:
    """Saved with 2 replicas, loaded with 3 (3x2): DCP refuses first, on every rank, with its
    own size mismatch of the momentum's replica dimension. A state of 2 replicas' rows handed
    to load_state_dict directly gets DistributedLion's own ValueError (Sharding.from_saved),
    as does one of another parameter's shape."""
    path, _ = resumed
    for got in run_ok(fr.dcp_load_refused, 6, replicas=3, path=str(path)):
        assert re.search(
            r"CheckpointException.*ValueError: Size mismatch between saved torch.Size\(\[2, 10, 6\]\) "
            r"and current: torch.Size\(\[3, 10, 6\]\) for optim.state.0.weight.exp_avg",
            got["dcp"],
            re.S,
        )
        assert got["load_state_dict"] == (
            "ValueError: DistributedLion.load_state_dict: a saved state of shape (2, 10, 6) is (3, 10, 6) "
            "here: each replica's momentum is its own, so resume with 2 replicas (the shard group's "
            "size may change)"
        )
        assert got["other_model"] == (
            "ValueError: DistributedLion.load_state_dict: a saved state of shape (3, 11, 6) belongs to a "
            "parameter of shape (11, 6), not (10, 6): another model"
        )


# ---- 8. refusals


REFUSED = {
    "mixed": r"ValueError: DistributedLion got FSDP-sharded \(DTensor\) and plain parameters together "
    r"\(parameter #1 \(3,\) is plain\)",
    "shard1": r"ValueError: .*placed \(Replicate\(\), Shard\(dim=1\)\) on a 2-D mesh.*Shard\(d\) for d > 0",
    "mesh3d": r"ValueError: .*placed \(Replicate\(\), Replicate\(\), Shard\(dim=0\)\) on a 3-D mesh",
    "both_sharded": r"ValueError: .*placed \(Shard\(dim=0\), Shard\(dim=0\)\) on a 2-D mesh",
    "unsharded_model": r"ValueError: dlion.attach needs a DistributedDataParallel or FSDP2 \(fully_shard\) "
    r"model.*got Sequential \(under FSDP, attach after fully_shard\)",
    "early_optimizer": r"ValueError: parameter '0.weight' of the FSDP model is not in the DistributedLion "
    r"optimizer: fully_shard replaces every parameter by a DTensor, so build the optimizer after",
    "hierarchical": r"ValueError: DistributedLion over FSDP-sharded parameters does not take "
    r"backend='hierarchical'",
    "overlap": r"ValueError: DistributedLion over FSDP-sharded parameters does not take overlap=True",
    "process_group": r"ValueError: .*votes across the mesh's replicate dimension: pass no process_group "
    r"\(got <torch.*ProcessGroup",
    "transport": r"ValueError: .*pass no process_group \(got None\) and transport='torch' \(got 'mpi'\)",
}


def test_bad_layouts_and_settings_are_named() -> None:
    """On a 2x2 mesh, every rank: a mix of DTensor and plain parameters; a DTensor placed
    Shard(1); a 3-D mesh; a 2-D mesh sharded on both dimensions; attach on a model before
    fully_shard; an optimizer built before fully_shard, attached after; backend
    "hierarchical", overlap=True, process_group= and transport "mpi" under sharding."""
    for rank, got in enumerate(run_ok(fr.refusals, 4)):
        assert got.keys() == REFUSED.keys()
        for case, pattern in REFUSED.items():
            assert re.match(pattern, got[case], re.S), (rank, case, got[case])


def test_each_shard_group_draws_its_own_coins() -> None:
    """A shard's positions are local, so coins keyed by position alone would repeat in every
    shard group: the seed is keyed by the shard index, the same across a shard's replicas."""
    out = run_ok(fr.coin_seeds, 4, replicas=2)
    by_shard: dict[int, set[int]] = {}
    for shard_index, seed in out:
        by_shard.setdefault(shard_index, set()).add(seed)
    assert all(len(seeds) == 1 for seeds in by_shard.values())  # the replicas of a shard agree
    assert len({next(iter(s)) for s in by_shard.values()}) == 2  # the two shards differ
    assert 3 not in {seed for _, seed in out}


# ---- 9. edges: one bad shard, attach's undoing, what is refused, swapped parameters


EDGES_4 = {  # fsdp_ranks.calls, all on one 2x2 world; the jobs that raise go last
    "skip": (fr.nonfinite, {"replicas": 2, "policy": "skip"}),
    "attach_twice": (fr.attach_twice, {}),
    "stale": (fr.stale_weights, {}),
    "stale_rooted": (fr.stale_weights, {"rooted": True}),
    "scaler": (fr.grad_scaler, {}),
    "savers": (fr.savers_refused, {}),
    "flattened": (fr.dcp_flattened, {"k": 2}),
    "swapped": (fr.swapped_in, {}),
    "raise_0": (fr.nonfinite, {"replicas": 2, "policy": "raise", "bad_rank": 0}),
    "raise_3": (fr.nonfinite, {"replicas": 2, "policy": "raise", "bad_rank": 3}),
}
EDGES_1D = {  # fsdp_ranks.torchrun_1d, on one 1-D world of 2 ranks
    "train": (fr.train_sharded, {"replicas": 1}),
    "skip": (fr.nonfinite, {"replicas": 1, "policy": "skip"}),
    "raise_0": (fr.nonfinite, {"replicas": 1, "policy": "raise", "bad_rank": 0}),
    "raise_1": (fr.nonfinite, {"replicas": 1, "policy": "raise", "bad_rank": 1}),
}


@pytest.fixture(scope="module")
def edges_4ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    path = tmp_path_factory.mktemp("edges")
    paths = {"savers": {"path": str(path / "dlion-files")}, "flattened": {"path": str(path / "flat")}}
    jobs = [(fn, kw | paths.get(name, {})) for name, (fn, kw) in EDGES_4.items()]
    return _by_name(EDGES_4, run_ok(fr.calls, 4, jobs=jobs, timeout_s=90))


@pytest.fixture(scope="module")
def edges_1d() -> dict[str, list[Any]]:
    return _by_name(["env", *EDGES_1D], run_ok(fr.torchrun_1d, 2, jobs=list(EDGES_1D.values()), timeout_s=90))


@pytest.mark.parametrize("mesh", ["2x2", "1d"])
def test_nonfinite_gradient_in_one_shard_skips_every_rank(
    mesh: str, edges_4ranks: dict[str, Any], edges_1d: dict[str, Any]
) -> None:
    """An Inf in one element of rank 0's local gradient shard at step BAD_STEP, under
    nonfinite="skip": every rank skips it (its replica by the vote's metadata, the other shard
    group by the shard verdict; on a 1-D mesh the verdict alone): no local shard or momentum
    moves, every rank counts one skipped step, the step's records are FSDP's and the
    agreement's (no vote), and two more steps train with every rank equal."""
    results = (edges_4ranks if mesh == "2x2" else edges_1d)["skip"]
    replicas = 2 if mesh == "2x2" else 1
    for rank, got in enumerate(results):
        assert got["error"] is None, rank
        assert got["counters_at_skip"] == (fr.BAD_STEP + 1, 1), rank
        assert got["unchanged"] and got["momenta_unchanged"], rank
        assert got["counters"] == (fr.STEPS + 1, 1), rank
        recs = got["records"][fr.BAD_STEP]
        assert Counter(r for r in recs if r[2] == "node") == fsdp_records(2, gathers=2), rank
        meta = dlion_records(rank, replicas, 2, "average", False)[:1] if replicas > 1 else []
        assert [r for r in recs if r[2] == "net"] == meta, rank
    assert_ranks_equal(results)


def _raised(bad: int, message: str | None) -> str:
    named = f"rank {bad}" if message is None else message
    return (
        f"NonFiniteGradientError: non-finite gradient (NaN or Inf) on {named}, parameter #0 (10, 6) at step "
        f"{fr.BAD_STEP}; pass nonfinite='skip' to skip such steps on all ranks"
    )


@pytest.mark.parametrize(("mesh", "bad"), [("2x2", 0), ("2x2", 3), ("1d", 0), ("1d", 1)])
def test_nonfinite_gradient_in_one_shard_raises_on_every_rank(
    mesh: str, bad: int, edges_4ranks: dict[str, Any], edges_1d: dict[str, Any]
) -> None:
    """Under nonfinite="raise" (the default) every rank raises NonFiniteGradientError at the
    same step, naming the same tensor; none goes on to wait for the others (a rank that did
    would time out, and report)."""
    for rank, got in enumerate((edges_4ranks if mesh == "2x2" else edges_1d)[f"raise_{bad}"]):
        assert re.fullmatch(re.escape(_raised(bad, "@")).replace("@", r"rank \d"), got["error"]), rank


@pytest.mark.parametrize(
    ("mesh", "bad"),
    [
        ("2x2", 0),
        ("2x2", 3),
        ("1d", 0),
        ("1d", 1),
    ],
)
def test_nonfinite_error_names_the_bad_rank(
    mesh: str, bad: int, edges_4ranks: dict[str, Any], edges_1d: dict[str, Any]
) -> None:
    """Every rank names the rank whose gradient was not finite, by its global rank: under HSDP
    the replicas' metadata names it by its rank in the replicate group, turned global before
    the shard groups agree (with the Inf on rank 0, ranks 2 and 3 once named "rank 2")."""
    for rank, got in enumerate((edges_4ranks if mesh == "2x2" else edges_1d)[f"raise_{bad}"]):
        assert got["error"] == _raised(bad, None), rank


ATTACHED = {
    "mesh_info": "FSDPMeshInfo",  # the shard dimension alone: no all-reduce across replicas
    "post_forward_mesh_info": "FSDPMeshInfo",
    "_all_gather_comm": "CountedAllGather",
    "_reduce_scatter_comm": "CountedReduceScatter",
}


def test_attach_twice_is_refused_and_detach_gives_fsdp_its_own(edges_4ranks: dict[str, Any]) -> None:
    """A 2x2 model whose root FSDP group holds the last Linear. dlion.attach again with the
    same optimizer, or with a second DistributedLion on the same model: a ValueError each,
    the first attachment untouched (it counts FSDP's collectives through a step). After
    detach() every group's mesh_info, post_forward_mesh_info and collectives are FSDP's own
    objects again (the root's post_forward_mesh_info the None FSDP's lazy init set at the
    first forward), as a twin model never attached has them after its first forward."""
    for rank, got in enumerate(edges_4ranks["attach_twice"]):
        assert got["same_optimizer"] == (
            "ValueError: dlion.attach: this DistributedLion is attached to an FSDP model already; "
            "detach() the first attachment before attaching again"
        ), rank
        assert got["second_optimizer"] == (
            "ValueError: dlion.attach: this FSDP model is attached to a DistributedLion already; "
            "detach() that attachment first"
        ), rank
        assert not got["second_attached"], rank
        assert got["attached"] == [ATTACHED] * 3, rank  # the root's group, then each sharded Linear's
        # the root's group is all-gathered once (FSDP keeps it unsharded from forward to backward)
        counted = {"fsdp.all_gather": 5, "fsdp.reduce_scatter": 3, "shard.verdict": 1}
        assert Counter(got["counted"]) == counted, rank
        assert got["detached"] == got["twin"], rank
        assert [g["mesh_info"] for g in got["detached"]] == ["HSDPMeshInfo"] * 3, rank
        pf = [g["post_forward_mesh_info"] for g in got["detached"]]
        assert pf == ["NoneType", "HSDPMeshInfo", "HSDPMeshInfo"], rank
        assert got["root_post_forward"] == ["None", "None"], rank
        assert not any(got["counted_after"]), rank
        root, *others = got["restored"]
        assert root == {**dict.fromkeys(ATTACHED, True), "post_forward_mesh_info": False}, rank
        assert all(all(r.values()) for r in others), rank


def test_no_grad_forward_after_step_sees_the_new_weights(edges_4ranks: dict[str, Any]) -> None:
    """Under attach: forward and backward, a torch.no_grad() forward, step(), a no_grad
    forward: its output is that of an unsharded copy built from the stepped parameters'
    full_tensor(), exactly (attach keeps FSDP resharding each Linear after forward, so the
    next forward all-gathers the new shards)."""
    for rank, got in enumerate(edges_4ranks["stale"]):
        assert same_bits([got["sharded"]], [got["unsharded"]]), rank


def test_no_grad_forward_after_step_with_a_root_group(edges_4ranks: dict[str, Any]) -> None:
    """The same with the last Linear in the root's FSDP group: FSDP does not reshard the
    root's parameters after forward (nor, with no backward, at all), so without help the
    no_grad forward after step() would reuse the parameters all-gathered before it (stale by
    about 3e-2; a torch.optim optimizer over plain FSDP2 gets the same). attach reshards every
    FSDP module in a step pre-hook (FSDPModule.reshard(), a no-op where already sharded)."""
    for rank, got in enumerate(edges_4ranks["stale_rooted"]):
        assert same_bits([got["sharded"]], [got["unsharded"]]), rank


def test_grad_scaler_is_refused_over_sharded_parameters(edges_4ranks: dict[str, Any]) -> None:
    """torch.amp.GradScaler("cpu") (enabled on the CPU) driving a sharded DistributedLion:
    scaler.step(opt), and scaler.unscale_(opt) then scaler.step(opt), raise take_loss_scale's
    ValueError on every rank, and nothing moves."""
    for rank, got in enumerate(edges_4ranks["scaler"]):
        assert got["enabled"], rank
        for case in ("step", "unscale_step"):
            assert got[case].startswith(
                "ValueError: DistributedLion over FSDP-sharded parameters does not take a GradScaler: "
                "the ranks of a shard group would scale their gradients differently"
            ), (rank, case)
        assert not got["moved"], rank


def test_dlion_savers_refuse_a_sharded_optimizer(edges_4ranks: dict[str, Any]) -> None:
    """dlion.save_optimizer_state and dlion.gather_optimizer_state on a sharded optimizer:
    a ValueError naming torch.distributed.checkpoint, on every rank, and no file written."""
    for rank, got in enumerate(edges_4ranks["savers"]):
        for case in ("save", "gather"):
            assert got[case].startswith(
                "ValueError: DistributedLion over FSDP-sharded parameters saves through "
                "torch.distributed.checkpoint (get_optimizer_state_dict / set_optimizer_state_dict"
            ), (rank, case)
        assert not got["written"], rank


def test_dcp_flattened_resume_equals_the_unbroken_run(
    edges_4ranks: dict[str, Any], hsdp_4ranks: dict[str, Any]
) -> None:
    """StateDictOptions(flatten_optimizer_state_dict=True), torchtitan's: the counters are
    saved per parameter under "param_groups.<fqn>.dlion" (the live groups carry the key, so
    the unflattening keeps it); saved at step 2, loaded into a fresh model and optimizer, the
    counters are (2, 0) right after load, and 2 more steps end where the unbroken 4-step run
    does, parameters and momenta bit for bit."""
    unbroken = hsdp_4ranks["average"]
    for rank, got in enumerate(edges_4ranks["flattened"]):
        fqns = [f"{i}.{n}" for i in (0, 2, 4) for n in ("weight", "bias")]
        counters = {"steps_taken": 2, "skipped_steps": 0}
        assert got["saved_counters"] == {f"param_groups.{f}.dlion": counters for f in fqns}, rank
        assert {f"state.{f}.exp_avg" for f in fqns} <= set(got["saved_keys"]), rank
        assert got["load"]["init_counters"] == (1, 0) and got["load"]["counters"] == (2, 0), rank
        assert got["load"]["init_changed"] == [False] * 6, rank
        assert same_bits(got["params"], unbroken[rank]["params"]), rank
        assert same_bits(got["momenta"], unbroken[rank]["momenta"]), rank
        assert got["counters"] == (4, 0), rank


def test_params_swapped_in_after_fully_shard(
    edges_4ranks: dict[str, Any], hsdp_4ranks: dict[str, Any]
) -> None:
    """Accelerate's FSDP2 prepare: DistributedLion built over the plain model's parameters,
    the model then fully_shard'ed on 2x2 and each param group's "params" replaced by its
    DTensors. state_dict() right after the swap, before any step, is the sharded form (the
    counters in every param group under "dlion", none at the top); attached and trained, every
    rank ends where the optimizer built after fully_shard does (hsdp_4ranks "average"),
    parameters, momenta and ledger, bit for bit, with no warning."""
    for rank, got in enumerate(edges_4ranks["swapped"]):
        assert got["keys"] == ["param_groups", "state"], rank
        assert got["group_counters"] == [{"steps_taken": 0, "skipped_steps": 0}], rank
        ref = hsdp_4ranks["average"][rank]
        for key in ("params", "momenta", "local"):
            assert same_bits(got[key], ref[key]), (rank, key)
        assert got["records"] == ref["records"], rank
        assert got["warnings"] == [] and got["counters"] == (fr.STEPS, 0), rank


def test_1d_mesh_under_torchrun_environment_trains(edges_1d: dict[str, Any]) -> None:
    """With WORLD_SIZE and RANK set as torchrun sets them, a 1-D mesh (no replicas: no comm
    of its own) is not taken for a launch that made no process group: it trains, equal to
    dlion.Lion on the unsharded model fed FSDP's mean gradient, bit for bit."""
    params, _ = fr.lion_reference(2)
    assert edges_1d["env"] == ["2", "2"]
    for rank, got in enumerate(edges_1d["train"]):
        assert same_bits(got["params"], params), rank
        assert got["counters"] == (fr.STEPS, 0), rank
