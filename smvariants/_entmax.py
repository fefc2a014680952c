"""alpha-entmax: exact 1.5-entmax and any alpha >= 1 (per-row, learnable)."""

from __future__ import annotations

import math
import operator
from functools import partial

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from smvariants import _masking
from smvariants._softmax import _softmax
from smvariants._sparsemax import _sparsemax
from smvariants._threshold import deformed_exp
from smvariants._threshold import entmax15_threshold
from smvariants._threshold import entmax_theta
from smvariants._threshold import max_and_threshold
from smvariants._threshold import safe_divide
from smvariants._threshold import simplex_jvp
from smvariants.stats import expm1_ratio

_ENTMAX15_MAX_ITER = 64


def _entmax15_tau(z: jax.Array, axis: int, init: jax.Array | None) -> jax.Array:
    """Exact ``tau`` of ``p = [z / 2 - tau]_+^2`` from a lower bound ``init`` (or from scratch)."""
    # Newton finds the support; the closed form on it makes the threshold exact.
    theta_init = None if init is None else 2 * (init + 1)  # tau = theta / 2 - 1
    theta, _ = entmax_theta(z, 0.5, axis, _ENTMAX15_MAX_ITER, theta_init)
    support = 2 + (z - theta) > 0
    return jnp.where(jnp.isnan(theta), jnp.nan, entmax15_threshold(0.5 * z, support, axis))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
@partial(jax.jit, static_argnums=(2,))
def _entmax15(x: jax.Array, t: jax.Array | None, axis: int) -> jax.Array:
    z = x if t is None else x / t
    m, tau = max_and_threshold(z, axis, _entmax15_tau, lambda z, tau: 0.5 * z > tau)
    return jnp.maximum(0.5 * (z - m) - tau, 0) ** 2


@partial(_entmax15.defjvp, symbolic_zeros=True)
def _entmax15_jvp(axis, primals, tangents):
    x, t = primals
    p = _entmax15(x, t, axis)

    def tangent(p, t, x_dot, t_dot):
        # g = p^(2 - alpha) = sqrt(p); the inner where keeps higher derivatives finite at p = 0.
        # On the support z = 2 sqrt(p) + 2 tau.
        support = p > 0
        g = jnp.where(support, jnp.sqrt(jnp.where(support, p, 1)), 0) + 0 * p  # nan rows: nan
        return simplex_jvp(g, _masking.logit_tangent(x_dot, t, t_dot, 2 * g), axis)

    return p, _masking.output_jvp(tangent, p, t, *tangents)


def _psi(x: jax.Array) -> jax.Array:
    """``(exp(x) - 1 - x) / x^2`` for ``0 <= x < 1`` by its Taylor series, accurate to float64."""
    out = jnp.full_like(x, 1 / math.factorial(18))
    for n in range(15, -1, -1):
        out = out * x + 1 / math.factorial(n + 2)
    return out


def _dp_dalpha(p: jax.Array, g: jax.Array, log_p: jax.Array, d: jax.Array, axis: int) -> jax.Array:
    """Closed-form ``dp/dalpha`` of alpha-entmax, stable through alpha = 1 and alpha = 2.

    Correia et al. (2019) give ``dp/dalpha = (p - g_hat) / d^2 - (p log p - g_hat H) / d`` with
    ``d = alpha - 1``, ``g_hat = g / sum(g)`` and ``H = sum p log p``. Both terms are O(1/d) and
    cancel as d -> 0. Writing ``p_j^-d = 1 - d l_j + R_j d^2`` (``l = log p``) the cancellation is
    done by hand, leaving

      dp_j/dalpha = (p_j Rbar - pR_j - d (p_j l_j Rbar - H pR_j)) / sum(g),

    with ``pR_j = p_j R_j = p_j l_j^2 psi(-d l_j)``, ``psi(x) = (e^x - 1 - x) / x^2`` and
    ``Rbar = sum pR``. At d = 0 it is the softmax limit ``p (sum p l^2 - l^2) / 2``.
    """
    support = p > 0
    x = -d * log_p  # >= 0
    small = x < 1
    d_safe = jnp.where(d == 0, 1, d)
    p_r = jnp.where(
        small,
        p * log_p**2 * _psi(jnp.where(small, x, 0)),
        (g - p - p * x) / (d_safe * d_safe),
    )
    p_r = jnp.where(support, p_r, 0)
    r_bar = jnp.sum(p_r, axis=axis, keepdims=True)
    h = jnp.sum(p * log_p, axis=axis, keepdims=True)
    num = p * r_bar - p_r - d * (p * log_p * r_bar - h * p_r)
    return safe_divide(num, jnp.sum(g, axis=axis, keepdims=True))


