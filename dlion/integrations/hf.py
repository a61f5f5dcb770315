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
AdamW, and a larger weight decay). Its betas are Lion's own (0.9, 0.99), not the arguments'
Adam betas, unless passed. Build it after the Trainer: the Trainer's arguments make the
process group DistributedLion talks through.

Checkpoints: the Trainer writes optimizer.pt from rank 0 alone and loads it on every rank,
right when every rank's optimizer state is the same (AdamW under DDP), not for
DistributedLion, whose momentum is each rank's own. ``on_save``, which the Trainer calls on
every rank after writing a checkpoint, gathers every rank's state and the ranks that wrote
optimizer.pt (``should_save``) write it again with the gathered state; DistributedLion's
``load_state_dict`` takes its own entry on every rank, so ``train(resume_from_checkpoint=...)``
continues the uninterrupted run. Resume with the same number of ranks.
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dlion.integrations.ddp import Attachment, attach, end_rounds, unwrap_optimizer
from dlion.integrations.fsdp import FsdpAttachment
from dlion.worker.core.saved_state import gather_optimizer_state
from dlion.worker.lion.distributed_lion import DistributedLion


def wrapper_of(model: torch.nn.Module) -> DDP | None:
    """The DistributedDataParallel module that wraps ``model``, if one does."""
    if isinstance(model, DDP):
        return model
    return next((o for o in gc.get_objects() if isinstance(o, DDP) and o.module is model), None)


class DistributedLionCallback(TrainerCallback):
    """Attach DistributedLion to the Trainer's DDP model for the length of ``train()``."""

    def __init__(self) -> None:
        self.attachment: Attachment | FsdpAttachment | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ddp = wrapper_of(kwargs["model"])
        if ddp is not None and self.attachment is None:  # one process: no DDP, nothing to do
            # The Trainer clips (max_grad_norm) and unscales (fp16) between backward and step:
            # the vote waits for them, in step().
            changes = bool(args.max_grad_norm and args.max_grad_norm > 0) or bool(args.fp16)
            self.attachment = attach(ddp, kwargs["optimizer"], vote_in_step=True if changes else None)

    # Local steps: a partial last round ends on every rank before the Trainer loads its best
    # model (load_best_model_at_end), which on_train_end comes after. The last step ends it at
    # max_steps; a stop decided by an evaluation (EarlyStoppingCallback) is seen next either
    # by on_save (a checkpoint follows the evaluation) or by on_epoch_end (the loop left).

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps and state.global_step >= state.max_steps:
            end_rounds(kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_training_stop:
            end_rounds(kwargs.get("optimizer"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        end_rounds(kwargs.get("optimizer"))  # stopped early: the open round ends here (else a no-op)
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None

    @staticmethod
    def _save_every_ranks_state(args: Any, state: Any, optimizer: Any) -> None:
        """The checkpoint's optimizer.pt holds every rank's state, gathered, wherever the Trainer
        wrote it (rank 0, or each node's first rank)."""
        opt = unwrap_optimizer(optimizer)
        comm = opt.comm_now()
        if args.save_only_model or comm is None or comm.world_size == 1 or opt.sharded:
            return  # no optimizer.pt, rank 0's state is the only one, or FSDP's DCP saved every rank's
        gathered = gather_optimizer_state(opt, receive=bool(args.should_save))
        if gathered is None:
            return
        file = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / OPTIMIZER_NAME
        if not file.is_file():  # written elsewhere (a hyperparameter search's run folder)
            warnings.warn(
                f"DistributedLionCallback: no {file} to replace with every rank's optimizer state; "
                "resuming from this checkpoint will refuse rank 0's state on the other ranks",
                stacklevel=2,
            )
            return
        tmp = file.with_name(file.name + ".tmp")
        torch.save(gathered, tmp)
        os.replace(tmp, file)  # a reader never sees half a file

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every rank, after the Trainer wrote a checkpoint: its optimizer state replaced by every
        rank's, then, if training stops here, the open round ended (after the state it saved)."""
        self._save_every_ranks_state(args, state, kwargs["optimizer"])
        if control.should_training_stop:
            end_rounds(kwargs.get("optimizer"))


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
    # Lion's own betas (DistributedLion's defaults), not the arguments' Adam ones (0.9, 0.999).
    return DistributedLion([g for g in groups if g["params"]], lr=args.learning_rate, **dlion_kwargs)
