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
from smvariants._entmax import _entmax_fixed
from smvariants._entmax import alpha_parameter
from smvariants._softmax import _softmax
from smvariants._sparsemax import _sparsemax
from smvariants._threshold import shift_rows
from smvariants.stats import tsallis

__all__ = ("entmax15_loss", "entmax_loss", "softmax_loss", "sparsemax_loss")

# variant -> (normalizer core on logits already divided by the temperature, alpha of its entropy;
# None: "entmax" takes the caller's alpha, as an array).
_CORES = {
    "softmax": (lambda z, a, axis, max_iter: _softmax(z, None, axis), 1.0),
    "sparsemax": (lambda z, a, axis, max_iter: _sparsemax(z, None, axis), 2.0),
    "entmax15": (lambda z, a, axis, max_iter: _entmax15(z, None, axis), 1.5),
    "entmax": (lambda z, a, axis, max_iter: _entmax(z, None, a, axis, max_iter), None),
}


def _divide(x, t):
    """``x / t``, with masked (``-inf``) entries kept out of the derivative in ``t``.

    ``d(x / t)/dt = -x / t^2`` is infinite there and would turn rows of second derivatives into
    ``nan``.
    """
    if t is None:
        return x
    masked = x == -jnp.inf
    return jnp.where(masked, -jnp.inf, jnp.where(masked, 0, x) / t)


def _loss_and_prediction(x, t, y, alpha, axis, variant, max_iter):
    """The loss of ``z = x / t`` (keeping ``axis``), the prediction ``p`` and ``zs``.

    ``zs`` is ``z`` shifted by its row maximum, with 0 at masked entries.
    """
    z = _divide(x, t)
    if isinstance(variant, tuple):  # ("entmax", d): a Python-number alpha = 1 + d, compiled in
        p = _entmax_fixed(z, None, variant[1], axis, max_iter)
    else:
        p = _CORES[variant][0](z, alpha, axis, max_iter)
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
    return jnp.maximum(loss, 0), p, zs


@partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _fy_loss(x, t, y, alpha, axis, variant, max_iter):
    return _loss_and_prediction(x, t, y, alpha, axis, variant, max_iter)[0]


@partial(_fy_loss.defjvp, symbolic_zeros=True)
def _fy_loss_jvp(axis, variant, max_iter, primals, tangents):
    x, t, y, alpha = primals
    x_dot, t_dot, _, alpha_dot = tangents  # labels are constants (stop_gradient in the public API)
    loss, p, zs = _loss_and_prediction(x, t, y, alpha, axis, variant, max_iter)
    loss_dot = jnp.zeros_like(loss)
    if not isinstance(x_dot, SymbolicZero):
        # dL/dz = p - y; masked entries have p = y = 0 and a zero tangent.
        dot = jnp.sum((p - y) * x_dot, axis=axis, keepdims=True)
        loss_dot = loss_dot + (dot if t is None else dot / t)
    if t is not None and not isinstance(t_dot, SymbolicZero):
        # dz/dt = -z / t: only a per-row inner product is kept for the backward pass.
        loss_dot = loss_dot - jnp.sum((p - y) * zs, axis=axis, keepdims=True) / t * t_dot
    if not isinstance(alpha_dot, SymbolicZero):
        # Envelope theorem: dL/dalpha = dH_alpha(p)/dalpha - dH_alpha(y)/dalpha at fixed p, y.
        def entropy_gap(a):
            return tsallis(p, a, axis) - tsallis(y, a, axis)

        loss_dot = loss_dot + jax.jvp(entropy_gap, (alpha,), (alpha_dot,))[1]
    return loss, loss_dot


def _labels_as_distribution(name, labels, z, axis):
    """Integer class ids or probability vectors -> ``(y, bad_rows)`` in ``z``'s dtype."""
    # The values, if known at trace time: taken before the conversion, which traces under jit
    # (and after a first one, which turns a malformed list into a TypeError).
    concrete = _masking.is_concrete(labels)
    array = _masking.as_array(name, "labels", labels)
    known = np.asarray(labels) if concrete else None
    labels = array
    k = z.shape[axis]
    row_shape = z.shape[:axis] + z.shape[axis + 1 :]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != row_shape:
            raise ValueError(
                f"{name}: integer labels must have the logits' shape without axis {axis}, "
                f"{row_shape}, got {labels.shape}."
            )
        if known is not None and known.size and (known.min() < 0 or known.max() >= k):
            bad = known[(known < 0) | (known >= k)][:3]
            raise ValueError(f"{name}: labels must be class ids in [0, {k}), got {bad}.")
        y = jax.nn.one_hot(labels, k, dtype=z.dtype, axis=axis)
        bad = jnp.expand_dims((labels < 0) | (labels >= k), axis)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != z.shape:
            raise ValueError(
                f"{name}: probability labels must have the logits' shape {z.shape}, "
                f"got {labels.shape}."
            )
        # An all-zero label is the padding of a fully masked row, and wrong anywhere else.
        empty = jnp.all(z == -jnp.inf, axis=axis, keepdims=True)
        if known is not None:
            known_empty = np.asarray(empty) if _masking.is_concrete(empty) else None
            _check_distributions(name, known, labels.dtype, axis, known_empty)
        y = labels.astype(z.dtype)
        bad = ~empty & (jnp.sum(y, axis=axis, keepdims=True) == 0)
    else:
        raise TypeError(f"{name}: labels must be integer class ids or floats, got {labels.dtype}.")
    on_masked = jnp.any((y != 0) & (z == -jnp.inf), axis=axis, keepdims=True)
    if _masking.is_concrete(on_masked) and np.any(np.asarray(on_masked)):
        raise ValueError(f"{name}: labels put probability on masked (or -inf) entries.")
    return jax.lax.stop_gradient(y), bad | on_masked


