"""Short rows on XLA:CPU (_solvers.py): sorted closed forms and the column loops, to rounding.

Rows of at most 32 entries are solved on a CPU without reductions (``_backend.by_columns``):
sparsemax and entmax15 sort each row with a network of elementwise maxima and minima and take
the closed form on the support it gives; alpha = 1 + 1/n and normmax sum over the columns, one
or more passes per trip of a loop. These tests call the solvers directly, so they hold on every
backend: on random rows at several scales, tied, masked, all-masked, nan and +inf rows, lengths
from 1 to 32, and rows built to need many trips; against the float64 reference too.
(test_normalizers' hypothesis tests take the public functions through them on a CPU.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smvariants import _solvers

import reference


def _rows(n, seed=0):
    """Rows of ``n`` entries, maximum 0: normal at several scales, ties, masks, nan, +inf, many
    trips."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(size=(64, n)) * s for s in (0.01, 0.3, 1.0, 3.0, 30.0)]
    rows.append(rng.integers(-2, 1, size=(16, n)).astype(float))  # ties
    masked = rng.normal(size=(16, n))
    masked[rng.random(masked.shape) < 0.5] = -np.inf
    rows += [masked, np.full((1, n), -np.inf), np.full((1, n), np.nan)]
    # A row that takes Michelot 6 steps from -1 at n = 32 (the most found): several trips.
    rows.append(-0.49 * (np.arange(n)[None] / n) ** 1.28)
    z = np.concatenate(rows).astype(np.float32)
    z[:, 0] = np.where(np.isnan(z[:, 0]), np.nan, np.maximum(z[:, 0], 0))  # one entry at 0
    top = np.max(np.where(np.isnan(z), -np.inf, z), axis=1, keepdims=True)
    z = z - np.where(np.isfinite(top), top, 0)
    # A row with +inf, shifted by its maximum: nan there, -inf elsewhere.
    inf_row = np.full((1, n), -np.inf, np.float32)
    inf_row[0, n // 2] = np.nan
    return np.concatenate([z, inf_row])


# The closed-form variants: (sorted, the loop, the output from a threshold, the reference).
EXACT = {
    "sparsemax": (
        _solvers._sparsemax_sorted,
        lambda z, axis: _solvers._michelot(z, axis, None),
        lambda z, t: jnp.maximum(z - t, 0),
        reference.sparsemax,
    ),
    "entmax15": (
        _solvers._entmax15_sorted,
        lambda z, axis: _solvers._entmax15_loop(z, axis, None),
        lambda z, t: jnp.maximum(0.5 * z - t, 0) ** 2,
        reference.entmax15,
    ),
}


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("n", [1, 2, 5, 17, 31, 32])
def test_sorted_closed_forms_are_the_loops_thresholds(name, n):
    by_sorting, loop, output, want = EXACT[name]
    z = jnp.asarray(_rows(n))
    t = jax.jit(by_sorting, static_argnums=1)(z, 1)
    t_loop = jax.jit(loop, static_argnums=1)(z, 1)
    np.testing.assert_allclose(t, t_loop, rtol=3e-7, atol=3e-7)
    np.testing.assert_array_equal(np.isnan(t), np.isnan(t_loop))
    np.testing.assert_allclose(output(z, t), want(np.asarray(z, np.float64)), atol=3e-7)


@pytest.mark.parametrize("name", EXACT)
def test_sorted_closed_forms_along_another_axis_and_row_by_row(name):
    z = jnp.asarray(_rows(32))
    solve = jax.jit(EXACT[name][0], static_argnums=1)
    whole = solve(z, 1)
    np.testing.assert_array_equal(solve(z.T, 0), whole.T)
    # Each row's threshold is its own: the same bits alone as in the batch.
    for i in (0, 70, z.shape[0] - 1):
        np.testing.assert_array_equal(solve(z[i : i + 1], 1), whole[i : i + 1])


@pytest.mark.parametrize("alpha", [1.25, 4 / 3, 1.1, 1 + 1 / 16])
@pytest.mark.parametrize("n", [1, 7, 32])
def test_entmax_theta_by_columns_at_alpha_one_plus_one_over_an_integer(alpha, n):
    z = jnp.asarray(_rows(n))
    d = alpha - 1
    k = _solvers._integer_power(d)
    assert k > 1
    solve = jax.jit(_solvers._norm_root_by_columns, static_argnums=(1, 2, 3, 4))
    theta, passes = solve(z, d, k, 1, 64)
    loop, _ = jax.jit(_solvers._entmax_theta, static_argnums=(1, 2, 3))(z, d, 1, 64)
    np.testing.assert_allclose(theta, loop, rtol=2e-7 * k, atol=2e-7 * k)
    assert 0 < passes < 64  # converged, not stopped by max_iter
    p, _ = _solvers.deformed_exp(z - theta, d)
    want = reference.entmax(np.asarray(z, np.float64), alpha=alpha)
    # p = b^k has k times the relative error of its base b (the loop's too: 5e-7 at k = 10).
    np.testing.assert_allclose(p, want, atol=1e-7 * k)


def test_norm_root_by_columns_honours_max_iter():
    z = jnp.asarray(_rows(32))
    solve = jax.jit(_solvers._norm_root_by_columns, static_argnums=(1, 2, 3, 4))
    for max_iter in (1, 2, 3, 4):  # these rows take more steps: every one allowed is taken
        _, passes = solve(z, 0.25, 4, 1, max_iter)
        assert passes == max_iter
    rough, _ = solve(z, 0.25, 4, 1, 1)
    exact, _ = solve(z, 0.25, 4, 1, 64)
    assert np.nanmax(np.abs(rough - exact)) > 1e-3  # one step is not enough: the cap is real


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3])
@pytest.mark.parametrize("n", [1, 7, 32])
def test_normmax_by_columns_is_the_loops_threshold(alpha, n):
    z = jnp.asarray(_rows(n))
    k = _solvers._integer_power((alpha - 1) / alpha)
    assert k > 1
    theta, passes = jax.jit(_solvers._norm_root_by_columns, static_argnums=(1, 2, 3, 4))(
        z, 1.0, k, 1, 64
    )
    loop = jax.jit(_solvers._normmax_loop, static_argnums=(1, 2, 3, 4))(z, alpha, 1, 64, None)
    np.testing.assert_allclose(theta - 1, loop, rtol=4e-7, atol=4e-7)
    np.testing.assert_array_equal(np.isnan(theta), np.isnan(loop))
    assert 0 < passes < 64
    p = _solvers.normmax_output(z, theta - 1, alpha, 1)
    want = reference.normmax(np.asarray(z, np.float64), alpha=alpha)
    np.testing.assert_allclose(p, want, atol=3e-7)
