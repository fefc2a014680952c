"""A variant's Jacobian applied to a tangent, as one primitive: one fused kernel on NVIDIA GPUs.

Every derivative rule applies ``J``, the Jacobian of a variant's output in its logits, to a
tangent ``w``, row by row and from the output ``p`` alone; ``J`` is symmetric, so the backward
pass applies the same map to the cotangent. Written as XLA operations, JAX transposes them, and
XLA:GPU runs them as a reduction kernel and an elementwise kernel that read ``p`` and ``w`` twice
each: 2.5 times the bytes of a copy. :func:`apply` binds the map as one primitive that is its own
transpose: on NVIDIA GPUs one Pallas kernel (:func:`smvariants._pallas.rows_map`) reads ``p``
and ``w`` once and writes the result once (1.5 copies); on other platforms it lowers to the same
XLA operations as before. Its derivative in ``p`` and the parameters (second order: ``hessian``)
is the XLA operations' own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from functools import cache
from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from smvariants import _args
from smvariants import _backend
from smvariants import _pallas

_tracing = threading.local()


@contextlib.contextmanager
def xla_operations() -> Iterator[None]:
    """While tracing: :func:`apply` gives the XLA operations on every platform.

    For ``experiments/benchmark.py``, which times the GPU kernel against XLA's own fusion of the
    same rule in one run.
    """
    before = getattr(_tracing, "xla", False)
    _tracing.xla = True
    try:
        yield
    finally:
        _tracing.xla = before


def apply(
    fn: Callable[..., jax.Array],
    w: jax.Array,
    p: jax.Array,
    per_row: Sequence[jax.Array],
    fills: Sequence[float],
    axis: int,
    fused: bool = True,
) -> jax.Array:
    """``fn(w, p, *per_row, axis=axis)`` in ``w``'s dtype, as one primitive (where ``fused``).

    Args:
      fn: ``fn(w, p, *per_row, axis)``: ``J w`` along ``axis``, linear in ``w`` with a symmetric
        ``J`` (the primitive's transpose is itself), in the compute dtype; a function JAX can
        hash (the same one on every call).
      w: the tangent (or cotangent), ``p``'s shape, any float dtype.
      p: the output.
      per_row: arrays broadcastable to ``p``'s shape with ``axis`` kept as 1 (temperature,
        parameters), in the compute dtype.
      fills: for each of ``per_row``, a valid value (for a kernel's padding rows).
      axis: the row axis (non-negative).
      fused: bind the primitive; else (and within :func:`xla_operations`) the XLA operations,
        on every platform.
    """
    if not fused or getattr(_tracing, "xla", False):
        return _plain(w, p, *per_row, fn=fn, fills=fills, axis=axis)
    row_shape = p.shape[:axis] + (1,) + p.shape[axis + 1 :]
    per_row = [jnp.broadcast_to(a, row_shape) for a in per_row]
    return _jacobian_p.bind(w, p, *per_row, fn=fn, fills=tuple(fills), axis=axis)


def _plain(w, p, *per_row, fn, fills, axis):
    """The map as XLA operations: computed in the compute dtype, returned in ``w``'s."""
    del fills
    compute = _args.compute_dtype(p.dtype)
    return fn(w.astype(compute), p.astype(compute), *per_row, axis=axis).astype(w.dtype)


def _kernel(w, p, *per_row, fn, fills, axis, interpret=False):
    """The map in one Pallas kernel (``interpret``: on any backend).

    Rows longer than ``_pallas.SPLIT_COLUMNS``, two of which a program would not hold in its
    registers, take the XLA operations.
    """
    if p.shape[axis] > _pallas.SPLIT_COLUMNS or not _pallas.fits(p.shape, axis):
        return _plain(w, p, *per_row, fn=fn, fills=fills, axis=axis)
    return _pallas.rows_map(partial(fn, axis=1), w, p, per_row, fills, axis, interpret)


_jacobian_p = Primitive("smvariants_jacobian")


def _lowering(ctx, *operands, fn, fills, axis):
    params = dict(fn=fn, fills=fills, axis=axis)

    def seam(*operands):
        return _backend.gpu_kernel(partial(_kernel, **params), partial(_plain, **params), *operands)

    return mlir.lower_fun(seam, multiple_results=False)(ctx, *operands)


@cache
def _jitted(fn, fills, axis):
    return jax.jit(partial(_jacobian_p.bind, fn=fn, fills=fills, axis=axis))


_jacobian_p.def_impl(lambda *operands, **params: _jitted(**params)(*operands))
_jacobian_p.def_abstract_eval(lambda w, *operands, **params: w.update(weak_type=False))
mlir.register_lowering(_jacobian_p, _lowering)


def _transpose(ct, w, p, *per_row, fn, fills, axis):
    """``J^T ct = J ct``: the primitive itself on the cotangent (linear in ``w`` only)."""
    assert ad.is_undefined_primal(w) and not ad.is_undefined_primal(p)
    if type(ct) is ad.Zero:
        w_ct = ad.Zero(w.aval)
    else:
        w_ct = _jacobian_p.bind(ct.astype(w.aval.dtype), p, *per_row, fn=fn, fills=fills, axis=axis)
    return (w_ct, None, *(None for _ in per_row))


def _jvp(primals, tangents, *, fn, fills, axis):
    """Second order: the XLA operations' derivative in the operands whose tangent is not zero.

    The others are constants of the derivative, not zero tangents: a term ``t_dot / t^2`` of a
    temperature below 1e-19 (whose square is 0 in float32) would be ``0 * inf``, ``nan`` in
    every Hessian in the logits.
    """
    out = _jacobian_p.bind(*primals, fn=fn, fills=fills, axis=axis)
    moving = [type(t) is not ad.Zero for t in tangents]
    if not any(moving):
        return out, ad.Zero(out.aval.to_tangent_aval())

    def plain(*varying):
        it = iter(varying)
        operands = [next(it) if m else p for p, m in zip(primals, moving, strict=True)]
        return _plain(*operands, fn=fn, fills=fills, axis=axis)

    varying = tuple(p for p, m in zip(primals, moving, strict=True) if m)
    nonzero = tuple(t for t, m in zip(tangents, moving, strict=True) if m)
    return out, jax.jvp(plain, varying, nonzero)[1]


def _batched(operands, dims, *, fn, fills, axis):
    """Under ``vmap``: every operand mapped along a new leading axis (the row axis one later)."""
    size = next(a.shape[d] for a, d in zip(operands, dims, strict=True) if d is not None)
    operands = [batching.bdim_at_front(a, d, size) for a, d in zip(operands, dims, strict=True)]
    return _jacobian_p.bind(*operands, fn=fn, fills=fills, axis=axis + 1), 0


ad.primitive_transposes[_jacobian_p] = _transpose
ad.primitive_jvps[_jacobian_p] = _jvp
batching.primitive_batchers[_jacobian_p] = _batched
