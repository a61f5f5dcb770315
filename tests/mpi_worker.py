"""Run under mpiexec: DistributedLion over MPI on each backend; results pickled per rank."""

from __future__ import annotations

import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpi4py import MPI
from test_distributed_lion import _train

CASES = [
    ("majority", "random", "allgather"),
    ("average", "random", "sharded"),
    ("majority", "zero", "server"),
]


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    results = [_train(rank, world, v, t, seed=7, backend=b, transport="mpi") for v, t, b in CASES]
    with open(os.path.join(sys.argv[1], f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
