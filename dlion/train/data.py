"""The training corpus: the Python standard library's own source, read as bytes.

It is on every machine that runs dlion, so the main job needs no download. The file
list is sorted before a seeded shuffle, so the split depends only on the Python build
and the split seed, never on directory order. Validation is held out by whole files:
windows drawn from a file seen in training would leak its text into the score.
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
