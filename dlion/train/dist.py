"""Process-group set-up for the training job, and the few collectives it makes itself.

Rank and world size come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE). ``dlion train`` sets the same ones and adds DLION_INIT_METHOD, a
``file://`` rendezvous in a fresh temporary folder: no port has to be picked, so two
jobs on one machine cannot race for one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dlion.transport import TorchComm

INIT_METHOD_ENV = "DLION_INIT_METHOD"
# Where a worker writes why it failed, so the launcher can name the rank that failed
# first rather than the ones that failed after it, on a broken connection.
ERROR_FILE_ENV = "DLION_ERROR_FILE"

# The file store of a world of one; FileStore reopens its file by path, so the folder
# must outlive the process group.
_scratch: tempfile.TemporaryDirectory[str] | None = None


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``initialized`` is False for plain one-process runs."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # "gloo", "nccl", "mpi", or None for a plain one-process run
    initialized: bool
    comm: Any = None  # TorchComm or MpiComm for the loop's own collectives


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cores(env: dict[str, str], ranks: int, cores: int | None = None) -> None:
    """Thread settings for ``ranks`` processes sharing ``cores`` (default: this machine's),
    into the environment they start with. A user's own settings win. OpenMP threads sleep
    between kernels instead of spinning on a core another rank needs."""
    threads = str(max(1, (cpu_count() if cores is None else cores) // max(1, ranks)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, threads)
    env.setdefault("OMP_WAIT_POLICY", "passive")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def set_thread_counts(local_world_size: int) -> int:
    """Split this machine's cores between its ranks, so N workers do not oversubscribe them.
    Numba's kernels follow torch's count (dlion.kernels.common.ready_threads); starting Numba
    here would set OpenMP's count, which torch reads, to NUMBA_NUM_THREADS."""
    threads = max(1, cpu_count() // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def setup(*, needs_group: bool, timeout_s: float, transport: str = "torch") -> DistContext:
    """Join the job's process group, or start a world of one when the optimizer needs one.

    ``needs_group`` is False only for purely local optimizers, which refuse a world size > 1.
    With ``transport="mpi"`` ranks come from MPI's COMM_WORLD (launched by mpiexec) and no
    torch process group is made.
    """
    if transport == "mpi" and needs_group:
        return _setup_mpi(timeout_s)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if not needs_group and world_size > 1:
        raise ValueError(f"runs on one process only, but WORLD_SIZE={world_size}")
    device = _device(local_rank)
    if not needs_group:
        return DistContext(rank, 1, local_rank, local_world_size, device, None, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_method = os.environ.get(INIT_METHOD_ENV)
    if init_method is None and "MASTER_ADDR" in os.environ:
        init_method = "env://"
        # Ranks meeting on a loopback address are all on this host: keep Gloo's traffic on
        # the loopback interface too, instead of whatever the hostname resolves to.
        if is_loopback(os.environ["MASTER_ADDR"]) and sys.platform == "linux":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if init_method is None:
        if world_size > 1:
            # Waiting for peers that were never told where to meet would only time out.
            raise ValueError(
                f"WORLD_SIZE={world_size} but neither MASTER_ADDR (torchrun) nor {INIT_METHOD_ENV} "
                "says where the ranks meet; launch with `dlion train --workers N` or torchrun"
            )
        # A lone `python -m dlion.train` with a distributed optimizer: a world of one,
        # all on this host, so the loopback interface is the right one for Gloo.
        global _scratch
        _scratch = tempfile.TemporaryDirectory(prefix="dlion-store-")
        init_method = Path(_scratch.name, "store").as_uri()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(init_method, world_size, timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
        )
    comm = TorchComm(None, timeout)
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend, True, comm)


def _attempt_store(init_method: str, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the agent's key-value store with a key space per restart attempt.

    torchrun (torch 2.13) hands restarted workers its agent's store as it was, with no
    prefix per attempt: a restarted rank then reads its peers' old Gloo addresses
    ("connectFullMesh ... Connection refused") or old barrier counts (a hang). Measured
    here: 1 clean restart in 3 without a prefix, 5 in 5 with one. None: torch's own env://.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if init_method != "env://" or attempt is None or not agent_store:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    base = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dlion/attempt_{attempt}", base)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to a loopback address."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        return False


def joined(device: torch.device, timeout_s: float) -> DistContext:
    """The context of a process group someone else made (Ray Train's TorchTrainer).

    The launcher owns the group and the device choice (Ray narrows CUDA_VISIBLE_DEVICES to
    the worker's GPUs), so both are taken as given; local ranks come from torchrun's variables.
    """
    if not dist.is_initialized():
        raise RuntimeError("joined() needs an initialised torch.distributed process group")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    comm = TorchComm(None, timedelta(seconds=timeout_s))
    backend = str(dist.get_backend())
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend, True, comm)


def _setup_mpi(timeout_s: float) -> DistContext:
    from mpi4py import MPI

    from dlion.transport.mpi_comm import MpiComm

    comm = MpiComm(timeout=timedelta(seconds=timeout_s))
    # The ranks on this host, whatever the MPI: a shared-memory split of COMM_WORLD.
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_world_size = local.Get_rank(), local.Get_size()
    local.Free()
    return DistContext(
        comm.rank, comm.world_size, local_rank, local_world_size, _device(local_rank), "mpi", True, comm
    )


def _device(local_rank: int) -> torch.device:
    use_cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return device


def record_failure(exc: BaseException) -> None:
    """Write the failure's time and message to $DLION_ERROR_FILE, when the launcher set one.

    ``{rank}`` in the path becomes this process's RANK: torchrun gives all its workers one
    environment, and each still needs a file of its own.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if path is None:
        return
    path = path.replace("{rank}", os.environ.get("RANK", "0"))
    if isinstance(exc, SystemExit):
        message = exc.code if isinstance(exc.code, str) else f"exit status {exc.code}"
    else:
        message = f"{type(exc).__name__}: {exc}"
    Path(path).write_text(json.dumps({"time": time.time(), "error": message}))


def teardown(ctx: DistContext) -> None:
    global _scratch
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()
    if _scratch is not None:
        _scratch.cleanup()
        _scratch = None


def all_gather_rows(ctx: DistContext, row: torch.Tensor) -> torch.Tensor:
    """(k,) on each rank -> (world, k) on every rank; the row's length must match across ranks."""
    if ctx.comm is None:
        return row.unsqueeze(0)
    return ctx.comm.all_gather(row, "report all_gather").cpu()


def param_checksum(params: Iterable[torch.Tensor]) -> tuple[float, bytes]:
    """A float64 sum and a SHA-256 of the raw bytes: the sum reads well, the hash catches a 1-ulp drift."""
    h = hashlib.sha256()
    total = 0.0
    for p in params:
        cpu = p.detach().cpu().contiguous().reshape(-1)
        total += float(cpu.double().sum())
        h.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    return total, h.digest()


def params_identical(ctx: DistContext, params: Iterable[torch.Tensor]) -> tuple[bool, list[float], str]:
    """Whether every rank holds the same parameter bytes, each rank's float64 sum, and the
    SHA-256 (hex) of this rank's bytes."""
    total, digest = param_checksum(params)
    sums = all_gather_rows(ctx, torch.tensor([total], dtype=torch.float64))[:, 0].tolist()
    digests = all_gather_rows(ctx, torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    same = bool((digests == digests[0]).all())
    return same, sums, digest.hex()
