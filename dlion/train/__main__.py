"""``python -m dlion.train`` and ``torchrun -m dlion.train``: one worker of the job."""

import os
import sys

from dlion.train.loop import main

if __name__ == "__main__":
    code = main()
    # Skip interpreter shutdown once the report is written. A Gloo worker thread can still
    # be releasing the tensors of the last collective then; it needs the GIL, which
    # finalisation no longer hands out, and the process aborts ("terminate called without
    # an active exception", SIGABRT) in about one run in ten. Failures still raise above.
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpiexec treats an exit without it as a crash
    os._exit(code)
