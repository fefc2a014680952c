"""Argument handling shared by every public function: checks, dtype policy, masks, nan policy.

Every public normalizer and loss calls :func:`prepare` first. It validates the arguments (raising
at trace time with a message that names the function and the argument), promotes half precision to
float32 and folds the ``where`` mask into the logits as ``-inf``. The temperature is not applied
here: it goes to the private cores (see ``_variants``), whose derivative rules need only their
output, so that no copy of the logits is kept for the backward pass.

A tuple ``axis`` is handled here too, once for every function (:class:`Layout`): the logits are
rearranged so that the rows lie along one axis, the cores run on that int axis, and
:meth:`Prepared.finish` undoes it. An int axis leaves the logits as they are.

The nan policy: a parameter or label that is invalid but traced (so it cannot be checked at trace
time) makes its rows ``nan``, in the value and in every derivative (:func:`nan_where`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smvariants._numerics import reduced_shape

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

# The valid values of a per-row parameter: a test that works on NumPy and JAX arrays, and how an
# error message states it.
Condition = tuple[Callable[[Any], Any], str]
POSITIVE: Condition = (lambda v: (v > 0) & (v < np.inf), "finite and > 0")
AT_LEAST_ONE: Condition = (lambda v: (v >= 1) & (v < np.inf), "finite and >= 1")
# alpha-entmax's alpha: its threshold is below 1 / (alpha - 1), which XLA flushes to 0 (rows of
# nan) above the reciprocal of the smallest normal number.
ENTMAX_ALPHA: Condition = (
    lambda v: (v >= 1) & (v <= 1 / np.finfo(v.dtype).tiny),
    "finite and >= 1, at most the reciprocal of the smallest normal number of its dtype (8.5e37 "
    "in float32: the threshold, below 1 / (alpha - 1), would be flushed to 0)",
)
ABOVE_ONE: Condition = (lambda v: (v > 1) & (v < np.inf), "finite and > 1")
# A temperature: XLA:CPU flushes subnormal numbers to 0, so one below the smallest normal number
# divided by 0 (rows of nan); XLA computes x / T as x * (1/T) in places, so one above that
# number's reciprocal multiplied by 0 (nan rows, or uniform ones).
TEMPERATURE: Condition = (
    lambda v: (v >= np.finfo(v.dtype).tiny) & (v <= 1 / np.finfo(v.dtype).tiny),
    "finite and > 0, at least the smallest normal number of its dtype and at most its reciprocal "
    "(1.2e-38 and 8.5e37 in float32: XLA flushes smaller numbers, and reciprocals of larger "
    "ones, to 0)",
)


def nan_where(invalid: jax.Array | None, value: jax.Array) -> jax.Array:
    """``value`` with ``nan`` where ``invalid`` (a traced check that failed); as is for ``None``.

    Applied to a parameter before the computation, so the output and every derivative of the
    flagged rows are ``nan``: never a finite gradient from an invalid value. Added rather than
    selected, so that the derivative in the parameter itself is ``nan`` too (a select would
    pass it a zero).
    """
    return value if invalid is None else value + jnp.where(invalid, jnp.nan, 0).astype(value.dtype)


def static_number(value: Any) -> float | None:
    """``value`` as a Python float if it is a number known at trace time, else ``None``.

    Python numbers, NumPy scalars and concrete 0-d arrays count, so that ``np.float32(1.5)`` or a
    concrete ``jnp.float32(1.5)`` take the same compiled path as ``1.5``.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.number)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float64: invalid everywhere, and reported so
            return math.inf if value > 0 else -math.inf
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and is_concrete(value):
        if jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer):
            return float(value)
    return None


def check_int(name: str, arg: str, value: Any, low: int, high: int = 2**31 - 1) -> int:
    """``value`` as an int in ``[low, high]``; ``TypeError``/``ValueError`` naming ``arg``.

    Python and NumPy integers, and concrete 0-d integer arrays (``jnp.int32(-100)``), count.
    """
    if (
        isinstance(value, jax.Array)
        and value.ndim == 0
        and jnp.issubdtype(value.dtype, jnp.integer)
        and is_concrete(value)
    ):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: {arg} must be an int, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name}: {arg} must be an int in [{low}, {high}], got {value}.")
    return int(value)


