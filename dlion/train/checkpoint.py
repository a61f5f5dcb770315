"""Checkpoints of the training job: one file per rank, because momentum is per rank.

Distributed Lion's workers never share their momentum: each rank's optimizer state is
its own, and averaging it (or keeping only rank 0's, as data-parallel checkpoints do)
would change every later vote. So every rank writes ``rank{r:05d}.pt`` with its optimizer
state, its batch sampler's RNG, its ledger and its loss history; rank 0 also writes
``model.pt`` (the parameters are identical on every rank). Files are written to a
temporary name and renamed, so a reader never sees a torn file, and hold only tensors
and plain Python values, so they load with ``torch.load(weights_only=True)``.

Where checkpoints live is the store's business: a Ray Train checkpoint (dlion.launch.
ray_job) or a folder on a shared file system (DirStore).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from dlion.train.report import RunRecord, dlion_version

FORMAT = 1
MODEL_FILE = "model.pt"
# The settings a checkpoint's state depends on: resuming under others is refused.
MUST_MATCH = (
    "task", "optimizer", "backend", "server", "seed", "d_model", "layers", "heads", "context", "sampling",
    "local_steps", "outer_lr", "outer_momentum", "error_feedback", "outer_bits",
)  # fmt: skip


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, torn, or from another job."""


@dataclass
class TrainParts:
    """The objects a checkpoint saves and restores, on one rank."""

    model: torch.nn.Module
    opt: Any  # every dlion optimizer has state_dict/load_state_dict and .ledger
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: Any  # a batch sampler with a torch.Generator in .generator
    rec: RunRecord


class CheckpointStore(Protocol):
    def latest(self) -> Any:
        """A context manager yielding the latest checkpoint's folder, or None."""
        ...

    def save(self, step: int, write: Any, metrics: dict[str, float]) -> None:
        """Make a checkpoint for ``step``: ``write(folder)`` puts this rank's files in it."""
        ...


@contextmanager
def durable_write(path: Path) -> Iterator[BinaryIO]:
    """A binary file to fill; on leaving, flushed to disk and renamed to ``path``, the folder
    synced: a reader (or a resume after a crash or power loss) sees the old file or the
    whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    with durable_write(path) as f:
        torch.save(obj, f)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_parts(folder: Path, parts: TrainParts, *, step: int, rank: int, world_size: int) -> None:
    """Write this rank's state for ``step`` into ``folder`` (and, on rank 0, the model)."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = parts.rec
    state = {
        "format": FORMAT,
        "dlion_version": dlion_version(),
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "config": {k: rec.config[k] for k in MUST_MATCH},
        "optimizer": parts.opt.state_dict(),
        "scheduler": parts.sched.state_dict(),
        "sampler_rng": parts.sampler.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "ledger": parts.opt.ledger.state_dict(),
        "history": {
            "train_loss": list(rec.train_loss),
            "step_time_s": list(rec.step_time_s),
            "val_loss": [list(v) for v in rec.val_loss],
            "val_accuracy": [list(v) for v in rec.val_accuracy],
            "eval_time_s": rec.eval_time_s,
        },
    }
    atomic_save(state, folder / rank_file(rank))
    if rank == 0:
        atomic_save({"format": FORMAT, "step": step, "model": parts.model.state_dict()}, folder / MODEL_FILE)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn or foreign file: say which
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dlion checkpoint of format {FORMAT}")
    return state


def load_parts(folder: Path, parts: TrainParts, *, rank: int, world_size: int) -> int:
    """Restore this rank's state from ``folder``; returns the step it was saved at."""
    state = _load(folder / rank_file(rank))
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written by {state['world_size']} workers, this job has {world_size}: "
            "each worker's momentum is its own, so resume with the same number of workers"
        )
    saved = state["config"]
    now = {k: parts.rec.config[k] for k in MUST_MATCH}
    # A setting newer than the checkpoint had its default then: the value it holds now.
    differ = {k: (saved.get(k), now[k]) for k in MUST_MATCH if saved.get(k, now[k]) != now[k]}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"checkpoint {folder} is from another job ({detail})")
    model = _load(folder / MODEL_FILE)
    if model["step"] != state["step"]:
        raise CheckpointError(
            f"checkpoint {folder} mixes steps: model.pt is at {model['step']}, "
            f"{rank_file(rank)} at {state['step']}"
        )
    parts.model.load_state_dict(model["model"])
    parts.opt.load_state_dict(state["optimizer"])
    parts.sched.load_state_dict(state["scheduler"])
    parts.sampler.generator.set_state(state["sampler_rng"])
    torch.set_rng_state(state["torch_rng"])
    parts.opt.ledger.load_state_dict(state["ledger"])
    history = state["history"]
    rec = parts.rec
    rec.train_loss = [float(x) for x in history["train_loss"]]
    rec.step_time_s = [float(x) for x in history["step_time_s"]]
    rec.val_loss = [(int(s), float(v)) for s, v in history["val_loss"]]
    rec.val_accuracy = [(int(s), float(v)) for s, v in history["val_accuracy"]]
    rec.eval_time_s = float(history["eval_time_s"])
    return int(state["step"])


class DirStore:
    """Checkpoints in ``root/step-NNNNNNNN/``, the newest named by ``root/latest``.

    ``root`` must be one folder for all ranks (a shared file system across hosts). Every
    rank writes its files, ``barrier`` waits for all of them, then rank 0 moves ``latest``:
    a job killed mid-write resumes from the previous complete checkpoint.
    """

    def __init__(self, root: Path, *, rank: int, barrier: Any, keep: int = 2) -> None:
        self.root = root
        self.rank = rank
        self.barrier = barrier
        self.keep = keep

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        pointer = self.root / "latest"
        yield (self.root / pointer.read_text().strip()) if pointer.is_file() else None

    def save(self, step: int, write: Any, metrics: dict[str, float]) -> None:
        name = f"step-{step:08d}"
        write(self.root / name)
        self.barrier()
        if self.rank != 0:
            return
        with durable_write(self.root / "latest") as f:
            f.write(f"{name}\n".encode())
        old = sorted(p for p in self.root.glob("step-*") if p.is_dir() and p.name != name)
        for stale in old[: max(0, len(old) - (self.keep - 1))]:
            for leftover in stale.iterdir():
                leftover.unlink()
            stale.rmdir()