def _entmax_forward(x, t, d, axis, max_iter):
    """alpha-entmax of ``x / t`` with ``d = alpha - 1`` (an array, or a Python number)."""
    z = x if t is None else x / t

    def solve(z, axis, init, d):
        return entmax_theta(z, d, axis, max_iter, init)[0]

    def in_support(z, theta, d):
        return 1 + d * (z - theta) > 0  # as in deformed_exp

    m, theta = max_and_threshold(z, axis, solve, in_support, (d,))
    p, _ = deformed_exp((z - m) - theta, d)
    # One renormalisation absorbs the solver's last rounding-level residual.
    return safe_divide(p, jnp.sum(p, axis=axis, keepdims=True))


def _g_and_log_p(p, d):
    """``g = p^(2 - alpha) = p^(1 - d)`` on the support (0 off it) and ``log p`` (0 off it)."""
    support = p > 0
    log_p = jnp.log(jnp.where(support, p, 1))
    # + 0 * p: nan in a nan row, where the support test is False.
    return jnp.where(support, jnp.exp((1 - d) * log_p), 0) + 0 * p, log_p


def _logit_jvp(g, log_p, d, t, x_dot, t_dot, axis):
    """The tangent of the output from those of ``x`` and ``t``."""
    # On the support z = (p^d - 1) / d + const, -> log p as d -> 0.
    phi = log_p * expm1_ratio(d * log_p)
    return simplex_jvp(g, _masking.logit_tangent(x_dot, t, t_dot, phi), axis)


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
@partial(jax.jit, static_argnums=(3, 4))
def _entmax(
    x: jax.Array, t: jax.Array | None, alpha: jax.Array, axis: int, max_iter: int
) -> jax.Array:
    return _entmax_forward(x, t, alpha - 1, axis, max_iter)


@partial(_entmax.defjvp, symbolic_zeros=True)
def _entmax_jvp(axis, max_iter, primals, tangents):
    x, t, alpha = primals
    x_dot, t_dot, alpha_dot = tangents
    p = _entmax(x, t, alpha, axis, max_iter)

    def tangent(p, t, alpha, x_dot, t_dot, alpha_dot):
        d = alpha - 1
        g, log_p = _g_and_log_p(p, d)
        terms = []
        if x_dot is not None or t_dot is not None:
            terms.append(_logit_jvp(g, log_p, d, t, x_dot, t_dot, axis))
        if alpha_dot is not None:
            terms.append(_dp_dalpha(p, g, log_p, d, axis) * alpha_dot)
        return sum(terms[1:], terms[0])

    return p, _masking.output_jvp(tangent, p, t, alpha, x_dot, t_dot, alpha_dot)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
@partial(jax.jit, static_argnums=(2, 3, 4))
def _entmax_fixed(x: jax.Array, t: jax.Array | None, d: float, axis: int, max_iter: int):
    """:func:`_entmax` for a Python-number ``alpha = 1 + d``, a compile-time constant.

    XLA then folds ``d`` into the solver, and ``d = 1/n`` (alpha = 1.25, 4/3, 1.2, ... as floats,
    1 + 1/n up to rounding) uses integer powers instead of ``exp`` and ``log``: 2-3x faster.
    """
    return _entmax_forward(x, t, d, axis, max_iter)


@partial(_entmax_fixed.defjvp, symbolic_zeros=True)
def _entmax_fixed_jvp(d, axis, max_iter, primals, tangents):
    x, t = primals
    p = _entmax_fixed(x, t, d, axis, max_iter)

    def tangent(p, t, x_dot, t_dot):
        return _logit_jvp(*_g_and_log_p(p, d), d, t, x_dot, t_dot, axis)

    return p, _masking.output_jvp(tangent, p, t, *tangents)


