"""Blockwise absmax quantization of fp32 rows to 8 or 4 bits (DiLoCo's quantized outer
exchange, as torchft's ``should_quantize`` and Streaming DiLoCo send their pseudo-gradients).

Along the last dimension, per block of ``block`` consecutive elements (the last block of a
row may be shorter):

    scale = max|x| / qmax          fp32, qmax = 2^(bits-1) - 1: 127 (8 bits), 7 (4 bits)
    q     = round(x / scale)       to nearest, ties to even; 0 where the block is all zero
    x'    = q * scale              so |x - x'| <= scale / 2 (up to fp32 rounding)

Codes are signed: 8-bit ones an int8 each, 4-bit ones two's complement nibbles, element 2k
in the low nibble of byte k and 2k + 1 in the high one. A message (``BlockQuant.encode``)
is a row's fp32 scales as bytes, then its codes: ``bits`` per element plus 32 per block.
Every step is a plain torch operation on the CPU or the device alike, so the bits depend
only on the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlion.checks import check_int

BITS: tuple[int, ...] = (8, 4)
DEFAULT_BLOCK = 1024  # elements per fp32 scale: 32 / 1024 bits per element of overhead


def check_bits(name: str, value: object, *, or_none: bool = True) -> None:
    """8 or 4 (or None with ``or_none``); the message names ``name`` and the value."""
    if value is None and or_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in BITS:
        allowed = ", ".join(map(str, BITS)) + (" or None" if or_none else "")
        raise ValueError(f"{name} must be one of {allowed} (bits per quantized value); got {value!r}")


def qmax(bits: int) -> int:
    """The largest code: codes lie in [-qmax, qmax], symmetric about zero."""
    return 2 ** (bits - 1) - 1


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` [..., L] -> (codes uint8 [..., L * bits / 8], scales fp32 [..., ceil(L / block)]).
    L must be a whole number of bytes of codes (even for 4 bits)."""
    check_bits("bits", bits, or_none=False)
    length, nb = x.shape[-1], n_blocks(x.shape[-1], block)
    if length % (8 // bits):
        raise ValueError(f"{bits}-bit codes pack {8 // bits} per byte; a row of {length} elements does not")
    lead = x.shape[:-1]
    blocks = torch.nn.functional.pad(x.float(), (0, nb * block - length)).reshape(*lead, nb, block)
    scales = blocks.abs().amax(dim=-1) / qmax(bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero block: codes 0
    q = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    codes = q.reshape(*lead, nb * block)[..., :length].view(torch.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)
    return codes.contiguous(), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """(codes, scales) of ``quantize`` -> fp32 [..., L], each code times its block's scale."""
    check_bits("bits", bits, or_none=False)
    if bits == 4:
        nibbles = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
        q = (nibbles.view(torch.int8) ^ 8) - 8  # sign-extend the two's complement nibble
    else:
        q = codes.view(torch.int8)
    length, nb = q.shape[-1], scales.shape[-1]
    if n_blocks(length, block) != nb:
        raise ValueError(
            f"{length} codes in blocks of {block} need {n_blocks(length, block)} scales, got {nb}"
        )
    lead = q.shape[:-1]
    blocks = torch.nn.functional.pad(q.float(), (0, nb * block - length)).reshape(*lead, nb, block)
    return (blocks * scales.unsqueeze(-1)).reshape(*lead, nb * block)[..., :length].contiguous()


@dataclass(frozen=True, kw_only=True)
class BlockQuant:
    """The codec of one exchange: ``bits`` per code (8 or 4), an fp32 scale per ``block``
    elements; rows of ``row`` elements travel as messages of ``message_bytes`` bytes."""

    bits: int
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        check_bits("bits", self.bits, or_none=False)
        check_int("block", self.block, low=1)

    @property
    def per_byte(self) -> int:
        """Codes per byte: a row's length must be a multiple of it."""
        return 8 // self.bits

    def code_bytes(self, row: int) -> int:
        return row * self.bits // 8

    def message_bytes(self, row: int) -> int:
        return 4 * n_blocks(row, self.block) + self.code_bytes(row)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [..., row] -> uint8 [..., message_bytes(row)]: the scales' bytes, then the codes."""
        codes, scales = quantize(x, self.bits, self.block)
        return torch.cat((scales.contiguous().view(torch.uint8), codes), dim=-1)

    def decode(self, msg: torch.Tensor, row: int) -> torch.Tensor:
        """uint8 [..., message_bytes(row)] of ``encode`` -> fp32 [..., row]."""
        if msg.shape[-1] != self.message_bytes(row):
            raise ValueError(
                f"a message of a {row}-element row is {self.message_bytes(row)} bytes, got {msg.shape[-1]}"
            )
        lead, nb = msg.shape[:-1], n_blocks(row, self.block)
        # A copy of the scale bytes, so the fp32 view starts aligned whatever row it came from.
        scales = msg[..., : 4 * nb].reshape(-1).clone().view(torch.float32).reshape(*lead, nb)
        return dequantize(msg[..., 4 * nb :], scales, self.bits, self.block)


def mean_of_rows(codec: BlockQuant, messages: torch.Tensor, row: int) -> torch.Tensor:
    """The reduce step of the quantized all-reduce: messages uint8 [N, bytes] (rank r's
    version of one chunk in row r) -> the fp32 mean of their decoded rows, summed in rank
    order (0, 1, ..., N-1) and divided by N, so every rank and the reference agree bit for bit."""
    decoded = codec.decode(messages, row)
    total = decoded[0].clone()
    for r in range(1, decoded.shape[0]):
        total += decoded[r]
    return total.div_(decoded.shape[0])


def quantized_all_reduce_bits(numel: int, world_size: int, codec: BlockQuant) -> int:
    """Bits one rank sends (and receives) per quantized all-reduce of ``numel`` fp32 values:
    the buffer padded to N chunks of ``chunk_len``; (N-1) chunk messages out in the
    all_to_all and (N-1) in the ring all_gather, 2 (N-1) x (chunk x bits + 32 x blocks).
    For a chunk a whole number of blocks that is 2 (N-1)/N x (bits + 32/block) per value."""
    chunk = chunk_len(numel, world_size, codec)
    return 2 * (world_size - 1) * 8 * codec.message_bytes(chunk)


def chunk_len(numel: int, world_size: int, codec: BlockQuant) -> int:
    """Each rank's share of a buffer of ``numel``: ceil(numel / N), up to a whole byte of codes."""
    share, unit = -(-numel // world_size), codec.per_byte
    return -(-share // unit) * unit
