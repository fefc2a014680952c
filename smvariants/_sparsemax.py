"""Sparsemax: the Euclidean projection onto the probability simplex."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _masking
from smvariants._threshold import max_and_threshold
from smvariants._threshold import simplex_jvp
from smvariants._threshold import sparsemax_threshold


@partial(jax.custom_jvp, nondiff_argnums=(2,))
@partial(jax.jit, static_argnums=(2,))
def _sparsemax(x: jax.Array, t: jax.Array | None, axis: int) -> jax.Array:
    z = x if t is None else x / t
    m, tau = max_and_threshold(z, axis, sparsemax_threshold, lambda z, tau: z > tau)
    return jnp.maximum((z - m) - tau, 0)


@partial(_sparsemax.defjvp, symbolic_zeros=True)
def _sparsemax_jvp(axis, primals, tangents):
    x, t = primals
    p = _sparsemax(x, t, axis)

    def tangent(p, t, x_dot, t_dot):
        # g = p^(2 - alpha) at alpha = 2: the support indicator; on the support z = p + tau.
        g = (p > 0).astype(p.dtype) + 0 * p  # + 0 * p: nan in a nan row (nan > 0 is False)
        return simplex_jvp(g, _masking.logit_tangent(x_dot, t, t_dot, p), axis)

    return p, _masking.output_jvp(tangent, p, t, *tangents)


def sparsemax(
    x: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Sparsemax: the closest probability vector to ``x / T`` in Euclidean distance.

    .. math::

      \mathrm{sparsemax}(z) = \arg\min_{p \in \Delta} \|p - z\|^2 = [z - \tau(z)]_+,
      \qquad \textstyle\sum_j [z_j - \tau]_+ = 1,

    with ``z = x / T``; alpha-entmax at alpha = 2. Entries more than ``tau`` below the row's
    largest logit get probability exactly 0. The threshold is exact (computed in closed form on the
    support, found sort-free by Michelot's algorithm), not a tolerance.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1.
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1 (one temperature per row). Differentiable. Larger temperatures give denser
        outputs. Under ``jit``, rows with an invalid temperature give ``nan``.

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Note:
      The Jacobian is ``diag(s) - s s^T / |S|`` with ``s`` the support indicator; both forward and
      reverse mode use it. A row with no unmasked entry gives all zeros with zero gradient; a row
      that contains ``nan`` or ``+inf`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import smvariants
      >>> smvariants.sparsemax(jnp.array([1.0, 2.0, 3.0]))
      Array([0., 0., 1.], dtype=float32)
      >>> smvariants.sparsemax(jnp.array([0.5, 0.1, -2.0]))
      Array([0.7       , 0.29999998, 0.        ], dtype=float32)

    References:
      Martins & Astudillo, `From Softmax to Sparsemax: A Sparse Model of Attention and Multi-Label
      Classification <https://arxiv.org/abs/1602.02068>`_, 2016.

      Michelot, `A finite algorithm for finding the projection of a point onto the canonical
      simplex of R^n <https://doi.org/10.1007/BF00938486>`_, 1986.
    """
    args = _masking.prepare("sparsemax", x, axis, where, temperature)
    return args.finish(_sparsemax(args.x, args.t, args.axis))