def _check_distributions(name, labels, dtype, axis, empty):
    """Raises ``ValueError`` unless each row of the NumPy ``labels`` is a distribution.

    A row of zeros is accepted where ``empty`` (fully masked rows, ``axis`` kept) is True, or
    everywhere if ``empty`` is ``None`` (unknown: the loss flags the others as ``nan``).
    """
    y = labels.astype(np.float64)
    if not np.all(y >= 0):  # also catches nan
        raise ValueError(f"{name}: probability labels must be >= 0, got {y[~(y >= 0)][:3]}.")
    # Rounding each entry to the labels' dtype moves the sum by at most its eps.
    tol = max(1e-3, float(jnp.finfo(dtype).eps))
    sums = y.sum(axis)
    padding = (sums == 0) & (True if empty is None else np.squeeze(empty, axis))
    off = ~(np.abs(sums - 1) <= tol) & ~padding
    if np.any(off):
        raise ValueError(
            f"{name}: probability labels must sum to 1 along axis {axis} (to {tol:.0e}), "
            f"got sums {sums[off][:3]}."
        )


def _loss(name, variant, logits, labels, axis, where, temperature, alpha=None, max_iter=None):
    args = _masking.prepare(name, logits, axis, where, temperature, arg="logits")
    x, axis = args.x, args.axis
    _, fixed_alpha = _CORES[variant]
    if fixed_alpha is None:
        number = alpha if isinstance(alpha, (int, float)) else None
        alpha, exact = alpha_parameter(name, alpha, x.shape, axis, x.dtype, max_iter, "logits")
        if exact is not None:
            variant = exact
        elif number is not None:
            variant = (variant, number - 1.0)  # as entmax does: alpha compiled into the solver
    else:
        alpha = jnp.asarray(fixed_alpha, x.dtype)
    y, bad = _labels_as_distribution(name, labels, x, axis)
    loss = _fy_loss(x, args.t, y, alpha, axis, variant, max_iter)
    # Invalid labels that could not be checked at trace time give nan, never a wrong number.
    return args.finish(jnp.where(bad, jnp.nan, loss)).squeeze(axis)


_SHARED_DOC = """
    Args:
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target
        distributions (one-hot or soft) of ``logits.shape``: entries >= 0 that sum to 1 along
        ``axis`` (to 1e-3, or the labels' dtype's eps if larger); all zeros for a fully masked
        (padding) row, whose loss is 0. Labels are constants: no gradient flows to them.
      {alpha}axis: the class axis.
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid {params}, when they are known at trace
        time (outside ``jit``, or constants under it). Traced values cannot be checked: the loss
        of an example with such a class id, masked mass, an all-zero label on a row that is not
        fully masked, or {params} is ``nan``; other soft labels are used as given (a row that is
        not a distribution gives a number that is not a Fenchel-Young loss, clamped at 0).
"""


_ALPHA_DOC = """alpha: a finite number >= 1, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1 (per-row alpha). Differentiable (a learnable alpha).
      """


def _doc(fn, alpha=""):
    params = "temperature or alpha" if alpha else "temperature"
    shared = _SHARED_DOC.format(alpha=alpha, params=params)
    fn.__doc__ = fn.__doc__.replace("{shared}", shared.strip("\n"))
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
    return _loss("softmax_loss", "softmax", logits, labels, axis, where, temperature)


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
    return _loss("sparsemax_loss", "sparsemax", logits, labels, axis, where, temperature)


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
    return _loss("entmax15_loss", "entmax15", logits, labels, axis, where, temperature)


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
    return _loss("entmax_loss", "entmax", logits, labels, axis, where, temperature, alpha, max_iter)
