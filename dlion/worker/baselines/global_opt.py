"""The usual data-parallel baseline: all-reduce dense gradients, then a torch optimizer.

How the mean is made is the optimizer's ``Exchange``, chosen once when it is built: a ring
all_reduce in fp32 or bf16 (``RingAllReduce``), or a reduce-scatter and all-gather of 8- or
4-bit blockwise-quantized chunks (``QuantizedAllReduce``, DiLoCo's quantized outer step).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dlion.aggregate.meta import StepMeta
from dlion.checks import check_instance, check_int, one_of
from dlion.compress.quant import (
    DEFAULT_BLOCK,
    BlockQuant,
    check_bits,
    chunk_len,
    mean_of_rows,
    n_blocks,
)
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_reduce_traffic
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

    wire_dtype:     the gradients' dtype on the wire, "float32" or "bfloat16".
    byzantine:      the last K ranks corrupt their gradients before the all-reduce.
    quantize_bits:  None: the ring all_reduce in ``wire_dtype``; 8 or 4: the fp32 gradients
                    quantized blockwise (dlion.compress.quant), reduced in a reduce-scatter and
                    quantized again for the all-gather, 2 (N-1)/N (bits + 32/block) bits per
                    value each way (``wire_dtype`` must then be "float32").
    quantize_block: elements per fp32 scale of the quantized exchange.
    """

    wire_dtype: str = "float32"
    byzantine: Byzantine | None = None
    quantize_bits: int | None = None
    quantize_block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        one_of("wire_dtype", self.wire_dtype, tuple(WIRE_DTYPES))
        check_instance("byzantine", self.byzantine, Byzantine, or_none=True)
        check_bits("quantize_bits", self.quantize_bits)
        check_int("quantize_block", self.quantize_block, low=1)
        if self.quantize_bits is not None and self.wire_dtype != "float32":
            raise ValueError(
                f"quantize_bits={self.quantize_bits} quantizes the fp32 gradients; wire_dtype must be "
                f"'float32' with it, got {self.wire_dtype!r}"
            )
        super().__post_init__()


class Exchange(Protocol):
    """How the ranks' flat gradients become their mean, the same on every rank."""

    @property
    def dtype(self) -> torch.dtype:
        """Of the flat buffer the optimizer fills."""
        ...

    def padded(self, numel: int, world_size: int) -> int:
        """The flat buffer's length for ``numel`` gradient values: N whole chunks."""
        ...

    def mean(self, comm: Comm, flat: torch.Tensor, numel: int, ledger: Ledger) -> torch.Tensor:
        """``flat`` (the first ``numel`` values the gradients, then zeros) -> the mean over
        ranks, recording every collective in ``ledger``."""
        ...


@dataclass(frozen=True)
class RingAllReduce:
    """One ring all_reduce (sum) in ``dtype``, then / N: 2 (N-1)/N x 8 x itemsize bits a value."""

    dtype: torch.dtype

    def padded(self, numel: int, world_size: int) -> int:
        return -(-numel // world_size) * world_size

    def mean(self, comm: Comm, flat: torch.Tensor, numel: int, ledger: Ledger) -> torch.Tensor:
        n = comm.world_size
        comm.all_reduce_sum(flat, "gradient all_reduce")
        bits = 8 * flat.element_size()
        sent, received = all_reduce_traffic(
            Traffic(payload=bits * numel, padding=bits * (flat.numel() - numel)), n
        )
        ledger.record(CollectiveRecord("grads", "all_reduce", n, sent, received))
        return flat.div_(n)


@dataclass(frozen=True)
class QuantizedAllReduce:
    """torchft's quantized all-reduce: the buffer in N chunks, chunk j of every rank's
    quantized buffer sent to rank j (all_to_all); rank j decodes the N versions, sums them in
    rank order and divides by N (``mean_of_rows``), quantizes that mean again, and the ring
    all_gather brings every rank every quantized mean, which all decode alike.

    Per rank each way: (N-1) chunk messages in each collective, payload and padding ``bits``
    a value, scalers 32 a block (``quantized_all_reduce_bits``)."""

    codec: BlockQuant
    dtype: torch.dtype = torch.float32

    def padded(self, numel: int, world_size: int) -> int:
        return chunk_len(numel, world_size, self.codec) * world_size

    def mean(self, comm: Comm, flat: torch.Tensor, numel: int, ledger: Ledger) -> torch.Tensor:
        n, me, codec = comm.world_size, comm.rank, self.codec
        chunk = flat.numel() // n
        part = [self._traffic(j, chunk, numel) for j in range(n)]
        others = [part[j] for j in range(n) if j != me]
        shards = comm.all_to_all(codec.encode(flat.view(n, chunk)).view(-1), "gradient quantized all_to_all")
        ledger.record(CollectiveRecord("grads.shards", "all_to_all", n, _sum(others), part[me] * (n - 1)))
        mine = mean_of_rows(codec, shards.to(flat.device), chunk)
        gathered = comm.all_gather(codec.encode(mine), "gradient quantized all_gather")
        # In a ring each rank forwards every chunk but that of the rank after it.
        up = _sum(part[j] for j in range(n) if j != (me + 1) % n)
        ledger.record(CollectiveRecord("grads.result", "all_gather", n, up, _sum(others)))
        return codec.decode(gathered.to(flat.device), chunk).view(-1)

    def _traffic(self, j: int, chunk: int, numel: int) -> Traffic:
        """Chunk j's message: its gradient values, its padding, its blocks' scales."""
        values = max(0, min(numel - j * chunk, chunk))
        bits = self.codec.bits
        scalers = 32 * n_blocks(chunk, self.codec.block)
        return Traffic(payload=bits * values, padding=bits * (chunk - values), scalers=scalers)


def _sum(parts: Iterable[Traffic]) -> Traffic:
    return sum(parts, Traffic())


def exchange_of(config: GlobalConfig) -> Exchange:
    """The exchange ``config`` asks for, chosen once."""
    if config.quantize_bits is None:
        return RingAllReduce(WIRE_DTYPES[config.wire_dtype])
    return QuantizedAllReduce(BlockQuant(bits=config.quantize_bits, block=config.quantize_block))


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
      3. Encode: all gradients flattened in ``wire_dtype`` (fp32 when quantized), padded so
         each of the N chunks is a whole number of elements (of bytes of codes). With
         ``byzantine``, the attacking ranks corrupt their gradients in the flat buffer
         (dlion.worker.core.byzantine; "flip" negates them).
      4-5. Exchange and combine (``exchange_of(config)``): one all_reduce (sum), then divide
         by N; or with ``quantize_bits`` the quantized reduce-scatter and all-gather.
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
        self.exchange: Exchange = exchange_of(config)
        self.wire_dtype = self.exchange.dtype
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
        padded = self.exchange.padded(numel, self.world_size)
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
        numel = sum(self._flat[i][0].numel() for i in work.live)
        return self.exchange.mean(comm, flat.to(comm.device), numel, self.ledger)

    def _apply(self, work: AllReduceStep, k: int, mean: torch.Tensor) -> None:
        offset = 0
        for i in work.live:
            n = self._flat[i][0].numel()
            self._set_grad(i, mean[offset : offset + n])
            offset += n
