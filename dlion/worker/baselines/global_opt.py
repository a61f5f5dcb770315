"""The usual data-parallel baseline: all-reduce dense gradients, then a torch optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dlion.aggregate.meta import StepMeta
from dlion.checks import check_instance, one_of
from dlion.ledger import CollectiveRecord, Traffic, all_reduce_traffic
from dlion.transport import Comm
from dlion.worker.core.base import Grads
from dlion.worker.core.byzantine import Byzantine, attack_key, attack_of, corrupt_grad
from dlion.worker.core.config import CommConfig, config_of
from dlion.worker.core.inner import InnerStep

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class GlobalConfig(CommConfig):
    """The all-reduce baseline's settings; transport, nonfinite, seed, timeout as CommConfig
    (seed keys a byzantine rank's noise).

    wire_dtype: the gradients' dtype on the wire, "float32" or "bfloat16".
    byzantine:  the last K ranks corrupt their gradients before the all-reduce.
    """

    wire_dtype: str = "float32"
    byzantine: Byzantine | None = None

    def __post_init__(self) -> None:
        one_of("wire_dtype", self.wire_dtype, tuple(WIRE_DTYPES))
        check_instance("byzantine", self.byzantine, Byzantine, or_none=True)
        super().__post_init__()


@dataclass
class AllReduceStep:
    live: list[int]  # the tensors some rank has a gradient for
    n_buckets: int  # 1 (the flat gradient), or 0 in a world of one


class GlobalOptimizer(InnerStep[AllReduceStep]):
    """Any torch optimizer on the ring all-reduced mean gradient ("global AdamW").

    Per step, with N ranks:
      1-2. Check and agree (dlion.worker.core.base): the metadata all_gather (4 + ceil(T/8) bytes
         per rank) of which tensors have a gradient anywhere and the first with a NaN/Inf on
         any rank. A tensor none has stays None (the inner optimizer skips it); a rank without
         one contributes zeros. A non-finite gradient raises NonFiniteGradientError on every
         rank naming the rank and tensor, or with nonfinite="skip" skips the step on every rank.
      3. Encode: all gradients flattened in ``wire_dtype``, padded so each of the N ring chunks
         is a whole number of elements. With ``byzantine``, the attacking ranks corrupt their
         gradients in the flat buffer (dlion.worker.core.byzantine; "flip" negates them).
      4-5. Exchange and combine: one all_reduce (sum), then divide by N.
      6. Apply: each p.grad becomes the mean; the inner optimizer steps, identical on all ranks.

    It is a torch.optim.Optimizer sharing the inner one's param groups and state, so an LR
    scheduler takes it directly. With one rank the inner optimizer steps on its own gradients.
    """

    STATE_KEY = "global"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        process_group: Any = None,
        *,
        config: GlobalConfig | None = None,
        **options: Any,
    ) -> None:
        """``config``: how the ranks communicate (GlobalConfig); or, the keyword form, its
        fields as keywords (``wire_dtype="bfloat16", nonfinite="skip"``), not both."""
        config = config_of(GlobalConfig, config, options, owner="GlobalOptimizer")
        super().__init__(inner, config=config, process_group=process_group)
        self.config: GlobalConfig = config
        self.wire_dtype = WIRE_DTYPES[config.wire_dtype]
        self._params_changed()

    def _params_changed(self) -> None:
        """Whether this rank attacks depends on its rank, known once the transport is."""
        self._attack = attack_of(self.config.byzantine, self.rank, self.world_size)

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> AllReduceStep:
        live = [i for i, on in enumerate(meta.present) if on]
        return AllReduceStep(live, 1 if comm is not None else 0)

    def _encode(self, work: AllReduceStep, k: int) -> torch.Tensor:
        live = [self._flat[i][0] for i in work.live]
        numel = sum(p.numel() for p in live)
        padded = -(-numel // self.world_size) * self.world_size
        flat = torch.zeros(padded, dtype=self.wire_dtype, device=live[0].device if live else "cpu")
        offset = 0
        for j, p in enumerate(live):
            mine = flat[offset : offset + p.numel()]
            if p.grad is not None:
                mine.copy_(p.grad.reshape(-1))
            if self._attack is not None:
                corrupt_grad(mine, self._attack, attack_key(self.config.seed, self.steps_taken, self.rank, j))
            offset += p.numel()
        return flat

    def _exchange(self, comm: Comm | None, work: AllReduceStep, k: int, flat: torch.Tensor) -> torch.Tensor:
        assert comm is not None
        n, numel = comm.world_size, sum(self._flat[i][0].numel() for i in work.live)
        flat = flat.to(comm.device)
        comm.all_reduce_sum(flat, "gradient all_reduce")
        bits = 8 * flat.element_size()
        sent, received = all_reduce_traffic(
            Traffic(payload=bits * numel, padding=bits * (flat.numel() - numel)), n
        )
        self.ledger.record(CollectiveRecord("grads", "all_reduce", n, sent, received))
        return flat.div_(n)

    def _apply(self, work: AllReduceStep, k: int, mean: torch.Tensor) -> None:
        offset = 0
        for i in work.live:
            n = self._flat[i][0].numel()
            self._set_grad(i, mean[offset : offset + n])
            offset += n
