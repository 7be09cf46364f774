"""The CPU reduction kernels through collectives._core.kernels, against numpy.

Every SIMD level this machine supports is checked: against numpy for each dtype and op (exact
for integers, float16 and bfloat16 included), for the NaN rule, and bit for bit against the
scalar level. The AVX-512 level is skipped, with the reason, where the CPU lacks it.
"""

import zlib

import ml_dtypes
import numpy as np
import pytest

from collectives import _core

K = _core.kernels
ALL_LEVELS = ["scalar", "avx2", "avx512"]
LEVELS = [
    pytest.param(level, marks=pytest.mark.skipif(
        level not in K.levels(), reason=f"{level} not supported by this CPU or build"))
    for level in ALL_LEVELS
]
DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
}
FLOATING = ["float16", "bfloat16", "float32", "float64"]
OPS = ["sum", "avg", "min", "max", "prod"]
# The quiet bit of each floating format's NaN (the top mantissa bit).
QUIET_BIT = {"float16": 0x200, "bfloat16": 0x40, "float32": 0x400000, "float64": 1 << 51}
COUNT = 4099  # several full vectors at every level, and a tail


def rng_for(*key):
    """A generator seeded from the test's parameters, the same in every run."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def bits(x):
    return x.view(f"u{x.dtype.itemsize}")


def wide(x):
    """float64 values (signalling NaNs raise "invalid" on the way; they stay NaN)."""
    with np.errstate(invalid="ignore"):
        return x.astype(np.float64)


def special_values(dtype):
    """Zeros, infinities, NaNs with payloads (quiet and signalling), subnormals, extremes."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([0, 1, -1 if info.min < 0 else 2, info.min, info.max], dtype=dtype)
    finfo = ml_dtypes.finfo(dtype)
    values = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0], dtype=np.float64).astype(dtype)
    extremes = np.array([finfo.max, finfo.min, finfo.smallest_subnormal,
                         -finfo.smallest_subnormal, finfo.smallest_normal], dtype=dtype)
    unsigned = f"u{dtype.itemsize}"
    exp_all_ones = bits(np.array([np.inf], dtype=dtype))[0]
    quiet = exp_all_ones | np.array(QUIET_BIT[dtype.name], dtype=unsigned)
    nans = np.array([quiet, quiet | 1, exp_all_ones | 1, exp_all_ones | 5], dtype=unsigned)
    sign = np.array(1 << (8 * dtype.itemsize - 1), dtype=unsigned)
    nans = np.concatenate([nans, nans | sign]).view(dtype)
    return np.concatenate([values, extremes, nans])


def random_array(dtype, count, rng):
    """Random bit patterns (every class of value), values in [-64, 64) (so that results round
    and carry), and one special value in eight."""
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8).view(dtype).copy()
    if not np.issubdtype(dtype, np.integer):
        moderate = rng.uniform(-64, 64, size=count).astype(np.float32).astype(dtype)
        raw = np.where(rng.random(count) < 0.5, raw, moderate)
    specials = special_values(dtype)
    pick = rng.random(count) < 1 / 8
    raw[pick] = specials[rng.integers(0, len(specials), size=int(pick.sum()))]
    return raw


def reduce(dst, src, op, level, dtype_name):
    out = dst.copy()
    K.reduce_into(out.ctypes.data, src.ctypes.data, out.size, dtype_name, op, level)
    return out


def numpy_reference(a, b, op, dtype_name):
    """numpy's answer: integers wrap, half types go through float32 with one rounding."""
    compute = np.float32 if dtype_name in ("float16", "bfloat16") else a.dtype
    x, y = a.astype(compute), b.astype(compute)
    with np.errstate(all="ignore"):
        if op in ("sum", "avg"):
            r = x + y
        elif op == "prod":
            r = x * y
        elif op == "min":
            r = np.minimum(x, y)
        else:
            r = np.maximum(x, y)
        return r.astype(a.dtype)


