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


@partial(jax.custom_jvp, nondiff_argnums=(1,))
@partial(jax.jit, static_argnums=(1,))
def _softmax(z: jax.Array, axis: int) -> jax.Array:
    e = jnp.exp(shift_rows(z, axis))
    return safe_divide(e, jnp.sum(e, axis=axis, keepdims=True))


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (z,), (z_dot,) = primals, tangents
    p = _softmax(z, axis)
    return p, simplex_jvp(p, z_dot, axis)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
@partial(jax.jit, static_argnums=(1,))
def _log_softmax(z: jax.Array, axis: int) -> jax.Array:
    shifted = shift_rows(z, axis)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))
    # Masked entries stay -inf, also in a fully masked row (where lse is -inf too).
    return jnp.where(z == -jnp.inf, -jnp.inf, shifted - lse)


@_log_softmax.defjvp
def _log_softmax_jvp(axis, primals, tangents):
    (z,), (z_dot,) = primals, tangents
    out = _log_softmax(z, axis)
    p = jnp.exp(out)
    live = z != -jnp.inf
    # d log p = z_dot - <p, z_dot>; masked entries are the constant -inf.
    return out, jnp.where(live, z_dot - jnp.sum(p * z_dot, axis=axis, keepdims=True), 0)


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
      temperature: a positive float, or an array broadcastable to ``x`` with ``axis`` kept as size 1
        (one temperature per row). Differentiable.

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
    z, axis, dtype = _masking.prepare("softmax", x, axis, where, temperature)
    return _softmax(z, axis).astype(dtype)


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
      temperature: a positive float, or an array broadcastable to ``x`` with ``axis`` kept as
        size 1.

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
    z, axis, dtype = _masking.prepare("log_softmax", x, axis, where, temperature)
    return _log_softmax(z, axis).astype(dtype)
