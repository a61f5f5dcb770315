"""Deep Gradient Compression's codec (Lin et al., ICLR 2018): schedule, selection, wire format.

Facts taken from the paper and its reference implementation (synxlin/deep-gradient-compression,
``dgc/compression.py``, ``train.py``):

- Which tensors: only those with more than one dimension (``param.dim() > 1``); biases and
  norm weights travel dense. ``min_numel`` can raise the bar further (0 = the reference's rule).
- How many: k = ceil(numel * density) entries per compressed tensor and step.
- Warm-up (paper section 3.4): the density falls 4x per stage, 25%, 6.25%, 1.5625%, 0.390625%
  (sparsity 75%, 93.75%, 98.4375%, 99.6%), then the final 0.1%. The paper counts stages in
  epochs; here they are steps, ``warmup_steps`` split evenly over ``warmup_stages``.
- Selection: a strided sample of |x| (about ``sample_ratio`` of the tensor, and never fewer
  than 2/density samples) gives a threshold, the k_s-th largest sample. Entries >= threshold
  are selected. If that picks more than 1.3 k, an exact top-k runs on the picked entries; if
  fewer than 0.8 k, the threshold shrinks by 0.8 and the pick repeats (at most 10 times).
  Then the first k by position are kept; fewer than k can remain.

Wire format, one message per rank and step, every length known to both sides from the
schedule and the agreed list of live tensors (nothing about lengths is sent):

    [indices: int32[S]] [values: fp32|fp16[S]] [dense: fp32[D]]

Compressed tensor j owns slots [off_j, off_j + k_j); an index is the position inside its
tensor. A slot that selection left empty holds index -1 and value 0 (the sentinel, counted
as padding), as do the fill slots that make S a multiple of 4 (fp32) or 8 (fp16). ``dense``
holds the uncompressed tensors' gradients, padded with zeros to a multiple of 4, when they
travel in the message (``dense_in_message``; otherwise D = 0 and the caller reduces them
apart). Every section is a whole number of 16-byte words (docs/design.md). Decoding adds rank
0's message first, then rank 1's, ...: a fixed order, so every rank and a server get the
same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlion.ledger import Traffic
from dlion.wire import WORD_BYTES, round_up

WARMUP_FACTOR = 4  # each warm-up stage keeps a quarter of the previous stage's density
UPPER, LOWER, MAX_ADAPT = 1.3, 0.8, 10  # the reference's threshold correction
SENTINEL = -1
INDEX_BITS = 32
VALUE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
MAX_NUMEL = 2**31 - 1  # int32 indices


def density_at(step: int, *, sparsity: float, warmup_steps: int, warmup_stages: int) -> float:
    """Fraction of each compressed tensor sent at ``step`` (0-based)."""
    final = round(1.0 - sparsity, 12)  # 1 - 0.999 is 0.0010000000000000009 in binary
    if step < warmup_steps and warmup_stages > 0:
        stage = step * warmup_stages // warmup_steps
        return max(final, float(WARMUP_FACTOR) ** -(stage + 1))
    return final


def select_count(numel: int, density: float) -> int:
    """k = ceil(numel * density), at least 1 (rounded first: float products overshoot whole numbers)."""
    return min(numel, max(1, math.ceil(round(numel * density, 6))))


def is_compressed(shape: Sequence[int], min_numel: int = 0) -> bool:
    """The reference's rule (``param.dim() > 1``), optionally with a minimum size."""
    return len(shape) > 1 and math.prod(shape) >= max(1, min_numel)


@dataclass(frozen=True)
class SamplePlan:
    """How one tensor is thresholded at one density."""

    numel: int
    k: int  # slots on the wire
    stride: int  # 1: the threshold comes from the whole tensor, no correction needed
    n_samples: int
    k_samples: int  # the threshold is the k_samples-th largest sample


def sample_plan(numel: int, density: float, sample_ratio: float) -> SamplePlan:
    """The reference's sampling arithmetic for one tensor."""
    if not 0 < numel <= MAX_NUMEL:
        raise ValueError(f"a compressed tensor must have 1..{MAX_NUMEL} elements, got {numel}")
    k = select_count(numel, density)
    wanted = max(math.ceil(numel * sample_ratio), math.ceil(2 / density))
    if sample_ratio >= 1.0 or numel <= wanted:
        stride, n_samples = 1, numel
    else:
        # An odd stride (32 m + 1) walks across rows of power-of-two widths instead of
        # sampling one column; it shrinks by 8 until there are enough samples.
        stride = math.ceil(numel / wanted / 32) * 32 + 1
        while numel // stride < wanted:
            stride -= 8
        n_samples = numel // stride
    return SamplePlan(numel, k, stride, n_samples, select_count(n_samples, density))


