"""Launch N local ranks of the communication benchmark, over Gloo or under mpiexec.

torch: N spawned processes join a Gloo process group through a file store; each writes
its results, then leaves with ``os._exit`` (Gloo can abort at interpreter exit). MPI:
``mpiexec -n N python -m mpi4py -m bench.comm.launch SPEC``, so one rank's exception
aborts the job. Every wait is bounded by the spec's timeout; a failed rank stops the rest.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.comm.rank import LaunchSpec, run_rank
from dlion.run import mpi as launch_mpi


class LaunchError(RuntimeError):
    """A launch failed or timed out; the message names the rank or the mpiexec output."""


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the Open MPI wheel's) or on PATH; None without mpi4py."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    try:
        return launch_mpi.find_mpiexec()
    except FileNotFoundError:
        return None


def _torch_child(spec_path: str, rank: int, store: str) -> None:
    """Spawned rank: Gloo process group over a file store; results on disk, then os._exit."""
    code = 0
    try:
        import numba
        import torch
        import torch.distributed as dist

        numba.set_num_threads(1)
        torch.set_num_threads(1)
        spec = LaunchSpec.load(spec_path)
        timeout = timedelta(seconds=spec.timeout_s)
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=spec.world, timeout=timeout
        )
        run_rank(spec, rank, dist.barrier)
    except BaseException:
        code = 1
        Path(spec_path).with_name(f"error-rank{rank}.txt").write_text(traceback.format_exc())
    # Gloo can abort at interpreter exit (a torch bug): skip the teardown.
    os._exit(code)


def run_torch(spec: LaunchSpec, spec_path: Path) -> None:
    ctx = mp.get_context("spawn")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = str(spec_path.with_name("store"))
    procs = [ctx.Process(target=_torch_child, args=(str(spec_path), r, store)) for r in range(spec.world)]
    deadline = time.monotonic() + spec.timeout_s
    try:
        for p in procs:
            p.start()
        while not all(p.exitcode == 0 for p in procs):
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                error = spec_path.with_name(f"error-rank{failed[0]}.txt")
                why = (
                    error.read_text()[-2000:] if error.exists() else "no error file (killed? out of memory?)"
                )
                raise LaunchError(f"rank {failed[0]} exited with {procs[failed[0]].exitcode}: {why}")
            if time.monotonic() > deadline:
                raise LaunchError(f"timed out after {spec.timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.pid is None:  # never started
                continue
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def run_mpi(spec: LaunchSpec, spec_path: Path, mpiexec: str) -> None:
    cmd = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", str(spec.world)]
    cmd += [sys.executable, "-m", "mpi4py", "-m", "bench.comm.launch", str(spec_path)]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise LaunchError(f"mpiexec timed out after {spec.timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise LaunchError(f"mpiexec exited with {proc.returncode}: {output[-3000:]}")


def mpi_child(spec_path: str) -> int:
    import numba
    import torch
    from mpi4py import MPI

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    run_rank(LaunchSpec.load(spec_path), comm.Get_rank(), comm.Barrier)
    return 0


def launch(spec: LaunchSpec, mpiexec: str | None = None) -> list[dict[str, Any]]:
    """Run ``spec.world`` ranks (``spec.out_dir`` is ignored: a fresh folder is used); each
    rank's result file, by rank. Raises LaunchError naming what went wrong."""
    with tempfile.TemporaryDirectory(prefix=f"dlion-bench-{spec.transport}{spec.world}-") as tmp:
        spec = replace(spec, out_dir=tmp)
        spec_path = Path(tmp) / "spec.json"
        spec.save(spec_path)
        if spec.transport == "mpi":
            if mpiexec is None:
                raise LaunchError("transport 'mpi' needs mpiexec and mpi4py")
            run_mpi(spec, spec_path, mpiexec)
        else:
            run_torch(spec, spec_path)
        try:
            return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(spec.world)]
        except OSError as err:
            raise LaunchError(f"a rank left no results: {err}") from err


if __name__ == "__main__":  # an MPI rank: python -m mpi4py -m bench.comm.launch SPEC
    raise SystemExit(mpi_child(sys.argv[1]))
