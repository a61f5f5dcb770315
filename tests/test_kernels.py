"""The Numba sign kernels against their NumPy references, bit for bit, and against the wire format.

Wire layout (docs/design.md): element k is byte k // 8, bit 7 - k % 8 (bitarray endian="big");
bit 1 means a positive value. Float32 results are compared through ``.view(np.uint32)``.
"""

from __future__ import annotations

import os

# libgomp spin-waits between parallel regions by default; on a busy 2-core machine that costs
# milliseconds per kernel call. Results are identical either way, only the suite's runtime
# changes. libgomp reads this when loaded: importing dlion loads torch, which loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from collections.abc import Callable

import numpy as np
import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dlion.kernels import (
    all_finite,
    all_finite_ref,
    apply_update,
    apply_update_ref,
    coin_bytes,
    coin_bytes_ref,
    count_planes,
    count_planes_ref,
    lion_sign_step,
    lion_sign_step_ref,
    majority_vote,
    majority_vote_ref,
    pack_signs,
    pack_signs_ref,
    unpack_signs,
    unpack_signs_ref,
)
from dlion.wire import derive_key

CHUNK = 1 << 14  # the kernels' internal chunk of elements
SIZES = [*range(10), 15, 16, 17, 63, 64, 65, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
SMALL_SIZES = [n for n in SIZES if n < CHUNK]
# 256 uint64 words = 2048 bytes is the vote kernels' block; sizes straddle words, tails and blocks.
NBYTES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 100, 2047, 2048, 2049, 3 * 2048 + 13]
KEY = np.uint64(derive_key(2024, 7))
PROPS = settings(max_examples=50, deadline=None, database=None)

# --------------------------------------------------------------------------- helpers


def rng_for(*parts: int) -> np.random.Generator:
    return np.random.default_rng([*parts, 12345])


