"""The wire's constants and bit layout, and the keys of every random draw.

Everything two ranks must agree on before a byte moves lives here, once:

- Bit layout: element k of a packed buffer is byte k // 8, bit 7 - k % 8 (most significant
  first), the layout of ``numpy.packbits`` and ``bitarray(endian="big")``; bit 1 is a
  positive sign. 2-bit ternary codes follow the same order (``kernels.ternary_ref``).
- Alignment: every bucket, shard and message section is a whole number of WORD_BYTES.
- Randomness is counter based, on splitmix64: draw j under a 64-bit key is a function of
  splitmix64(key + j) only, so any chunking, thread count or device gives the same draws.
  Keys come from ``derive_key(seed, stream, ...)``; the streams below keep the draws of
  different purposes apart. The hash itself has twins per engine (Numba CPU, CUDA, NumPy,
  torch); their constants are these.
"""

from __future__ import annotations

WORD_BYTES = 16  # every bucket, shard and message section is whole 16-byte words

# splitmix64 (Steele, Lea, Flood 2014): the increment and the two finaliser multipliers.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
SHIFTS = (30, 27, 31)
MASK64 = (1 << 64) - 1

# Streams of derive_key(seed, stream, step, ...): one per purpose.
ZERO_STREAM = 1  # a worker's coin for c == 0 in the sign step (per rank, per tensor)
TIE_STREAM = 2  # the even-split tie coin of a majority vote (the same on every rank)
# TernGrad's Bernoulli draws and a byzantine rank's coins share 3; no optimizer uses both.
TERN_STREAM = 3
BYZANTINE_STREAM = 3
SAMPLE_STREAM = 0xD6C  # DGC's sample offsets for the top-k threshold
SHARD_STREAM = 0x5AD  # an FSDP shard's seed: each shard group draws coins of its own


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_bytes(n: int) -> int:
    """Bytes of n elements at one bit each."""
    return (n + 7) // 8


def mix64(z: int) -> int:
    """splitmix64 of the integer z (its increment, then its finaliser), on Python ints."""
    z = (z + GOLDEN) & MASK64
    z = ((z ^ (z >> SHIFTS[0])) * MIX1) & MASK64
    z = ((z ^ (z >> SHIFTS[1])) * MIX2) & MASK64
    return z ^ (z >> SHIFTS[2])


def derive_key(*parts: int) -> int:
    """A 64-bit key from a sequence of non-negative ints, the same on every rank."""
    key = 0
    for part in parts:
        key = extend_key(key, part)
    return key


def extend_key(key: int, part: int) -> int:
    """derive_key(*parts, part) from key = derive_key(*parts): one mix, not len(parts)+1."""
    return mix64(key ^ (part & MASK64))
