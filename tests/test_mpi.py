"""DistributedLion over MPI (mpi4py, Open MPI wheel) under mpiexec, against the simulation."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from mpi_worker import DEDICATED_CASES, cases
from test_distributed_lion import assert_matches_simulation


def _mpiexec() -> str:
    from dlion.launch.mpi import find_mpiexec

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
