"""TernGrad's wire codec (Wen et al., NeurIPS 2017): per-layer scalers and 2-bit ternary codes.

Per layer (parameter tensor) of worker i, in the paper's notation:

    s_i = max|g_i|, or with gradient clipping min(max|g_i|, c * sigma_i), c = 2.5
    s   = max_i s_i                              scaler sharing: one scaler for all workers
    t_k = sign(g_k) * b_k,  b_k ~ Bernoulli(min(1, |g_k| / s))
    mean = s * (sum_i t_i) / N                   2N + 1 levels

E[s * t_k] = g_k wherever |g_k| <= s (unbiased); a larger |g_k| is clipped to s. Packets
combine by summation: the codes of N workers add up to integers in [-N, N], which either
every rank computes from an all_gather, or a server computes and sends back in
ceil(log2(2N + 1)) bits per element. The bit layout is in ``dlion.kernels.ternary_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dlion.kernels.ternary import pack_levels, sum_ternary, ternarize_pack, unpack_levels
from dlion.kernels.ternary_ref import level_bits
from dlion.ledger import Traffic
from dlion.wire import TERN_STREAM, WORD_BYTES, derive_key, round_up

CLIP_FACTOR = 2.5  # c of the paper's clipping, cross-validated once on CIFAR-10 and kept for all nets

__all__ = [
    "CLIP_FACTOR",
    "CodeLayout",
    "decode_mean",
    "draw_key",
    "encode",
    "level_bits",
    "local_scaler",
    "pack_sums",
    "plan_layout",
    "shared_scalers",
    "sum_codes",
    "unpack_sums",
]


def local_scaler(grad: np.ndarray, clip_factor: float | None) -> np.float32:
    """One worker's scaler of one layer: max|g|, or min(max|g|, c * sigma) with clipping.

    sigma is the population standard deviation of the layer's gradient (about its mean),
    as in the reference implementation. Clipping at c * sigma and then taking max|f(g)|
    gives min(max|g|, c * sigma). A constant layer (sigma = 0, e.g. one element) keeps
    max|g|: a zero scaler would silence it for good.
    """
    g = np.asarray(grad, dtype=np.float32).reshape(-1)
    if g.size == 0:
        return np.float32(0.0)
    top = np.float32(np.max(np.abs(g)))
    if clip_factor is None:
        return top
    clipped = np.float32(clip_factor * float(np.std(g, dtype=np.float64)))
    return min(top, clipped) if clipped > 0 else top


def shared_scalers(gathered: np.ndarray) -> np.ndarray:
    """float32[N, T] of every worker's layer scalers -> float32[T], the max over workers.

    Sharing one scaler makes every worker's values multiples of the same s, so their
    average is s * k / N with k an integer in [-N, N].
    """
    return np.asarray(gathered, dtype=np.float32).max(axis=0)


def draw_key(seed: int, step: int, rank: int, index: int) -> int:
    """Key of rank ``rank``'s draws for tensor ``index`` at ``step``: one run seed, per-rank streams."""
    return derive_key(seed, TERN_STREAM, step, rank, index)


@dataclass(frozen=True)
class CodeLayout:
    """Where each tensor's 2-bit codes sit in one flat packet, the same on every rank.

    Each tensor starts on a byte boundary (the fused kernel writes whole bytes; at most
    6 bits of padding per tensor) and the packet is padded to whole 16-byte words. Element
    slot 4 * byte_offset + k of the packet holds element k of the tensor.
    """

    indices: tuple[int, ...]  # positions in the optimizer's flat parameter list
    numels: tuple[int, ...]
    byte_offsets: tuple[int, ...]
    nbytes: int

    @property
    def n_slots(self) -> int:
        return 4 * self.nbytes

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def slots(self, j: int) -> slice:
        """Element slots of the layout's j-th tensor."""
        lo = 4 * self.byte_offsets[j]
        return slice(lo, lo + self.numels[j])

    def code_traffic(self) -> Traffic:
        """One packet: 2 bits of payload per element; alignment is padding."""
        payload = 2 * self.numel
        return Traffic(payload=payload, padding=8 * self.nbytes - payload)

    def sums_bytes(self) -> int:
        """Bytes of one bit plane of sums (one bit per slot), padded to whole 16-byte words."""
        return round_up(self.n_slots // 8, WORD_BYTES)

    def sums_traffic(self, n_workers: int) -> Traffic:
        """The server's reply: ceil(log2(2N + 1)) planes of one bit per slot."""
        b = level_bits(n_workers)
        payload = b * self.numel
        return Traffic(payload=payload, padding=8 * b * self.sums_bytes() - payload)


def plan_layout(indices: Sequence[int], numels: Sequence[int]) -> CodeLayout:
    offsets: list[int] = []
    offset = 0
    for n in numels:
        offsets.append(offset)
        offset += (n + 3) // 4
    nbytes = max(WORD_BYTES, round_up(offset, WORD_BYTES))
    return CodeLayout(tuple(indices), tuple(numels), tuple(offsets), nbytes)


def encode(
    layout: CodeLayout,
    grads: Sequence[np.ndarray | None],
    scales: Sequence[float] | np.ndarray,
    keys: Sequence[int],
) -> np.ndarray:
    """One worker's packet, uint8[layout.nbytes]; grads[j] float32[numel_j] or None (all zeros)."""
    packet = np.zeros(layout.nbytes, np.uint8)
    for j, (g, s, key) in enumerate(zip(grads, scales, keys, strict=True)):
        if g is None or layout.numels[j] == 0:
            continue  # an absent gradient is all zeros: codes 00
        lo = layout.byte_offsets[j]
        ternarize_pack(g, float(s), key, packet[lo : lo + (layout.numels[j] + 3) // 4])
    return packet


def sum_codes(packets: np.ndarray) -> np.ndarray:
    """uint8[N, nbytes] -> int32[4 * nbytes]: per slot, the sum of the N workers' ternary values."""
    return sum_ternary(packets)


def pack_sums(sums: np.ndarray, n_workers: int, plane_bytes: int) -> np.ndarray:
    """int32[n] in [-N, N] -> uint8[B, plane_bytes], zero-padded: the server's exact reply."""
    planes = pack_levels(sums, n_workers)
    out = np.zeros((planes.shape[0], plane_bytes), np.uint8)
    out[:, : planes.shape[1]] = planes
    return out


def unpack_sums(planes: np.ndarray, n_workers: int, n: int) -> np.ndarray:
    return unpack_levels(planes, n_workers, n)


def decode_mean(sums: np.ndarray, scale: float, n_workers: int) -> np.ndarray:
    """int32[n] -> float32[n]: (k * s) / N, two float32 roundings in this order."""
    return sums.astype(np.float32) * np.float32(scale) / np.float32(n_workers)