def select_topk(x: torch.Tensor, plan: SamplePlan, key: int) -> torch.Tensor:
    """x: float[numel] -> int64[<= plan.k] ascending positions of the selected entries.

    ``key`` (from derive_key) fixes the sample offset, so a rank's choice is reproducible.
    """
    if plan.k >= plan.numel:  # sparsity 0: everything, whatever the threshold says
        return torch.arange(plan.numel, device=x.device)
    importance = x.abs()
    samples = importance if plan.stride == 1 else importance[key % plan.stride :: plan.stride]
    threshold = torch.topk(samples, plan.k_samples, sorted=False).values.min()
    idx = torch.nonzero(importance >= threshold).view(-1)
    if plan.stride > 1:
        # A sampled threshold is an estimate: correct it towards k.
        for _ in range(MAX_ADAPT):
            n = idx.numel()
            if n > plan.k:
                if n > UPPER * plan.k:
                    idx = idx[torch.topk(importance[idx], plan.k, sorted=False).indices]
                break
            if n >= LOWER * plan.k:
                break
            threshold = threshold * LOWER
            idx = torch.nonzero(importance >= threshold).view(-1)
    return idx[: plan.k].sort().values


@dataclass(frozen=True, eq=False)
class WireLayout:
    """Where each live tensor's data lies in the message and in the decoded flat buffer."""

    value_dtype: torch.dtype
    numels: tuple[int, ...]  # live tensors, in parameter order
    ks: tuple[int | None, ...]  # slots of each compressed tensor; None: sent dense
    bases: tuple[int, ...]  # offset of each tensor in the decoded flat buffer
    slot_offsets: tuple[int | None, ...]
    dense_offsets: tuple[int | None, ...]  # position in the flat vector of dense tensors
    dense_in_message: bool
    n_slots: int  # S, padded
    n_dense: int  # D, padded; 0 when the dense tensors travel apart
    slot_base: torch.Tensor  # int64[S]: base of the tensor each slot belongs to (0 for fill)
    slot_limit: torch.Tensor  # int64[S]: numel of that tensor, the bound of a valid index (0 for fill)

    @property
    def value_bits(self) -> int:
        return 8 * torch.empty((), dtype=self.value_dtype).element_size()

    @property
    def value_offset(self) -> int:
        return 4 * self.n_slots

    @property
    def dense_offset(self) -> int:
        return self.value_offset + self.value_bits // 8 * self.n_slots

    @property
    def nbytes(self) -> int:
        return self.dense_offset + 4 * self.n_dense

    @property
    def total_numel(self) -> int:
        return sum(self.numels)

    @property
    def dense_numel(self) -> int:
        """Elements of the uncompressed tensors, in the message or not."""
        return sum(n for n, k in zip(self.numels, self.ks, strict=True) if k is None)

    def dense_ranges(self) -> list[tuple[int, int, int]]:
        """(offset in the dense vector, base in the decoded buffer, numel) of each dense tensor."""
        return [
            (off, b, n)
            for off, b, n in zip(self.dense_offsets, self.bases, self.numels, strict=True)
            if off is not None
        ]


