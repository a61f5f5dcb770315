"""What a communicating optimizer checks once, before its steps: that every rank runs the same
release, parameter list and config (the fingerprint), holds rank 0's parameters and buffers
(the start, dlion.aggregate.start), and did not get averaged gradients (dlion.worker.core.guard).

The start runs as soon as there is a transport: when the optimizer is built if the process group
exists then, so ranks seeded differently (nanoGPT seeds each rank) run their first forward on
rank 0's weights; and again at the first step, where the checksums send nothing more if the
parameters are still equal. The first step's fingerprint carries a digest of the first
gradients, which is how the guard sees that DDP averaged them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from dlion.aggregate.meta import check_fingerprint
from dlion.aggregate.start import start_equal
from dlion.ledger import Ledger
from dlion.transport import Comm
from dlion.worker.core.guard import gradient_digest, warn_if_averaged


class Starting:
    """The once-per-parameter-list exchanges of one optimizer; ``reset`` when the list changes."""

    def __init__(self, owner: str, mode: str, ledger: Ledger) -> None:
        self.owner, self.mode, self.ledger = owner, mode, ledger
        self.started = False  # every rank holds rank 0's parameters and buffers
        self.checked = False  # the first step's fingerprint, with the gradient digest, is done
        self.buffers: list[torch.Tensor] = []  # modules' buffers that start equal too

    def start(
        self, comm: Comm | None, params: Sequence[torch.Tensor], names: Sequence[str], config: str
    ) -> None:
        """Fingerprint, then the start (CommConfig.start), outside any step."""
        assert comm is not None
        check_fingerprint(comm, params, config, self.ledger, one_off=True)
        self._equalize(comm, params, names)

    def first_step(
        self,
        comm: Comm,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        config: str,
        grads: Sequence[torch.Tensor | None],
    ) -> None:
        """The first step's fingerprint with the gradient digest (every rank warns if all
        gradients are equal), and the start again: the parameters may have changed since the
        optimizer was built (loaded on rank 0 alone, say); the checksums send nothing more
        where they are still equal (DDP broadcast them at wrap, say)."""
        digests = check_fingerprint(comm, params, config, self.ledger, gradients=gradient_digest(grads))
        warn_if_averaged(digests, self.owner, self.ledger.n_params)
        self._equalize(comm, params, names)
        self.checked = True

    def _equalize(self, comm: Comm, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        named = [*names, *(f"buffer #{i} {tuple(b.shape)}" for i, b in enumerate(self.buffers))]
        start_equal(comm, self.mode, [*params, *self.buffers], named, self.ledger)
        self.started = True

    def add_buffers(self, module: torch.nn.Module) -> bool:
        """``module``'s buffers start equal too; whether the start must run again for them."""
        self.buffers += [b for b in module.buffers() if not any(b is seen for seen in self.buffers)]
        return self.started

    def reset(self) -> None:
        """The parameter list changed: fingerprint and start again."""
        self.started = self.checked = False


def config_text(config: Any, extra: dict[str, object]) -> str:
    """A config (a dataclass) as ranks compare it: every field but the timeout, which may differ,
    and ``extra`` settings beside it."""
    fields = asdict(config)
    fields.pop("timeout")
    fields.update(extra)
    return repr(sorted(fields.items()))


def refuse_training_alone(owner: str) -> None:
    """A launch that says it has several ranks but made no process group: every rank would
    train alone. RuntimeError, at the first step."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but no torch.distributed process group exists at the first step of "
            f"{owner}: every rank would train its own model. Call "
            "torch.distributed.init_process_group() (or build your framework's arguments) first"
        )
