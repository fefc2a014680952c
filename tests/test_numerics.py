"""The numerical helpers (_numerics.py): accurate row sums, log1p, powers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smvariants import _numerics

F32 = np.float32


@pytest.mark.parametrize("n", [1, 2, 7, 32, 33, 63, 64, 65, 168, 512, 513, 1000])
def test_accurate_sum_is_within_a_few_roundings_and_row_by_row(n):
    # Same-sign terms, as the closed forms sum them (support entries, squared deviations).
    rows = np.random.default_rng(n).uniform(-1, 0, size=(50, n)).astype(F32)
    got = np.asarray(_numerics.accurate_sum(jnp.asarray(rows), 1), np.float64)
    exact = rows.astype(np.float64).sum(1, keepdims=True)
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(F32))
    # Pairwise up to 512 terms: at most log2(n) roundings; compensated beyond: one.
    pairwise = n <= _numerics._PAIRWISE_MAX
    assert ulps.max() <= (max(1, np.ceil(np.log2(n))) if pairwise else 1)
    # A row's sum does not depend on the other rows, nor on how many there are.
    others = np.random.default_rng(0).uniform(-1, 0, size=(999, n)).astype(F32)
    batch = np.asarray(_numerics.accurate_sum(jnp.asarray(np.concatenate([others, rows])), 1))
    alone = np.asarray(_numerics.accurate_sum(jnp.asarray(rows[3:4]), 1))
    if pairwise:  # elementwise adds in a fixed order: the same bits on every backend
        np.testing.assert_array_equal(batch[999:], got.astype(F32))
        np.testing.assert_array_equal(alone, got[3:4].astype(F32))
    else:  # a reduction: a backend may order it by shape, within the last bit
        np.testing.assert_allclose(batch[999:], got, rtol=2e-7)
        np.testing.assert_allclose(alone, got[3:4], rtol=2e-7)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32])
@pytest.mark.parametrize("axis", [0, 1])
def test_column_sums_are_the_pairwise_sums_bit_for_bit(n, axis):
    rows = np.random.default_rng(n).normal(size=(20, n)).astype(F32)
    z = jnp.asarray(rows if axis == 1 else rows.T)
    sums = jax.jit(_numerics.column_sums, static_argnums=(0, 2))(lambda c: (c, jnp.abs(c)), z, axis)
    for got, a in zip(sums, (z, jnp.abs(z)), strict=True):
        assert got.shape == _numerics.reduced_shape(z.shape, axis)
        np.testing.assert_array_equal(
            got, jax.jit(_numerics._pairwise_sum, static_argnums=1)(a, axis)
        )


@pytest.mark.parametrize("n", [1, 3, 32])
def test_column_sums_combine_as_told(n):
    # A sum, a minimum and a maximum in one pass (the column solvers' certificate takes a minimum).
    z = jnp.asarray(np.random.default_rng(n).normal(size=(20, n)).astype(F32))
    ops = (jnp.add, jnp.minimum, jnp.maximum)
    total, low, high = _numerics.column_sums(lambda c: (c, c, -c), z, 1, ops)
    np.testing.assert_allclose(total, np.sum(np.asarray(z), 1, keepdims=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(low, np.min(np.asarray(z), 1, keepdims=True))
    np.testing.assert_array_equal(high, -np.min(np.asarray(z), 1, keepdims=True))


@pytest.mark.parametrize("n", range(1, 13))
def test_merge_sort_network_sorts_every_row_of_zeros_and_ones(n):
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    rows = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    for i, j in _numerics._merge_sort_network(n):
        assert 0 <= i < j < n
        rows[:, i], rows[:, j] = (
            np.maximum(rows[:, i], rows[:, j]),
            np.minimum(rows[:, i], rows[:, j]),
        )
    np.testing.assert_array_equal(rows, -np.sort(-rows, axis=1))


@pytest.mark.parametrize("n", [1, 2, 5, 13, 17, 31, 32])
@pytest.mark.parametrize("axis", [0, 1])
def test_sorted_columns_are_each_rows_entries_in_decreasing_order(n, axis):
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(300, n)).astype(F32)
    rows[:100] = np.round(rows[:100])  # ties
    rows[100:200][rng.random((100, n)) < 0.4] = -np.inf  # masked entries
    rows[200] = -np.inf
    z = jnp.asarray(rows if axis == 1 else rows.T)
    columns = jax.jit(_numerics.sorted_columns, static_argnums=1)(z, axis)
    got = np.concatenate([np.asarray(c).reshape(-1, 1) for c in columns], axis=1)
    np.testing.assert_array_equal(got, -np.sort(-rows, axis=1))
    assert len(_numerics._merge_sort_network(32)) == 191
    # A nan reaches at least one sorted column of its row, and no other row.
    rows[7, n // 2] = np.nan
    columns = _numerics.sorted_columns(jnp.asarray(rows), 1)
    got = np.concatenate([np.asarray(c) for c in columns], axis=1)
    assert np.isnan(got[7]).any() and not np.isnan(np.delete(got, 7, axis=0)).any()


@pytest.mark.parametrize("n", [1025, 4096, 131072, 200000])
def test_accurate_sum_of_many_equal_terms(n):
    """Rounding errors of one sign grew the correction to 100 at 200000 terms, which lost its
    own low bits: a sum off by 0.12 (a sparsemax row summing to 1.12)."""
    rows = np.full((2, n), -0.3, F32)
    rows[:, 5] = 0
    rows[1, ::3] = -0.7
    got = np.asarray(_numerics.accurate_sum(jnp.asarray(rows), 1), np.float64)
    exact = rows.astype(np.float64).sum(1, keepdims=True)
    assert (np.abs(got - exact) / np.spacing(np.abs(exact).astype(F32))).max() <= 1
    # On a 3-d array, the row along the middle axis.
    middle = np.asarray(_numerics.accurate_sum(jnp.asarray(np.stack([rows.T] * 2)), 1))
    np.testing.assert_allclose(middle[:, 0, :], np.stack([got[:, 0]] * 2), rtol=1e-7)


@pytest.mark.parametrize("n", [131072, 200000, 300000])
def test_long_rows_of_ties_below_the_maximum_sum_to_one(n):
    import smvariants as sm

    x = np.full(n, -0.3, F32)
    x[5] = 0
    for f in (sm.sparsemax, sm.entmax15):
        p = np.asarray(f(jnp.asarray(x)), np.float64)
        # Each tail entry is a difference of nearly equal floats (0.3 - 0.3000035): at best
        # within half an ulp of 0.3 each, 4e-3 in the sum at 200000 entries.
        assert abs(p.sum() - 1) < 6e-3, (f, p.sum())


def test_accurate_sum_of_empty_rows_is_zero():
    assert _numerics.accurate_sum(jnp.zeros((3, 0), F32), 1).shape == (3, 1)
    np.testing.assert_array_equal(_numerics.accurate_sum(jnp.zeros((3, 0), F32), 1), 0)


def test_log1p_is_within_a_few_ulps_under_jit():
    # Down to the tiny arguments where log(1 + v) is all rounding (v = -3e-8: 1 + v rounds to
    # 1 - 6e-8, twice v), and up to -1, where it is -inf.
    v = np.concatenate([-np.logspace(-12, 0, 2001), -np.random.default_rng(0).uniform(size=4000)])
    v = v.astype(F32)
    got = np.asarray(jax.jit(_numerics.log1p)(jnp.asarray(v)), np.float64)
    finite = v > -1
    exact = np.log1p(v[finite].astype(np.float64))
    ulps = np.abs(got[finite] - exact) / np.spacing(np.abs(exact).astype(F32))
    assert ulps.max() <= 4
    assert np.all(got[~finite] == -np.inf) and np.any(~finite)


@pytest.mark.parametrize("e", [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 0.3])
def test_power_is_accurate_zero_at_zero_nan_at_nan_and_twice_differentiable_there(e):
    # Static multiples of 1/4 take integer powers of b or of its square roots
    # (within a few ulps, where exp(e log b) is off by up to 100); others exp and log.
    b = np.concatenate([np.random.default_rng(1).uniform(size=10000), np.logspace(-8, 0, 200)])
    got = np.asarray(jax.jit(lambda b: _numerics.power(b, e))(jnp.asarray(b, F32)), np.float64)
    exact = b.astype(F32).astype(np.float64) ** e
    ulps = np.abs(got - exact) / np.spacing(exact.astype(F32))
    assert ulps.max() <= (20 if e == 0.3 else 8)
    edge = jnp.array([0.0, np.nan], F32)
    np.testing.assert_array_equal(_numerics.power(edge, e), [0.0, np.nan])
    second = jax.grad(lambda b: jnp.sum(jax.grad(lambda b: jnp.sum(_numerics.power(b, e)))(b)))
    assert np.isfinite(second(jnp.zeros(3, F32))).all()


def test_power_takes_exponents_equal_to_a_quarter_up_to_rounding_as_such():
    # normmax at alpha = 4/3 and 1.2: 1 / (alpha - 1) is 3 and 5 only to an ulp of float64.
    b = jnp.asarray(np.random.default_rng(2).uniform(size=100), F32)
    for alpha, n in [(4 / 3, 3), (1.2, 5)]:
        np.testing.assert_array_equal(_numerics.power(b, 1 / (alpha - 1)), b**n)