def expected_nan_bits(a, b, dtype_name):
    """The NaN rule: the destination's NaN if it has one, else the source's; half types
    come back quieted."""
    quiet = 0 if dtype_name in ("float32", "float64") else QUIET_BIT[dtype_name]
    return np.where(np.isnan(wide(a)), bits(a), bits(b)) | np.array(quiet, dtype=bits(a).dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("level", LEVELS)
def test_matches_numpy(level, dtype_name, op):
    dtype = DTYPES[dtype_name]
    rng = rng_for(level, dtype_name, op)
    a, b = random_array(dtype, COUNT, rng), random_array(dtype, COUNT, rng)
    got = reduce(a, b, op, level, dtype_name)
    want = numpy_reference(a, b, op, dtype_name)
    if dtype_name not in FLOATING:
        np.testing.assert_array_equal(got, want)
        return
    a_nan, b_nan = np.isnan(wide(a)), np.isnan(wide(b))
    got_nan = np.isnan(wide(got))
    # NaN wherever numpy has one (min/max propagate NaN like np.minimum/np.maximum).
    np.testing.assert_array_equal(got_nan, np.isnan(wide(want)))
    operand_nan = a_nan | b_nan
    np.testing.assert_array_equal(bits(got)[operand_nan],
                                  expected_nan_bits(a, b, dtype_name)[operand_nan])
    numbers = ~got_nan
    if op in ("min", "max"):
        # On a tie of +0 and -0 numpy may pick either zero; we keep the destination's.
        np.testing.assert_array_equal(wide(got)[numbers], wide(want)[numbers])
        tie = numbers & (wide(a) == wide(b))
        np.testing.assert_array_equal(bits(got)[tie], bits(a)[tie])
    else:
        np.testing.assert_array_equal(bits(got)[numbers], bits(want)[numbers])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("level", LEVELS)
def test_level_equals_scalar_bitwise(level, dtype_name, op):
    """Every length up to a few vectors, and unaligned buffers: bit for bit like scalar."""
    dtype = DTYPES[dtype_name]
    rng = rng_for("bits", level, dtype_name, op)
    for count in [0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 65, 1000, 4097]:
        for offset in sorted({0, 1, dtype.itemsize}):
            size = count * dtype.itemsize
            storage = np.zeros(2 * (size + offset) + 1, dtype=np.uint8)
            dst = storage[offset:offset + size]
            src = storage[size + offset + 1:][:size]
            dst[:] = random_array(dtype, count, rng).view(np.uint8)
            src[:] = random_array(dtype, count, rng).view(np.uint8)
            want = dst.copy()
            K.reduce_into(want.ctypes.data, src.ctypes.data, count, dtype_name, op, "scalar")
            K.reduce_into(dst.ctypes.data, src.ctypes.data, count, dtype_name, op, level)
            np.testing.assert_array_equal(dst, want, err_msg=f"count={count} offset={offset}")


@pytest.mark.parametrize("op", ["min", "max"])
@pytest.mark.parametrize("dtype_name", FLOATING)
@pytest.mark.parametrize("level", LEVELS)
def test_min_max_propagate_nan(level, dtype_name, op):
    dtype = DTYPES[dtype_name]
    n = 37
    a = np.arange(n).astype(dtype)
    b = (np.arange(n) - 5).astype(dtype)
    a[[0, 9, 33]] = np.nan
    b[[1, 9, 20, 36]] = np.nan
    got = reduce(a, b, op, level, dtype_name)
    np.testing.assert_array_equal(np.isnan(wide(got)), np.isnan(wide(a)) | np.isnan(wide(b)))


@pytest.mark.parametrize("divisor", [3.0, 0.1, -7.0, 1e-30, 0.0])
@pytest.mark.parametrize("dtype_name", FLOATING)
@pytest.mark.parametrize("level", LEVELS)
def test_divide(level, dtype_name, divisor):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(7)
    a = random_array(dtype, COUNT, rng)
    got = a.copy()
    K.divide(got.ctypes.data, got.size, dtype_name, divisor, level)
    compute = np.float64 if dtype_name == "float64" else np.float32
    with np.errstate(all="ignore"):
        want = (a.astype(compute) / compute(divisor)).astype(dtype)
    got_nan = np.isnan(wide(got))
    np.testing.assert_array_equal(got_nan, np.isnan(wide(want)))
    np.testing.assert_array_equal(bits(got)[~got_nan], bits(want)[~got_nan])
    scalar = a.copy()
    K.divide(scalar.ctypes.data, scalar.size, dtype_name, divisor, "scalar")
    np.testing.assert_array_equal(bits(got), bits(scalar))


@pytest.mark.parametrize("dtype_name", ["int8", "uint8", "int32", "int64"])
def test_divide_integers_is_an_error(dtype_name):
    a = np.ones(4, dtype=DTYPES[dtype_name])
    with pytest.raises(ValueError, match="floating"):
        K.divide(a.ctypes.data, a.size, dtype_name, 2.0, "scalar")


def test_levels():
    levels = K.levels()
    assert levels[0] == "scalar"
    assert set(levels) <= set(ALL_LEVELS)
    assert K.best_level() == levels[-1]


def test_bad_names_and_unsupported_levels():
    a = np.ones(4, dtype=np.float32)
    args = (a.ctypes.data, a.ctypes.data, a.size)
    with pytest.raises(ValueError, match="dtype"):
        K.reduce_into(*args, "float128", "sum", "scalar")
    with pytest.raises(ValueError, match="op"):
        K.reduce_into(*args, "float32", "mean", "scalar")
    with pytest.raises(ValueError, match="level"):
        K.reduce_into(*args, "float32", "sum", "sse9")
    with pytest.raises(ValueError, match="level"):
        K.divide(a.ctypes.data, a.size, "float32", 2.0, "sse9")
    for level in set(ALL_LEVELS) - set(K.levels()):
        with pytest.raises(ValueError, match="not supported"):
            K.reduce_into(*args, "float32", "sum", level)


def test_empty_and_null():
    K.reduce_into(0, 0, 0, "float32", "sum", K.best_level())
    with pytest.raises(ValueError, match="null"):
        K.reduce_into(0, 0, 4, "float32", "sum", K.best_level())
