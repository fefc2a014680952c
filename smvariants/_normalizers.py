"""The public normalizers: thin wrappers over the variant table, with the docstrings."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _args
from smvariants import _solvers
from smvariants import _variants

Numeric = float | int | ArrayLike


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
@partial(jax.jit, static_argnums=(2, 3))
def _log_softmax(x: jax.Array, t: jax.Array | None, axis: int, dtype) -> jax.Array:
    """log_softmax of ``x / t`` (compute dtype), for a result in ``dtype``."""
    m = _solvers.row_max(x, axis)
    z = _solvers.scale(x, m, t)
    # A logit more than the float range below the maximum stays finite (the lowest float), so
    # that it is not taken for a masked entry: its gradient is that of jax.nn.log_softmax.
    z = jnp.where(x == -jnp.inf, -jnp.inf, jnp.maximum(z, jnp.finfo(z.dtype).min))
    lse = jnp.log(jnp.sum(jnp.exp(z), axis=axis, keepdims=True))
    # Masked entries stay -inf, also in a fully masked row (where lse is -inf too); +inf or nan
    # anywhere in the row (lse nan or inf) makes the whole row nan.
    # The lowest float of the result's dtype: a half-precision result computed in float32 would
    # otherwise round a finite log-probability below its range to -inf.
    out = jnp.where(z == -jnp.inf, -jnp.inf, jnp.maximum(z - lse, float(jnp.finfo(dtype).min)))
    out = jnp.where(jnp.isnan(lse) | (lse == jnp.inf), jnp.nan, out)
    if t is not None:  # as in _variants.forward: x / T overflowing to +-inf
        top = m / t
        out = jnp.where(top == jnp.inf, jnp.nan, jnp.where(top == -jnp.inf, -jnp.inf, out))
    return out


@partial(_log_softmax.defjvp, symbolic_zeros=True)
def _log_softmax_jvp(axis, dtype, primals, tangents):
    x, t = primals
    out = _log_softmax(x, t, axis, dtype)

    def tangent(out, t, x_dot, t_dot):
        # d log p = dz - <p, dz> on the unmasked entries, where z = log p + const; masked entries
        # are the constant -inf.
        live = out != -jnp.inf
        dz = _variants.logit_tangent(x_dot, t, t_dot, lambda: jnp.where(live, out, 0))
        dz = jnp.where(live, dz, 0)
        return jnp.where(live, dz - jnp.sum(jnp.exp(out) * dz, axis=axis, keepdims=True), 0)

    rule = jax.checkpoint(tangent, prevent_cse=False)
    return out, rule(out, t, *_variants.nonzero_tangents(tuple(tangents)))


def softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
) -> jax.Array:
    r"""Softmax with temperature and an optional mask.

    .. math::

      \mathrm{softmax}(x)_j = \frac{\exp(x_j / T)}{\sum_k \exp(x_k / T)}

    the alpha = 1 member of the entmax family: its output is dense (every unmasked entry is
    positive). ``softmax(x, temperature=t)`` equals ``jax.nn.softmax(x / t)``.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1: an int or a tuple of ints (the
        variant over the flattened axes, as ``jax.nn.softmax(x, axis=(1, 2))``).
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
      >>> import numpy as np
      >>> import smvariants
      >>> print(np.asarray(smvariants.softmax(jnp.array([1.0, 2.0, 3.0]))).round(4))
      [0.09   0.2447 0.6652]
      >>> x, mask = jnp.array([1.0, 2.0, 3.0]), jnp.array([True, True, False])
      >>> print(np.asarray(smvariants.softmax(x, where=mask)).round(4))
      [0.2689 0.7311 0.    ]

    References:
      Bridle, `Probabilistic Interpretation of Feedforward Classification Network Outputs
      <https://doi.org/10.1007/978-3-642-76153-9_28>`_, 1990.
    """
    return _variants.normalize("softmax", "softmax", x, axis, where, temperature)


def log_softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
) -> jax.Array:
    r"""Logarithm of :func:`softmax`, computed stably.

    .. math::

      \mathrm{log\_softmax}(x)_j = x_j / T - \log \sum_k \exp(x_k / T)

    Args:
      x: logits, a floating-point array.
      axis: the axis along which ``exp`` of the output sums to 1: an int or a tuple of ints
        (over the flattened axes, as ``jax.nn.log_softmax(x, axis=(1, 2))``).
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
      >>> import numpy as np
      >>> import smvariants
      >>> print(np.asarray(smvariants.log_softmax(jnp.array([0.0, 0.0]))).round(4))
      [-0.6931 -0.6931]

    References:
      Bridle, `Probabilistic Interpretation of Feedforward Classification Network Outputs
      <https://doi.org/10.1007/978-3-642-76153-9_28>`_, 1990.
    """
    args = _args.prepare("log_softmax", x, axis, where, temperature)
    return args.finish(_log_softmax(args.x, args.t, args.axis, jnp.dtype(args.dtype)))


def sparsemax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
) -> jax.Array:
    r"""Sparsemax: the closest probability vector to ``x / T`` in Euclidean distance.

    .. math::

      \mathrm{sparsemax}(z) = \arg\min_{p \in \Delta} \|p - z\|^2 = [z - \tau(z)]_+,
      \qquad \textstyle\sum_j [z_j - \tau]_+ = 1,

    with ``z = x / T``; alpha-entmax at alpha = 2. Entries more than ``tau`` below the row's
    largest logit get probability exactly 0. The threshold is exact (computed in closed form on the
    support, found by Michelot's algorithm, or on a CPU's rows of up to 32 entries by a sorting
    network), not a tolerance.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1: an int or a tuple of ints (the
        variant over the flattened axes, as ``jax.nn.softmax(x, axis=(1, 2))``).
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
      >>> import numpy as np
      >>> import smvariants
      >>> smvariants.sparsemax(jnp.array([1.0, 2.0, 3.0]))
      Array([0., 0., 1.], dtype=float32)
      >>> print(np.asarray(smvariants.sparsemax(jnp.array([0.5, 0.1, -2.0]))).round(4))
      [0.7 0.3 0. ]

    References:
      Martins & Astudillo, `From Softmax to Sparsemax: A Sparse Model of Attention and Multi-Label
      Classification <https://arxiv.org/abs/1602.02068>`_, 2016.

      Michelot, `A finite algorithm for finding the projection of a point onto the canonical
      simplex of R^n <https://doi.org/10.1007/BF00938486>`_, 1986.
    """
    return _variants.normalize("sparsemax", "sparsemax", x, axis, where, temperature)


def entmax15(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
) -> jax.Array:
    r"""Exact 1.5-entmax: sparse like sparsemax, smooth like softmax.

    .. math::

      \mathrm{entmax}_{1.5}(z) = \arg\max_{p \in \Delta} \langle p, z\rangle + H_{1.5}(p)
      = [z / 2 - \tau]_+^2, \qquad \textstyle\sum_j [z_j / 2 - \tau]_+^2 = 1,

    with ``z = x / T`` and Tsallis entropy ``H_{1.5}(p) = 4 (1 - \sum_j p_j^{1.5}) / 3``. The
    support is found by safeguarded Newton steps (on a CPU's rows of up to 32 entries by a sorting
    network) and ``tau`` is then computed in closed form on it, so the result is exact to float
    rounding.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1: an int or a tuple of ints (the
        variant over the flattened axes, as ``jax.nn.softmax(x, axis=(1, 2))``).
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1. Differentiable. Under ``jit``, rows with an invalid temperature give ``nan``.

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Note:
      The Jacobian is ``diag(g) - g g^T / sum(g)`` with ``g = sqrt(p)``. A row with no unmasked
      entry gives all zeros with zero gradient; a row that contains ``nan`` or ``+inf`` gives
      ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import smvariants
      >>> print(np.asarray(smvariants.entmax15(jnp.array([1.0, 2.0, 3.0]))).round(4))
      [0.     0.1693 0.8307]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    return _variants.normalize("entmax15", "entmax15", x, axis, where, temperature)


