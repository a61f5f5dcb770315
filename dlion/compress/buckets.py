"""Flat buckets of packed sign bits.

Each parameter starts on a byte boundary of its bucket (at most 7 bits of padding per
tensor, none for sizes divisible by 8), so the sign kernel of one parameter writes whole
bytes of the shared buffer without read-modify-write. Each bucket is padded to a whole
number of 16-byte words (dlion.wire); per-rank shards of the sharded backend split on those.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlion.wire import WORD_BYTES


@dataclass(frozen=True)
class Slot:
    index: int  # position of the tensor in the optimizer's flat parameter list
    numel: int
    byte_offset: int  # where its bits start in the bucket

    @property
    def nbytes(self) -> int:
        return (self.numel + 7) // 8


@dataclass(frozen=True)
class Bucket:
    slots: tuple[Slot, ...]
    nbytes: int  # padded size of the bucket buffer

    @property
    def payload_bits(self) -> int:
        return sum(s.numel for s in self.slots)


def plan_buckets(numels: list[int], bucket_numel: int, align_bytes: int = WORD_BYTES) -> list[Bucket]:
    """Group tensors, in order, into buckets of about ``bucket_numel`` elements.

    A tensor larger than ``bucket_numel`` gets a bucket of its own. Buckets are padded to
    a multiple of ``align_bytes``.
    """
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    offset = 0
    for index, numel in enumerate(numels):
        if slots and 8 * offset + numel > bucket_numel:
            buckets.append(_close(slots, offset, align_bytes))
            slots, offset = [], 0
        slots.append(Slot(index, numel, offset))
        offset += (numel + 7) // 8
    if slots:
        buckets.append(_close(slots, offset, align_bytes))
    return buckets


def _close(slots: list[Slot], nbytes: int, align: int) -> Bucket:
    return Bucket(tuple(slots), max(align, -(-nbytes // align) * align))
