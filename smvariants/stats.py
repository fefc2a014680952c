"""Statistics of probability vectors: support size, sparsity and Tsallis entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _args
from smvariants._numerics import tsallis

__all__ = ("sparsity", "support_size", "tsallis_entropy")


Axis = int | tuple[int, ...]


def _prepare(name: str, p: ArrayLike, axis: Axis, where: ArrayLike | None):
    """``p`` and ``where`` checked and arranged, their rows along one axis (``_args.Layout``)."""
    p = _args.check_float(name, "p", p)
    rows = _args.layout(name, axis, p.shape, "p")
    mask = _args.broadcast_mask(name, where, p.shape, "p")
    return rows.arrange(p), rows, None if mask is None else rows.arrange(mask)


def support_size(p: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Number of entries with non-zero probability: :math:`|\{j : p_j > 0\}|`.

    Args:
      p: probabilities, e.g. the output of :func:`smvariants.sparsemax`.
      axis: the axis of each probability vector: an int or a tuple of ints (the flattened axes).
      where: optional boolean mask broadcastable to ``p``; only unmasked entries are counted.

    Returns:
      An int32 array of ``p``'s shape without ``axis``. An int has no ``nan``: a ``nan`` entry
      is not counted (:func:`sparsity` is ``nan`` for such a vector).

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import stats
      >>> stats.support_size(jnp.array([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]))
      Array([2, 1], dtype=int32)

    References:
      Martins & Astudillo, `From Softmax to Sparsemax <https://arxiv.org/abs/1602.02068>`_, 2016.
    """
    probs, rows, mask = _prepare("support_size", p, axis, where)
    on = probs > 0 if mask is None else (probs > 0) & mask
    return rows.squeeze(jnp.sum(on, axis=rows.axis, dtype=jnp.int32, keepdims=True))


def sparsity(p: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Fraction of exact zeros among the unmasked entries: :math:`|\{j : p_j = 0\}| / n`.

    Args:
      p: probabilities.
      axis: the axis of each probability vector: an int or a tuple of ints (the flattened axes).
      where: optional boolean mask broadcastable to ``p``; masked entries are not counted (neither
        as zeros nor in ``n``).

    Returns:
      An array of ``p``'s shape without ``axis``, in ``p``'s dtype (rounded towards 0 in half
      precision, and in float32 beyond 2^24 entries, so that 1 means that every unmasked entry is
      0: bfloat16 has no number between 0.996 and 1); ``nan`` for a vector with no unmasked
      entry (0 / 0) or with an unmasked ``nan`` entry (a normalizer's ``nan`` row).

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import stats
      >>> stats.sparsity(jnp.array([0.7, 0.3, 0.0, 0.0]))
      Array(0.5, dtype=float32)

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    probs, rows, mask = _prepare("sparsity", p, axis, where)
    axis = rows.axis
    zero = probs == 0
    nan = jnp.isnan(probs)
    # Counted in int32 and divided in float32 (or float64): a half-precision count is wrong past
    # 256 (bfloat16) or overflows past 65504 (float16).
    dtype = probs.dtype if probs.dtype == jnp.float64 else jnp.dtype(jnp.float32)
    if mask is None:
        n = jnp.asarray(probs.shape[axis], jnp.int32)
    else:
        zero, nan = zero & mask, nan & mask
        n = jnp.sum(mask, axis=axis, dtype=jnp.int32, keepdims=True)
    zeros = jnp.sum(zero, axis=axis, dtype=jnp.int32, keepdims=True)
    out = zeros.astype(dtype) / n.astype(dtype)
    # Beyond 2^24 entries a float32 count rounds: a nonzero entry among 2^25 gave 1.
    out = jnp.where((zeros < n) & (out >= 1), jnp.nextafter(jnp.ones((), dtype), 0), out)
    out = jnp.where(jnp.any(nan, axis=axis, keepdims=True), jnp.nan, out)
    rounded = out.astype(probs.dtype)
    above = rounded.astype(dtype) > out  # (False for nan)
    return rows.squeeze(jnp.where(above, jnp.nextafter(rounded, jnp.zeros_like(rounded)), rounded))


def tsallis_entropy(p: ArrayLike, alpha: float | ArrayLike, axis: Axis = -1) -> jax.Array:
    r"""Tsallis alpha-entropy, the regulariser whose argmax over the simplex is alpha-entmax.

    .. math::

      H_\alpha(p) = \frac{1 - \sum_j p_j^\alpha}{\alpha (\alpha - 1)}, \qquad
      H_1(p) = -\sum_j p_j \log p_j \ (\text{Shannon}).

    It is evaluated as :math:`-\frac{1}{\alpha}\sum_j p_j \log p_j \,
    \frac{\mathrm{expm1}((\alpha-1)\log p_j)}{(\alpha-1)\log p_j}`, which is exact at
    ``alpha = 1`` and has no cancellation near it; it is differentiable in ``p`` (on the support)
    and in ``alpha``. That is :math:`(\sum_j p_j - \sum_j p_j^\alpha) / (\alpha (\alpha - 1))`,
    the formula above for ``p`` on the simplex; a vector that does not sum to 1 gets this form
    (an all-zero one, a fully masked normalizer row, gets 0).

    Args:
      p: probabilities along ``axis``.
      alpha: a finite number >= 1, or an array broadcastable to ``p`` with ``axis`` kept as
        size 1. Other values raise ``ValueError``, or give ``nan`` where traced (under ``jit``).
      axis: the axis of each probability vector: an int or a tuple of ints (the flattened axes).

    Returns:
      An array of ``p``'s shape without ``axis`` and ``p``'s dtype (computed in float32 for half
      precision); ``nan`` for a vector with a negative or ``nan`` entry.

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
    p = _args.check_float(name, "p", p)
    rows = _args.layout(name, axis, p.shape, "p")
    dtype = _args.compute_dtype(p.dtype)
    a, invalid = _args.row_parameter(
        name, "alpha", alpha, rows.arranged, rows.axis, dtype, _args.AT_LEAST_ONE, "p",
        axes=rows.text,
    )  # fmt: skip
    # A traced alpha that is not finite and >= 1 gives nan (value and gradients).
    h = tsallis(rows.arrange(p).astype(dtype), _args.nan_where(invalid, a), rows.axis)
    return rows.squeeze(h).astype(p.dtype)
