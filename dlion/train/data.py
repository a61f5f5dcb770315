"""The training corpus: the Python standard library's own source, read as bytes.

It is on every machine that runs dlion, so the main job needs no download. The file
list is sorted before a seeded shuffle, so the split depends only on the Python build
and the split seed, never on directory order. Validation is held out by whole files:
windows drawn from a file seen in training would leak its text into the score.

Two samplers read the training split: ``BatchSampler`` draws windows at random offsets
(the job's default, ``--sampling random``), ``StreamSampler`` walks a seeded order of
non-overlapping windows, each rank its own (``--sampling stream``), so a run trains on
no byte twice until it has trained on all of them.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dlion import wire
from dlion.checks import check_int, check_number

# The key stream of the stream sampler's epoch orders: apart from the optimizers' streams
# (dlion.wire), so an order never shares its draws with a coin.
EPOCH_STREAM = 0xDA7A

# Installed third-party code is not the standard library and differs between machines.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Which bytes to train on.

    root:         directory searched for ``*.py`` (None: the standard library).
    max_bytes:    cap on the corpus size; whole files are taken in shuffled order until
                  it is reached, the last one cut short.
    val_fraction: share of the selected files held out for validation (at least one).
    split_seed:   seed of the file shuffle; fixed by default so every run scores on the
                  same validation text whatever its training seed.
    """

    root: str | None = None
    max_bytes: int = 4_000_000
    val_fraction: float = 0.05
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_int("max_bytes", self.max_bytes, low=1024)
        check_number("val_fraction", self.val_fraction, low=0, high=1, low_open=True, high_open=True)
        check_int("split_seed", self.split_seed, low=0)


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    sha256: str

    def describe(self) -> dict[str, object]:
        return {
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "sha256": self.sha256,
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> list[Path]:
    """Every ``*.py`` under ``root`` outside third-party and cache folders, sorted by path."""
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(
    files: list[Path], cfg: CorpusConfig
) -> tuple[list[tuple[Path, bytes]], list[tuple[Path, bytes]]]:
    """Take files in seeded order up to ``cfg.max_bytes``; hold out the last ones."""
    order = list(files)
    random.Random(cfg.split_seed).shuffle(order)
    chosen: list[tuple[Path, bytes]] = []
    total = 0
    for path in order:
        if total >= cfg.max_bytes:
            break
        text = path.read_bytes()[: cfg.max_bytes - total]
        if text:
            chosen.append((path, text))
            total += len(text)
    if len(chosen) < 2:
        raise ValueError(
            f"max_bytes={cfg.max_bytes} selects {len(chosen)} file(s); need at least 2 to hold one out"
        )
    n_val = min(len(chosen) - 1, max(1, round(cfg.val_fraction * len(chosen))))
    return chosen[:-n_val], chosen[-n_val:]


def load_corpus(cfg: CorpusConfig, *, min_bytes: int = 2) -> Corpus:
    """Read the corpus; both splits must hold at least ``min_bytes`` (a window + 1)."""
    root = Path(cfg.root) if cfg.root is not None else stdlib_root()
    files = list_source_files(root)
    if not files:
        raise ValueError(f"no *.py files under {root}")
    train, val = split_files(files, cfg)
    train_bytes = b"".join(t for _, t in train)
    val_bytes = b"".join(t for _, t in val)
    for name, data in (("training", train_bytes), ("validation", val_bytes)):
        if len(data) < min_bytes:
            raise ValueError(
                f"data_bytes={cfg.max_bytes} gives a {name} split of {len(data)} bytes; "
                f"need at least {min_bytes} (context + 1)"
            )
    digest = hashlib.sha256(train_bytes + b"\0" + val_bytes).hexdigest()
    return Corpus(
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8),
        train_files=tuple(p.relative_to(root).as_posix() for p, _ in train),
        val_files=tuple(p.relative_to(root).as_posix() for p, _ in val),
        sha256=digest,
    )


def mix_seed(seed: int, rank: int) -> int:
    """A per-rank generator seed; distinct ranks draw distinct batch streams."""
    return (seed * wire.GOLDEN + (rank + 1) * wire.MIX1) % (1 << 63)


