r"""Fenchel-Young losses, one per normalizer.

For the Tsallis regulariser :math:`\Omega = -H_\alpha` restricted to the simplex, the Fenchel-Young
loss of logits ``z`` against a target distribution ``y`` is

.. math::

  L(z; y) = \Omega^*(z) + \Omega(y) - \langle z, y\rangle
          = \langle z, p - y\rangle + H_\alpha(p) - H_\alpha(y), \qquad
  p = \mathrm{entmax}_\alpha(z),

which is >= 0, zero exactly when ``p == y``, finite where ``p`` has exact zeros (unlike the
cross-entropy of a sparse output), and has gradient ``p - y`` in ``z``. alpha = 1 is the softmax
cross-entropy, alpha = 2 the sparsemax loss.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from smvariants import _masking
from smvariants._entmax import _entmax
from smvariants._entmax import _entmax15
from smvariants._entmax import alpha_parameter
from smvariants._softmax import _softmax
from smvariants._sparsemax import _sparsemax
from smvariants._threshold import shift_rows
from smvariants.stats import tsallis

__all__ = ("entmax15_loss", "entmax_loss", "softmax_loss", "sparsemax_loss")

# Static variant -> (normalizer core, alpha of its entropy). "entmax" takes alpha as an array.
_CORES = {
    "softmax": (lambda z, a, axis, max_iter: _softmax(z, axis), 1.0),
    "sparsemax": (lambda z, a, axis, max_iter: _sparsemax(z, axis), 2.0),
    "entmax15": (lambda z, a, axis, max_iter: _entmax15(z, axis), 1.5),
    "entmax": (_entmax, None),
}


def _loss_and_prediction(z, y, alpha, axis, variant, max_iter):
    normalize, _ = _CORES[variant]
    p = normalize(z, alpha, axis, max_iter)
    # The shift cancels in <z, p - y> (both sum to 1) and keeps the products small; masked
    # entries (-inf) carry no mass in p or y and are zeroed before any product.
    shifted = shift_rows(z, axis)
    zs = jnp.where(z == -jnp.inf, 0, shifted)
    if variant == "softmax":
        # Omega*(z) = logsumexp(z): exact, rather than <z, p> + H(p) from a rounded p.
        lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))
        loss = lse - jnp.sum(zs * y, axis=axis, keepdims=True) - tsallis(y, alpha, axis)
    else:
        loss = jnp.sum(zs * (p - y), axis=axis, keepdims=True)
        loss = loss + tsallis(p, alpha, axis) - tsallis(y, alpha, axis)
    # Rounding can leave a tiny negative value where p == y; the loss is >= 0.
    return jnp.maximum(loss, 0), p


@partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _fy_loss(z, y, alpha, axis, variant, max_iter):
    return _loss_and_prediction(z, y, alpha, axis, variant, max_iter)[0]


@partial(_fy_loss.defjvp, symbolic_zeros=True)
def _fy_loss_jvp(axis, variant, max_iter, primals, tangents):
    z, y, alpha = primals
    z_dot, _, alpha_dot = tangents  # labels are constants (stop_gradient in the public API)
    loss, p = _loss_and_prediction(z, y, alpha, axis, variant, max_iter)
    loss_dot = jnp.zeros_like(loss)
    if not isinstance(z_dot, SymbolicZero):
        # dL/dz = p - y; masked entries have p = y = 0 and a zero tangent.
        loss_dot = loss_dot + jnp.sum((p - y) * z_dot, axis=axis, keepdims=True)
    if not isinstance(alpha_dot, SymbolicZero):
        # Envelope theorem: dL/dalpha = dH_alpha(p)/dalpha - dH_alpha(y)/dalpha at fixed p, y.
        def entropy_gap(a):
            return tsallis(p, a, axis) - tsallis(y, a, axis)

        loss_dot = loss_dot + jax.jvp(entropy_gap, (alpha,), (alpha_dot,))[1]
    return loss, loss_dot


def _labels_as_distribution(name, labels, z, axis):
    """Integer class ids or probability vectors -> ``(y, bad_rows)`` in ``z``'s dtype."""
    labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
    k = z.shape[axis]
    row_shape = z.shape[:axis] + z.shape[axis + 1 :]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != row_shape:
            raise ValueError(
                f"{name}: integer labels must have the logits' shape without axis {axis}, "
                f"{row_shape}, got {labels.shape}."
            )
        if _masking.is_concrete(labels):
            ids = np.asarray(labels)
            if ids.size and (ids.min() < 0 or ids.max() >= k):
                bad = ids[(ids < 0) | (ids >= k)][:3]
                raise ValueError(f"{name}: labels must be class ids in [0, {k}), got {bad}.")
        y = jax.nn.one_hot(labels, k, dtype=z.dtype, axis=axis)
        bad = jnp.expand_dims((labels < 0) | (labels >= k), axis)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != z.shape:
            raise ValueError(
                f"{name}: probability labels must have the logits' shape {z.shape}, "
                f"got {labels.shape}."
            )
        y = labels.astype(z.dtype)
        bad = jnp.zeros(z.shape[:axis] + (1,) + z.shape[axis + 1 :], bool)
    else:
        raise TypeError(f"{name}: labels must be integer class ids or floats, got {labels.dtype}.")
    on_masked = jnp.any((y != 0) & (z == -jnp.inf), axis=axis, keepdims=True)
    if _masking.is_concrete(on_masked) and np.any(np.asarray(on_masked)):
        raise ValueError(f"{name}: labels put probability on masked (or -inf) entries.")
    return jax.lax.stop_gradient(y), bad | on_masked


