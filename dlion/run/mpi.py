"""N ranks under mpiexec: ``python -m mpi4py -m dlion.train ... --transport mpi``.

``python -m mpi4py`` makes an uncaught exception on one rank abort the whole job
(MPI_Abort) instead of leaving the others blocked in a collective. mpiexec comes from the
PyPI Open MPI or MPICH wheel (the ``mpi`` extra) installed next to this interpreter, or
from PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dlion.train.dist import share_cores


def find_mpiexec() -> str:
    """mpiexec next to this interpreter first (the wheel's), then on PATH."""
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError(
            "--transport mpi needs mpiexec and mpi4py: pip install 'dlion[mpi]' (the Open MPI wheel)"
        )
    return found


def mpiexec_command(processes: int, argv: list[str], mpiexec: str) -> list[str]:
    cmd = [mpiexec, "-n", str(processes)]
    if _is_open_mpi(mpiexec):
        # Open MPI refuses root without this flag, and more ranks than cores without the other.
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [*cmd, sys.executable, "-m", "mpi4py", "-m", "dlion.train", *argv]


def _is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def launch_mpi(processes: int, argv: list[str]) -> int:
    """Run the training job on ``processes`` MPI ranks on this host; mpiexec's exit status."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    env = dict(os.environ)
    share_cores(env, processes)
    proc = subprocess.Popen(mpiexec_command(processes, argv, find_mpiexec()), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # mpiexec forwards the signal to its ranks; give them a moment, then make sure.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
