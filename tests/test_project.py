"""The cost-model projection: alpha-beta formulas by hand, its limits, the crossing finder,
its bytes against the optimizers' own ledgers at N = 2..4, and the CLI's files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.project import driver as cli
from bench.project.model import (
    BY_LABEL,
    FP32_RING,
    METHODS,
    check_bytes,
    collective_terms,
    collective_time,
    find_crossover,
    last_fit,
    model_bytes,
    plan,
    project,
    step_bytes,
)

ALPHA, BETA = 5e-6, 1e-9  # 5 us per message, 1 GB/s


@pytest.mark.parametrize(
    ("op", "algorithm", "n", "size", "fan", "expected"),
    [
        # ring all_reduce of 8 MB on 4 ranks: 6 start-ups, 2 * 3/4 * 8 MB
        ("all_reduce", "ring", 4, 8e6, 0, 6 * ALPHA + 12e6 * BETA),
        # recursive doubling on 5 ranks: ceil(log2 5) = 3 rounds of the whole buffer
        ("all_reduce", "tree", 5, 8e6, 0, 3 * (ALPHA + 8e6 * BETA)),
        ("all_gather", "ring", 4, 1e6, 0, 3 * (ALPHA + 1e6 * BETA)),
        ("all_gather", "tree", 8, 1e6, 0, 3 * ALPHA + 7e6 * BETA),
        ("all_to_all", "ring", 4, 8e6, 0, 3 * (ALPHA + 2e6 * BETA)),
        ("all_to_all", "tree", 8, 8e6, 0, 3 * (ALPHA + 4e6 * BETA)),
        # a server on rank 0 of 8: 7 messages through its link, ring or tree alike
        ("gather", "ring", 8, 1e6, 7, 7 * (ALPHA + 1e6 * BETA)),
        ("broadcast", "tree", 8, 1e6, 8, 8 * (ALPHA + 1e6 * BETA)),
    ],
)
def test_alpha_beta_by_hand(op: Any, algorithm: Any, n: int, size: float, fan: int, expected: float) -> None:
    assert collective_time(op, size, n, ALPHA, BETA, algorithm=algorithm, fan=fan) == pytest.approx(expected)


def test_best_picks_tree_for_small_and_ring_for_large_messages() -> None:
    assert collective_terms("all_reduce", 1e3, 1024, ALPHA, BETA, algorithm="best")[1] == "tree"
    assert collective_terms("all_reduce", 1e9, 1024, ALPHA, BETA, algorithm="best")[1] == "ring"
    with pytest.raises(ValueError, match="algorithm must be one of"):
        collective_time("all_reduce", 1e3, 4, ALPHA, BETA, algorithm="fastest")  # type: ignore[arg-type]


def test_fp32_ring_tends_to_two_full_buffers_per_link() -> None:
    d, gbits = 25_000_000, 100.0
    limit_ms = 2 * 4 * d / (gbits * 1e9 / 8) * 1e3
    for n, tol in ((8, 0.13), (1024, 1e-3)):
        p = project(FP32_RING, n, d, gbits, alpha=0.0)
        assert p.latency_ms == 0
        # 2 (N-1)/N of the buffer, plus the few bytes of the metadata all_gather and of padding
        assert p.comm_ms == pytest.approx(limit_ms * (n - 1) / n, rel=1e-4)
        assert abs(p.comm_ms / limit_ms - 1) <= tol
    # With latency, the bandwidth term keeps the limit and the latency term adds 2 (N-1) alpha.
    p = project(FP32_RING, 1024, d, gbits, alpha=5e-6)
    assert p.bandwidth_ms == pytest.approx(limit_ms, rel=1e-3)
    assert p.latency_ms == pytest.approx(1e3 * 5e-6 * (2 * 1023 + 1023))  # the metadata ring all_gather too


def test_sharded_majority_is_a_32nd_of_fp32_ring_at_every_n() -> None:
    sharded = BY_LABEL["dlion-mavo sharded"]
    for n in (2, 8, 64, 1024):
        fp32 = project(FP32_RING, n, 25_000_000, 100, 5e-6).bandwidth_ms
        mine = project(sharded, n, 25_000_000, 100, 5e-6, algorithm="ring").bandwidth_ms
        assert 31.0 < fp32 / mine <= 32.0, (n, fp32 / mine)


def test_server_grows_with_n_while_sharded_stays_flat() -> None:
    server, sharded = BY_LABEL["dlion-mavo server"], BY_LABEL["dlion-mavo sharded"]
    ns = [8, 64, 512]
    srv = [project(server, n, 25_000_000, 100, 5e-6).bandwidth_ms for n in ns]
    shd = [project(sharded, n, 25_000_000, 100, 5e-6, algorithm="ring").bandwidth_ms for n in ns]
    assert srv[2] / srv[0] == pytest.approx(511 / 7, rel=0.01)  # the server's link carries N - 1 messages
    assert max(shd) / min(shd) < 1.15  # 2 (N-1)/N d/8 whatever N
    assert srv[0] > 5 * shd[0]


def test_plans_equal_comm_model_to_the_byte() -> None:
    numels = [8201, 5401, 3401, 1801, 1021, 3, 172]
    checked = 0
    for m in METHODS:
        for n in (2, 3, 7, 64, 1000, 1024):
            for server in (False, True) if m.has_server else (False,):
                theirs = model_bytes(m, n, numels, 8192, server=server)
                if theirs is not None:
                    assert step_bytes(m, n, numels, 8192, server=server) == theirs, (m.label, n, server)
                    checked += 1
    assert checked == 6 * (2 + 4 + 4 * 2)  # fp32 x2, allgather/sharded x4, servers x4 both views
    assert check_bytes(numels, [2, 1024], 8192) == 2 * 14


def test_crossover_on_a_constructed_case() -> None:
    points = [(8, 10.0), (16, 40.0), (32, 90.0), (64, 130.0), (128, 80.0)]
    assert find_crossover(points, 100.0) == (32, 64)  # the first crossing; N = 128 dips back under
    assert find_crossover(points, 5.0) == (None, 8)  # never
    assert find_crossover(points[:3], 100.0) == (32, None)  # always
    # Between the listed N: comm = 3 N ms crosses 100 ms after N = 33.
    assert last_fit(32, 64, lambda n: 3.0 * n, 100.0) == 33
    assert last_fit(8, 9, lambda n: 3.0 * n, 100.0) == 8
    texts = [
        cli.Crossing("m", 10, 32, 64, 33, {32: 96.0, 33: 99.0, 64: 192.0}).text(100),
        cli.Crossing("m", 10, None, 8, None, {8: 140.0}).text(100),
        cli.Crossing("m", 10, 1024, None, None, {1024: 15.6}).text(100),
    ]
    assert texts == [
        "fits up to N = 32 (96.0 ms), N = 64 needs 192 ms; crosses after N = 33 (99.0 ms)",
        "never: N = 8 already needs 140 ms > 100 ms",
        "always: 15.6 ms at N = 1024 is within 100 ms",
    ]


# The ledger: every method's real optimizer on 2, 3 and 4 Gloo ranks (subgroups of one job of
# 4 processes), its steady step's records against the plan. Rank 3 is the dedicated server
# process at N = 2 and 3; N = 4 would need a fifth process, about 2 s more of this test.
NUMELS = [8201, 5401, 3401, 1801, 1021, 3, 172]  # bench.comm.rank.tensor_numels(20_000)
BUCKET_NUMEL = 8192  # several buckets, one tensor larger than a bucket
WORLD = 4
SERVER = 3


def ledger_rank(rank: int, world: int) -> dict[str, list[tuple[str, str, int, int]]]:
    import torch
    import torch.distributed as dist

    from dlion import DistributedLion, GlobalOptimizer, ParameterServer
    from dlion.server import ServerLink
    from dlion.transport import TorchComm
    from dlion.worker.baselines.dgc import DGC, DGCConfig
    from dlion.worker.baselines.terngrad import build_terngrad

    sizes = range(2, WORLD + 1)
    groups = {n: dist.new_group(list(range(n))) for n in sizes}
    links = {n: dist.new_group([*range(n), SERVER]) for n in sizes if n <= SERVER}
    out = {}
    for n in sizes:
        for m in (m for m in METHODS if m.algorithm != "tree"):  # the tree row: the same optimizer
            key = f"{m.label} N={n}"
            if m.dedicated and n not in links:
                continue
            if m.dedicated and rank == SERVER:
                server = ParameterServer(ServerLink(TorchComm(links[n]), n))
                server.serve()
                out[key] = _records(server.ledger)
            if rank >= n:
                continue
            gen = torch.Generator().manual_seed(rank)
            params = [torch.nn.Parameter(torch.zeros(k, 1)) for k in NUMELS]  # matrices: DGC compresses them
            g = groups[n]
            if m.family == "fp32":
                opt: Any = GlobalOptimizer(torch.optim.SGD(params, lr=0.1), g)
            elif m.family == "terngrad":
                opt = build_terngrad(params, lr=0.1, weight_decay=0.0, betas=(0.9, 0.99), process_group=g)
            elif m.family == "dgc":
                opt = DGC(params, lr=0.1, process_group=g, config=DGCConfig(warmup_steps=0))
            else:
                link = ServerLink(TorchComm(links[n]), n) if m.dedicated else None
                opt = DistributedLion(
                    params,
                    vote=m.vote,
                    backend=m.backend,
                    bucket_numel=BUCKET_NUMEL,
                    process_group=g,
                    server=link,
                )
            for _ in range(2):  # the first step also carries the one-off fingerprint
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            if m.dedicated:
                opt.close()
            out[key] = _records(opt.ledger)
    return out


def _records(ledger: Any) -> list[tuple[str, str, int, int]]:
    return [
        (r.name.replace("[server]", ""), r.op, r.sent.bits // 8, r.received.bits // 8)
        for r in ledger.steps[-1]
    ]


def _expected(m: Any, n: int, rank: int) -> list[tuple[str, str, int, int]]:
    server = rank == (SERVER if m.dedicated else 0) and m.has_server
    rows: list[tuple[str, str, int, int]] = []
    for c in plan(m, n, NUMELS, BUCKET_NUMEL):
        if server and m.dedicated and c.name == "meta":
            continue  # the server process takes no part in the workers' metadata exchange
        b = c.rank_bytes(n, server=server)
        op = "send" if c.name == "step header" and not server else c.op  # a worker's point-to-point header
        rows.append((c.name, op, b.sent, b.received))
    return rows


def run_forkserver(fn: Any, world: int, timeout_s: float) -> list[Any]:
    """multiproc.run_ok's ranks, forked from a forkserver that has imported torch, dlion and
    this module once: about 1 s of CPU per rank instead of 5 (imports, torch._dynamo)."""
    import multiprocessing as mp
    import os
    import pickle
    import tempfile

    from multiproc import _entry

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "numba", "dlion", "multiproc", __name__])
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, q, {})) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world):
                rank, status, value = q.get(timeout=timeout_s)
                assert status == "ok", f"rank {rank} failed:\n{value}"
                results[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]


def test_plan_equals_the_optimizers_ledgers() -> None:
    results = run_forkserver(ledger_rank, WORLD, timeout_s=120)
    checked = 0
    for rank, records in enumerate(results):
        for key, got in records.items():
            label, n = key.rsplit(" N=", 1)
            assert got == _expected(BY_LABEL[label], int(n), rank), (key, rank)
            checked += 1
    # 11 optimizers on every worker at N = 2, 3, 4 (no server process at 4), + the server's 2 records
    assert checked == 11 * (2 + 3 + 4) - 2 * 4 + 2 * 2


def test_cli_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--small", "--params", "1e6", "--compute-ms", "5"]  # N = 8,16,...,64 at 10 and 100 Gbit/s
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| dlion-mavo sharded |" in printed and "Where communication crosses" in printed
    report = json.loads((tmp_path / "project.json").read_text())
    assert len(report["rows"]) == len(METHODS) * 4 * 2
    assert {r["n"] for r in report["rows"]} == {8, 16, 32, 64}
    assert len(report["crossings"]) == len(METHODS) * 2
    # 1M parameters at 10 Gbit/s: fp32 ring all-reduce needs 2 * 7/8 * 4 MB / 1.25 GB/s = 5.6 ms > 5 ms
    fp32 = next(c for c in report["crossings"] if c["method"] == "fp32 all-reduce, ring" and c["gbits"] == 10)
    assert (fp32["fits_up_to"], fp32["first_over"]) == (None, 8)
    assert (tmp_path / "project.md").read_text().count("| fp32 all-reduce, ring |") == 2
    assert (tmp_path / "project.png").stat().st_size > 0
    assert all(math.isfinite(r["speedup"]) for r in report["rows"])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--workers", "1,8", "--workers: '1' is not a whole number of workers >= 2"),
        ("--workers", "8,12,...,64", "B must be a multiple of A"),
        ("--workers", "8,16,...,100", "100 is not in the series 8, 16"),
        ("--gbits", "10,fast", "--gbits: 'fast' is not a link bandwidth in Gbit/s > 0"),
        ("--gbits", "0", "--gbits: '0' is not a link bandwidth"),
        ("--gbits", "100,100", "--gbits: each bandwidth once"),
        ("--params", "many", "--params: 'many' is not a whole number"),
        ("--params", "2.5", "--params: '2.5' is not a whole number of parameters >= 1"),
        ("--params", "0", "--params: '0' is not a whole number"),
        ("--compute-ms", "-1", "--compute-ms: '-1' is not a compute time per step in ms > 0"),
        ("--alpha-us", "1,2", "--alpha-us: give 1 value or 3 (one per --gbits)"),
    ],
)
def test_bad_flags_are_named(
    flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([flag, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "project.json").exists()


def test_hierarchical_projection_sends_a_kth_of_the_bits_between_nodes() -> None:
    from bench.comm.rank import tensor_numels
    from bench.project.hier import Step, _sent, hierarchical_plan, project_rows, render

    numels = tensor_numels(10_000_000)
    flat = hierarchical_plan(64, 1, numels)  # one GPU per node: the flat sharded vote
    hier = hierarchical_plan(64, 8, numels)

    def bits(steps: list[Step]) -> int:
        return _sent([s for s in steps if s.name != "meta"], "net")

    # 2 (H-1)/H of 1/K of the bits: H = 64, K = 1 against H = 8, K = 8.
    assert bits(hier) == pytest.approx(bits(flat) * (7 / 8) / (63 / 64) / 8, rel=0.01)
    rows = project_rows(10_000_000, 8, [8, 64, 1024], [100.0])
    assert all(r.hier_best_ms < r.fp32_ring_ms for r in rows)
    assert rows[-1].hier_ring_ms < rows[-1].sharded_ring_ms  # rings over 128 nodes, not 1024 ranks
    assert "| 100 | 1024 | 128 |" in render(rows, 10_000_000, 8)
    with pytest.raises(ValueError, match="multiples of --per-node 8"):
        project_rows(10_000_000, 8, [12], [100.0])


@pytest.mark.parametrize("n", [64, 128, 1024])
def test_hsdp_projection_bytes_per_rank_follow_the_formulas(n: int) -> None:
    from bench.project.hier import _sent
    from bench.project.hsdp import hsdp_plan

    d, s = 125_000_000, 8
    r = n // s  # replicas: the nodes
    ring = 2 * (r - 1) / r

    def net(method: str, meta: bool = True) -> int:
        return _sent([st for st in hsdp_plan(method, n, s, d) if meta or st.name != "meta"], "net")

    # The replica all-reduce of the 1/S shard: fp32, and bf16 at half of it (shards rounded up
    # per tensor and to the R chunks: under a kB).
    assert net("hsdp-adamw-fp32") == pytest.approx(ring * 4 * d / s, rel=1e-5)
    assert net("hsdp-adamw-bf16") == pytest.approx(ring * 2 * d / s, rel=1e-5)
    # The sharded vote of the shard's signs, its buckets padded to 16 R bytes; and its metadata.
    assert net("hsdp-dlion", meta=False) == pytest.approx(ring * d / s / 8, rel=1e-3)
    assert 0 < net("hsdp-dlion") - net("hsdp-dlion", meta=False) < 1e-4 * d
    # FSDP inside the node, the same for every HSDP plan: two fp32 all-gathers of the parameters
    # and the fp32 reduce-scatter of the gradients, (S-1)/S of 4d each.
    for method in ("hsdp-adamw-fp32", "hsdp-adamw-bf16", "hsdp-dlion"):
        node = _sent(hsdp_plan(method, n, s, d), "node")
        assert node == pytest.approx(3 * (s - 1) / s * 4 * d, rel=1e-6)
    assert _sent(hsdp_plan("ddp-fp32", n, s, d), "node") == 0


def test_hsdp_projection_orders_the_methods_and_writes_its_files(tmp_path: Path) -> None:
    from bench.project.hsdp import METHODS, HsdpProjectConfig, main, project_rows

    rows = project_rows(HsdpProjectConfig(params=25_000_000, workers=(64, 1024), gbits=(100.0,)))
    for n in (64, 1024):
        ms = {r.method: r.ring_ms for r in rows if r.n == n}
        assert ms["hsdp-dlion"] < ms["hsdp-adamw-bf16"] < ms["hsdp-adamw-fp32"] < ms["ddp-fp32"], ms
    assert main(["--params", "1e6", "--workers", "64,128", "--gbits", "100", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "project_hsdp.json").read_text())
    assert {r["method"] for r in saved} == set(METHODS) and len(saved) == 2 * len(METHODS)
    assert "| HSDP + DistributedLion (sharded vote) |" in (tmp_path / "project_hsdp.md").read_text()
    with pytest.raises(ValueError, match="multiples of --per-node 8, 2 nodes or more"):
        HsdpProjectConfig(workers=(8,))
