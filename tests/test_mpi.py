"""DistributedLion over MPI (mpi4py, Open MPI wheel) under mpiexec, against the simulation."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mpi_worker import DEDICATED_CASES, cases
from test_distributed_lion import assert_matches_simulation


def _mpiexec() -> str:
    from dlion.run.mpi import find_mpiexec

    try:
        found = find_mpiexec()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("MPI tests need mpi4py: pip install -e '.[dev]'")
    return found


def _mpirun(tmp_path: Path, world: int, *args: str) -> list:
    worker = Path(__file__).with_name("mpi_worker.py")
    cmd = [_mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", str(world)]
    cmd += [sys.executable, "-m", "mpi4py", str(worker), str(tmp_path), *args]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]


def test_mpi_dedicated_server_matches_simulation(tmp_path: Path) -> None:
    workers = 2
    results = _mpirun(tmp_path, workers + 1, "dedicated")
    assert_matches_simulation(results[:workers], [(v, t, "server") for v, t in DEDICATED_CASES], workers)
    assert [r["served"] for r in results[workers]] == [4, 4]


@pytest.fixture(scope="module")
def by_world(tmp_path_factory: pytest.TempPathFactory) -> list[dict[int, list[dict]]]:
    """One launch of 4 ranks for N = 2, 3 and 4 (see mpi_worker.by_world): by rank, {N: results}."""
    return _mpirun(tmp_path_factory.mktemp("mpi"), 4)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_mpi_transport_matches_simulation(by_world: list[dict[int, list[dict]]], world: int) -> None:
    """Every backend x vote over MPI equals the NumPy simulation, bit for bit."""
    assert [sorted(res) for res in by_world] == [[2, 3, 4], [2, 3, 4], [3, 4], [4]]  # rank r in N > r
    results = [res[world] for res in by_world[:world]]
    assert_matches_simulation(results, cases(world), world)
    assert all(res["ledger"]["bytes_sent"] > 0 for rank in results for res in rank)


def test_mpi_receive_names_a_message_of_the_wrong_length(tmp_path: Path) -> None:
    """MpiComm posts one byte of room: a longer message is a named length error, not MPI's
    truncation abort; a shorter one too."""
    said = _mpirun(tmp_path, 2, "lengths")[1]
    assert said[0] == "rank 1: bucket0 bits from rank 0 was 15 bytes; expected 16 " + EXPLAIN
    assert said[1] == "ok " + str([7] * 16)
    assert said[2] == "rank 1: bucket0 bits from rank 0 was 17 bytes; expected 16 " + EXPLAIN


EXPLAIN = "(the peer runs another model, config or dlion version)"


def test_mpi_killed_rank_ends_the_job_naming_it(tmp_path: Path) -> None:
    """Under mpiexec a SIGKILLed rank takes the job down at once, and the launcher names it."""
    _mpiexec()
    from dlion.train.faults import FAULT_KIND_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV

    from test_train import TINY, _run

    cmd = [
        sys.executable,
        "-m",
        "dlion",
        "train",
        "--workers",
        "3",
        "--transport",
        "mpi",
        "--timeout-s",
        "10",
    ]
    env = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "2", FAULT_KIND_ENV: "kill"}
    started = time.monotonic()
    proc = _run([*cmd, *TINY, "--out", str(tmp_path / "run")], env=env)
    assert proc.returncode != 0
    assert "process rank 1" in proc.stdout + proc.stderr and "signal 9" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run" / "report.json").exists()