def is_concrete(value: Any) -> bool:
    """True if ``value`` is known at trace time (numbers or non-traced arrays, also in a list)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def as_array(name: str, arg: str, value: Any) -> jax.Array:
    """``value`` as ``jnp.asarray`` makes it (so lists of numbers are accepted), else TypeError."""
    try:
        # A Python number beyond float32 (without x64) becomes inf: checked and reported by the
        # callers, with no NumPy warning of the cast on the way.
        with np.errstate(over="ignore", under="ignore"):
            return jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: {arg} must be an array or a number, got {value!r}.") from None


def check_float(name: str, arg: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it has a floating dtype."""
    x = as_array(name, arg, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: {arg} must be a floating-point array, got dtype {x.dtype}.")
    return x


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a computation on ``dtype`` runs in: float32 for half precision."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in _HALF else dtype


def canonical_axis(name: str, axis: Any, ndim: int, arg: str = "x") -> int:
    """Validates ``axis`` (an int in ``[-ndim, ndim)`` of ``arg``) and returns it non-negative."""
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name}: axis must be an int, got {axis!r}.") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for {arg} with {ndim} dimension(s).")
    return axis % ndim


def canonical_axes(name: str, axis: Any, ndim: int, arg: str = "x") -> int | tuple[int, ...]:
    """Validates ``axis``, an int or a tuple of ints of ``arg``; returns it non-negative.

    A tuple comes back sorted: the axes of a row are a set, as for ``jax.nn.softmax``. Repeated
    or out-of-range axes raise ``ValueError``, anything else ``TypeError``.
    """
    if not isinstance(axis, tuple):
        try:
            operator.index(axis)
        except TypeError:
            raise TypeError(
                f"{name}: axis must be an int or a tuple of ints, got {axis!r}."
            ) from None
        return canonical_axis(name, axis, ndim, arg)
    axes = []
    for a in axis:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                f"{name}: axis must be an int or a tuple of ints, got {axis!r}."
            ) from None
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}: axis {a} in axis={axis} is out of range for {arg} with {ndim} "
                "dimension(s)."
            )
        axes.append(a % ndim)
    if len(set(axes)) < len(axes):
        raise ValueError(
            f"{name}: axis={axis} names a dimension more than once (as {tuple(axes)}); each axis "
            "may appear once."
        )
    return tuple(sorted(axes))


class Layout(NamedTuple):
    """Where the rows of an array lie, for an int or a tuple ``axis``, and how to get them together.

    The cores take one int axis. For a tuple the array is *arranged*: its reduced axes are moved
    next to the last of them (a transpose, only where they are not adjacent already) and merged
    into it, the others left as size 1, so the arranged array has the same rank and its rows'
    shape (the arranged shape with ``axis`` as size 1) is the original shape with every reduced
    axis kept as size 1: per-row parameters broadcast against it unchanged. An empty tuple (rows
    of one entry each, as ``jax.nn.softmax(x, axis=())``) puts a new leading axis of size 1 in
    front instead. For an int axis every method is the identity (or the one squeeze).

    An entry's index along the merged axis is its flat index into the reduced axes, in
    increasing order of axis, row-major (``np.ravel_multi_index``).
    """

    shape: tuple[int, ...]  # the original shape
    axes: tuple[int, ...]  # the reduced axes of the original, non-negative, increasing
    axis: int  # the axis of the rows in the arranged array
    arranged: tuple[int, ...]  # the arranged shape
    perm: tuple[int, ...] | None  # the transpose before the reshape; None if none is needed
    text: str  # how messages name the argument: "axis 1", "axes (1, 2)"

    @property
    def unchanged(self) -> bool:
        """True where arranging is the identity (as for an int axis, or a tuple of one)."""
        return self.arranged == self.shape

    @property
    def row_ids_shape(self) -> tuple[int, ...]:
        """The shape of one value per row, without the reduced axes (integer labels, results)."""
        return tuple(n for i, n in enumerate(self.shape) if i not in self.axes)

    def arrange(self, a: Any) -> Any:
        """An array of the original shape (NumPy or JAX) in the arranged layout."""
        if self.unchanged:
            return a
        if self.perm is not None:
            a = a.transpose(self.perm)
        return a.reshape(self.arranged)

    def restore(self, a: Any) -> Any:
        """An array of the arranged shape back in the original layout (undoes :meth:`arrange`)."""
        if self.unchanged:
            return a
        if self.perm is None:
            return a.reshape(self.shape)
        a = a.reshape(tuple(self.shape[i] for i in self.perm))
        return a.transpose(tuple(np.argsort(self.perm)))

    def arrange_rows(self, a: Any) -> Any:
        """One value per row (``row_ids_shape``) as the arranged array's rows, ``axis`` removed."""
        shape = self.arranged[: self.axis] + self.arranged[self.axis + 1 :]
        return a if a.shape == shape else a.reshape(shape)

    def squeeze(self, a: Any) -> Any:
        """One value per row of the arranged array (``axis`` kept) -> ``row_ids_shape``."""
        return a.reshape(self.row_ids_shape)


