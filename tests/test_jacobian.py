"""The Jacobian primitive (_jacobian.py): its own transpose, its batching and derivative rules.

Its kernel is checked in ``test_pallas.py`` (interpret mode) and its ``cuda`` lowering in
``test_backend.py``; here its rules, on a map of the variants' form ``diag(g) - g g^T / sum(g)``.
"""

import jax
import jax.numpy as jnp
import numpy as np

from smvariants import _jacobian


def _fn(w, p, t, *, axis):
    """``(diag(g) - g g^T / sum(g)) w / t`` with ``g = p^2``: symmetric, linear in ``w``."""
    g = p * p
    gw = jnp.sum(g * w, axis=axis, keepdims=True)
    return g * (w - gw / jnp.sum(g, axis=axis, keepdims=True)) / t


def _apply(w, p, t, axis=1):
    return _jacobian.apply(_fn, w, p, [t], [1.0], axis)


def _matrix(p_row, t):
    g = p_row**2
    return (np.diag(g) - np.outer(g, g) / g.sum()) / t


RNG = np.random.default_rng(0)
P = jnp.asarray(RNG.uniform(0.1, 1.0, size=(4, 6)))
T = jnp.asarray(RNG.uniform(0.5, 2.0, size=(4, 1)))
W = jnp.asarray(RNG.normal(size=(4, 6)))


def test_applies_the_map_and_binds_one_primitive():
    out = _apply(W, P, T)
    for i in range(4):
        np.testing.assert_allclose(out[i], _matrix(P[i], T[i, 0]) @ W[i], rtol=1e-12)
    assert "smvariants_jacobian" in str(jax.make_jaxpr(_apply)(W, P, T))
    with _jacobian.xla_operations():  # a new function: make_jaxpr caches traces per function
        plain = jax.make_jaxpr(lambda *args: _apply(*args))(W, P, T)
    assert "smvariants_jacobian" not in str(plain)


def test_its_transpose_is_itself():
    transpose = jax.linear_transpose(lambda w: _apply(w, P, T), W)
    np.testing.assert_allclose(transpose(W)[0], _apply(W, P, T), rtol=1e-12)
    ct = jnp.asarray(RNG.normal(size=W.shape))
    vjp = jax.vjp(lambda w: _apply(w, P, T), W)[1](ct)[0]
    np.testing.assert_allclose(vjp, _apply(ct, P, T), rtol=1e-12)


def test_batching_maps_any_operand_and_axis():
    w3 = jnp.stack([W, 2 * W, -W])
    mapped = jax.vmap(_apply, in_axes=(0, None, None))(w3, P, T)
    for k in range(3):
        np.testing.assert_allclose(mapped[k], _apply(w3[k], P, T), rtol=1e-12)
    # Rows along axis 0, the batch along the last axis of p only.
    p3 = jnp.stack([P, P[::-1]], axis=-1)
    by_column = jax.vmap(lambda p: _apply(W.T, p.T, T.T, axis=0), in_axes=-1)(p3)
    np.testing.assert_allclose(by_column[1], _apply(W, P[::-1], T).T, rtol=1e-12)


def test_derivatives_in_every_operand_are_the_operations():
    def plain(w, p, t):
        return _fn(w, p, t, axis=1)

    tangents = (W[::-1], P[::-1], T[::-1])
    ours = jax.jvp(_apply, (W, P, T), tangents)
    expected = jax.jvp(plain, (W, P, T), tangents)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    hessian = jax.hessian(lambda p: jnp.sum(_apply(W, p, T) ** 2))(P)
    np.testing.assert_allclose(
        hessian, jax.hessian(lambda p: jnp.sum(plain(W, p, T) ** 2))(P), rtol=1e-10
    )


def test_second_order_at_a_temperature_whose_square_underflows():
    """Operands that are not differentiated are constants of the second-order rule."""
    w, p = W.astype(jnp.float32), P.astype(jnp.float32)
    t = jnp.full((4, 1), 1e-20, jnp.float32)  # t^2 flushes to 0; 1/t = 1e20 is finite
    v = w[::-1]  # v^T J w (the sum of J w is 0 whatever p)
    hessian = jax.hessian(lambda p: jnp.sum(_apply(w, p, t) * v))(p)
    assert np.isfinite(hessian).all()
    t64 = t.astype(jnp.float64)  # t^2 > 0
    exact = jax.hessian(lambda p: jnp.sum(_apply(W, p, t64) * W[::-1]))(P)
    exact = np.asarray(exact)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(hessian) / scale, exact / scale, atol=1e-5)
    assert jax.jvp(lambda p: _apply(w, p, t), (p,), (p,))[1].dtype == jnp.float32


def test_hessians_in_the_logits_at_the_smallest_temperatures():
    """Below 1.1e-19, where t^2 is 0 in float32, every variant's Hessian in the logits was nan:
    the temperature's zero tangent entered the second-order rule as ``0 * t_dot / t^2``."""
    import smvariants as sm

    x, w = jnp.float32([0.3, 0.1, -1.0]), jnp.float32([0.0, 1.0, 2.0])
    for t in (1e-19, 1e-30):  # sparsemax is piecewise linear: 0 however large 1/t^2 is
        loss = lambda x, t=t: jnp.sum(sm.sparsemax(x * t, temperature=t) * w)  # noqa: E731
        np.testing.assert_array_equal(jax.hessian(loss)(x), 0)
        np.testing.assert_array_equal(jax.jacfwd(jax.grad(loss))(x), 0)
    t = 1e-19  # the logits are x t / t = x: the Hessian in x is that at t = 1
    hessian = jax.hessian(lambda x: jnp.sum(sm.entmax15(x * t, temperature=t) * w))(x)
    at_one = jax.hessian(lambda x: jnp.sum(sm.entmax15(x, temperature=1.0) * w))(x)
    np.testing.assert_allclose(hessian, at_one, rtol=1e-5, atol=1e-6)


def test_half_precision_in_and_out():
    out = _apply(W.astype(jnp.bfloat16), P.astype(jnp.bfloat16), T.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    expected = _apply(
        W.astype(jnp.bfloat16).astype(jnp.float32),
        P.astype(jnp.bfloat16).astype(jnp.float32),
        T.astype(jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2**-7, atol=2**-7)