def plan_wire(
    numels: Sequence[int],
    ks: Sequence[int | None],
    value_dtype: torch.dtype,
    *,
    dense_in_message: bool = True,
) -> WireLayout:
    """The message layout for live tensors of ``numels`` (k None: dense)."""
    bases, slot_offsets, dense_offsets = [], [], []
    slots = dense = base = 0
    for numel, k in zip(numels, ks, strict=True):
        bases.append(base)
        base += numel
        slot_offsets.append(slots if k is not None else None)
        dense_offsets.append(dense if k is None else None)
        slots += k if k is not None else 0
        dense += numel if k is None else 0
    value_bytes = torch.empty((), dtype=value_dtype).element_size()
    n_slots = round_up(slots, WORD_BYTES // min(4, value_bytes))
    slot_base = torch.zeros(n_slots, dtype=torch.int64)
    slot_limit = torch.zeros(n_slots, dtype=torch.int64)
    for b, off, k, numel in zip(bases, slot_offsets, ks, numels, strict=True):
        if off is not None and k is not None:
            slot_base[off : off + k] = b
            slot_limit[off : off + k] = numel
    return WireLayout(
        value_dtype,
        tuple(numels),
        tuple(ks),
        tuple(bases),
        tuple(slot_offsets),
        tuple(dense_offsets),
        dense_in_message,
        n_slots,
        round_up(dense, WORD_BYTES // 4) if dense_in_message else 0,
        slot_base,
        slot_limit,
    )


def _sections(layout: WireLayout, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8[..., nbytes] -> (int32 indices, values, fp32 dense) views of the same memory."""
    lo, mid, hi = layout.value_offset, layout.dense_offset, layout.nbytes
    return (
        msg[..., :lo].view(torch.int32),
        msg[..., lo:mid].view(layout.value_dtype),
        msg[..., mid:hi].view(torch.float32),
    )


def encode(
    layout: WireLayout,
    indices: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    dense: Sequence[torch.Tensor],
) -> torch.Tensor:
    """One rank's message: uint8[nbytes].

    indices/values: one pair per compressed tensor, in order (int64[n <= k], float[n]);
    dense: the flat gradient of each uncompressed tensor, in order.
    """
    msg = torch.zeros(layout.nbytes, dtype=torch.uint8)
    idx_out, val_out, dense_out = _sections(layout, msg)
    idx_out.fill_(SENTINEL)
    sparse = [(off, k) for off, k in zip(layout.slot_offsets, layout.ks, strict=True) if off is not None]
    dense_at = layout.dense_ranges() if layout.dense_in_message else []
    if not len(indices) == len(values) == len(sparse) or len(dense) != len(dense_at):
        raise ValueError("encode: tensors do not match the layout")
    for (off, k), idx, val in zip(sparse, indices, values, strict=True):
        assert k is not None and idx.numel() <= k, "more entries selected than the layout has slots"
        idx_out[off : off + idx.numel()] = idx.to(torch.int32)
        val_out[off : off + idx.numel()] = val.to(layout.value_dtype)
    for (off, _, n), g in zip(dense_at, dense, strict=True):
        dense_out[off : off + n] = g.reshape(-1)
    return msg


def valid_slots(layout: WireLayout, messages: torch.Tensor) -> list[int]:
    """uint8[N, nbytes] -> entries (non-sentinel slots) in each rank's message."""
    idx, _, _ = _sections(layout, messages)
    return (idx >= 0).sum(dim=1).tolist()


def decode_sum(layout: WireLayout, messages: torch.Tensor) -> torch.Tensor:
    """uint8[N, nbytes] -> fp32[total numel]: every rank's entries added, rank 0 first."""
    out = torch.zeros(layout.total_numel, dtype=torch.float32)
    idx, val, dense = _sections(layout, messages.cpu())
    dense_at = layout.dense_ranges() if layout.dense_in_message else []
    for r in range(messages.shape[0]):
        pos = idx[r].to(torch.int64)
        ok = pos >= 0
        # An index past its tensor would add into the next one: a corrupt message, refused.
        out_of_range = ok & (pos >= layout.slot_limit)
        if bool(out_of_range.any()):
            slot = int(out_of_range.nonzero()[0, 0])
            raise ValueError(
                f"DGC message from rank {r}: slot {slot} holds index {int(pos[slot])}, past its "
                f"tensor's {int(layout.slot_limit[slot])} elements (a corrupt or foreign message)"
            )
        # Positions within one message are distinct, so the adds of one rank do not race.
        out.index_add_(0, layout.slot_base[ok] + pos[ok], val[r][ok].to(torch.float32))
        for off, b, n in dense_at:
            out[b : b + n] += dense[r, off : off + n]
    return out


def place_dense(layout: WireLayout, avg: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Write the dense tensors' averaged gradients (fp32[D], in dense order) into ``avg``."""
    for off, base, numel in layout.dense_ranges():
        avg[base : base + numel] = dense[off : off + numel]
    return avg


def message_traffic(layout: WireLayout, valid: int) -> Traffic:
    """Bits of one message holding ``valid`` entries: values and dense gradients are payload."""
    payload = layout.value_bits * valid + 32 * layout.dense_numel * layout.dense_in_message
    indices = INDEX_BITS * valid
    return Traffic(payload=payload, indices=indices, padding=8 * layout.nbytes - payload - indices)