class BatchSampler:
    """Random (batch, context) windows of next-byte prediction from one split."""

    def __init__(self, data: torch.Tensor, *, batch_size: int, context: int, seed: int, rank: int) -> None:
        if data.numel() < context + 1:
            raise ValueError(f"data of {data.numel()} bytes is shorter than context + 1 = {context + 1}")
        self.data = data
        self.batch_size = batch_size
        self.offsets = torch.arange(context + 1)
        self.generator = torch.Generator().manual_seed(mix_seed(seed, rank))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both (batch, context) int64."""
        high = self.data.numel() - self.offsets.numel() + 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        window = self.data[starts[:, None] + self.offsets].long()
        return window[:, :-1], window[:, 1:]


def eval_batches(
    data: torch.Tensor, *, batch_size: int, context: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of windows spread evenly over the split, the same in every run."""
    if data.numel() < context + 1:
        raise ValueError(f"data of {data.numel()} bytes is shorter than context + 1 = {context + 1}")
    starts = torch.linspace(0, data.numel() - context - 1, n_batches * batch_size).long()
    window = data[starts[:, None] + torch.arange(context + 1)].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch_size)]


class StreamCursor:
    """A stream's position, kept behind a torch.Generator's ``get_state``/``set_state``.

    Checkpoints save and restore ``sampler.generator`` (dlion.train.checkpoint). A stream
    draws nothing at random after its epoch orders, which follow from the seed, so its whole
    state is how many batches it has handed out: that count is what this "generator" holds.
    """

    # Marks a cursor's state, so a random sampler's RNG state is refused rather than misread.
    TAG = 0x57EA

    def __init__(self) -> None:
        self.batches = 0

    def get_state(self) -> torch.Tensor:
        return torch.tensor([self.TAG, self.batches], dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        ok = state.dtype == torch.int64 and state.shape == (2,) and int(state[0]) == self.TAG
        if not ok or int(state[1]) < 0:
            raise ValueError(
                f"a stream sampler's state is int64 [{self.TAG}, batches]; got a {state.dtype} tensor "
                f"of shape {tuple(state.shape)} (a checkpoint of --sampling random?)"
            )
        self.batches = int(state[1])


class StreamSampler:
    """Non-overlapping (batch, context) windows of one split, each rank its own, epoch by epoch.

    Window k is bytes [k * context, (k + 1) * context]: its inputs and, shifted by one, its
    targets, so each byte is a target once per epoch. An epoch is a permutation of the
    windows seeded by (seed, epoch) and the same on every rank; each step takes its next
    world_size * batch_size windows and rank r every world_size-th of them from the r-th, so
    the ranks' windows are disjoint. The permutation's last windows that do not fill a step
    sit that epoch out (a later epoch's order puts them elsewhere), so no step straddles two
    epochs.
    """

    def __init__(
        self, data: torch.Tensor, *, batch_size: int, context: int, seed: int, rank: int, world_size: int
    ) -> None:
        check_int("world_size", world_size, low=1)
        check_int("rank", rank, low=0, high=world_size - 1)
        self.n_windows = (data.numel() - 1) // context
        self.per_step = batch_size * world_size
        if self.n_windows < self.per_step:
            raise ValueError(
                f"data of {data.numel()} bytes holds {self.n_windows} windows of context {context}; "
                f"a step of {world_size} rank(s) x batch {batch_size} needs {self.per_step}"
            )
        self.data, self.context, self.seed = data, context, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = self.n_windows // self.per_step
        self.offsets = torch.arange(context + 1)
        self.generator = StreamCursor()
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.int64))

    def epochs(self, steps: int) -> float:
        """How many epochs ``steps`` steps walk; while at most 1, no byte is a target twice."""
        return steps / self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of window indices (one epoch kept: the ranks walk forward)."""
        if self._order[0] != epoch:
            key = wire.derive_key(self.seed, EPOCH_STREAM, epoch) >> 1  # torch seeds are < 2**63
            perm = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(key))
            self._order = (epoch, perm)
        return self._order[1]

    def starts(self, batch: int) -> torch.Tensor:
        """The start offsets, (batch_size,) int64, of this rank's windows in batch ``batch``."""
        epoch, k = divmod(batch, self.steps_per_epoch)
        step = self.order(epoch)[k * self.per_step : (k + 1) * self.per_step]
        return step[self.rank :: self.world_size] * self.context

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both (batch, context) int64."""
        starts = self.starts(self.generator.batches)
        self.generator.batches += 1
        window = self.data[starts[:, None] + self.offsets].long()
        return window[:, :-1], window[:, 1:]
