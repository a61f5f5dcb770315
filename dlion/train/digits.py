"""The second task: a small CNN on scikit-learn's handwritten digits (8x8, 10 classes).

The 1,797 images ship inside scikit-learn itself, so the task needs no download. A fixed
seeded permutation holds out 20% of them, stratified by class, for validation; each rank
draws its own training batches. Pixels are scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlion.checks import check_int
from dlion.train.data import mix_seed

VAL_FRACTION = 0.2
# Independent of the run seed: every run, whatever its seed, scores the same images.
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor  # (n, 1, 8, 8) float32 in [0, 1]
    train_y: torch.Tensor  # (n,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor

    def describe(self) -> dict[str, object]:
        return {
            "source": "sklearn.datasets.load_digits",
            "train_images": int(self.train_y.numel()),
            "val_images": int(self.val_y.numel()),
            "classes": 10,
        }


def load_digits() -> Digits:
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:
        raise RuntimeError(f"the digits task needs scikit-learn ({e}); pip install -e '.[bench]'") from None
    data = sk_load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    val = []
    for c in range(10):  # stratified: the same share of every class in validation
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        val.append(idx[: round(idx.numel() * VAL_FRACTION)])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(y.numel(), dtype=torch.bool)
    mask[val_idx] = False
    return Digits(x[mask], y[mask], x[val_idx], y[val_idx])


class DigitsSampler:
    """Random training batches with replacement, from a generator seeded by (seed, rank)."""

    def __init__(self, data: Digits, *, batch_size: int, seed: int, rank: int) -> None:
        self.x, self.y = data.train_x, data.train_y
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(mix_seed(seed, rank))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.y.numel(), (self.batch_size,), generator=self.generator)
        return self.x[idx], self.y[idx]


def digits_eval_batches(data: Digits, *, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every validation image, in fixed batches."""
    return list(zip(data.val_x.split(batch_size), data.val_y.split(batch_size), strict=True))


class DigitsCNN(nn.Module):
    """conv 3x3 (1->c) - ReLU - conv 3x3 (c->2c) - ReLU - maxpool 2 - linear (32c -> 4c) - ReLU -
    linear (4c -> 10); ``width`` = c. Seeded initialisation, identical on every rank."""

    def __init__(self, *, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        check_int("width", width, low=1)
        c = width
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc1 = nn.Linear(2 * c * 16, 4 * c)
        self.fc2 = nn.Linear(4 * c, 10)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in (self.conv1, self.conv2, self.fc1, self.fc2):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 1, 8, 8) images -> (batch, 10) logits; with (batch,) labels y, the loss
        instead, so DDP can run the loss as the module's forward (powersgd)."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pool2d(h, 2).flatten(1)
        logits = self.fc2(F.relu(self.fc1(h)))
        return logits if y is None else F.cross_entropy(logits, y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(x, y)

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return int((self(x).argmax(1) == y).sum())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
