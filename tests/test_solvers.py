"""Short rows solved by columns (_solvers.py on XLA:CPU): the loop's thresholds, to rounding.

Rows of at most 32 entries are solved on a CPU with sums over their columns and several passes
per trip of the loop (``_backend.by_columns``). These tests call both solvers directly, so they
hold on every backend: on random rows at several scales, tied, masked, all-masked and nan rows,
lengths from 1 to 32, and rows built to need many trips; against the float64 reference too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smvariants import _solvers

import reference


def _rows(n, seed=0):
    """Rows of ``n`` entries, maximum 0: normal at several scales, ties, masks, nan, many trips."""
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
    return z - np.where(np.isfinite(top), top, 0)


@pytest.mark.parametrize("n", [1, 2, 5, 17, 31, 32])
def test_sparsemax_by_columns_is_the_loops_threshold(n):
    z = jnp.asarray(_rows(n))
    by_columns = jax.jit(_solvers._sparsemax_by_columns, static_argnums=1)(z, 1)
    loop = jax.jit(_solvers._michelot, static_argnums=(1, 2))(z, 1, None)
    np.testing.assert_allclose(by_columns, loop, rtol=2e-7, atol=2e-7)
    np.testing.assert_array_equal(np.isnan(by_columns), np.isnan(loop))
    p = jnp.maximum(z - by_columns, 0)
    want = reference.sparsemax(np.asarray(z, np.float64))
    np.testing.assert_allclose(p, want, atol=3e-7)


def test_sparsemax_by_columns_along_another_axis_and_row_by_row():
    z = jnp.asarray(_rows(32))
    solve = jax.jit(_solvers._sparsemax_by_columns, static_argnums=1)
    whole = solve(z, 1)
    np.testing.assert_array_equal(solve(z.T, 0), whole.T)
    # Each row's threshold is its own: the same bits alone as in the batch.
    for i in (0, 70, z.shape[0] - 1):
        np.testing.assert_array_equal(solve(z[i : i + 1], 1), whole[i : i + 1])
