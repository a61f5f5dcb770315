"""Lightning: DistributedLion with DDP's all-reduce replaced by the vote, on CPU and GPU.

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return dlion.DistributedLion(self.parameters(), lr=3e-4)

    L.Trainer(strategy="ddp", callbacks=[DistributedLionCallback()]).fit(Model())

Lightning's own ``ddp_comm_hook`` option registers only on CUDA; this callback attaches to
the strategy's DDP module at the start of training, whatever the device, and detaches at the
end. The first optimizer that is a DistributedLion is the one attached.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel as DDP

from dlion.integrations.ddp import Attachment, attach
from dlion.worker.distributed_lion import DistributedLion


class DistributedLionCallback(pl.Callback):
    def __init__(self) -> None:
        self.attachment: Attachment | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DDP) or self.attachment is not None:
            return  # one process, or already attached
        opt = next((o for o in trainer.optimizers if isinstance(o, DistributedLion)), None)
        if opt is None:
            raise ValueError(
                "DistributedLionCallback needs configure_optimizers to return a dlion.DistributedLion"
            )
        self.attachment = attach(model, opt)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None
