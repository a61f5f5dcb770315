"""Run under mpiexec: DistributedLion over MPI on each backend; results pickled per rank.

Without arguments after the output folder: every N from 2 to the launch's size in one
launch, N = size on COMM_WORLD and each smaller N on a communicator of ranks 0..N-1 (the
others wait), so one set of interpreter start-ups serves every N. With "dedicated": the
last rank is a parameter server. With "lengths": rank 0 sends 15, 16 and 17 bytes where
rank 1 expects 16 each time; rank 1 records what MpiComm says.
"""

from __future__ import annotations

import os
import pickle
import sys
import time

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


def _idle_barrier(comm: MPI.Comm) -> None:
    """A barrier that sleeps while it waits: idle ranks leave the cores to the busy ones."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def by_world(comm: MPI.Comm) -> dict[int, list[dict]]:
    """{N: this rank's results of cases(N)} for every N this rank takes part in."""
    rank, size = comm.Get_rank(), comm.Get_size()
    out = {}
    for n in range(2, size + 1):
        _idle_barrier(comm)
        sub = None if n == size else comm.Split(0 if rank < n else MPI.UNDEFINED, rank)
        if rank < n:
            out[n] = [
                _train(rank, n, v, t, seed=7, backend=b, transport="mpi", process_group=sub)
                for v, t, b in cases(n)
            ]
        if sub is not None and sub != MPI.COMM_NULL:
            sub.Free()
    return out


def wrong_lengths(rank: int) -> list[str]:
    import torch

    from dlion.transport.mpi_comm import MpiComm

    comm, said = MpiComm(), []
    for n in (15, 16, 17):
        if rank == 0:
            comm.wait_all([comm.isend(torch.full((n,), 7, dtype=torch.uint8), 1, f"{n} bytes")])
        elif rank == 1:
            buf = torch.zeros(16, dtype=torch.uint8)
            try:
                comm.wait_all([comm.irecv(buf, 0, "bucket0 bits")])
                said.append(f"ok {buf.tolist()}")
            except ValueError as err:
                said.append(str(err))
    return said


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if sys.argv[2:] == ["dedicated"]:  # the last rank is a parameter server
        results: object = run_dedicated(rank, world, DEDICATED_CASES, transport="mpi")
    elif sys.argv[2:] == ["lengths"]:
        results = wrong_lengths(rank)
    else:
        results = by_world(comm)
    with open(os.path.join(sys.argv[1], f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
