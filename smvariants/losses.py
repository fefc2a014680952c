r"""Fenchel-Young losses, one per variant, all derived from the variant table.

For a variant ``p = argmax_{p in C} <p, z> - Omega(p)`` the Fenchel-Young loss of logits ``z``
against a target ``y`` in ``C`` is

.. math::

  L(z; y) = \Omega^*(z) + \Omega(y) - \langle z, y\rangle
          = \langle z, p - y\rangle - \Omega(p) + \Omega(y),

which is >= 0, zero exactly when ``p == y``, finite where ``p`` has exact zeros (unlike the
cross-entropy of a sparse output), and has gradient ``p - y`` in ``z``. For the Tsallis
regulariser ``Omega = -H_alpha`` alpha = 1 is the softmax cross-entropy (up to the labels'
entropy) and alpha = 2 the sparsemax loss. :func:`make_fenchel_young_loss` gives the loss of any
variant by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from smvariants import _args
from smvariants import _variants
from smvariants._numerics import row_max
from smvariants._solvers import scale

__all__ = (
    "budget_sparsemax_loss",
    "entmax15_loss",
    "entmax_loss",
    "make_fenchel_young_loss",
    "normmax_loss",
    "softmax_loss",
    "sparsemax_loss",
)

Numeric = float | int | ArrayLike


def _loss_and_prediction(x, t, y, ignored, arrays, axis, name, statics):
    """The loss of ``z = x / t`` (keeping ``axis``), the prediction ``p`` and ``zs``.

    ``zs`` is ``z`` shifted by its row maximum, with 0 at masked entries: the shift cancels in
    ``<z, p - y>`` (both sum to the same total) and keeps the products small. The ``ignored``
    rows' logits are not read (zeros instead): ``nan`` or ``inf`` there would reach derivatives
    of every order through their zero weights (``0 * nan`` is ``nan``). Here, inside the custom
    derivative, the select saves nothing for the backward pass.
    """
    v = _variants.VARIANTS[name]
    x = jnp.where(ignored, jnp.zeros((), x.dtype), x)
    params = _variants.merge_params(arrays, statics)
    p = _variants.CORES[name](x, t, arrays, axis, statics)
    m = row_max(x, axis)
    # Masked: -inf, or beyond the float range once shifted and divided by t (the normalizers
    # mask it too: p = 0). Such entries are replaced before the division: d(x / t)/dt is
    # infinite there, and would turn derivatives in t into nan (and -inf * 0 the loss).
    masked = _off(x, m, t)
    zs = jnp.where(masked, 0, scale(jnp.where(masked, m, x), m, t))
    omega_y = v.regulariser(y, axis, *params)
    if v.conjugate is not None:
        # Omega*(z) exactly (softmax: logsumexp), rather than <z, p> - Omega(p) from a rounded p.
        z = jnp.where(masked, -jnp.inf, zs)
        loss = v.conjugate(z, axis, *params) - jnp.sum(zs * y, axis=axis, keepdims=True) + omega_y
    else:
        loss = jnp.sum(zs * (p - y), axis=axis, keepdims=True)
        loss = loss - v.regulariser(p, axis, *params) + omega_y
    # Rounding can leave a tiny negative value where p == y; the loss is >= 0.
    return jnp.maximum(loss, 0), p, zs


def _off(x, m, t):
    """The entries that the normalizers mask: those where ``(x - m) / t`` is ``-inf``.

    ``x`` masked, or so far below the row maximum ``m`` that the float range ends first.
    """
    return scale(x, m, t) == -jnp.inf


@partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def _fy_loss(x, t, y, ignored, arrays, axis, name, statics):
    return _loss_and_prediction(x, t, y, ignored, arrays, axis, name, statics)[0]


@partial(_fy_loss.defjvp, symbolic_zeros=True)
def _fy_loss_jvp(axis, name, statics, primals, tangents):
    """The loss's derivatives: ``p - y`` in ``z``, and 0 in the ``ignored`` rows.

    The caller sets those rows' loss to 0; their derivatives are 0 here also where their logits
    hold ``nan`` (0 * nan would be ``nan``).
    """
    x, t, y, ignored, arrays = primals
    x_dot, t_dot, _, _, arrays_dot = _variants.nonzero_tangents(
        tuple(tangents)
    )  # labels and the ignored rows are constants
    loss, p, zs = _loss_and_prediction(x, t, y, ignored, arrays, axis, name, statics)
    residual = jnp.where(ignored, 0, p - y)
    loss_dot = jnp.zeros_like(loss)
    if x_dot is not None:
        # dL/dz = p - y; masked entries have p = y = 0 and a zero tangent.
        dot = jnp.sum(residual * x_dot, axis=axis, keepdims=True)
        loss_dot = loss_dot + (dot if t is None else dot / t)
    if t is not None and t_dot is not None:
        # dz/dt = -z / t: only a per-row inner product is kept for the backward pass.
        inner = jnp.sum(jnp.where(ignored, 0, (p - y) * zs), axis=axis, keepdims=True)
        loss_dot = loss_dot - inner / t * t_dot
    if any(a is not None for a in arrays_dot):
        # Envelope theorem: dL/dparam = d(Omega(y) - Omega(p))/dparam at fixed p and y.
        v = _variants.VARIANTS[name]

        def gap(arrays):
            params = _variants.merge_params(arrays, statics)
            return v.regulariser(y, axis, *params) - v.regulariser(p, axis, *params)

        zero = [
            jnp.zeros_like(a) if d is None else d for a, d in zip(arrays, arrays_dot, strict=True)
        ]
        loss_dot = loss_dot + jnp.where(ignored, 0, jax.jvp(gap, (arrays,), (tuple(zero),))[1])
    return loss, loss_dot


def _labels(name, labels, z, rows, total, capped, ignore_index):
    """Integer class ids or target vectors -> ``(y, bad, ignored)`` in ``z``'s dtype.

    ``z`` are the logits arranged by ``rows`` (an ``_args.Layout``), with their rows along
    ``rows.axis``; the labels are given in the caller's layout (integer ids of a tuple axis: flat
    indices into the reduced axes) and returned arranged. ``bad`` flags rows whose labels are
    invalid but could not be checked at trace time (they get ``nan``); ``ignored`` the rows whose
    loss is 0 with zero gradient: those whose class id is ``ignore_index``, and the padding,
    fully masked rows (whatever their label: the regulariser at a one-hot label is not 0 for
    every variant, normmax's is 1).
    """
    # The values, if known at trace time: taken before the conversion, which traces under jit
    # (and after a first one, which turns a malformed list into a TypeError).
    concrete = _args.is_concrete(labels)
    array = _args.as_array(name, "labels", labels)
    known = np.asarray(labels) if concrete else None
    axis = rows.axis
    k = z.shape[axis]
    row_shape = rows.row_ids_shape
    empty = jnp.all(z == -jnp.inf, axis=axis, keepdims=True)  # fully masked: padding
    ignored = None
    if jnp.issubdtype(array.dtype, jnp.integer):
        if total is not None:
            raise TypeError(
                f"{name}: labels must be multi-hot or soft target vectors of the logits' shape "
                "(integer class ids sum to 1, not to the budget)."
            )
        if array.shape != row_shape:
            raise ValueError(
                f"{name}: integer labels must have the logits' shape without {rows.text}, "
                f"{row_shape}, got {array.shape}."
            )
        # Ids are widened to the widest signed integer: in int8/uint8/int16 the one-hot's class
        # index (in the labels' dtype) and the comparisons with ``k`` and ``ignore_index`` wrap
        # around; unsigned ids that do not fit become negative, out of range as they were.
        wide = jax.dtypes.canonicalize_dtype(jnp.int64)
        array = rows.arrange_rows(array.astype(wide))
        known = None if known is None else rows.arrange_rows(known.astype(np.int64))
        if ignore_index is not None:
            ignored = jnp.expand_dims(array == ignore_index, axis)
            array = jnp.where(array == ignore_index, 0, array)
            if known is not None:
                known = np.where(known == ignore_index, 0, known)
        if known is not None:
            out_of_range = (known < 0) | (known >= k)
            if _args.is_concrete(empty):  # a padding row's id is not used
                out_of_range &= ~np.squeeze(np.asarray(empty), axis)
            if np.any(out_of_range):
                bad = known[out_of_range][:3]
                flat = "" if len(rows.axes) == 1 else f" (flat indices into {rows.text})"
                raise ValueError(f"{name}: labels must be class ids in [0, {k}){flat}, got {bad}.")
        y = jax.nn.one_hot(array, k, dtype=z.dtype, axis=axis)
        bad = jnp.expand_dims((array < 0) | (array >= k), axis)
    elif jnp.issubdtype(array.dtype, jnp.floating):
        if ignore_index is not None:
            raise ValueError(
                f"{name}: ignore_index applies to integer class ids, not to probability labels "
                "(a row of zeros on a fully masked row is padding)."
            )
        if array.shape != rows.shape:
            raise ValueError(
                f"{name}: probability labels must have the logits' shape {rows.shape}, "
                f"got {array.shape}."
            )
        array = rows.arrange(array)
        known = None if known is None else rows.arrange(known)
        y = array.astype(z.dtype)
        sums = jnp.sum(y, axis=axis, keepdims=True)
        expected = 1 if total is None else total
        # Rounding each entry to the labels' dtype moves the sum by at most its eps per unit.
        tol = max(1e-3, float(jnp.finfo(array.dtype).eps))
        scaled_tol = tol * jnp.maximum(expected, 1)
        ok = (jnp.abs(sums - expected) <= scaled_tol) & jnp.all(y >= 0, axis=axis, keepdims=True)
        if capped:
            ok = ok & jnp.all(y <= 1 + tol, axis=axis, keepdims=True)
        # An all-zero label is the padding of a fully masked row, and wrong anywhere else.
        bad = ~ok & ~(empty & (sums == 0))
        if known is not None and _args.is_concrete(expected):
            # Where the logits are traced, a row of zeros may be padding: flagged, not raised.
            padding = np.asarray(empty) if _args.is_concrete(empty) else None
            _check_targets(name, known, rows, tol, padding, np.asarray(expected), capped)
    else:
        raise TypeError(f"{name}: labels must be integer class ids or floats, got {array.dtype}.")
    on_masked = jnp.any((y != 0) & (z == -jnp.inf), axis=axis, keepdims=True)
    if ignored is not None:
        on_masked = on_masked & ~ignored
    if _args.is_concrete(on_masked) and np.any(np.asarray(on_masked & ~empty)):
        raise ValueError(f"{name}: labels put probability on masked (or -inf) entries.")
    ignored = empty if ignored is None else ignored | empty
    return jax.lax.stop_gradient(y), (bad | on_masked) & ~empty, ignored


def _check_targets(name, labels, rows, tol, padding, expected, capped):
    """Raises ``ValueError`` unless each row of the NumPy ``labels`` is a valid target.

    Valid: entries >= 0 (and <= 1 if ``capped``) summing to ``expected`` (to ``tol`` per unit).
    ``padding`` flags the fully masked rows (``rows.axis`` kept), whose labels are not used and
    not checked; ``None`` where it is not known (traced logits): there a row of zeros may be
    padding, and passes. ``labels`` are arranged by ``rows`` (an ``_args.Layout``).
    """
    y = labels.astype(np.float64)
    sums = y.sum(rows.axis, keepdims=True)
    waived = np.zeros(sums.shape, bool) if padding is None else np.broadcast_to(padding, sums.shape)
    live = y[np.broadcast_to(~waived, y.shape)]
    if not np.all(live >= 0):  # also catches nan
        raise ValueError(f"{name}: probability labels must be >= 0, got {live[~(live >= 0)][:3]}.")
    if capped and not np.all(live <= 1 + tol):
        raise ValueError(f"{name}: target labels must be <= 1, got {live[~(live <= 1 + tol)][:3]}.")
    expected = np.broadcast_to(expected, sums.shape)
    off = ~(np.abs(sums - expected) <= tol * np.maximum(expected, 1)) & ~waived
    if padding is None:
        off &= sums != 0
    if np.any(off):
        target = "1" if not capped else "the budget"
        raise ValueError(
            f"{name}: probability labels must sum to {target} along {rows.text} (to {tol:.0e}), "
            f"got sums {sums[off][:3]}."
        )


def _smooth(y, z, axis, label_smoothing, total):
    """``(1 - s) y + s u``, ``u`` the uniform target over the unmasked entries of the row."""
    live = (z != -jnp.inf).astype(y.dtype)
    n = jnp.sum(live, axis=axis, keepdims=True)
    uniform = live * (1 if total is None else total) / jnp.maximum(n, 1)
    return (1 - label_smoothing) * y + label_smoothing * uniform


def _fenchel_young_loss(
    name: str,
    variant: str,
    logits: Any,
    labels: Any,
    axis: Any = -1,
    where: Any = None,
    temperature: Any = 1.0,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    **values: Any,
) -> jax.Array:
    """The Fenchel-Young loss of the table's ``variant``, checked as the public ``name``."""

    def run(logits, axis, labels, where, temperature, values):
        return _loss(
            name, variant, logits, labels, axis, where, temperature, ignore_index,
            label_smoothing, values,
        )  # fmt: skip

    return _args.auto_sharded(
        name, run, logits, axis, labels, where, temperature, values, per_row=True
    )


def _loss(
    name, variant, logits, labels, axis, where, temperature, ignore_index, label_smoothing, values
):
    """:func:`_fenchel_young_loss` (the mesh's explicit axes as auto ones)."""
    args = _args.prepare(name, logits, axis, where, temperature, arg="logits")
    x, axis = args.x, args.axis
    v, arrays, statics = _variants.parameters(
        name, _variants.VARIANTS[variant], values, x.shape, axis, x.dtype, "logits",
        axes=args.layout.text,
    )  # fmt: skip
    if ignore_index is not None:
        ignore_index = _args.check_int(name, "ignore_index", ignore_index, -(2**31))
    smoothing = _args.static_number(label_smoothing)  # also np.float32(0.1), a concrete array
    if smoothing is None:
        raise TypeError(
            f"{name}: label_smoothing must be a number known at trace time, got "
            f"{label_smoothing!r}."
        )
    if not 0 <= smoothing < 1:
        raise ValueError(
            f"{name}: label_smoothing must be a number in [0, 1), got {label_smoothing!r}."
        )
    label_smoothing = smoothing
    table = _variants.VARIANTS[variant]
    total: Any = None
    if table.label_sum is not None:
        # The labels' total (budget): fixed by the labels, so it is not differentiated here.
        raw = values.get(table.label_sum, table.params[0].default)
        if v is not table:  # an exact special case (budget 1: sparsemax)
            total = 1.0
        elif _args.is_concrete(raw):  # known at trace time: the labels are checked against it
            total = np.asarray(raw, x.dtype)
            total = total.reshape((1,) * (x.ndim - total.ndim) + total.shape)
        else:
            total = jax.lax.stop_gradient(_variants.merge_params(arrays, statics)[0])
    # The entries the normalizer masks (-inf, or -inf once divided by the temperature) for the
    # labels' checks and the smoothing: -inf where masked, 0 elsewhere.
    z = jnp.where(_off(x, row_max(x, axis), args.t), -jnp.inf, 0).astype(x.dtype)
    y, bad, ignored = _labels(name, labels, z, args.layout, total, table.capped, ignore_index)
    # Invalid labels that could not be checked at trace time give nan, never a wrong number: in
    # the loss and in every derivative (p - y, and the parameters').
    y = _args.nan_where(bad, y)
    if label_smoothing:
        y = _smooth(y, z, axis, label_smoothing, total)
    loss = _fy_loss(x, args.t, y, ignored, arrays, axis, v.name, statics)
    return args.finish_rows(jnp.where(ignored, 0, loss))  # loss 0 and gradient 0


def softmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Softmax cross-entropy, the Fenchel-Young loss of Shannon entropy.

    .. math::

      L(z; y) = \log \sum_j e^{z_j} - \langle z, y\rangle - H_1(y), \qquad z = x / T,

    that is ``optax.softmax_cross_entropy`` of ``logits / temperature`` minus the entropy of the
    labels ``H_1(y)``, so that the loss is 0 exactly when ``softmax(z) == y``. For one-hot labels
    (and integer class ids) the two are equal; for soft labels they differ by that entropy, a
    constant that does not change the gradient. Gradient: ``(softmax(z) - y) / T``.

    Args:
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target vectors of
        ``logits.shape`` (one-hot or soft): entries >= 0 that sum to 1 along ``axis`` (to 1e-3,
        or the labels' dtype's eps if larger). A row of zeros pads a fully masked row. Labels are
        constants: no gradient flows to them.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient, whatever its label.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      ignore_index: for integer labels, a class id that marks examples to skip: their loss is 0
        with zero gradient (a masked mean works under ``jit``); with probability labels, a
        ``ValueError``.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` uniform over the
        unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid temperature, when known at trace time.
        Traced values cannot be checked: the loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> logits = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
      >>> print(np.asarray(losses.softmax_loss(logits, jnp.array([2, 0]))).round(4))
      [0.4076 2.4076]

    References:
      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.
    """
    return _fenchel_young_loss(
        "softmax_loss", "softmax", logits, labels, axis, where, temperature,
        ignore_index=ignore_index, label_smoothing=label_smoothing,
    )  # fmt: skip


def sparsemax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Sparsemax loss, the Fenchel-Young loss of the Gini entropy (alpha = 2).

    .. math::

      L(z; y) = \langle z, p - y\rangle + \tfrac12 (\|y\|^2 - \|p\|^2), \qquad
      p = \mathrm{sparsemax}(z),\ z = x / T.

    Equal to ``optax.losses.multiclass_sparsemax_loss`` for integer labels. Finite and
    informative even where the prediction has exact zeros. Gradient: ``(p - y) / T``.

    Args:
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target vectors of
        ``logits.shape`` (one-hot or soft): entries >= 0 that sum to 1 along ``axis`` (to 1e-3,
        or the labels' dtype's eps if larger). A row of zeros pads a fully masked row. Labels are
        constants: no gradient flows to them.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient, whatever its label.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      ignore_index: for integer labels, a class id that marks examples to skip: their loss is 0
        with zero gradient (a masked mean works under ``jit``); with probability labels, a
        ``ValueError``.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` uniform over the
        unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid temperature, when known at trace time.
        Traced values cannot be checked: the loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> logits = jnp.array([[0.5, 0.1, -2.0]])
      >>> print(np.asarray(losses.sparsemax_loss(logits, jnp.array([0]))).round(4))
      [0.09]

    References:
      Martins & Astudillo, `From Softmax to Sparsemax
      <https://arxiv.org/abs/1602.02068>`_, 2016.
    """
    return _fenchel_young_loss(
        "sparsemax_loss", "sparsemax", logits, labels, axis, where, temperature,
        ignore_index=ignore_index, label_smoothing=label_smoothing,
    )  # fmt: skip


def entmax15_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""1.5-entmax loss, the Fenchel-Young loss of the Tsallis 1.5-entropy.

    .. math::

      L(z; y) = \langle z, p - y\rangle + H_{1.5}(p) - H_{1.5}(y), \qquad
      p = \mathrm{entmax}_{1.5}(z),\ H_{1.5}(p) = \tfrac43 (1 - \textstyle\sum_j p_j^{1.5}).

    Gradient: ``(p - y) / T``.

    Args:
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target vectors of
        ``logits.shape`` (one-hot or soft): entries >= 0 that sum to 1 along ``axis`` (to 1e-3,
        or the labels' dtype's eps if larger). A row of zeros pads a fully masked row. Labels are
        constants: no gradient flows to them.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient, whatever its label.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      ignore_index: for integer labels, a class id that marks examples to skip: their loss is 0
        with zero gradient (a masked mean works under ``jit``); with probability labels, a
        ``ValueError``.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` uniform over the
        unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid temperature, when known at trace time.
        Traced values cannot be checked: the loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> print(losses.entmax15_loss(jnp.array([[0.0, 5.0]]), jnp.array([1])))
      [0.]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.
    """
    return _fenchel_young_loss(
        "entmax15_loss", "entmax15", logits, labels, axis, where, temperature,
        ignore_index=ignore_index, label_smoothing=label_smoothing,
    )  # fmt: skip


def entmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: Numeric = 1.5,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""alpha-entmax loss, the Fenchel-Young loss of the Tsallis alpha-entropy, any alpha >= 1.

    .. math::

      L(z; y) = \langle z, p - y\rangle + H_\alpha(p) - H_\alpha(y), \qquad
      p = \mathrm{entmax}_\alpha(z),\ z = x / T.

    alpha = 1 is :func:`softmax_loss`, 1.5 :func:`entmax15_loss`, 2 :func:`sparsemax_loss` (a
    number of those values known at trace time uses them). Gradient in the logits:
    ``(p - y) / T``; in alpha, ``dH_alpha(p)/dalpha - dH_alpha(y)/dalpha`` (envelope theorem),
    stable through alpha = 1.

    Args:
      alpha: a finite number >= 1, or an array broadcastable to ``logits`` with ``axis`` kept as
        size 1 (per-row alpha). Differentiable (a learnable alpha).
      max_iter: bounds the solver as in :func:`smvariants.entmax`.
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target vectors of
        ``logits.shape`` (one-hot or soft): entries >= 0 that sum to 1 along ``axis`` (to 1e-3,
        or the labels' dtype's eps if larger). A row of zeros pads a fully masked row. Labels are
        constants: no gradient flows to them.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient, whatever its label.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      ignore_index: for integer labels, a class id that marks examples to skip: their loss is 0
        with zero gradient (a masked mean works under ``jit``); with probability labels, a
        ``ValueError``.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` uniform over the
        unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid temperature or alpha, when known at
        trace time. Traced values cannot be checked: the loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> logits = jnp.array([[1.0, 2.0, 3.0]])
      >>> print(np.asarray(losses.entmax_loss(logits, jnp.array([2]), alpha=1.25)).round(4))
      [0.1646]

    References:
      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.

      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    return _fenchel_young_loss(
        "entmax_loss", "entmax", logits, labels, axis, where, temperature,
        ignore_index=ignore_index, label_smoothing=label_smoothing, alpha=alpha, max_iter=max_iter,
    )  # fmt: skip


def normmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: Numeric = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Normmax loss, the Fenchel-Young loss of the norm entropy ``H(p) = 1 - ||p||_alpha``.

    .. math::

      L(z; y) = \langle z, p - y\rangle - \|p\|_\alpha + \|y\|_\alpha, \qquad
      p = \mathrm{normmax}_\alpha(z),\ z = x / T.

    Gradient in the logits: ``(p - y) / T``; in alpha, ``d(||y||_alpha - ||p||_alpha)/dalpha``
    at fixed ``p`` (envelope theorem).

    Args:
      alpha: a finite number > 1, or an array broadcastable to ``logits`` with ``axis`` kept as
        size 1 (per-row alpha). Differentiable.
      max_iter: bounds the solver as in :func:`smvariants.normmax`.
      logits: a floating-point array.
      labels: integer class ids of shape ``logits.shape`` without ``axis``, or target vectors of
        ``logits.shape`` (one-hot or soft): entries >= 0 that sum to 1 along ``axis`` (to 1e-3,
        or the labels' dtype's eps if larger). A row of zeros pads a fully masked row. Labels are
        constants: no gradient flows to them.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient, whatever its label.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      ignore_index: for integer labels, a class id that marks examples to skip: their loss is 0
        with zero gradient (a masked mean works under ``jit``); with probability labels, a
        ``ValueError``.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` uniform over the
        unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      ValueError: for class ids out of range, labels that put mass on a masked entry, soft
        labels that are not distributions, or an invalid temperature or alpha, when known at
        trace time. Traced values cannot be checked: the loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> logits = jnp.array([[1.0, 1.5, 2.0]])
      >>> print(np.asarray(losses.normmax_loss(logits, jnp.array([2]), alpha=2.0)).round(4))
      [0.0886]

    References:
      Santos, Niculae, McNamee & Martins, `Sparse and Structured Hopfield Networks
      <https://arxiv.org/abs/2402.13725>`_, 2024.
    """
    return _fenchel_young_loss(
        "normmax_loss", "normmax", logits, labels, axis, where, temperature,
        ignore_index=ignore_index, label_smoothing=label_smoothing, alpha=alpha, max_iter=max_iter,
    )  # fmt: skip


def budget_sparsemax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    budget: Numeric = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    temperature: Numeric = 1.0,
    *,
    max_iter: int = 64,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Budget sparsemax loss: the Fenchel-Young loss of the capped simplex (multi-label).

    .. math::

      L(z; y) = \langle z, p - y\rangle + \tfrac12 (\|y\|^2 - \|p\|^2), \qquad
      p = \mathrm{budget\_sparsemax}(z),\ z = x / T,

    for targets ``y`` with ``0 <= y_j <= 1`` and ``sum_j y_j = budget``, e.g. a multi-hot vector
    of ``budget`` labels. Zero exactly when the prediction equals ``y``. Gradient:
    ``(p - y) / T``.

    Args:
      logits: a floating-point array.
      labels: target vectors of ``logits.shape``: multi-hot or soft, entries in [0, 1] that sum
        to ``budget`` along ``axis`` (to 1e-3 times the budget). A row of zeros pads a fully
        masked row. Constants: no gradient flows to them.
      budget: a finite number > 0, or an array broadcastable to ``logits`` with ``axis`` kept as
        size 1 (per row). Fixed by the labels, so not differentiated here.
      axis: the class axis: an int or a tuple of ints (the classes are the entries of the
        flattened axes; integer labels then index them flat, in row-major order of increasing
        axis, as ``np.ravel_multi_index``).
      where: optional boolean mask broadcastable to ``logits``: the loss of a row equals the loss
        on its unmasked entries alone; ``-inf`` logits count as masked. A fully masked row is
        padding: its loss is 0 with zero gradient.
      temperature: a finite positive float, or an array broadcastable to ``logits`` with ``axis``
        kept as size 1; the loss is that of ``logits / temperature``. Differentiable.
      max_iter: bounds the solver as in :func:`smvariants.budget_sparsemax`.
      label_smoothing: ``s`` in [0, 1): the target is ``(1 - s) y + s u``, ``u`` spreading the
        budget evenly over the unmasked classes.

    Returns:
      The per-example loss (no reduction), of ``logits``' shape without ``axis`` and its dtype.

    Raises:
      TypeError: for integer class ids (they sum to 1, not to a budget).
      ValueError: for targets outside the capped simplex, mass on a masked entry, or an invalid
        budget or temperature, when known at trace time. Traced values cannot be checked: the
        loss of such an example is ``nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> logits = jnp.array([[2.0, 1.5, -1.0, 0.0]])
      >>> labels = jnp.array([[1.0, 1.0, 0.0, 0.0]])
      >>> print(losses.budget_sparsemax_loss(logits, labels, budget=2.0))
      [0.]

    References:
      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.
    """
    return _fenchel_young_loss(
        "budget_sparsemax_loss", "budget_sparsemax", logits, labels, axis, where, temperature,
        label_smoothing=label_smoothing, budget=budget, max_iter=max_iter,
    )  # fmt: skip


def make_fenchel_young_loss(variant: str, **params: Any) -> Callable[..., jax.Array]:
    r"""The Fenchel-Young loss of any variant of the table, by name, with its parameters bound.

    .. math::

      L(z; y) = \Omega^*(z) + \Omega(y) - \langle z, y\rangle, \qquad
      \Omega^*(z) = \max_{p \in C} \langle z, p\rangle - \Omega(p),

    with ``Omega`` and ``C`` the variant's regulariser and set (the counterpart of
    ``optax.losses.make_fenchel_young_loss``, built from the variant's exact solver and
    hand-written derivatives rather than by differentiating through ``Omega*``).

    Args:
      variant: a name of :func:`smvariants.registry.names`.
      **params: the variant's parameters (``alpha``, ``budget``, ``max_iter``).

    Returns:
      ``loss(logits, labels, axis=-1, where=None, temperature=1.0, *, ignore_index=None,
      label_smoothing=0.0)``, as the named losses of this module.

    Raises:
      ValueError: for an unknown variant or parameter, or an invalid parameter value known now.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import losses
      >>> loss = losses.make_fenchel_young_loss("entmax", alpha=1.25)
      >>> print(np.asarray(loss(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([2]))).round(4))
      [0.1646]

    References:
      Blondel, Martins & Niculae, `Learning with Fenchel-Young Losses
      <https://arxiv.org/abs/1901.02324>`_, 2020.
    """
    if variant not in _variants.VARIANTS:
        known = ", ".join(sorted(_variants.VARIANTS))
        raise ValueError(f"unknown variant {variant!r}; known variants: {known}.")
    accepted = {q.name for q in _variants.VARIANTS[variant].params}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"variant {variant!r} takes parameters {', '.join(sorted(accepted)) or 'none'}; "
            f"got {', '.join(unknown)}."
        )
    name = f"{variant}_loss"
    # Parameters known now are checked now, not at the first call.
    given = {k: v for k, v in params.items() if jnp.ndim(v) == 0 and _args.is_concrete(v)}
    _variants.parameters(name, _variants.VARIANTS[variant], given, (1, 2), 1, jnp.float32)
    for key, value in params.items():
        if jnp.ndim(value) and _args.is_concrete(value):
            _variants.check_array_values(name, variant, key, value)
    multi_label = _variants.VARIANTS[variant].label_sum is not None

    def loss(
        logits, labels, axis=-1, where=None, temperature=1.0, *, label_smoothing=0.0, **options
    ):
        # The named losses' keywords only: a misspelt one must not be ignored.
        allowed = set() if multi_label else {"ignore_index"}  # budget: target vectors only
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword arguments {', '.join(unknown)}.")
        return _fenchel_young_loss(
            name, variant, logits, labels, axis, where, temperature,
            label_smoothing=label_smoothing, **options, **params,
        )  # fmt: skip

    loss.__name__ = loss.__qualname__ = name
    return loss