def _loss(name, variant, logits, labels, alpha, axis, where, temperature, max_iter):
    z, axis, dtype = _masking.prepare(name, logits, axis, where, temperature)
    y, bad = _labels_as_distribution(name, labels, z, axis)
    loss = _fy_loss(z, y, alpha, axis, variant, max_iter)
    # Invalid labels that could not be checked at trace time give nan, never a wrong number.
    return jnp.where(bad, jnp.nan, loss).squeeze(axis).astype(dtype)


_SHARED_DOC = """
    Args:
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target
        distributions (one-hot or soft) of ``logits.shape``. Labels are constants: no gradient
        flows to them.
      {alpha}axis: the class axis.
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked.
      temperature: a positive float, or an array broadcastable to ``logits`` with ``axis`` kept as
        size 1; the loss is that of ``logits / temperature``. Differentiable.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: outside ``jit``, for class ids out of range or labels that put mass on a masked
        entry. Inside ``jit`` these cannot be checked: the loss of those examples is ``nan``.
"""


_ALPHA_DOC = """alpha: a number >= 1, or an array broadcastable to ``logits`` with ``axis`` kept
        as size 1 (per-row alpha). Differentiable (a learnable alpha).
      """


def _doc(fn, alpha=""):
    fn.__doc__ = fn.__doc__.replace("{shared}", _SHARED_DOC.format(alpha=alpha).strip("\n"))
    return fn