def layout(name: str, axis: Any, shape: tuple[int, ...], arg: str = "x") -> Layout:
    """Validates ``axis`` (an int or a tuple of ints) of ``arg`` and returns its :class:`Layout`."""
    axes = canonical_axes(name, axis, len(shape), arg)
    if isinstance(axes, int):
        return Layout(shape, (axes,), axes, shape, None, f"axis {axes}")
    text = f"axes {axes}"
    if not axes:
        return Layout(shape, (), 0, (1, *shape), None, text)
    k = axes[-1]
    others = [i for i in range(len(shape)) if i not in axes]
    perm = tuple([i for i in others if i < k] + list(axes) + [i for i in others if i > k])
    arranged = tuple(
        math.prod(shape[i] for i in axes) if i == k else 1 if i in axes else n
        for i, n in enumerate(shape)
    )
    return Layout(shape, axes, k, arranged, None if perm == tuple(sorted(perm)) else perm, text)


def _signed_float(value: Any) -> float:
    """``float(value)``, or the infinity of its sign for an integer beyond float64."""
    try:
        return float(value)
    except OverflowError:
        return np.inf if value > 0 else -np.inf


def _signed_floats(value: Any) -> Any:
    """``value``'s entries as float64 (:func:`_signed_float`), or ``value`` if one is no number."""
    try:
        return np.vectorize(_signed_float, otypes=[np.float64])(np.asarray(value, object))
    except (TypeError, ValueError):
        return value  # as_array says what is wrong


def integers_as_floats(value: Any) -> Any:
    """Python or NumPy integers (of any size) as float64 NumPy values, anything else as it is.

    Without x64, JAX makes integers int32: a Python int of 2^31 or more raised ``OverflowError``
    and a NumPy int64 wrapped around (a temperature of 2^40 became 0, an alpha of 2^31 negative).
    """
    if isinstance(value, jax.Array):
        return value
    try:
        given = np.asarray(value)
        if given.dtype == object:  # Python ints of 2^64 or more
            return np.asarray(value, np.float64)
    except OverflowError:  # beyond float64: +-inf, invalid for every parameter and reported so
        return _signed_floats(value)
    except (TypeError, ValueError):
        return value  # as_array says what is wrong
    return given.astype(np.float64) if np.issubdtype(given.dtype, np.integer) else value


