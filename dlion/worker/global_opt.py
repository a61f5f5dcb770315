"""The usual data-parallel baseline: all-reduce dense gradients, then a local optimizer."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dlion.aggregate.meta import exchange_step_meta
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_reduce_traffic
from dlion.transport import TorchComm, make_comm
from dlion.worker.agreement import first_nonfinite, raise_nonfinite
from dlion.worker.byzantine import Byzantine, attack_key, attack_of, corrupt_grad
from dlion.worker.config import NONFINITE, TRANSPORTS
from dlion.worker.lion import run_closure

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEPS_KEY = "dlion_global_steps"


class GlobalOptimizer:
    """Wraps any torch optimizer with a ring all-reduce of the gradients ("global AdamW").

    Per step, with N ranks:
      1. Metadata all_gather (4 + ceil(T/8) bytes per rank): which tensors have a
         gradient anywhere, and the first with a NaN/Inf on any rank. A tensor none has
         stays None (the inner optimizer skips it); a rank without one contributes zeros.
         A non-finite gradient raises NonFiniteGradientError on every rank naming the rank
         and tensor, or with nonfinite="skip" skips the step on every rank.
      2. One all_reduce (sum) of all gradients, flattened in ``wire_dtype`` and padded so
         each of the N ring chunks is a whole number of elements; then divide by N. With
         ``byzantine``, the attacking ranks corrupt their gradients in the flat buffer
         (dlion.worker.byzantine; "flip" negates them).
      3. The inner optimizer's step on the averaged gradients, identical on all ranks.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        process_group: dist.ProcessGroup | None = None,
        *,
        wire_dtype: str = "float32",
        transport: str = "torch",
        timeout: timedelta | None = None,
        byzantine: Byzantine | None = None,
        seed: int = 0,
        nonfinite: str = "raise",
    ) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.inner = inner
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}; got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._comm: TorchComm | None = make_comm(process_group, timeout, transport)
        n, rank = (self._comm.world_size, self._comm.rank) if self._comm is not None else (1, 0)
        self._attack = attack_of(byzantine, rank, n)
        self._seed = seed
        self._steps = 0
        self._flat = [p for g in inner.param_groups for p in g["params"]]
        self.ledger = Ledger(n_params=sum(p.numel() for p in self._flat))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        # The step count keys the attack coins, so a resumed run draws what a whole one would.
        return self.inner.state_dict() | {STEPS_KEY: self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._steps = int(state_dict.pop(STEPS_KEY, 0))
        self.inner.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        bad = first_nonfinite([p.grad for p in self._flat])
        comm = self._comm
        if comm is not None and comm.world_size > 1:
            go = self._average_grads(comm, bad)
        else:
            go = bad < 0 or self._nonfinite(0, bad)
        self._steps += 1
        if go:
            self.inner.step()
        return loss

    def _nonfinite(self, rank: int, index: int) -> bool:
        """Raise, or under nonfinite="skip" return False: the same on every rank."""
        shape = tuple(self._flat[index].shape)
        raise_nonfinite(self.nonfinite, where=f"rank {rank}, parameter #{index} {shape}", step=self._steps)
        return False

    def _average_grads(self, comm: TorchComm, bad: int) -> bool:
        """All-reduce the gradients; False when a non-finite one skips the step everywhere."""
        self.ledger.begin_step()
        try:
            present = np.array([p.grad is not None for p in self._flat], dtype=bool)
            meta = exchange_step_meta(comm, present, bad, self.ledger)
            if meta.bad_rank >= 0:
                return self._nonfinite(meta.bad_rank, meta.bad_index)
            live = [p for p, on in zip(self._flat, meta.present, strict=True) if on]
            numel = sum(p.numel() for p in live)
            n = comm.world_size
            padded = -(-numel // n) * n
            flat = torch.zeros(padded, dtype=self.wire_dtype, device=live[0].device if live else "cpu")
            offset = 0
            for i, p in enumerate(live):
                mine = flat[offset : offset + p.numel()]
                if p.grad is not None:
                    mine.copy_(p.grad.reshape(-1))
                if self._attack is not None:
                    corrupt_grad(mine, self._attack, attack_key(self._seed, self._steps, comm.rank, i))
                offset += p.numel()
            flat = flat.to(comm.device)
            comm.all_reduce_sum(flat, "gradient all_reduce")
            bits = 8 * flat.element_size()
            sent, received = all_reduce_traffic(
                Traffic(payload=bits * numel, padding=bits * (padded - numel)), n
            )
            self.ledger.record(CollectiveRecord("grads", "all_reduce", n, sent, received))
            flat.div_(n)
            offset = 0
            for p in live:
                avg = flat[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
                offset += p.numel()
            return True
        finally:
            self.ledger.end_step()