@_doc
def softmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Softmax cross-entropy, the Fenchel-Young loss of Shannon entropy.

    .. math::

      L(z; y) = \log \sum_j e^{z_j} - \langle z, y\rangle - H_1(y), \qquad z = x / T,

    i.e. ``optax.softmax_cross_entropy`` of ``logits / temperature`` minus the (constant) entropy
    of the labels, so that the loss is 0 exactly when ``softmax(z) == y``. For one-hot labels the
    two are equal. Gradient: ``(softmax(z) - y) / T``.

    {shared}

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import losses
      >>> logits = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
      >>> losses.softmax_loss(logits, jnp.array([2, 0]))
      Array([0.40760595, 2.407606  ], dtype=float32)

    References:
      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.
    """
    alpha = jnp.asarray(1.0, _masking.compute_dtype(jnp.result_type(logits)))
    return _loss("softmax_loss", "softmax", logits, labels, alpha, axis, where, temperature, None)


@_doc
def sparsemax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""Sparsemax loss, the Fenchel-Young loss of the Gini entropy (alpha = 2).

    .. math::

      L(z; y) = \langle z, p - y\rangle + \tfrac12 (\|y\|^2 - \|p\|^2), \qquad
      p = \mathrm{sparsemax}(z),\ z = x / T.

    Equal to ``optax.losses.multiclass_sparsemax_loss`` for integer labels. Finite and
    informative even where the prediction has exact zeros. Gradient: ``(p - y) / T``.

    {shared}

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import losses
      >>> losses.sparsemax_loss(jnp.array([[0.5, 0.1, -2.0]]), jnp.array([0]))
      Array([0.08999998], dtype=float32)

    References:
      Martins & Astudillo, `From Softmax to Sparsemax
      <https://arxiv.org/abs/1602.02068>`_, 2016.
    """
    alpha = jnp.asarray(2.0, _masking.compute_dtype(jnp.result_type(logits)))
    return _loss(
        "sparsemax_loss", "sparsemax", logits, labels, alpha, axis, where, temperature, None
    )


@_doc
def entmax15_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
) -> jax.Array:
    r"""1.5-entmax loss, the Fenchel-Young loss of the Tsallis 1.5-entropy.

    .. math::

      L(z; y) = \langle z, p - y\rangle + H_{1.5}(p) - H_{1.5}(y), \qquad
      p = \mathrm{entmax}_{1.5}(z),\ H_{1.5}(p) = \tfrac43 (1 - \textstyle\sum_j p_j^{1.5}).

    Gradient: ``(p - y) / T``.

    {shared}

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import losses
      >>> print(losses.entmax15_loss(jnp.array([[0.0, 5.0]]), jnp.array([1])))
      [0.]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    alpha = jnp.asarray(1.5, _masking.compute_dtype(jnp.result_type(logits)))
    return _loss("entmax15_loss", "entmax15", logits, labels, alpha, axis, where, temperature, None)


@partial(_doc, alpha=_ALPHA_DOC)
def entmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: chex.Numeric = 1.5,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: chex.Numeric = 1.0,
    *,
    max_iter: int = 64,
) -> jax.Array:
    r"""alpha-entmax loss, the Fenchel-Young loss of the Tsallis alpha-entropy, any alpha >= 1.

    .. math::

      L(z; y) = \langle z, p - y\rangle + H_\alpha(p) - H_\alpha(y), \qquad
      p = \mathrm{entmax}_\alpha(z),\ z = x / T.

    alpha = 1 is :func:`softmax_loss`, 1.5 :func:`entmax15_loss`, 2 :func:`sparsemax_loss` (a
    Python number of those values uses them). Gradient in the logits: ``(p - y) / T``; in alpha,
    ``dH_alpha(p)/dalpha - dH_alpha(y)/dalpha`` (envelope theorem), stable through alpha = 1.
    ``max_iter`` bounds the solver as in :func:`smvariants.entmax`.

    {shared}

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import losses
      >>> logits = jnp.array([[1.0, 2.0, 3.0]])
      >>> print(losses.entmax_loss(logits, jnp.array([2]), alpha=1.25).round(4))
      [0.1646]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.

      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    logits = _masking.check_float("entmax_loss", "logits", logits)
    dtype = _masking.compute_dtype(logits.dtype)
    axis_ = _masking.canonical_axis("entmax_loss", axis, logits.ndim)
    a, exact = alpha_parameter("entmax_loss", alpha, logits.shape, axis_, dtype, max_iter)
    variant = exact or "entmax"
    return _loss("entmax_loss", variant, logits, labels, a, axis, where, temperature, max_iter)