def row_parameter(
    name: str,
    arg: str,
    value: Any,
    shape: tuple[int, ...],
    axis: int,
    dtype: Any,
    condition: Condition,
    of: str = "x",
    *,
    axes: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Validates a per-row parameter (temperature, alpha) and returns it in ``dtype``.

    The parameter is a scalar or an array broadcastable to ``shape`` (the shape of ``of``) with
    ``axis`` kept as size 1, whose entries satisfy ``condition``. A concrete value that does not
    raises ``ValueError``; a traced one cannot be checked at trace time. ``shape`` and ``axis``
    may be those of an arranged array (:class:`Layout`); ``axes`` then says how messages name
    the user's axis (default ``"axis {axis}"``).

    Returns:
      ``(value, invalid)``: the parameter as an array (a non-scalar with the full rank) and, for a
      traced value, a boolean array flagging the entries that fail ``condition`` (``None`` for a
      concrete value). Callers turn those rows into ``nan``.
    """
    value = integers_as_floats(value)
    array = as_array(name, arg, value)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{name}: {arg} must be a real number or array, got {value!r}.")
    row = reduced_shape(shape, axis)
    try:
        ok = np.broadcast_shapes(array.shape, row) == row
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: {arg} must be a scalar or broadcastable to {row} (the shape of {of} with "
            f"{axes or f'axis {axis}'} kept as size 1), got shape {array.shape}."
        )
    array = array.astype(dtype)
    # Give a non-scalar the full rank, so it never relies on implicit rank promotion.
    if array.ndim:
        array = array.reshape((1,) * (len(row) - array.ndim) + array.shape)
    valid, expected = condition
    if not is_concrete(value):
        return array, ~valid(array)
    # Checked in ``dtype``: a value that over- or underflows there is caught too, and shown as
    # given with what ``dtype`` makes of it.
    given = np.asarray(value)
    with np.errstate(over="ignore", under="ignore"):
        values = given.astype(dtype)
    bad = ~valid(values)
    if np.any(bad):
        shown, as_given = (values, given) if values.ndim == 0 else (values[bad][:3], given[bad][:3])
        in_dtype = f" ({shown} in {jnp.dtype(dtype).name})"
        same = np.array_equal(shown, as_given, equal_nan=True)
        raise ValueError(
            f"{name}: {arg} must be {expected}, got {as_given}{'' if same else in_dtype}."
        )
    return array, None


def broadcast_mask(
    name: str, where: Any, shape: tuple[int, ...], arg: str = "x"
) -> jax.Array | None:
    """Validates ``where`` (boolean, broadcastable to ``shape``, that of ``arg``); broadcasts it."""
    if where is None:
        return None
    where = as_array(name, "where", where)
    if where.dtype != jnp.dtype(bool):
        raise TypeError(f"{name}: where must be a boolean array, got dtype {where.dtype}.")
    try:
        ok = np.broadcast_shapes(where.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: where of shape {where.shape} does not broadcast to the shape of {arg}, "
            f"{shape}."
        )
    return jnp.broadcast_to(where, shape)


class Prepared(NamedTuple):
    """Validated arguments of a normalizer or loss, as :func:`prepare` returns them."""

    x: jax.Array  # the logits (compute dtype unless kept), -inf where masked, arranged (see layout)
    t: jax.Array | None  # the temperature (scalar or one per row, nan where invalid); None for 1
    invalid: jax.Array | None  # rows whose traced temperature is invalid; None if none can be
    axis: int  # the axis of the rows of x, non-negative
    dtype: jnp.dtype  # the dtype of the result
    layout: Layout  # how x is arranged from the caller's array (as is for an int axis)

    def finish(self, out: jax.Array) -> jax.Array:
        """``out`` (``x``'s shape) in the result dtype and the caller's layout, ``nan`` where due.

        ``nan`` goes in the rows of an invalid temperature. The cores already give those rows
        ``nan`` (their temperature is ``nan``, see :func:`nan_where`); adding it to the output as
        well makes sure no fusion can fold it away. Added rather than selected: the backward pass
        keeps no full-size mask for it.
        """
        return self.layout.restore(nan_where(self.invalid, out).astype(self.dtype))

    def finish_rows(self, out: jax.Array) -> jax.Array:
        """As :meth:`finish`, for one value per row (``axis`` kept as size 1).

        The reduced axes are dropped, as a loss or a statistic returns its values.
        """
        return self.layout.squeeze(nan_where(self.invalid, out).astype(self.dtype))


def prepare(
    name: str,
    x: Any,
    axis: Any,
    where: Any,
    temperature: Any,
    arg: str = "x",
    keep_dtype: bool = False,
) -> Prepared:
    """Validates the common arguments (``x`` named ``arg`` in messages).

    ``x`` is returned in the compute dtype (float32 for half precision; with ``keep_dtype``, in
    its own dtype, for a core that converts it itself) with ``-inf`` at the entries masked out
    by ``where``: a masked ``nan`` or ``inf`` is harmless and its gradient is exactly zero. The
    cores compute ``(x - max x) / t``; ``t`` is ``None`` for a temperature of 1 known at trace
    time (the fast path: no temperature). A concrete invalid temperature raises
    ``ValueError``; a traced one is ``nan`` in its rows, which makes them ``nan``.

    ``axis`` is an int or a tuple of ints; for a tuple, ``x`` comes back arranged with its rows
    along the int ``axis`` (:class:`Layout`): apply a core there, then :meth:`Prepared.finish`.
    Per-row arrays given against the caller's shape (the reduced axes kept as size 1) broadcast
    against the arranged ``x`` as they are.
    """
    x = check_float(name, arg, x)
    if not all(isinstance(n, int) for n in x.shape):
        # jax.export's symbolic dimensions: the solvers choose their paths by the row length.
        raise TypeError(
            f"{name}: {arg} has a symbolic shape {x.shape}; export with concrete shapes (one "
            "export per shape)."
        )
    rows = layout(name, axis, x.shape, arg)
    dtype = compute_dtype(x.dtype)
    mask = broadcast_mask(name, where, x.shape, arg)
    array, invalid = row_parameter(
        name, "temperature", temperature, rows.arranged, rows.axis, dtype, TEMPERATURE, arg,
        axes=rows.text,
    )  # fmt: skip
    t = None if static_number(temperature) == 1 else nan_where(invalid, array)
    z = x if keep_dtype else x.astype(dtype)
    if mask is not None:
        z = _mask_out(z, mask)
    return Prepared(rows.arrange(z), t, invalid, rows.axis, x.dtype, rows)


@partial(jax.checkpoint, prevent_cse=False)
def _mask_out(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` with ``-inf`` where ``mask`` is False.

    Checkpointed: its backward pass keeps only ``mask`` (plain ``jnp.where`` would also keep a
    full-size zero tangent for the ``-inf`` branch).
    """
    return jnp.where(mask, x, -jnp.inf)


def auto_sharded(
    name: str, f: Callable[..., jax.Array], x: Any, axis: Any, *args: Any, per_row: bool = False
) -> jax.Array:
    """``f(x, axis, *args)``, under a mesh with explicit axes run with them as auto ones.

    Under explicit sharding (``AxisType.Explicit``, ``jax.make_mesh``'s default) every operation
    must agree on its operands' shardings, which the solvers' loops and selects do not state.
    There ``f`` runs in ``jax.sharding.auto_axes`` (arrays pass through it; Python numbers and
    concrete scalars stay static), and its result keeps ``x``'s sharding (without the reduced
    axes where ``per_row``: one value per row). Elsewhere it is ``f(x, axis, *args)``.
    """
    if not _explicit(x):
        return f(x, axis, *args)
    axes = canonical_axes(name, axis, x.ndim)
    reduced = set(axes) if isinstance(axes, tuple) else {axes}
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    kept = [i for i in range(x.ndim) if not (per_row and i in reduced)]
    leaves, tree = jax.tree.flatten(args)
    passed = [isinstance(a, jax.Array) and not (a.ndim == 0 and is_concrete(a)) for a in leaves]

    def run(x, *arrays):
        it = iter(arrays)
        full = [next(it) if p else a for a, p in zip(leaves, passed, strict=True)]
        return f(x, axis, *jax.tree.unflatten(tree, full))

    arrays = [a for a, p in zip(leaves, passed, strict=True) if p]
    out_spec = jax.sharding.PartitionSpec(*(spec[i] for i in kept))
    return jax.sharding.auto_axes(run, out_sharding=out_spec)(x, *arrays)


def _explicit(x: Any) -> bool:
    """True if ``x`` is an array typed with a mesh that has explicit axes."""
    if not isinstance(x, jax.Array):
        return False
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    return any(t == jax.sharding.AxisType.Explicit for t in types)
