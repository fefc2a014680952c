"""softmax and log_softmax (_softmax.py): the worked example and agreement with jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import smvariants as sm

SEED = np.array([1.0, 2.0, 3.0])
# exp(k) / (e + e^2 + e^3) for k = 1, 2, 3. An often-quoted printout shows 0.65507956 for the last
# entry; that vector sums to 0.99 and is not the softmax.
SEED_SOFTMAX = np.array([0.09003057317038046, 0.24472847105479764, 0.6652409557748219])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worked_example(dtype):
    p = sm.softmax(SEED.astype(dtype))
    np.testing.assert_allclose(p, SEED_SOFTMAX, rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert abs(float(p[2]) - 0.65507956) > 1e-2
    np.testing.assert_allclose(float(jnp.sum(p)), 1.0, rtol=1e-6)


def test_worked_example_batched():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_allclose(sm.softmax(x), np.stack([SEED_SOFTMAX] * 2), rtol=1e-15)
    # Along axis 0 every column is [1, 4] + k: softmax([0, 3]).
    column = [[0.04742587317756678], [0.9525741268224334]]
    np.testing.assert_allclose(sm.softmax(x, axis=0), np.tile(column, (1, 3)), rtol=1e-14)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_matches_jax_nn_with_temperature_and_mask(temperature):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)) * 3
    where = rng.random((5, 8)) > 0.3
    where[:, 0] = True
    np.testing.assert_allclose(
        sm.softmax(x, temperature=temperature), jax.nn.softmax(x / temperature), rtol=1e-13
    )
    np.testing.assert_allclose(
        sm.softmax(x, where=where, temperature=temperature),
        jax.nn.softmax(x / temperature, where=where),
        rtol=1e-13,
        atol=1e-300,
    )
    # Near 0 the log-probabilities are accurate to eps |x / T| absolutely: XLA computes the
    # division as a multiplication by 1 / T, a rounding away from the eager x / T.
    np.testing.assert_allclose(
        sm.log_softmax(x, temperature=temperature),
        jax.nn.log_softmax(x / temperature),
        rtol=1e-13,
        atol=1e-14,
    )


def test_log_softmax_is_log_of_softmax_and_stable():
    x = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    lp = sm.log_softmax(x)
    assert np.isfinite(lp).all()
    np.testing.assert_allclose(lp[0], [0.0, -1000.0, -2000.0])
    np.testing.assert_allclose(np.exp(lp), sm.softmax(x), rtol=1e-14)


def test_log_softmax_gradients():
    x = np.array([[0.3, -1.2, 0.9, 0.5], [4.0, 5.0, 6.0, 5.5]])
    check_grads(sm.log_softmax, (x,), order=2, modes=("fwd", "rev"))
    check_grads(lambda t: sm.log_softmax(x, temperature=t), (np.array([[0.5], [2.0]]),), order=2)
    where = np.array([[True, False, True, True]] * 2)
    g = jax.grad(lambda x: jnp.sum(jnp.where(where, sm.log_softmax(x, where=where), 0)))(x)
    assert (np.asarray(g)[:, 1] == 0).all()
    np.testing.assert_allclose(
        g, jax.grad(lambda x: jnp.sum(jnp.where(where, jax.nn.log_softmax(x, where=where), 0)))(x)
    )


def test_softmax_sharpens_as_temperature_falls():
    x = np.array([0.1, 0.5, 0.2])
    top = [float(sm.softmax(x, temperature=t)[1]) for t in (4.0, 1.0, 0.25, 0.01)]
    assert top == sorted(top) and top[-1] > 1 - 1e-12


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_log_softmax_is_finite_below_its_range(dtype):
    # A log-probability below the half-precision range is its lowest finite float, as in
    # float32 (it was computed in float32 and rounded to -inf: p log p was nan); masked: -inf.
    low = float(jnp.finfo(dtype).min)
    x = jnp.array([0.0, 0.75 * low, 1.0, -jnp.inf], dtype)  # below the range at T = 0.5
    lp = sm.log_softmax(x, temperature=0.5)
    assert lp.dtype == dtype
    np.testing.assert_array_equal(np.asarray(lp[1:], np.float32)[::2], [low, -np.inf])
    assert np.isfinite(float(jnp.sum(jnp.where(x > -jnp.inf, jnp.exp(lp) * lp, 0))))