def alpha_parameter(name, alpha, shape, axis, dtype, max_iter, of="x"):
    """Checks ``alpha`` and ``max_iter``; returns the alpha array and the exact variant, if any.

    The exact variant ("softmax", "entmax15" or "sparsemax") is named for a Python-number alpha of
    1, 1.5 or 2. A traced alpha that is not finite and >= 1 has no entmax: its rows get
    alpha = nan (the solver then gives nan rows at once) rather than something silently wrong.
    """
    a, invalid = _masking.row_parameter(
        name, "alpha", alpha, shape, axis, dtype, _masking.AT_LEAST_ONE, of
    )
    if operator.index(max_iter) < 1:
        raise ValueError(f"{name}: max_iter must be >= 1, got {max_iter}.")
    exact = None
    if isinstance(alpha, (int, float)):
        exact = {1: "softmax", 1.5: "entmax15", 2: "sparsemax"}.get(alpha)
    return a if invalid is None else jnp.where(invalid, jnp.nan, a), exact


def entmax15(
    x: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Exact 1.5-entmax: sparse like sparsemax, smooth like softmax.

    .. math::

      \mathrm{entmax}_{1.5}(z) = \arg\max_{p \in \Delta} \langle p, z\rangle + H_{1.5}(p)
      = [z / 2 - \tau]_+^2, \qquad \textstyle\sum_j [z_j / 2 - \tau]_+^2 = 1,

    with ``z = x / T`` and Tsallis entropy ``H_{1.5}(p) = 4 (1 - \sum_j p_j^{1.5}) / 3``. The
    support is found sort-free (safeguarded Newton) and ``tau`` is then computed in closed form on
    it, so the result is exact to float rounding.

    Args:
      x: logits, a floating-point array.
      axis: the axis along which the probabilities sum to 1.
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
      >>> import smvariants
      >>> smvariants.entmax15(jnp.array([1.0, 2.0, 3.0]))
      Array([0.        , 0.16928107, 0.8307189 ], dtype=float32)

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    args = _masking.prepare("entmax15", x, axis, where, temperature)
    return args.finish(_entmax15(args.x, args.t, args.axis))


def entmax(
    x: ArrayLike,
    alpha: chex.Numeric = 1.5,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
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
    ``dp/dalpha`` is closed form (Correia et al., 2019), evaluated without cancellation near 1.

    Args:
      x: logits, a floating-point array.
      alpha: a finite number >= 1, or an array broadcastable to ``x`` with ``axis`` kept as size 1
        (per-row or per-head alpha). Differentiable. A Python number is compiled into the solver
        (faster: 1, 1.5 and 2 are exact closed forms, 1 + 1/n uses integer powers); pass an array
        to learn alpha or to vary it without recompiling.
      axis: the axis along which the probabilities sum to 1.
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
      ``alpha = 4`` and 1e-2 at ``alpha = 5`` (about 1e-7 for ``alpha <= 2``), so float64 is
      advised for large ``alpha``. A row with no unmasked entry gives all zeros; a row that
      contains ``nan`` or ``+inf`` gives ``nan`` in that row only.

    Examples:
      >>> import jax.numpy as jnp
      >>> import smvariants
      >>> x = jnp.array([1.0, 2.0, 3.0])
      >>> smvariants.entmax(x, alpha=1.25).round(4)
      Array([0.0345, 0.2148, 0.7507], dtype=float32)
      >>> smvariants.entmax(x, alpha=jnp.array([1.5])).round(4)  # array alpha: general path
      Array([0.        , 0.16929999, 0.8307    ], dtype=float32)

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.

      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    args = _masking.prepare("entmax", x, axis, where, temperature)
    a, exact = alpha_parameter("entmax", alpha, args.x.shape, args.axis, args.x.dtype, max_iter)
    if exact is not None:
        core = {"softmax": _softmax, "entmax15": _entmax15, "sparsemax": _sparsemax}[exact]
        return args.finish(core(args.x, args.t, args.axis))
    max_iter = operator.index(max_iter)
    if isinstance(alpha, (int, float)):
        return args.finish(_entmax_fixed(args.x, args.t, alpha - 1.0, args.axis, max_iter))
    return args.finish(_entmax(args.x, args.t, a, args.axis, max_iter))
