"""The numerical helpers (_numerics.py): accurate row sums, order keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smvariants import _numerics

F32 = np.float32


@pytest.mark.parametrize("n", [1, 2, 7, 32, 33, 63, 64, 65, 1000])
def test_accurate_sum_is_within_a_few_roundings_and_row_by_row(n):
    # Same-sign terms, as the closed forms sum them (support entries, squared deviations).
    rows = np.random.default_rng(n).uniform(-1, 0, size=(50, n)).astype(F32)
    got = np.asarray(_numerics.accurate_sum(jnp.asarray(rows), 1), np.float64)
    exact = rows.astype(np.float64).sum(1, keepdims=True)
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(F32))
    # Pairwise up to 64 terms: at most log2(n) roundings; compensated beyond: one.
    assert ulps.max() <= (max(1, np.ceil(np.log2(n))) if n <= 64 else 1)
    # A row's sum does not depend on the other rows, nor on how many there are.
    others = np.random.default_rng(0).uniform(-1, 0, size=(999, n)).astype(F32)
    batch = np.asarray(_numerics.accurate_sum(jnp.asarray(np.concatenate([others, rows])), 1))
    alone = np.asarray(_numerics.accurate_sum(jnp.asarray(rows[3:4]), 1))
    if n <= 64:  # elementwise adds in a fixed order: the same bits on every backend
        np.testing.assert_array_equal(batch[999:], got.astype(F32))
        np.testing.assert_array_equal(alone, got[3:4].astype(F32))
    else:  # a reduction: a backend may order it by shape, within the last bit
        np.testing.assert_allclose(batch[999:], got, rtol=2e-7)
        np.testing.assert_allclose(alone, got[3:4], rtol=2e-7)


def test_accurate_sum_of_empty_rows_is_zero():
    assert _numerics.accurate_sum(jnp.zeros((3, 0), F32), 1).shape == (3, 1)
    np.testing.assert_array_equal(_numerics.accurate_sum(jnp.zeros((3, 0), F32), 1), 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_order_keys_order_as_the_floats_with_every_nan_on_top(dtype):
    dtype = jnp.dtype(dtype)
    itype = jnp.dtype(f"int{8 * dtype.itemsize}")
    if dtype.itemsize == 2:  # every bit pattern
        bits = np.arange(-(2**15), 2**15).astype(np.int16)
    else:  # random patterns, and the special values with both signs
        info = np.iinfo(itype)
        bits = np.random.default_rng(0).integers(info.min, info.max, 100000, dtype=itype)
    special = jnp.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0], dtype)
    bits = np.concatenate([bits, np.asarray(jax.lax.bitcast_convert_type(special, itype))])
    x = jax.lax.bitcast_convert_type(jnp.asarray(bits), dtype)
    keys = np.asarray(_numerics.order_key(x))
    assert keys.dtype == itype
    back = _numerics.from_order_key(jnp.asarray(keys), dtype)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(back, itype)), bits)
    values = np.asarray(x.astype(jnp.float64))
    nan = np.isnan(values)
    assert nan.any() and keys[nan].min() > keys[~nan].max()  # nans of either sign on top
    ordered = values[~nan][np.argsort(keys[~nan], kind="stable")]
    assert np.all(ordered[1:] >= ordered[:-1])  # larger keys, larger floats
    assert keys[values == -np.inf].min() == np.iinfo(itype).min  # -inf: the lowest key
