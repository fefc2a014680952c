"""Softmax and log-softmax with temperature and masks."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _masking
from smvariants._threshold import safe_divide
from smvariants._threshold import shift_rows
from smvariants._threshold import simplex_jvp


@partial(jax.custom_jvp, nondiff_argnums=(2,))
@partial(jax.jit, static_argnums=(2,))
def _softmax(x: jax.Array, t: jax.Array | None, axis: int) -> jax.Array:
    z = x if t is None else x / t
    e = jnp.exp(shift_rows(z, axis))
    return safe_divide(e, jnp.sum(e, axis=axis, keepdims=True))


@partial(_softmax.defjvp, symbolic_zeros=True)
def _softmax_jvp(axis, primals, tangents):
    x, t = primals
    p = _softmax(x, t, axis)

    def tangent(p, t, x_dot, t_dot):
        # g = p; on the support z = log p + const.
        log_p = jnp.log(jnp.where(p > 0, p, 1))
        return simplex_jvp(p, _masking.logit_tangent(x_dot, t, t_dot, log_p), axis)

    return p, _masking.output_jvp(tangent, p, t, *tangents)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
@partial(jax.jit, static_argnums=(2,))
def _log_softmax(x: jax.Array, t: jax.Array | None, axis: int) -> jax.Array:
    z = x if t is None else x / t
    shifted = shift_rows(z, axis)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))
    # Masked entries stay -inf, also in a fully masked row (where lse is -inf too).
    return jnp.where(z == -jnp.inf, -jnp.inf, shifted - lse)


@partial(_log_softmax.defjvp, symbolic_zeros=True)
def _log_softmax_jvp(axis, primals, tangents):
    x, t = primals
    out = _log_softmax(x, t, axis)

    def tangent(out, t, x_dot, t_dot):
        # d log p = dz - <p, dz> on the unmasked entries, where z = log p + const; masked entries
        # are the constant -inf.
        live = out != -jnp.inf
        log_p = jnp.where(live, out, 0)
        dz = _masking.logit_tangent(x_dot, t, t_dot, log_p)
        return jnp.where(live, dz - jnp.sum(jnp.exp(out) * dz, axis=axis, keepdims=True), 0)

    return out, _masking.output_jvp(tangent, out, t, *tangents)


def softmax(
    x: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Softmax with temperature and an optional mask.

    .. math::

      \mathrm{softmax}(x)_j = \frac{\exp(x_j / T)}{\sum_k \exp(x_k / T)}

    the alpha = 1 member of the entmax family: its output is dense (every unmasked entry is
    positive). ``softmax(x, temperature=t)`` equals ``jax.nn.softmax(x / t)``.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1.
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1 (one temperature per row). Differentiable. Under ``jit``, rows with an invalid
        temperature give ``nan``.

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Note:
      A row with no unmasked entry gives all zeros (not ``nan``), with zero gradient. A row that
      contains ``nan`` or ``+inf`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import smvariants
      >>> smvariants.softmax(jnp.array([1.0, 2.0, 3.0]))
      Array([0.09003057, 0.24472848, 0.66524094], dtype=float32)
      >>> smvariants.softmax(jnp.array([1.0, 2.0, 3.0]), where=jnp.array([True, True, False]))
      Array([0.26894143, 0.7310586 , 0.        ], dtype=float32)

    References:
      Bridle, `Probabilistic Interpretation of Feedforward Classification Network Outputs
      <https://doi.org/10.1007/978-3-642-76153-9_28>`_, 1990.
    """
    args = _masking.prepare("softmax", x, axis, where, temperature)
    return args.finish(_softmax(args.x, args.t, args.axis))


def log_softmax(
    x: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Logarithm of :func:`softmax`, computed stably.

    .. math::

      \mathrm{log\_softmax}(x)_j = x_j / T - \log \sum_k \exp(x_k / T)

    Args:
      x: logits, a floating-point array.
      axis: the axis along which ``exp`` of the output sums to 1.
      where: optional boolean mask broadcastable to ``x``; masked entries (and ``-inf`` logits)
        get ``-inf`` (the log of probability 0) and gradient 0.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1. Differentiable. Under ``jit``, rows with an invalid temperature give ``nan``.

    Returns:
      An array of the shape and dtype of ``x``.

    Note:
      A row with no unmasked entry gives all ``-inf`` with zero gradient; a row that contains
      ``nan`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import smvariants
      >>> smvariants.log_softmax(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)

    References:
      Bridle, `Probabilistic Interpretation of Feedforward Classification Network Outputs
      <https://doi.org/10.1007/978-3-642-76153-9_28>`_, 1990.
    """
    args = _masking.prepare("log_softmax", x, axis, where, temperature)
    return args.finish(_log_softmax(args.x, args.t, args.axis))
