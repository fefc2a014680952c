"""Statistics of probability vectors: support size, sparsity and Tsallis entropy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _masking

__all__ = ("sparsity", "support_size", "tsallis_entropy")


def _prepare(name: str, p: ArrayLike, axis: int, where: ArrayLike | None):
    p = _masking.check_float(name, "p", p)
    axis = _masking.canonical_axis(name, axis, p.ndim, "p")
    mask = _masking.broadcast_mask(name, where, p.shape, "p")
    return p, axis, mask


def support_size(p: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Number of entries with non-zero probability: :math:`|\{j : p_j > 0\}|`.

    Args:
      p: probabilities, e.g. the output of :func:`smvariants.sparsemax`.
      axis: the axis of each probability vector.
      where: optional boolean mask broadcastable to ``p``; only unmasked entries are counted.

    Returns:
      An int32 array of ``p``'s shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import stats
      >>> stats.support_size(jnp.array([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]))
      Array([2, 1], dtype=int32)

    References:
      Martins & Astudillo, `From Softmax to Sparsemax <https://arxiv.org/abs/1602.02068>`_, 2016.
    """
    p, axis, mask = _prepare("support_size", p, axis, where)
    on = p > 0 if mask is None else (p > 0) & mask
    return jnp.sum(on, axis=axis, dtype=jnp.int32)


def sparsity(p: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Fraction of exact zeros among the unmasked entries: :math:`|\{j : p_j = 0\}| / n`.

    Args:
      p: probabilities.
      axis: the axis of each probability vector.
      where: optional boolean mask broadcastable to ``p``; masked entries are not counted (neither
        as zeros nor in ``n``).

    Returns:
      An array of ``p``'s shape without ``axis``, in ``p``'s dtype; ``nan`` for a vector with no
      unmasked entry (0 / 0).

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import stats
      >>> stats.sparsity(jnp.array([0.7, 0.3, 0.0, 0.0]))
      Array(0.5, dtype=float32)

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    p, axis, mask = _prepare("sparsity", p, axis, where)
    zero = p == 0
    if mask is None:
        return jnp.mean(zero.astype(p.dtype), axis=axis)
    n = jnp.sum(mask, axis=axis).astype(p.dtype)
    return jnp.sum(zero & mask, axis=axis).astype(p.dtype) / n


def expm1_ratio(x: jax.Array) -> jax.Array:
    """``expm1(x) / x`` with its limit 1 at 0, smooth (and differentiable) through 0."""
    small = jnp.abs(x) < 1e-3
    xs = jnp.where(small, 1, x)
    series = 1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x / 120)))
    return jnp.where(small, series, jnp.expm1(xs) / xs)


def tsallis_entropy(p: ArrayLike, alpha: chex.Numeric, axis: int = -1) -> jax.Array:
    r"""Tsallis alpha-entropy, the regulariser whose argmax over the simplex is alpha-entmax.

    .. math::

      H_\alpha(p) = \frac{1 - \sum_j p_j^\alpha}{\alpha (\alpha - 1)}, \qquad
      H_1(p) = -\sum_j p_j \log p_j \ (\text{Shannon}).

    It is evaluated as :math:`-\frac{1}{\alpha}\sum_j p_j \log p_j \,
    \frac{\mathrm{expm1}((\alpha-1)\log p_j)}{(\alpha-1)\log p_j}`, which is exact at
    ``alpha = 1`` and has no cancellation near it; it is differentiable in ``p`` (on the support)
    and in ``alpha``.

    Args:
      p: probabilities along ``axis``.
      alpha: a finite number >= 1, or an array broadcastable to ``p`` with ``axis`` kept as
        size 1. Other values raise ``ValueError``, or give ``nan`` where traced (under ``jit``).
      axis: the axis of each probability vector.

    Returns:
      An array of ``p``'s shape without ``axis`` and ``p``'s dtype (computed in float32 for half
      precision).

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import stats
      >>> p = jnp.array([0.5, 0.5])
      >>> print(f"{stats.tsallis_entropy(p, 1.0):.6f} {stats.tsallis_entropy(p, 2.0):.6f}")
      0.693147 0.250000

    References:
      Tsallis, `Possible generalization of Boltzmann-Gibbs statistics
      <https://doi.org/10.1007/BF01016429>`_, 1988.
    """
    name = "tsallis_entropy"
    p = _masking.check_float(name, "p", p)
    axis = _masking.canonical_axis(name, axis, p.ndim, "p")
    dtype = _masking.compute_dtype(p.dtype)
    a, invalid = _masking.row_parameter(
        name, "alpha", alpha, p.shape, axis, dtype, _masking.AT_LEAST_ONE, "p"
    )
    h = tsallis(p.astype(dtype), a, axis)
    if invalid is not None:  # a traced alpha that is not finite and >= 1
        h = jnp.where(invalid, jnp.nan, h)
    return h.squeeze(axis).astype(p.dtype)


def tsallis(p: jax.Array, alpha: jax.Array, axis: int) -> jax.Array:
    """:func:`tsallis_entropy` without argument checks, keeping ``axis`` (used by the losses)."""
    on = p > 0
    log_p = jnp.log(jnp.where(on, p, 1))
    terms = jnp.where(on, p * log_p * expm1_ratio((alpha - 1) * log_p), 0)
    return -jnp.sum(terms, axis=axis, keepdims=True) / alpha
