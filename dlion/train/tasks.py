"""The training job's tasks: what model to train on what data, behind one shape.

``bytes``: the byte-level transformer on Python's standard library (dlion.train.data,
dlion.train.model). ``digits``: a small CNN on scikit-learn's handwritten digits
(dlion.train.digits), which also reports validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dlion.train.config import TASKS, TrainConfig
from dlion.train.data import BatchSampler, Corpus, CorpusConfig, StreamSampler, eval_batches, load_corpus
from dlion.train.digits import DigitsCNN, DigitsSampler, digits_eval_batches, load_digits
from dlion.train.model import ByteGPT, ModelConfig

__all__ = ["TASKS", "Task", "build_task", "evaluate"]


@dataclass
class Task:
    """One rank's model, its batch sampler, and (on rank 0) the validation batches."""

    # An nn.Module whose forward(x, y) is the mean loss (DDP trains through it, as powersgd
    # does) and forward(x) the outputs; .loss(x, y) (and, for classifiers, .correct(x, y)).
    model: Any
    sampler: Any  # BatchSampler, StreamSampler or DigitsSampler: .next() and .generator
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    data: dict[str, Any]  # what the data is, for the report
    classifier: bool  # whether validation also scores accuracy


def build_task(cfg: TrainConfig, *, rank: int, device: torch.device, world_size: int = 1) -> Task:
    """This rank's part of the job; ``world_size``: the job's training ranks, which the
    stream sampler splits its windows over (and the report's count of bytes trained on)."""
    main = rank == 0
    if cfg.task == "digits":
        digits = load_digits()
        return Task(
            model=DigitsCNN(seed=cfg.seed).to(device),
            sampler=DigitsSampler(digits, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank),
            val_batches=digits_eval_batches(digits, batch_size=256) if main else [],
            data=digits.describe(),
            classifier=True,
        )
    model_cfg = ModelConfig(context=cfg.context, d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)
    corpus = load_corpus(CorpusConfig(max_bytes=cfg.data_bytes), min_bytes=cfg.context + 1)
    sampler, data = _byte_sampler(cfg, corpus, rank=rank, world_size=world_size)
    return Task(
        model=ByteGPT(model_cfg, seed=cfg.seed).to(device),
        sampler=sampler,
        val_batches=(
            eval_batches(
                corpus.val, batch_size=cfg.batch_size, context=cfg.context, n_batches=cfg.eval_batches
            )
            if main
            else []
        ),
        data=data,
        classifier=False,
    )


def _byte_sampler(
    cfg: TrainConfig, corpus: Corpus, *, rank: int, world_size: int
) -> tuple[BatchSampler | StreamSampler, dict[str, Any]]:
    """The rank's sampler, and the corpus's description with how much of it the run reads:
    ``passes``, the target bytes of the whole run over the training bytes (a random sampler
    reads some windows more often than others at any pass count); with ``stream``, ``epochs``
    too (while at most 1, no byte is a target twice)."""
    common = {"batch_size": cfg.batch_size, "context": cfg.context, "seed": cfg.seed, "rank": rank}
    targets = cfg.steps * world_size * cfg.batch_size * cfg.context
    data = {
        **corpus.describe(),
        "sampling": cfg.sampling,
        "target_bytes": targets,
        "passes": targets / corpus.train.numel(),
    }
    if cfg.sampling == "random":
        return BatchSampler(corpus.train, **common), data
    stream = StreamSampler(corpus.train, world_size=world_size, **common)
    data["windows_per_epoch"] = stream.steps_per_epoch * stream.per_step
    data["epochs"] = stream.epochs(cfg.steps)
    return stream, data


@torch.no_grad()
def evaluate(task: Task, device: torch.device) -> tuple[float, float | None]:
    """Mean validation loss over the batches, and accuracy over all examples (classifiers)."""
    model = task.model
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    for x, y in task.val_batches:
        x, y = x.to(device), y.to(device)
        loss += float(model.loss(x, y))
        if task.classifier:
            correct += model.correct(x, y)
            seen += y.numel()
    model.train()
    return loss / len(task.val_batches), (correct / seen if task.classifier else None)
