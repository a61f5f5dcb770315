"""Plain NumPy references for the sign kernels.

Each function here has the exact signature of its Numba twin in ``cpu.py``; the tests
hold the fast versions to these bit for bit. Wire layout (dlion.wire): element k of a
buffer is byte k // 8, bit 7 - k % 8, the layout of ``numpy.packbits``.
"""

from __future__ import annotations

import numpy as np

from dlion import wire


def splitmix64_ref(key: int, start: int, n: int) -> np.ndarray:
    """uint64[n]: element j is splitmix64(key + start + j), the counter-based draw of dlion.wire."""
    s30, s27, s31 = (np.uint64(s) for s in wire.SHIFTS)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.uint64(start) + np.arange(n, dtype=np.uint64)
        z = z + np.uint64(wire.GOLDEN)
        z = (z ^ (z >> s30)) * np.uint64(wire.MIX1)
        z = (z ^ (z >> s27)) * np.uint64(wire.MIX2)
        return z ^ (z >> s31)


def coin_bytes_ref(key: int, start: int, nbytes: int) -> np.ndarray:
    """uint8[nbytes]: byte j is the top byte of splitmix64(key + start + j)."""
    return (splitmix64_ref(key, start, nbytes) >> np.uint64(56)).astype(np.uint8)


def pack_signs_ref(x: np.ndarray) -> np.ndarray:
    """float32[n] -> uint8[ceil(n/8)]: bit 1 where x > 0, zero-padded."""
    return np.packbits(np.asarray(x) > 0)


def unpack_signs_ref(bits: np.ndarray, n: int) -> np.ndarray:
    """uint8[>= ceil(n/8)] -> float32[n] of +1 (bit 1) and -1 (bit 0)."""
    return np.unpackbits(np.asarray(bits), count=n).astype(np.float32) * 2 - 1


def lion_sign_step_ref(
    grad: np.ndarray, exp_avg: np.ndarray, out: np.ndarray, beta1: float, beta2: float, zero_key: int
) -> None:
    """One worker's Lion step without the parameter update.

    c = beta1*m + (1-beta1)*g; writes pack(c > 0) into out[:ceil(n/8)] and updates
    exp_avg in place to beta2*m + (1-beta2)*g. A coordinate with c == 0 has no sign:
    it takes a fair coin from ``coin_bytes(zero_key, 0, .)`` so zeros add no drift.
    """
    n = grad.size
    nb = (n + 7) // 8
    b1, omb1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, omb2 = np.float32(beta2), np.float32(1.0 - beta2)
    g = np.asarray(grad, dtype=np.float32)
    c = b1 * exp_avg + omb1 * g
    bits = np.packbits(c > 0)
    zeros = np.packbits(c == 0)
    if zeros.any():
        coin = coin_bytes_ref(zero_key, 0, nb)
        bits = bits | (zeros & coin)
    out[:nb] = bits
    exp_avg[...] = b2 * exp_avg + omb2 * g


def majority_vote_ref(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, nbytes] -> (win, tie), each uint8[nbytes].

    win has bit 1 where more than N/2 workers sent 1; tie has bit 1 where exactly N/2
    did (only possible for even N).
    """
    n_workers = packed.shape[0]
    counts = np.unpackbits(packed, axis=1).sum(axis=0, dtype=np.int64)
    return np.packbits(2 * counts > n_workers), np.packbits(2 * counts == n_workers)


def count_planes_ref(packed: np.ndarray) -> np.ndarray:
    """uint8[N, nbytes] -> uint8[B, nbytes], B = ceil(log2(N+1)).

    Plane b holds bit b of each element's count of positive votes, in the wire's bit
    layout: the counts packed bit-sliced, ceil(log2(N+1)) bits per element.
    """
    n_workers = packed.shape[0]
    n_planes = max(1, int(n_workers).bit_length())
    counts = np.unpackbits(packed, axis=1).sum(axis=0, dtype=np.int64)
    return np.stack([np.packbits((counts >> b) & 1) for b in range(n_planes)]).reshape(
        n_planes, packed.shape[1]
    )


def apply_update_ref(
    param: np.ndarray,
    planes: np.ndarray,
    table: np.ndarray,
    lr: float,
    weight_decay: float,
    cautious: bool = False,
) -> None:
    """param[k] <- param[k]*(1 - lr*wd) - lr*table[code_k] in float32, in place.

    code_k = sum_b bit_k(planes[b]) << b; planes is uint8[B, >= ceil(n/8)]. ``cautious``
    (cautious weight decay, Chen et al. 2025) decays only where table[code_k]*param >= 0,
    i.e. where the update and the parameter do not have opposite signs.
    """
    n = param.size
    code = np.zeros(n, dtype=np.int64)
    for b in range(planes.shape[0]):
        code |= np.unpackbits(planes[b], count=n).astype(np.int64) << b
    decay = np.full(n, 1.0 - lr * weight_decay, dtype=np.float32)
    direction = np.asarray(table, dtype=np.float32)[code]
    update = np.float32(lr) * direction
    if cautious:
        decay[direction * param < 0] = 1.0
    param[...] = param * decay - update


def all_finite_ref(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())
