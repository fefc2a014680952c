"""sparsemax (_sparsemax.py): closed forms, optax's simplex projection, exactness at scale."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import smvariants as sm

import reference


def test_hand_computed_examples():
    # [0.5, 0.1, -2]: support {0, 1}, tau = (0.6 - 1) / 2 = -0.2.
    np.testing.assert_allclose(
        sm.sparsemax(np.array([0.5, 0.1, -2.0])), [0.7, 0.3, 0.0], atol=1e-15
    )
    # A gap of at least 1 gives one-hot.
    np.testing.assert_array_equal(sm.sparsemax(np.array([1.0, 2.0, 3.0])), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(sm.sparsemax(np.array([0.0, 0.0, 0.0, 0.0])), [0.25] * 4)
    # Ties at the boundary: [1, 0, 0] has tau = 0, so the tied zeros are out of the support.
    np.testing.assert_array_equal(sm.sparsemax(np.array([1.0, 0.0, 0.0])), [1.0, 0.0, 0.0])


def test_equals_optax_simplex_projection():
    x = np.random.default_rng(0).normal(size=(16, 50)) * 2
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float internally
        expected = jax.vmap(optax.projections.projection_simplex)(x)
    np.testing.assert_allclose(sm.sparsemax(x), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 1000), (4, 32000)])
def test_float32_exact_at_scale(shape):
    x = (np.random.default_rng(1).normal(size=shape) * 3).astype(np.float32)
    p = np.asarray(sm.sparsemax(x))
    expected = reference.sparsemax(x)
    np.testing.assert_allclose(p, expected, atol=2e-6)
    # The support is the reference's, up to entries at rounding distance from the threshold.
    assert np.sum((p > 0) != (expected > 0)) <= 2
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-5)


def test_iterations_do_not_depend_on_batch_neighbours():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 100))
    alone = np.stack([np.asarray(sm.sparsemax(row)) for row in x])
    np.testing.assert_array_equal(sm.sparsemax(x), alone)


def test_jacobian_is_support_projection():
    x = np.array([0.5, 0.1, -2.0, 0.4])
    jac = np.asarray(jax.jacrev(sm.sparsemax)(x))
    s = np.array([1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(jac, np.diag(s) - np.outer(s, s) / 3, atol=1e-15)


def test_temperature_controls_sparsity():
    x = np.random.default_rng(3).normal(size=(1, 30))
    sizes = [int(jnp.sum(sm.sparsemax(x, temperature=t) > 0)) for t in (0.1, 1.0, 10.0, 100.0)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 30
