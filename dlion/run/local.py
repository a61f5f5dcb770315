"""N local worker processes joined by a Gloo process group: the embedded default, no cluster.

Each worker is ``python -m dlion.train`` with torchrun's rank variables set, so the
worker code is the same under both launchers. Rendezvous is a FileStore in a fresh
temporary folder (DLION_INIT_METHOD), which needs no free port and so cannot race
another job for one. The launcher polls its workers; when one fails it stops the rest
and names the rank, so a dead worker never leaves the others waiting on a collective.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from dlion.train.dist import ERROR_FILE_ENV, INIT_METHOD_ENV, share_cores

POLL_S = 0.1
# How long a worker gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 5.0


@dataclass(frozen=True)
class WorkerFailure:
    rank: int
    returncode: int
    error: str | None  # the worker's own account, from its error file
    time: float  # when it failed, by its error file, else when the launcher saw it

    def describe(self, server_rank: int | None = None) -> str:
        who = "the parameter server" if self.rank == server_rank else "worker"
        how = (
            f"was killed by {signal.Signals(-self.returncode).name}"
            if self.returncode < 0 and -self.returncode in signal.valid_signals()
            else f"failed with exit code {self.returncode}"
        )
        return f"{who} rank {self.rank} {how}" + (f": {self.error}" if self.error else "")


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def worker_env(rank: int, workers: int, scratch: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of worker ``rank``: torchrun's variables plus thread limits."""
    env = dict(os.environ if base is None else base)
    share_cores(env, workers)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(workers),
        LOCAL_WORLD_SIZE=str(workers),
        MASTER_ADDR="127.0.0.1",
    )
    env[INIT_METHOD_ENV] = (scratch / "store").as_uri()
    env[ERROR_FILE_ENV] = str(scratch / f"error-rank{rank}.json")
    return env


def launch_local(workers: int, argv: list[str], *, server_rank: int | None = None) -> int:
    """Run ``python -m dlion.train *argv`` on ``workers`` local ranks; 0 if all of them succeed.

    On the first failure the other workers are stopped and the failing rank's exit status
    is returned, with a message on stderr naming the rank.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    cmd = [sys.executable, "-m", "dlion.train", *argv]
    procs: list[subprocess.Popen[bytes]] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupted)
    with tempfile.TemporaryDirectory(prefix="dlion-launch-") as tmp:
        scratch = Path(tmp)
        try:
            for rank in range(workers):
                procs.append(subprocess.Popen(cmd, env=worker_env(rank, workers, scratch)))
            failure = _supervise(procs, scratch)
        except (KeyboardInterrupt, Interrupted) as e:
            print(f"dlion: interrupted ({e or 'SIGINT'}); stopping {workers} worker(s)", file=sys.stderr)
            return 130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum
        finally:
            stop_processes(procs)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if failure is None:
        return 0
    message = f"dlion: {failure.describe(server_rank)}; the other processes were stopped"
    print(message, file=sys.stderr, flush=True)
    # Popen reports death by signal k as -k; a shell would say 128 + k.
    return failure.returncode if failure.returncode > 0 else 128 - failure.returncode


def _supervise(procs: list[subprocess.Popen[bytes]], scratch: Path) -> WorkerFailure | None:
    """Wait until every worker succeeds (None) or one fails (the first to fail)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            seen = time.time()
            # Several ranks can be found dead in one poll: a fault on one breaks the others'
            # connections. A rank killed without a word (no error file: a signal, out of
            # memory) is the cause over ranks that wrote about it; then the earliest file.
            failures = [read_failure(rank, codes[rank], scratch, seen) for rank in failed]
            return min(failures, key=lambda f: (f.error is not None, f.time, f.rank))
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_S)


def read_failure(rank: int, code: int | None, scratch: Path, seen: float) -> WorkerFailure:
    assert code is not None
    try:
        record = json.loads((scratch / f"error-rank{rank}.json").read_text())
        return WorkerFailure(rank, code, str(record["error"]), float(record["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        # Killed before it could write (a signal, out of memory): only the exit code is known.
        return WorkerFailure(rank, code, None, seen)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live worker, then SIGKILL whatever outlives the grace period."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)
