"""A one-machine Ray cluster that this process starts and stops, and nobody else's.

``ray stop`` kills every Ray process on the machine, other users' clusters too. This
starts ``ray start --head --block`` in a session of its own, with its own temporary
folder and its own free ports, and stops it by signalling that session and then
killing whatever still names that folder on its command line: only what it started.

    with LocalRayCluster(num_cpus=4) as cluster:
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, ...])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    # The `ray` beside this interpreter: the cluster then runs this environment's Python,
    # which is the one `ray job submit` entrypoints get.
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        raise FileNotFoundError("the `ray` command is not installed; pip install -e '.[ray]'")
    return found


class LocalRayCluster:
    """``ray start --head`` on this machine, bounded in time and stopped on exit."""

    def __init__(
        self, *, num_cpus: int = 4, dashboard: bool = True, start_timeout_s: float = START_TIMEOUT_S
    ):
        if num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.start_timeout_s = start_timeout_s
        # Unix socket paths must stay under ~107 bytes: a short folder under /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dray", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> LocalRayCluster:
        # Ray's fixed default ports would collide with a cluster someone else runs here.
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--min-worker-port": 0,
            "--max-worker-port": 0,
        }
        cmd = [_ray_cli(), "start", "--head", "--block", "--disable-usage-stats"]
        cmd += ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus)]
        cmd += ["--temp-dir", str(self.temp_dir), "--include-dashboard", str(self.dashboard).lower()]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        log = (self.temp_dir / "ray-start.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        marker = "Ray runtime started"
        log = self.temp_dir / "ray-start.log"
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if marker in text:
                return
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the Ray cluster did not start within {self.start_timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop this cluster: SIGTERM its session, then kill whatever still uses its folder."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + STOP_GRACE_S
        while (pids := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)  # a killed process lingers until the kernel has torn it down
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive (Linux /proc): in the session ``ray start``
        led (Ray's workers take process groups of their own, not sessions), or naming this
        cluster's folder on their command line."""
        needle = str(self.temp_dir).encode()
        session = self.proc.pid if self.proc is not None else -1
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                # After the command name (which may hold spaces): state, ppid, pgrp, session.
                state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
                if state == "Z":  # dead already, waiting for its parent to reap it
                    continue
                if int(sid) == session or needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
