"""Run under mpiexec: DistributedLion over MPI on each backend; results pickled per rank."""

from __future__ import annotations

import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpi4py import MPI
from test_distributed_lion import _train
from test_server import run_dedicated

BACKENDS = ("allgather", "sharded", "server")
DEDICATED_CASES = [("majority", "random"), ("average", "random")]


def cases(world: int) -> list[tuple[str, str, str]]:
    """Every backend x vote; tie="zero" only differs where even splits can happen."""
    rules = [("majority", "random"), ("average", "random")] + [("majority", "zero")] * (world % 2 == 0)
    return [(v, t, b) for v, t in rules for b in BACKENDS]


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if sys.argv[2:] == ["dedicated"]:  # the last rank is a parameter server
        results = run_dedicated(rank, world, DEDICATED_CASES, transport="mpi")
    else:
        results = [_train(rank, world, v, t, seed=7, backend=b, transport="mpi") for v, t, b in cases(world)]
    with open(os.path.join(sys.argv[1], f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
