"""DistributedLion over MPI (mpi4py, Open MPI wheel) under mpiexec, against the simulation."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mpi_worker import CASES
from test_distributed_lion import assert_matches_simulation

WORLD = 3


def _mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("MPI tests need mpi4py and an mpiexec: pip install -e '.[dev]' brings the Open MPI wheel")
    return found


def test_mpi_transport_matches_simulation(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("mpi_worker.py")
    cmd = [_mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", str(WORLD)]
    cmd += [sys.executable, "-m", "mpi4py", str(worker), str(tmp_path)]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    assert_matches_simulation(results, CASES, WORLD)
    assert all(res["ledger"]["bytes_sent"] > 0 for rank in results for res in rank)
