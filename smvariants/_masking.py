"""Argument checks, masking and dtype handling shared by every normalizer.

Every public normalizer calls :func:`prepare` first. It validates the arguments (raising at trace
time with a message that names the function and the argument), promotes half precision to float32,
divides by the temperature and folds the ``where`` mask into the logits as ``-inf``. The private
cores then only ever see one float array in which masked entries are ``-inf``.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def is_concrete(value: Any) -> bool:
    """True if ``value`` is known at trace time (a Python number or a non-traced array)."""
    return not isinstance(value, jax.core.Tracer)


def check_float(name: str, arg: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: {arg} must be a floating-point array, got dtype {dtype}.")
    return jnp.asarray(x)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a computation on ``dtype`` runs in: float32 for half precision."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in _HALF else dtype


def canonical_axis(name: str, axis: Any, ndim: int) -> int:
    """Validates ``axis`` (an int in ``[-ndim, ndim)``) and returns it as a non-negative int."""
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name}: axis must be an int, got {axis!r}.") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for x with {ndim} dimension(s).")
    return axis % ndim


def reduced_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` kept as size 1: the shape of one value per row."""
    return shape[:axis] + (1,) + shape[axis + 1 :]


def row_parameter(
    name: str, arg: str, value: Any, shape: tuple[int, ...], axis: int, dtype: Any
) -> jax.Array:
    """Validates a per-row parameter (temperature, alpha) and returns it in ``dtype``.

    The parameter is a scalar or an array broadcastable to ``shape`` with ``axis`` kept as size 1.
    """
    real = not isinstance(value, (str, bytes)) and any(
        jnp.issubdtype(jnp.result_type(value), kind) for kind in (jnp.floating, jnp.integer)
    )
    if not real:
        raise TypeError(f"{name}: {arg} must be a real number or array, got {value!r}.")
    row = reduced_shape(shape, axis)
    arg_shape = jnp.shape(value)
    try:
        ok = np.broadcast_shapes(arg_shape, row) == row
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: {arg} must be a scalar or broadcastable to {row} (x's shape with axis {axis} "
            f"kept as size 1), got shape {arg_shape}."
        )
    value = jnp.asarray(value, dtype=dtype)
    # Give a non-scalar the full rank, so it never relies on implicit rank promotion.
    return value if value.ndim == 0 else value.reshape((1,) * (len(row) - value.ndim) + value.shape)


def check_concrete(name: str, arg: str, value: Any, ok: Any, expected: str) -> None:
    """Raises ``ValueError`` if a concrete ``value`` has entries for which ``ok`` is False.

    Traced values cannot be checked at trace time; callers turn their bad rows into ``nan``.
    """
    if is_concrete(value):
        value = np.asarray(value)
        bad = ~ok(value)
        if np.any(bad):
            shown = value if value.ndim == 0 else value[bad][:3]
            raise ValueError(f"{name}: {arg} must be {expected}, got {shown}.")


def broadcast_mask(name: str, where: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """Validates ``where`` (boolean, broadcastable to ``shape``) and broadcasts it."""
    if where is None:
        return None
    if jnp.result_type(where) != jnp.dtype(bool):
        raise TypeError(
            f"{name}: where must be a boolean array, got dtype {jnp.result_type(where)}."
        )
    mask_shape = jnp.shape(where)
    try:
        ok = np.broadcast_shapes(mask_shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: where of shape {mask_shape} does not broadcast to x's shape {shape}."
        )
    return jnp.broadcast_to(where, shape)


def prepare(
    name: str, x: Any, axis: Any, where: Any, temperature: Any
) -> tuple[jax.Array, int, jnp.dtype]:
    """Validates the common arguments and returns ``(z, axis, out_dtype)``.

    ``z = x / temperature`` in the compute dtype (float32 for half precision), with ``-inf`` at the
    entries masked out by ``where``. Masked entries never reach the division, so a masked ``nan`` or
    ``inf`` stays harmless and their gradient is exactly zero. A traced, non-positive temperature
    turns its rows into ``nan`` (a concrete one raises ``ValueError``).
    """
    x = check_float(name, "x", x)
    axis = canonical_axis(name, axis, x.ndim)
    out_dtype = x.dtype
    dtype = compute_dtype(out_dtype)
    mask = broadcast_mask(name, where, x.shape)
    t = row_parameter(name, "temperature", temperature, x.shape, axis, dtype)
    check_concrete(name, "temperature", temperature, lambda v: v > 0, "> 0")

    x = x.astype(dtype)
    if mask is None and isinstance(temperature, (int, float)) and temperature == 1:
        # Nothing to fold in: -inf logits already are masked entries (the common, fastest path).
        return x, axis, out_dtype
    live = x != -jnp.inf
    if mask is not None:
        live = live & mask
    z = jnp.where(t > 0, jnp.where(live, x, 0) / t, jnp.nan)
    return jnp.where(live, z, -jnp.inf), axis, out_dtype