def special_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32[n]: normals with zeros, -0.0, NaN, +-Inf and subnormals sprinkled in."""
    x = rng.standard_normal(n).astype(np.float32)
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1e-38], np.float32)
    pick = rng.random(n) < 0.2
    x[pick] = rng.choice(specials, size=int(pick.sum()))
    return x


def bit_list(buf: np.ndarray) -> list[int]:
    """The bits of a uint8 buffer in wire order (bitarray, big endian)."""
    ba = bitarray(endian="big")
    ba.frombytes(np.ascontiguousarray(buf, dtype=np.uint8).tobytes())
    return ba.tolist()


def assert_f32_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and expected.dtype == np.float32
    assert actual.shape == expected.shape
    a = np.ascontiguousarray(actual).view(np.uint32)
    e = np.ascontiguousarray(expected).view(np.uint32)
    # Which of two NaN operands x86 passes on depends on operand order, which LLVM may swap
    # in a commutative op: NaN payloads are not compared, NaN positions are.
    both_nan = np.isnan(actual) & np.isnan(expected)
    bad = np.flatnonzero((a != e) & ~both_nan)
    assert bad.size == 0, f"{bad.size} float32 words differ, first at {bad[:5]}: {a[bad[:5]]} vs {e[bad[:5]]}"


def assert_u8_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and expected.dtype == np.uint8
    assert actual.shape == expected.shape
    bad = np.flatnonzero(actual != expected)
    shown = f"{actual[bad[:5]]} vs {expected[bad[:5]]}"
    assert bad.size == 0, f"{bad.size} bytes differ, first at {bad[:5]}: {shown}"


def random_planes(rng: np.random.Generator, n_workers: int, nbytes: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n_workers, nbytes), dtype=np.uint8)


def hand_counts(packed: np.ndarray) -> np.ndarray:
    """Per element, the number of rows with bit 1, read through bitarray."""
    return np.array([bit_list(row) for row in packed], dtype=np.int64).reshape(packed.shape[0], -1).sum(0)


# --------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("n", SIZES)
def test_pack_signs_matches_ref(n: int) -> None:
    x = special_floats(rng_for(1, n), n)
    assert_u8_identical(pack_signs(x), pack_signs_ref(x))


@pytest.mark.parametrize("n", SIZES)
def test_pack_signs_strided(n: int) -> None:
    base = special_floats(rng_for(2, n), 3 * n)
    x = base[::3]
    assert not x.flags.c_contiguous or n <= 1
    assert_u8_identical(pack_signs(x), pack_signs_ref(x))


@pytest.mark.parametrize("n", [*SMALL_SIZES, CHUNK + 1])
def test_pack_signs_bit_layout(n: int) -> None:
    x = special_floats(rng_for(3, n), n)
    bits = bit_list(pack_signs(x))
    assert len(bits) == 8 * ((n + 7) // 8)
    assert bits[:n] == (x > 0).astype(int).tolist()
    assert not any(bits[n:]), "padding bits must be zero"


def test_pack_signs_nan_zero_inf() -> None:
    x = np.array([np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 2.0], np.float32)
    assert bit_list(pack_signs(x))[:9] == [0, 0, 0, 0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("n", SIZES)
def test_unpack_signs_matches_ref(n: int) -> None:
    rng = rng_for(4, n)
    bits = rng.integers(0, 256, size=(n + 7) // 8 + 3, dtype=np.uint8)  # extra bytes are ignored
    assert_f32_identical(unpack_signs(bits, n), unpack_signs_ref(bits, n))
    strided = np.repeat(bits, 2)[::2]
    assert not strided.flags.c_contiguous or strided.size <= 1
    assert_f32_identical(unpack_signs(strided, n), unpack_signs_ref(strided, n))


@pytest.mark.parametrize("n", [*SMALL_SIZES, CHUNK + 1])
def test_unpack_signs_semantics(n: int) -> None:
    x = special_floats(rng_for(5, n), n)
    packed = pack_signs(x)
    expected = [1.0 if b else -1.0 for b in bit_list(packed)[:n]]
    out = unpack_signs(packed, n)
    assert out.tolist() == expected
    assert_f32_identical(out, np.where(x > 0, 1, -1).astype(np.float32))


@PROPS
@given(hnp.arrays(np.float32, st.integers(0, 80), elements=st.floats(width=32)))
def test_pack_unpack_property(x: np.ndarray) -> None:
    packed = pack_signs(x)
    assert_u8_identical(packed, pack_signs_ref(x))
    assert bit_list(packed)[: x.size] == (x > 0).astype(int).tolist()
    assert_f32_identical(unpack_signs(packed, x.size), unpack_signs_ref(packed, x.size))


@PROPS
@given(st.integers(0, 4 * CHUNK), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_pack_signs_property_sizes(n: int, seed: int, stride: int) -> None:
    x = special_floats(rng_for(seed), n * stride)[::stride]
    assert_u8_identical(pack_signs(x), pack_signs_ref(x))


# --------------------------------------------------------------------------- coins


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 1000, CHUNK + 3])
@pytest.mark.parametrize("start", [0, 1, 12345, 2**40 + 3])
def test_coin_bytes_matches_ref(start: int, nbytes: int) -> None:
    assert_u8_identical(coin_bytes(KEY, start, nbytes), coin_bytes_ref(int(KEY), start, nbytes))


def test_coin_bytes_wraps_around_2_64() -> None:
    key = np.uint64(2**64 - 3)
    assert_u8_identical(coin_bytes(key, 1, 64), coin_bytes_ref(int(key), 1, 64))


def test_coin_bytes_offsets_compose() -> None:
    whole = coin_bytes(KEY, 0, 100)
    assert_u8_identical(coin_bytes(KEY, 37, 63), whole[37:])


def test_coin_bytes_look_fair() -> None:
    coins = coin_bytes(KEY, 0, 1 << 16)
    ones = np.unpackbits(coins).mean()
    assert 0.49 < ones < 0.51
    hist = np.bincount(coins, minlength=256)
    assert hist.min() > 150 and hist.max() < 370  # expected 256 per value


@PROPS
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**48), st.integers(0, 3000))
def test_coin_bytes_property(key: int, start: int, nbytes: int) -> None:
    k = np.uint64(key)
    assert_u8_identical(coin_bytes(k, start, nbytes), coin_bytes_ref(key, start, nbytes))


@pytest.mark.parametrize("key", [0, 5, 2**63 - 1, np.int64(5)])
def test_coin_bytes_int64_key_matches_ref(key: int) -> None:
    """KNOWN KERNEL BUG: a key typed int64 (a Python int below 2**63, or np.int64) takes a
    signed path in ``coin``: ``key + np.uint64(j) + GOLDEN`` is int64 in Numba, so the
    splitmix ``>>`` shifts sign-extend and the bytes differ from ``coin_bytes_ref``."""
    assert_u8_identical(coin_bytes(key, 0, 64), coin_bytes_ref(int(key), 0, 64))


@pytest.mark.parametrize("kernel", ["coin_bytes", "lion_sign_step"])
def test_python_int_key_above_2_63_after_small_key(kernel: str) -> None:
    """KNOWN KERNEL BUG: once a dispatcher holds an int64 specialisation (any small Python
    int key), a Python int key >= 2**63, such as half of ``derive_key``'s results, raises
    ``OverflowError: int too big to convert`` instead of running."""
    small, big = 3, 2**63 + 11
    if kernel == "coin_bytes":
        coin_bytes(small, 0, 8)
        assert_u8_identical(coin_bytes(big, 0, 64), coin_bytes_ref(big, 0, 64))
        return
    g = np.zeros(64, np.float32)
    lion_sign_step(g, g.copy(), np.zeros(8, np.uint8), 0.9, 0.99, small)
    m, m_ref = np.zeros(64, np.float32), np.zeros(64, np.float32)
    out, out_ref = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    lion_sign_step(g, m, out, 0.9, 0.99, big)
    lion_sign_step_ref(g, m_ref, out_ref, 0.9, 0.99, big)
    assert_u8_identical(out, out_ref)


# --------------------------------------------------------------------------- fused Lion step


def run_both(
    g: np.ndarray, m: np.ndarray, beta1: float, beta2: float, key: np.uint64, extra: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run fast and reference step on copies; returns (out, m, out_ref, m_ref)."""
    nb = (g.size + 7) // 8
    out = np.full(nb + extra, 0xA5, np.uint8)
    out_ref = out.copy()
    m_fast, m_ref = m.copy(), m.copy()
    lion_sign_step(g, m_fast, out, beta1, beta2, key)
    with np.errstate(invalid="ignore", over="ignore"):
        lion_sign_step_ref(g, m_ref, out_ref, beta1, beta2, int(key))
    return out, m_fast, out_ref, m_ref


