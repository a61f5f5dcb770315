"""Hugging Face Trainer: DistributedLion with DDP's all-reduce replaced by the vote.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[DistributedLionCallback()])
    trainer.optimizer = create_optimizer(trainer)  # decay / no-decay groups
    trainer.train()

The Trainer wraps the model in DistributedDataParallel (through Accelerate) only inside
``train()``, and hands callbacks the unwrapped model; the callback finds the DDP module that
wraps it and calls ``dlion.attach`` at the start of training, and detaches at the end.
``create_optimizer`` builds the optimizer as ``Trainer.create_optimizer`` builds AdamW: the
parameters the Trainer decays (not biases, not norms) in one group with the arguments' weight
decay, the others without, at the arguments' learning rate (Lion wants a smaller one than
AdamW, and a larger weight decay). Build it after the Trainer: the
Trainer's arguments make the process group DistributedLion talks through.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import Trainer, TrainerCallback

from dlion.integrations.ddp import Attachment, attach
from dlion.worker.distributed_lion import DistributedLion


def wrapper_of(model: torch.nn.Module) -> DDP | None:
    """The DistributedDataParallel module that wraps ``model``, if one does."""
    if isinstance(model, DDP):
        return model
    return next((o for o in gc.get_objects() if isinstance(o, DDP) and o.module is model), None)


class DistributedLionCallback(TrainerCallback):
    """Attach DistributedLion to the Trainer's DDP model for the length of ``train()``."""

    def __init__(self) -> None:
        self.attachment: Attachment | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ddp = wrapper_of(kwargs["model"])
        if ddp is not None and self.attachment is None:  # one process: no DDP, nothing to do
            self.attachment = attach(ddp, kwargs["optimizer"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None


def create_optimizer(trainer: Trainer, **dlion_kwargs: Any) -> DistributedLion:
    """DistributedLion over the Trainer's model, with the Trainer's decay / no-decay groups."""
    args, model = trainer.args, trainer.model
    assert model is not None, "the Trainer has no model"
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    betas = dlion_kwargs.pop("betas", (args.adam_beta1, args.adam_beta2))
    return DistributedLion(
        [g for g in groups if g["params"]], lr=args.learning_rate, betas=betas, **dlion_kwargs
    )