def entmax(
    x: ArrayLike,
    alpha: Numeric = 1.5,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
) -> jax.Array:
    r"""alpha-entmax for any ``alpha >= 1``; ``alpha`` may be per row and learned.

    .. math::

      \mathrm{entmax}_\alpha(z) = \arg\max_{p \in \Delta} \langle p, z\rangle + H_\alpha(p)
      = [(\alpha - 1) z - \tau]_+^{1/(\alpha - 1)},
      \qquad H_\alpha(p) = \frac{1 - \sum_j p_j^\alpha}{\alpha (\alpha - 1)},

    with ``z = x / T`` and ``tau`` such that the output sums to 1. ``alpha = 1`` is softmax,
    ``alpha = 2`` sparsemax; in between the output is sparse with a smooth Jacobian, larger
    ``alpha`` is sparser. Internally ``p_j = [1 + (alpha - 1)(z_j - theta)]_+^{1/(alpha - 1)}``,
    which tends to ``exp(z_j - theta)`` as ``alpha -> 1``, so values near 1 and 2 are as accurate
    as any other. ``theta`` is found by safeguarded Newton iterations with a bisection fallback.

    A Python-number ``alpha`` of 1, 1.5 or 2 uses the exact :func:`softmax`, :func:`entmax15` or
    :func:`sparsemax`. An array ``alpha`` always takes the general path and is differentiable:
    ``dp/dalpha`` is closed form (Correia et al., 2019), a perturbation of the logits evaluated
    without cancellation near 1.

    Args:
      x: logits, a floating-point array.
      alpha: a finite number >= 1 (at most 8.5e37 in float32, the reciprocal of its smallest
        normal number), or an array broadcastable to ``x`` with ``axis`` kept as size 1 (per-row
        or per-head alpha). Differentiable. A Python number is compiled into the solver
        (faster: 1, 1.5 and 2 are exact closed forms, 1 + 1/n uses integer powers); pass an array
        to learn alpha or to vary it without recompiling.
      axis: the axis along which the probabilities sum to 1: an int or a tuple of ints (the
        variant over the flattened axes, as ``jax.nn.softmax(x, axis=(1, 2))``).
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1. Differentiable. Under ``jit``, rows with an invalid temperature give ``nan``.
      max_iter: the most Newton/bisection passes the solver makes (it stops earlier once every row
        has converged to the dtype's resolution). The default reaches float64 precision.

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Raises:
      ValueError: for a concrete ``alpha`` that is not finite and >= 1, a concrete temperature
        that is not finite and > 0 (traced ones give ``nan`` rows), a bad ``axis`` or ``where``
        shape, or ``max_iter < 1``.

    Note:
      The Jacobian in ``x`` is ``(diag(g) - g g^T / sum(g)) / T`` with ``g = p^(2 - alpha)``. For
      ``alpha > 2``, ``g`` is unbounded as an entry leaves the support, and the map itself is
      ill-conditioned there: an entry whose base ``1 + (alpha - 1)(z_j - theta)`` is at rounding
      level has an error of order ``eps^(1 / (alpha - 1))``, even with an exactly rounded
      threshold. In float32 the forward error reaches about 5e-5 at ``alpha = 3``, 4e-3 at
      ``alpha = 4`` and 1e-2 at ``alpha = 5`` (about 1e-7 for ``alpha <= 2``; on rows of many
      tied small entries up to 5e-5 just below ``alpha = 2`` and 3.5e-2 at ``alpha = 4``: see
      the README), so float64 is advised for large ``alpha``. A row with no unmasked entry
      gives all zeros; a row that contains ``nan`` or ``+inf`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import smvariants
      >>> x = jnp.array([1.0, 2.0, 3.0])
      >>> print(np.asarray(smvariants.entmax(x, alpha=1.25)).round(4))
      [0.0345 0.2148 0.7507]
      >>> p = smvariants.entmax(x, alpha=jnp.array([1.5]))  # an array: the general path
      >>> print(np.asarray(p).round(4))
      [0.     0.1693 0.8307]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.

      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    return _variants.normalize(
        "entmax", "entmax", x, axis, where, temperature, alpha=alpha, max_iter=max_iter
    )


def normmax(
    x: ArrayLike,
    alpha: Numeric = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
) -> jax.Array:
    r"""Normmax: the norm-entropy mapping, sparse, with a tunable norm.

    .. math::

      \mathrm{normmax}_\alpha(z) = \arg\max_{p \in \Delta} \langle p, z\rangle - \|p\|_\alpha
      = \frac{q}{\textstyle\sum_j q_j}, \qquad
      q_j = [z_j - \tau]_+^{1/(\alpha - 1)}, \ \|q\|_\alpha = 1,

    with ``z = x / T``: the regulariser is the ``alpha``-norm (the norm entropy
    ``H(p) = 1 - ||p||_alpha``) instead of the Tsallis entropy of :func:`entmax`. Entries more than
    ``tau`` below the row's maximum get probability exactly 0. As ``alpha -> 1`` it tends to the
    argmax (one-hot), as ``alpha -> inf`` to the uniform distribution over the entries within 1
    of the maximum; ``alpha = 2`` is ``argmax <p, z> - ||p||_2``. ``tau`` is found sort-free by
    Newton's method on the norm ``||[z - tau]_+||_k``, ``k = alpha / (alpha - 1)``, which is
    convex in ``tau``, so the iterates increase monotonically to it (no bisection needed).

    Args:
      x: logits, a floating-point array.
      alpha: a finite number > 1, or an array broadcastable to ``x`` with ``axis`` kept as size 1
        (per row). Differentiable. A Python number is compiled into the solver.
      axis: the axis along which the probabilities sum to 1: an int or a tuple of ints (the
        variant over the flattened axes, as ``jax.nn.softmax(x, axis=(1, 2))``).
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1 (one temperature per row). Differentiable. Under ``jit``, rows with an invalid
        temperature or alpha give ``nan``.
      max_iter: the most Newton passes the solver makes (it stops earlier once every row has
        converged to the dtype's resolution).

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Note:
      The Jacobian is ``c (diag(g) - g p^T - p g^T + sum(g) p p^T)`` with ``g = p^(2 - alpha)`` on
      the support and ``c = ||p||_alpha^(alpha - 1) / (alpha - 1)``: symmetric, and used by both
      forward and reverse mode. A row with no unmasked entry gives all zeros with zero gradient; a
      row that contains ``nan`` or ``+inf`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import smvariants
      >>> print(np.asarray(smvariants.normmax(jnp.array([1.0, 1.5, 2.0]), alpha=2.0)).round(4))
      [0.    0.311 0.689]

    References:
      Santos, Niculae, McNamee & Martins, `Sparse and Structured Hopfield Networks
      <https://arxiv.org/abs/2402.13725>`_, 2024.

      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.
    """
    return _variants.normalize(
        "normmax", "normmax", x, axis, where, temperature, alpha=alpha, max_iter=max_iter
    )


def budget_sparsemax(
    x: ArrayLike,
    budget: Numeric = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
) -> jax.Array:
    r"""Budget sparsemax: the Euclidean projection onto the capped simplex.

    .. math::

      \mathrm{budget\_sparsemax}(z) = \arg\min_{0 \le p \le 1,\ \sum_j p_j = B} \|p - z\|^2
      = \mathrm{clip}(z - \tau, 0, 1),

    with ``z = x / T`` and ``tau`` such that the output sums to the budget ``B``: a sparse
    multi-label output with a fixed total mass (about ``B`` labels on), each entry a probability.
    ``B = 1`` is :func:`sparsemax`. ``tau`` is exact: found sort-free (Newton steps on the
    piecewise-linear ``sum_j clip(z_j - tau, 0, 1) = B`` with a bisection safeguard) and then
    computed in closed form on the entries strictly between 0 and 1.

    Args:
      x: logits, a floating-point array.
      budget: a finite number > 0, or an array broadcastable to ``x`` with ``axis`` kept as size
        1 (per row). Differentiable (``dp/dB`` is ``1/|S|`` on the entries ``S`` strictly between
        0 and 1). A Python number is compiled into the solver.
      axis: the axis along which the probabilities sum to ``budget``: an int or a tuple of ints
        (the variant over the flattened axes).
      where: optional boolean mask broadcastable to ``x``; masked entries get probability exactly 0
        and gradient 0. ``-inf`` logits are treated as masked.
      temperature: a finite positive float, or an array broadcastable to ``x`` with ``axis`` kept
        as size 1 (one temperature per row). Differentiable. Under ``jit``, rows with an invalid
        temperature or budget give ``nan``.
      max_iter: the most solver passes (the default is far more than any row needs).

    Returns:
      An array of the shape and dtype of ``x`` (float16/bfloat16 inputs are computed in float32).

    Note:
      The Jacobian is ``diag(s) - s s^T / |S|`` with ``s`` the indicator of the entries strictly
      between 0 and 1. A row with fewer unmasked entries than ``budget`` has no solution and gives
      ``nan``; a row with exactly ``budget`` unmasked entries gives 1 on each. A row with no
      unmasked entry gives all zeros with zero gradient; a row that contains ``nan`` or ``+inf``
      gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import smvariants
      >>> x = jnp.array([0.9, 0.8, 0.1, -1.0])
      >>> print(np.asarray(smvariants.budget_sparsemax(x, budget=2.0)).round(4))
      [0.9667 0.8667 0.1667 0.    ]

    References:
      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.

      Peters, Correia, Niculae & Martins, `The entmax package (budget_bisect)
      <https://github.com/deep-spin/entmax>`_, 2019.
    """
    return _variants.normalize(
        "budget_sparsemax",
        "budget_sparsemax",
        x,
        axis,
        where,
        temperature,
        budget=budget,
        max_iter=max_iter,
    )