def check_step(g: np.ndarray, m: np.ndarray, beta1: float, beta2: float, key: np.uint64) -> None:
    out, m_fast, out_ref, m_ref = run_both(g, m, beta1, beta2, key)
    assert_u8_identical(out, out_ref)
    assert_f32_identical(m_fast, m_ref)
    assert (out[(g.size + 7) // 8 :] == 0xA5).all(), "bytes past ceil(n/8) must be left alone"


def step_inputs(n: int, seed: int, zero_frac: float) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for(seed, n)
    g = rng.standard_normal(n).astype(np.float32)
    m = rng.standard_normal(n).astype(np.float32)
    zero = rng.random(n) < zero_frac
    g[zero] = 0.0
    m[zero] = np.where(rng.random(int(zero.sum())) < 0.5, 0.0, -0.0)
    return g, m


def c_of(g: np.ndarray, m: np.ndarray, beta1: float) -> np.ndarray:
    return np.float32(beta1) * m + np.float32(1.0 - beta1) * g


@pytest.mark.parametrize("n", SIZES)
def test_lion_sign_step_no_zeros(n: int) -> None:
    g, m = step_inputs(n, 6, 0.0)
    assert not (c_of(g, m, 0.9) == 0).any()
    check_step(g, m, 0.9, 0.99, KEY)


@pytest.mark.parametrize("n", SIZES)
def test_lion_sign_step_with_zeros(n: int) -> None:
    g, m = step_inputs(n, 7, 0.3)
    assert n < 8 or (c_of(g, m, 0.9) == 0).any()
    check_step(g, m, 0.9, 0.99, KEY)


@pytest.mark.parametrize("n", [1, 9, 1000, CHUNK + 1])
def test_lion_sign_step_cancellation_zeros(n: int) -> None:
    """c == 0 from nonzero g and m: with beta1 = 0.5, m = -g cancels exactly."""
    g, _ = step_inputs(n, 8, 0.0)
    m = g.copy()
    m[::2] = -g[::2]
    assert (c_of(g, m, 0.5)[::2] == 0).all()
    check_step(g, m, 0.5, 0.99, KEY)


@pytest.mark.parametrize("n", [0, 1, 9, 1000, CHUNK + 1, 3 * CHUNK + 5])
def test_lion_sign_step_strided(n: int) -> None:
    g_base, m_base = step_inputs(3 * n, 9, 0.2)
    g, m_view = g_base[::3], m_base[::3]
    out, m_fast, out_ref, m_ref = run_both(g, m_view, 0.9, 0.99, KEY)
    assert_u8_identical(out, out_ref)
    assert_f32_identical(m_fast, m_ref)
    # The update must also land through a strided view of exp_avg.
    m_base_fast, m_base_ref = m_base.copy(), m_base.copy()
    out_fast = np.zeros((n + 7) // 8, np.uint8)
    out_ref2 = np.zeros_like(out_fast)
    lion_sign_step(g, m_base_fast[::3], out_fast, 0.9, 0.99, KEY)
    lion_sign_step_ref(g, m_base_ref[::3], out_ref2, 0.9, 0.99, int(KEY))
    assert_u8_identical(out_fast, out_ref2)
    assert_f32_identical(m_base_fast, m_base_ref)


def test_lion_sign_step_nan_inf() -> None:
    g = np.array([np.nan, 1.0, np.inf, -np.inf, np.inf, 0.0, 3.0, -2.0, np.nan], np.float32)
    m = np.array([1.0, np.nan, -np.inf, 1.0, np.inf, np.nan, 0.0, 0.0, np.nan], np.float32)
    check_step(g, m, 0.9, 0.99, KEY)


@pytest.mark.parametrize("n", [9, 1000, CHUNK + 1])
def test_lion_sign_step_semantics(n: int) -> None:
    """Nonzero c gives bit (c > 0); c == 0 gives the coin bit; m <- beta2*m + (1-beta2)*g."""
    g, m = step_inputs(n, 10, 0.25)
    c = c_of(g, m, 0.9)
    out = np.zeros((n + 7) // 8, np.uint8)
    m_new = m.copy()
    lion_sign_step(g, m_new, out, 0.9, 0.99, KEY)
    coin = bit_list(coin_bytes_ref(int(KEY), 0, out.size))
    bits = bit_list(out)
    for k in range(n):
        expected = coin[k] if c[k] == 0 else int(c[k] > 0)
        assert bits[k] == expected, k
    assert not any(bits[n:])
    assert_f32_identical(m_new, np.float32(0.99) * m + np.float32(0.01) * g)


def test_lion_sign_step_zero_coins_are_fair() -> None:
    n = 20000
    g = np.zeros(n, np.float32)
    m = np.zeros(n, np.float32)
    out = np.zeros(n // 8, np.uint8)
    lion_sign_step(g, m, out, 0.9, 0.99, KEY)
    assert_u8_identical(out, coin_bytes_ref(int(KEY), 0, n // 8))
    assert 0.45 < np.unpackbits(out).mean() < 0.55
    other = np.zeros_like(out)
    lion_sign_step(g, m, other, 0.9, 0.99, np.uint64(derive_key(2024, 8)))
    assert 0.45 < np.unpackbits(out ^ other).mean() < 0.55, "coins must depend on the key"


@PROPS
@given(
    st.integers(0, 3 * CHUNK),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 0.05, 0.5]),
    st.floats(0.0, 1.0, width=32),
    st.floats(0.0, 1.0, width=32),
    st.integers(0, 2**64 - 1),
)
def test_lion_sign_step_property(n: int, seed: int, zf: float, b1: float, b2: float, key: int) -> None:
    g, m = step_inputs(n, seed, zf)
    check_step(g, m, b1, b2, np.uint64(key))


@PROPS
@given(
    hnp.arrays(np.float32, 24, elements=st.floats(width=32)),
    hnp.arrays(np.float32, 24, elements=st.floats(width=32)),
)
def test_lion_sign_step_property_values(g: np.ndarray, m: np.ndarray) -> None:
    check_step(g, m, 0.9, 0.99, KEY)


# --------------------------------------------------------------------------- votes


@pytest.mark.parametrize("n_workers", range(1, 18))
def test_majority_vote_matches_ref(n_workers: int) -> None:
    for nbytes in NBYTES:
        packed = random_planes(rng_for(11, n_workers, nbytes), n_workers, nbytes)
        before = packed.copy()
        win, tie = majority_vote(packed)
        win_ref, tie_ref = majority_vote_ref(packed)
        assert_u8_identical(win, win_ref)
        assert_u8_identical(tie, tie_ref)
        assert_u8_identical(packed, before)


@pytest.mark.parametrize("n_workers", range(1, 18))
def test_majority_vote_semantics(n_workers: int) -> None:
    packed = random_planes(rng_for(12, n_workers), n_workers, 2 * 2048 + 11)
    counts = hand_counts(packed)
    win, tie = majority_vote(packed)
    assert bit_list(win) == (2 * counts > n_workers).astype(int).tolist()
    assert bit_list(tie) == (2 * counts == n_workers).astype(int).tolist()
    if n_workers % 2:
        assert not tie.any(), "odd N can never tie"
    else:
        assert tie.any()
    assert not (win & tie).any()


@pytest.mark.parametrize("n_workers", [2, 3, 8])
def test_majority_vote_non_contiguous(n_workers: int) -> None:
    wide = random_planes(rng_for(13, n_workers), 2 * n_workers, 2 * 1001)
    for packed in (wide[::2, ::2], wide[1::2, :1001], wide[:n_workers].T.copy().T[:, 3:]):
        win, tie = majority_vote(packed)
        win_ref, tie_ref = majority_vote_ref(packed)
        assert_u8_identical(win, win_ref)
        assert_u8_identical(tie, tie_ref)


def test_majority_vote_extremes() -> None:
    for n_workers in (1, 2, 7, 8):
        ones = np.full((n_workers, 13), 0xFF, np.uint8)
        win, tie = majority_vote(ones)
        assert (win == 0xFF).all() and not tie.any()
        win, tie = majority_vote(np.zeros_like(ones))
        assert not win.any() and not tie.any()


def test_vote_kernels_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        majority_vote(np.zeros((0, 8), np.uint8))
    with pytest.raises(ValueError):
        majority_vote(np.zeros(8, np.uint8))
    with pytest.raises(ValueError):
        count_planes(np.zeros(8, np.uint8))


@PROPS
@given(st.integers(1, 17), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_majority_vote_property(n_workers: int, nbytes: int, seed: int) -> None:
    packed = random_planes(rng_for(seed), n_workers, nbytes)
    win, tie = majority_vote(packed)
    win_ref, tie_ref = majority_vote_ref(packed)
    assert_u8_identical(win, win_ref)
    assert_u8_identical(tie, tie_ref)


@pytest.mark.parametrize("n_workers", range(1, 18))
def test_count_planes_matches_ref(n_workers: int) -> None:
    n_planes = n_workers.bit_length()
    for nbytes in NBYTES:
        packed = random_planes(rng_for(14, n_workers, nbytes), n_workers, nbytes)
        planes = count_planes(packed)
        assert planes.shape == (n_planes, nbytes)
        assert_u8_identical(planes, count_planes_ref(packed))


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 7, 8, 9, 16, 17])
def test_count_planes_reconstructs_counts(n_workers: int) -> None:
    packed = random_planes(rng_for(15, n_workers), n_workers, 2048 + 9)
    counts = hand_counts(packed)
    planes = count_planes(packed)
    rebuilt = sum(np.array(bit_list(planes[b]), np.int64) << b for b in range(planes.shape[0]))
    np.testing.assert_array_equal(rebuilt, counts)
    assert counts.max() <= n_workers


@PROPS
@given(st.integers(1, 17), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_count_planes_property(n_workers: int, nbytes: int, seed: int) -> None:
    packed = random_planes(rng_for(seed), n_workers, nbytes)
    assert_u8_identical(count_planes(packed), count_planes_ref(packed))


# --------------------------------------------------------------------------- apply update


def majority_case(rng: np.random.Generator, n_workers: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    win, _ = majority_vote_ref(random_planes(rng, n_workers, nbytes))
    return win[None, :], np.array([-1.0, 1.0], np.float32)


def ternary_case(rng: np.random.Generator, n_workers: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    win, tie = majority_vote_ref(random_planes(rng, n_workers, nbytes))
    return np.stack([win, tie]), np.array([-1.0, 1.0, 0.0, 0.0], np.float32)


def average_case(rng: np.random.Generator, n_workers: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    planes = count_planes_ref(random_planes(rng, n_workers, nbytes))
    k = np.arange(1 << planes.shape[0], dtype=np.float64)
    return planes, ((2 * k - n_workers) / n_workers).astype(np.float32)


CASES: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]] = {
    "majority": majority_case,
    "ternary": ternary_case,
    "average": average_case,
}


def check_apply(
    param: np.ndarray, planes: np.ndarray, table: np.ndarray, lr: float, wd: float, cautious: bool = False
) -> None:
    fast, ref = param.copy(), param.copy()
    apply_update(fast, planes, table, lr, wd, cautious)
    with np.errstate(invalid="ignore", over="ignore"):
        apply_update_ref(ref, planes, table, lr, wd, cautious)
    assert_f32_identical(fast, ref)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", SIZES)
def test_apply_update_matches_ref(case: str, n: int) -> None:
    rng = rng_for(16, n, len(case))
    planes, table = CASES[case](rng, 4 if case == "ternary" else 5, (n + 7) // 8 + 2)
    param = special_floats(rng, n)
    check_apply(param, planes, table, 1e-3, 0.1)
    check_apply(param, planes, table, 3e-4, 0.0)
    check_apply(param, planes, table, 1e-3, 0.1, cautious=True)


@pytest.mark.parametrize("n", [9, 1000, CHUNK + 1])
def test_cautious_decay_only_where_update_and_param_agree(n: int) -> None:
    """Cautious weight decay: p*(1 - lr*wd) - lr*u where u*p >= 0, else p - lr*u."""
    rng = rng_for(19, n)
    planes, table = average_case(rng, 5, (n + 7) // 8)
    param = rng.standard_normal(n).astype(np.float32)
    param[::7] = 0.0
    plain, cautious = param.copy(), param.copy()
    apply_update(plain, planes, table, 0.01, 0.5)
    apply_update(cautious, planes, table, 0.01, 0.5, cautious=True)
    code = np.zeros(n, np.int64)
    for b in range(planes.shape[0]):
        code |= np.unpackbits(planes[b], count=n).astype(np.int64) << b
    u = table[code]
    agree = u * param >= 0
    assert np.array_equal(cautious[agree], plain[agree])
    undecayed = param - np.float32(0.01) * u
    assert np.array_equal(cautious[~agree], undecayed[~agree]) and (~agree).any()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 9, 1000, CHUNK + 1])
def test_apply_update_strided(case: str, n: int) -> None:
    rng = rng_for(17, n)
    planes, table = CASES[case](rng, 6, (n + 7) // 8)
    base = special_floats(rng, 3 * n)
    fast_base, ref_base = base.copy(), base.copy()
    apply_update(fast_base[::3], planes, table, 1e-3, 0.1)
    apply_update_ref(ref_base[::3], planes, table, 1e-3, 0.1)
    assert_f32_identical(fast_base, ref_base)


@pytest.mark.parametrize("n", [9, 1000, CHUNK + 1])
def test_apply_update_semantics(n: int) -> None:
    """Majority table, no decay: param moves by exactly -lr*(+1 or -1) per bit."""
    rng = rng_for(18, n)
    planes, table = majority_case(rng, 5, (n + 7) // 8)
    param = np.zeros(n, np.float32)
    apply_update(param, planes, table, 0.5, 0.0)
    signs = np.array(bit_list(planes[0])[:n]) * 2 - 1
    assert param.tolist() == (-0.5 * signs).tolist()


@PROPS
@given(
    st.sampled_from(sorted(CASES)),
    st.integers(1, 17),
    st.integers(0, 3 * CHUNK),
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_apply_update_property(case: str, n_workers: int, n: int, seed: int, lr: float, wd: float) -> None:
    rng = rng_for(seed)
    planes, table = CASES[case](rng, n_workers, (n + 7) // 8)
    check_apply(special_floats(rng, n), planes, table, lr, wd)


# --------------------------------------------------------------------------- all finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, CHUNK + 1])
def test_all_finite(dtype: type, n: int) -> None:
    x: np.ndarray = rng_for(19, n).standard_normal(n).astype(dtype)
    assert all_finite(x) is all_finite_ref(x) is True
    for bad in (np.nan, np.inf, -np.inf):
        for pos in {0, n // 2, n - 1} if n else set():
            y = x.copy()
            y[pos] = bad
            assert all_finite(y) is all_finite_ref(y) is False


def test_all_finite_empty_and_strided() -> None:
    assert all_finite(np.zeros(0, np.float32)) is True
    x = np.ones(101, np.float32)
    x[1::2] = np.nan
    assert all_finite(x[::2]) is all_finite_ref(x[::2]) is True
    assert all_finite(x[1::2]) is all_finite_ref(x[1::2]) is False


@PROPS
@given(hnp.arrays(np.float32, st.integers(0, 64), elements=st.floats(width=32)))
def test_all_finite_property(x: np.ndarray) -> None:
    assert all_finite(x) == all_finite_ref(x)
