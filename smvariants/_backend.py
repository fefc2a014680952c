"""The backend seam: what is tuned for one XLA backend, chosen with ``lax.platform_dependent``.

Everything here has a plain XLA default (taken on TPU, and shown by a lowering for ``("tpu",)``),
where measurement found one a CPU-only variant, and for the iterative variants Pallas kernels
on NVIDIA GPUs (:func:`gpu_kernel`, :mod:`smvariants._pallas`): the forward pass, and the
Jacobian that the derivative rules apply (:mod:`smvariants._jacobian`). The solvers call these
helpers and never test the platform themselves. Inside a kernel's body (:func:`kernel_body`)
there is one target only, so the helpers take their in-kernel form there without a
``platform_dependent``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax.interpreters import mlir

# Rows up to this length take the CPU's matrix-vector row sum (see ``row_sum``).
_CPU_DOT_MAX = 64
# Longer rows are summed from a buffer of their own on the CPU (see ``row_sum``).
_CPU_STORED_SUM_MIN = 2048
# Rows up to this length are solved by columns on the CPU (see ``by_columns``).
_CPU_COLUMNS_MAX = 32

_tracing = threading.local()
_T = TypeVar("_T")
_Z = TypeVar("_Z", jax.Array, tuple[jax.Array, ...])


@contextlib.contextmanager
def kernel_body() -> Iterator[None]:
    """While tracing a Pallas kernel's body: the helpers below take their in-kernel form."""
    depth = getattr(_tracing, "kernel", 0)
    _tracing.kernel = depth + 1
    try:
        yield
    finally:
        _tracing.kernel = depth


def in_kernel() -> bool:
    """True while a Pallas kernel's body is traced (one target there: no ``platform_dependent``)."""
    return getattr(_tracing, "kernel", 0) > 0


def row_sum(a: jax.Array, axis: int, cheap: bool = False) -> jax.Array:
    """``sum(a, axis, keepdims=True)`` for a solver's iterations.

    On XLA:CPU, rows of at most 64 entries are summed as a matrix-vector product with a vector of
    ones: its reduction loops are slow on short rows and its dot kernel is not (a Michelot pass on
    32-wide rows costs about half as much); ``cheap`` entries (a few flops each, no ``exp`` or
    ``log``) are summed as they are computed instead. Rows of more than 2048 entries are summed
    from a buffer of their own (:func:`own_buffer`): XLA:CPU fuses a cheap producer into the
    reduction, which then adds a row's entries one by one, and a row with one large entry loses
    the low bits of all the others (an alpha = 1.1 threshold off by 5e-4 at 131072 entries,
    against 6e-8 when the reduction reads stored entries). Elsewhere a plain reduction. A dot's
    accumulation order depends on the batch, so closed forms that need an accurate sum use
    :func:`smvariants._numerics.accurate_sum` instead.
    """
    axis = axis % a.ndim

    def plain(a):
        return jnp.sum(a, axis=axis, keepdims=True)

    if in_kernel():
        return plain(a)
    if a.shape[axis] > _CPU_STORED_SUM_MIN:
        return plain(own_buffer(a))
    if cheap or a.shape[axis] > _CPU_DOT_MAX:
        return plain(a)

    def on_cpu(a):
        ones = jnp.ones((a.shape[axis],), a.dtype)
        dims = (((axis,), (0,)), ((), ()))
        return jnp.expand_dims(
            lax.dot_general(a, ones, dims, precision=lax.Precision.HIGHEST), axis
        )

    return lax.platform_dependent(a, cpu=on_cpu, default=plain)


def by_columns(
    solve_by_columns: Callable[[_Z], _T],
    solve: Callable[[_Z], _T],
    z: _Z,
    axis: int,
) -> _T:
    """``solve_by_columns(z)`` on XLA:CPU for rows of at most 32 entries, ``solve(z)`` elsewhere.

    Both solve the rows of ``z`` (an array, or a tuple of arrays of one shape) along ``axis``;
    ``solve_by_columns`` as elementwise work on the row's columns: sums over them
    (:func:`smvariants._numerics.column_sums`), one or more passes per trip of its loop, or a
    sorting network (:func:`smvariants._numerics.sorted_columns`) and no loop. XLA:CPU runs each
    pass as one loop over the rows (a reduction along a short row is scalar code, and a loop's
    trip costs several kernels), but compiles every column's work: longer rows take ``solve``.
    A GPU's kernels and a TPU's layout (rows along vector lanes) want ``solve``.
    """
    if not 0 < jax.tree.leaves(z)[0].shape[axis] <= _CPU_COLUMNS_MAX or in_kernel():
        return solve(z)
    return lax.platform_dependent(z, cpu=solve_by_columns, default=solve)


def _key_parts(dtype) -> tuple[jnp.dtype, int, int]:
    """The integer type of ``dtype``'s width, its largest value, and ``dtype``'s nan rotation."""
    itype = jnp.dtype(f"int{jnp.finfo(dtype).bits}")
    return itype, int(jnp.iinfo(itype).max), 2 ** jnp.finfo(dtype).nmant - 1


def order_key(x: jax.Array) -> jax.Array:
    """Integers of ``x``'s width that order as the floats ``x`` do, every nan above ``+inf``.

    The bits of a float are sign and magnitude: flipping the magnitude bits of negative values
    gives two's complement integers in the floats' order (-0 just below +0), with negative nans
    below -inf. Subtracting ``2^mantissa - 1`` (wrapping) moves exactly those to the top, above
    the positive nans, and -inf to the lowest integer. Bit operations only.
    :func:`from_order_key` inverts it.
    """
    itype, top, rotation = _key_parts(x.dtype)
    bits = lax.bitcast_convert_type(x, itype)
    return (bits ^ ((bits >> (8 * itype.itemsize - 1)) & itype.type(top))) - itype.type(rotation)


