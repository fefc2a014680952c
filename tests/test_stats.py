"""Support size, sparsity and Tsallis entropy (stats.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import smvariants as sm
from smvariants import stats

P = np.array([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])


def test_support_size_and_sparsity():
    np.testing.assert_array_equal(stats.support_size(P), [2, 4, 1])
    np.testing.assert_allclose(stats.sparsity(P), [0.5, 0.0, 0.75])
    np.testing.assert_array_equal(stats.support_size(P.T, axis=0), [2, 4, 1])


def test_masked_entries_are_not_counted():
    where = np.array([True, True, True, False])
    np.testing.assert_array_equal(stats.support_size(P, where=where), [2, 3, 1])
    # Among 3 unmasked entries: row 0 has one zero, row 2 two.
    np.testing.assert_allclose(stats.sparsity(P, where=where), [1 / 3, 0.0, 2 / 3])
    all_masked = stats.sparsity(P, where=np.zeros(4, bool))
    assert np.isnan(all_masked).all()


def test_sparsity_of_the_normalizers_orders_them():
    x = np.random.default_rng(0).normal(size=(32, 50)) * 2
    means = [float(jnp.mean(stats.sparsity(f(x)))) for f in (sm.softmax, sm.entmax15, sm.sparsemax)]
    assert means[0] == 0 and 0 < means[1] < means[2] < 1


@pytest.mark.parametrize("alpha", [1.0, 1.0 + 1e-7, 1.5, 2.0, 3.0])
def test_tsallis_entropy_closed_forms(alpha):
    p = np.array([0.5, 0.3, 0.2, 0.0])
    on = p[p > 0]
    if alpha == 1:
        expected = -np.sum(on * np.log(on))
    else:
        expected = (1 - np.sum(on**alpha)) / (alpha * (alpha - 1))
    np.testing.assert_allclose(stats.tsallis_entropy(p, alpha), expected, rtol=1e-8)


def test_tsallis_entropy_limits_and_bounds():
    uniform = np.full(8, 1 / 8)
    np.testing.assert_allclose(stats.tsallis_entropy(uniform, 1.0), np.log(8), rtol=1e-14)
    np.testing.assert_allclose(stats.tsallis_entropy(np.eye(8)[0], 1.7), 0.0, atol=1e-15)
    # Continuous in alpha through 1, in float32 too (no 0/0).
    p32 = np.array([0.6, 0.3, 0.1], np.float32)
    h1 = stats.tsallis_entropy(p32, 1.0)
    np.testing.assert_allclose(stats.tsallis_entropy(p32, jnp.float32(1 + 1e-6)), h1, rtol=1e-5)


def test_tsallis_entropy_gradients_and_per_row_alpha():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    a = np.array([[1.3], [2.2]])
    check_grads(lambda a: stats.tsallis_entropy(p, a), (a,), order=2, modes=("fwd", "rev"))
    check_grads(lambda q: stats.tsallis_entropy(q, a), (p,), order=1, modes=("fwd", "rev"))
    rows = [float(stats.tsallis_entropy(p[i], float(a[i, 0]))) for i in range(2)]
    np.testing.assert_allclose(stats.tsallis_entropy(p, a), rows)
    np.testing.assert_allclose(jax.jit(stats.tsallis_entropy)(p, a), rows)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="p must be a floating-point"):
        stats.sparsity(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="tsallis_entropy: alpha must be finite and >= 1"):
        stats.tsallis_entropy(P, 0.5)
    with pytest.raises(ValueError, match="tsallis_entropy: alpha must be finite and >= 1, got inf"):
        stats.tsallis_entropy(P, np.inf)
    # Traced, an invalid alpha gives nan for its rows only.
    a = np.array([[1.5], [0.5], [np.inf]])
    h = np.asarray(jax.jit(stats.tsallis_entropy)(P, a))
    assert np.isfinite(h[0]) and np.isnan(h[1:]).all()
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        stats.support_size(P, axis=2)


def test_sparsity_of_a_vector_with_nan_is_nan():
    """A normalizer's nan row had a finite sparsity: the nan was hidden in the statistics."""
    p = jnp.array([[0.5, 0.5, 0.0], [jnp.nan, jnp.nan, jnp.nan], [0.5, 0.0, jnp.nan]], jnp.float32)
    out = np.asarray(stats.sparsity(p))
    np.testing.assert_allclose(out[0], 1 / 3, rtol=1e-6)
    assert np.isnan(out[1:]).all()
    # A masked nan is not looked at; an int count has no nan: the nan entry is not counted.
    where = jnp.array([[True] * 3, [True] * 3, [True, True, False]])
    assert float(stats.sparsity(p, where=where)[2]) == 0.5
    np.testing.assert_array_equal(stats.support_size(p), [2, 0, 1])
