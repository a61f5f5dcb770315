"""Where dlion meets its users' stacks: ``attach`` (a DDP communication hook, dlion.integrations.ddp)
and, behind the ``integrations`` extra, callbacks for Hugging Face (``integrations.hf``) and
Lightning (``integrations.lightning``), imported only when asked for."""

from dlion.integrations.ddp import Attachment, attach

__all__ = ["Attachment", "attach"]