def from_order_key(key: jax.Array, dtype) -> jax.Array:
    """The floats of ``dtype`` whose :func:`order_key` is ``key``."""
    itype, top, rotation = _key_parts(dtype)
    flipped = key + itype.type(rotation)
    bits = flipped ^ ((flipped >> (8 * itype.itemsize - 1)) & itype.type(top))
    return lax.bitcast_convert_type(bits, dtype)


def comparing_reduction(reduce: Callable[[jax.Array], tuple[jax.Array, ...]], z: jax.Array):
    """``reduce(z)`` for a reduction that only compares entries (maxima, top-k) and returns them.

    On XLA:CPU a half-precision ``z`` is reduced as its :func:`order_key` and the results mapped
    back: XLA:CPU reduces bfloat16 and float16 as scalar code (bfloat16 rows of 32000: 90x slower
    than their keys), and converting to float32 first costs a float32 copy of ``z`` (in fresh
    memory on every call when large). ``reduce`` must also accept integers. Elsewhere, and for
    other dtypes, ``reduce(z)``.
    """
    if jnp.dtype(z.dtype).itemsize != 2:
        return reduce(z)

    def on_cpu(z):
        return tuple(from_order_key(r, z.dtype) for r in reduce(order_key(z)))

    return lax.platform_dependent(z, cpu=on_cpu, default=reduce)


def gpu_kernel(kernel: Callable[..., jax.Array], default: Callable[..., jax.Array], *operands):
    """``kernel(*operands)`` on an NVIDIA GPU (a Pallas kernel), ``default(*operands)`` elsewhere.

    Both must give the same result up to rounding, an array of ``operands[0]``'s shape and dtype.
    A lowering for ``("cuda",)`` shows the kernel's custom call and none of ``default``'s loops.
    ``kernel`` is traced when that branch is lowered, not with the program: a lowering for the
    CPU or the TPU, which never takes it, does not trace a Pallas kernel (0.02-0.1 s of every
    compile on a CPU). The branch has no derivative rules: it serves inside a ``custom_jvp``, or
    as the lowering of a primitive with its own rules (``_jacobian``).
    """
    x = operands[0]
    out = ShapedArray(x.shape, x.dtype)
    x64 = bool(jax.config.read("jax_enable_x64"))  # lowered as traced, also outside enable_x64

    def deferred(*operands):
        return _deferred_p.bind(*operands, kernel=kernel, out=out, x64=x64)

    return lax.platform_dependent(*operands, cuda=deferred, default=default)


# ``kernel(*operands)``, traced at lowering time; ``out`` is its result's shape and dtype, ``x64``
# whether 64-bit types were enabled where it was bound.
_deferred_p = Primitive("smvariants_deferred_kernel")
_deferred_p.def_impl(lambda *operands, kernel, out, x64: kernel(*operands))


def _deferred_abstract(x, *operands, kernel, out, x64):
    """``out``, sharded and varying over manual mesh axes (``shard_map``) as ``x`` is."""
    del operands, kernel, x64
    if x.ndim != len(out.shape):  # mapped by vmap over the other operands only
        return out
    return x.update(shape=out.shape, dtype=out.dtype, weak_type=False)


_deferred_p.def_abstract_eval(_deferred_abstract)


def _deferred_lowering(ctx, *operands, kernel, out, x64):
    """The kernel traced now, with 64-bit types as they were when it was bound.

    Lowered for ``cuda`` alone: in a lowering for several platforms (``("cpu", "cuda")``, as
    ``jax.export`` does), ``platform_dependent``'s branches are lowered for all of them, and a
    Pallas kernel has no CPU lowering; this branch only ever runs on ``cuda``.
    """
    del out
    with jax.enable_x64(x64):
        return mlir.lower_fun(kernel, multiple_results=False)(
            ctx.replace(platforms=("cuda",)), *operands
        )


mlir.register_lowering(_deferred_p, _deferred_lowering)


def _deferred_batched(operands, dims, *, kernel, out, x64):
    """Under ``vmap``: the mapped kernel (mapped when lowered), the mapped dimension in front."""
    size = next(a.shape[d] for a, d in zip(operands, dims, strict=True) if d is not None)
    mapped = ShapedArray((size, *out.shape), out.dtype)
    kernel = jax.vmap(kernel, in_axes=dims)
    return _deferred_p.bind(*operands, kernel=kernel, out=mapped, x64=x64), 0


batching.primitive_batchers[_deferred_p] = _deferred_batched


def own_buffer(x: jax.Array) -> jax.Array:
    """``x``, computed into a buffer of its own on CPU (unchanged elsewhere).

    XLA:CPU fuses an elementwise producer of ``x`` (a half-precision convert, a mask) into the
    block reduction of long rows, which then runs up to 10x slower than on a stored array. A
    ``cond`` is a fusion boundary that XLA keeps (an ``optimization_barrier`` is removed before
    fusion). Its predicate, a constant behind an ``optimization_barrier``, is only there so that
    it cannot be folded away (a predicate computed from ``x`` would cost kernels, and compile
    time); the second branch is never taken. On a GPU a ``cond`` would cost a round trip to the
    host.
    """

    def on_cpu(x):
        kept = lax.optimization_barrier(jnp.array(True))
        return lax.cond(kept, lambda x: x, lambda x: x + 0, x)

    return lax.platform_dependent(x, cpu=on_cpu, default=lambda x: x)
