"""Lightning: DistributedLion with DDP's all-reduce replaced by the vote, on CPU and GPU.

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return dlion.DistributedLion(self.parameters(), lr=3e-4)

    L.Trainer(strategy="ddp", callbacks=[DistributedLionCallback()]).fit(Model())

Lightning's own ``ddp_comm_hook`` option registers only on CUDA; this callback attaches to
the strategy's DDP module at the start of training, whatever the device, and detaches at the
end. The first optimizer that is a DistributedLion is the one attached.

Checkpoints: ``Trainer.save_checkpoint`` runs on every rank and writes rank 0's checkpoint
alone; each rank's DistributedLion momentum is its own, so ``on_save_checkpoint`` swaps each
DistributedLion's entry of ``optimizer_states`` for every rank's state, gathered on rank 0.
``Trainer.fit(ckpt_path=...)`` loads it on every rank, and each DistributedLion keeps its own
entry: the run goes on as if never stopped (resume with the same number of ranks; from a
mid-epoch checkpoint only with a resumable dataloader, as Lightning warns).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.nn.parallel import DistributedDataParallel as DDP

from dlion.integrations.ddp import Attachment, attach, end_rounds
from dlion.integrations.fsdp import FsdpAttachment, holds_fsdp
from dlion.worker.core.saved_state import gather_optimizer_state
from dlion.worker.lion.distributed_lion import DistributedLion
from dlion.worker.local.optimizer import LocalSteps


class DistributedLionCallback(pl.Callback):
    def __init__(self) -> None:
        self.attachment: Attachment | FsdpAttachment | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        unscale_before_clipping(trainer.precision_plugin)
        model = trainer.strategy.model
        # ModelParallelStrategy shards the LightningModule in place (fully_shard): it is the model.
        if not (isinstance(model, DDP) or holds_fsdp(model)) or self.attachment is not None:
            return  # one process, or already attached
        opt = next((o for o in trainer.optimizers if isinstance(o, (DistributedLion, LocalSteps))), None)
        if opt is None:
            raise ValueError(
                "DistributedLionCallback needs configure_optimizers to return a dlion.DistributedLion "
                "or a local-steps optimizer (dlion-local, diloco)"
            )
        # Lightning clips (gradient_clip_val) and unscales (16-mixed's GradScaler) between
        # backward and step: the vote waits for them, in step().
        scales = getattr(trainer.precision_plugin, "scaler", None) is not None
        changes = bool(trainer.gradient_clip_val) or scales
        self.attachment = attach(model, opt, vote_in_step=True if changes else None)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for opt in trainer.optimizers:
            end_rounds(opt)  # local steps: a partial last round ends on every rank
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Every rank, while Lightning builds a checkpoint: every rank's DistributedLion state,
        gathered, in place of rank 0's own where the checkpoint is written."""
        states = checkpoint.get("optimizer_states")
        if states is None or trainer.world_size == 1:
            return  # weights only, or one process: rank 0's state is the only one
        for i, opt in enumerate(trainer.optimizers):
            # A sharded one's state holds every replica's momentum as DTensors: Lightning's
            # distributed checkpoint (DCP) already saves it whole.
            if isinstance(opt, (DistributedLion, LocalSteps)) and not opt.sharded:
                gathered = gather_optimizer_state(opt, receive=bool(trainer.is_global_zero))
                if gathered is not None:
                    states[i] = gathered


def unscale_before_clipping(plugin: Any) -> None:
    """Lightning's 16-mixed refuses to clip for an optimizer that unscales in its own step()
    (``_step_supports_amp_scaling``, which dlion's optimizers declare so that GradScaler steps
    every rank and an overflow skips the step on all). Clipping then unscales first, as
    Lightning does for other optimizers, and ``scaler.step`` finds the gradients unscaled."""
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or getattr(plugin, "_dlion_unscales", False):
        return

    def clip(
        optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = GradClipAlgorithmType.NORM
    ) -> None:
        if clip_val > 0:
            scaler.unscale_(getattr(optimizer, "_optimizer", optimizer))  # LightningOptimizer's
        Precision.clip_gradients(plugin, optimizer, clip_val, gradient_clip_algorithm)

    plugin.clip_gradients = clip
    plugin._dlion_unscales = True
