"""Pallas GPU kernels: a variant's whole forward pass with its rows held on chip.

On XLA:GPU every trip of a data-dependent ``while_loop`` (and every ``cond``) waits for the host
before it launches the next kernels, and re-reads the rows from memory. Here the same solver and
output map as on the other backends (the variant table's own functions, traced into the kernel)
run inside one kernel per block of rows: each program loads its rows once (masked entries and
the padding up to a power of two as ``-inf``), iterates in registers, and writes the output
once. Short rows are packed several to a program. Rows too long for a program's registers are
split (``_variants.split_forward``): :func:`rows_threshold` solves their subsets, then
re-solves the few rows whose subset is not certified. The derivative rules apply a variant's
Jacobian in one kernel too (:func:`rows_map`, ``_jacobian``): the output and the tangent read
once, the result written once.

The kernels use the Triton lowering of Pallas. They are chosen for ``cuda`` at the backend seam
(:mod:`smvariants._backend`); on a CPU they run in Pallas' interpret mode, which is how the tests
check them against the float64 references without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from smvariants import _args
from smvariants import _backend

try:  # the Triton lowering's parts; a jaxlib without them runs the XLA path everywhere
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover (every Linux jaxlib has them)
    plgpu = None  # type: ignore[assignment]

# Rows up to this many entries (after padding to a power of two) can be held by one program.
MAX_COLUMNS = 1 << 17
# Rows longer than this are split (``_variants.split_forward``), and their derivative rule is
# XLA's: a program has 64K 32-bit registers (256 KB), 64 a thread at 32 warps, and a row of 2^15
# takes 32 of them for its entries alone. Compiled for sm_90a (``tools/kernel_registers.py``),
# every variant's forward kernel but sparsemax's spills there (140-1400 bytes a thread,
# reloaded in every iteration), and so does every Jacobian kernel (120-1360); at 2^14 (16
# entries a thread) none does but budget sparsemax (32-64 bytes) and alpha-entmax with an array
# alpha (150). Only the rows that the split's certificate fails are then held whole (up to
# ``MAX_COLUMNS``, spilling).
SPLIT_COLUMNS = 1 << 14
# Entries a program holds when rows are short: 4096 is 32 per thread at 4 warps.
_TILE = 4096


def fits(shape: tuple[int, ...], axis: int, columns: int | None = None) -> bool:
    """Whether rows of ``shape`` along ``axis`` can take a kernel.

    Non-empty, and a row (or the ``columns`` of it that a program holds) of at most
    ``MAX_COLUMNS`` entries.
    """
    held = shape[axis] if columns is None else columns
    return plgpu is not None and 0 not in shape and held <= MAX_COLUMNS


def _layout(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """``(columns, rows)`` of a program's block (powers of two, as Triton needs) and its warps.

    32 entries a thread up to 8 warps (255 registers a thread), 16 beyond (128 registers a
    thread at 16 warps, 64 at 32): a longer row, held by more threads, leaves each fewer
    registers. With these, kernels compiled for sm_90a spill (almost) nothing up to
    ``SPLIT_COLUMNS`` (see there).
    """
    columns = pl.next_power_of_2(n_cols)
    rows = max(1, min(_TILE // columns, pl.next_power_of_2(n_rows)))
    entries = rows * columns
    warps = max(4, entries // 1024) if entries <= 8192 else min(32, entries // 512)
    return columns, rows, warps


def _kernel(*refs, rows_fn, fills, n_rows, n_cols, block, compute, per_row, guarded, pad, n_in):
    """A block of rows: load (padding ``pad``), ``rows_fn`` in ``compute``, store what is valid.

    The first ``n_in`` operands are rows, the others one value per row. ``per_row``: ``rows_fn``
    gives one value per row (a threshold), stored as a column. ``guarded``: the first two
    parameters are a flag and a value per row; only a block with a flagged row loads its rows
    and runs ``rows_fn``, and rows not flagged get their value.
    """
    *in_refs, o_ref = refs
    row_refs, param_refs = in_refs[:n_in], in_refs[n_in:]
    block_rows, columns = block
    start = pl.program_id(0) * jnp.int32(block_rows)  # int32 indices, also under jax_enable_x64
    # A traced 0, not the literal: the column slice is then dynamic, so a block wider than the
    # row (padding to a power of two) passes Pallas' static bounds check; the masks cover it.
    first = jnp.int32(0)
    row = start + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (1, columns), 1)
    valid = (row < n_rows) & (col < n_cols)
    rows = pl.ds(start, block_rows)
    out = o_ref.at[rows, pl.ds(first, 1 if per_row else columns)]
    with _backend.kernel_body():
        # Per-row values (temperature, parameters) of padding rows: a valid value, never stored.
        params = [
            plgpu.load(ref.at[rows, pl.ds(first, 1)], mask=row < n_rows, other=_typed(fill, ref))
            for ref, fill in zip(param_refs, fills, strict=True)
        ]

        def run(params):
            loaded = [
                plgpu.load(r.at[rows, pl.ds(first, columns)], mask=valid, other=_typed(pad, r))
                for r in row_refs
            ]
            # half precision: converted in registers
            return rows_fn(*(a.astype(compute) for a in loaded), *params)

        if not guarded:
            mask = (row < n_rows) if per_row else valid
            plgpu.store(out, run(params).astype(o_ref.dtype), mask=mask)
            return
        flag, keep, *params = params
        computed = jnp.max(flag) > 0

        @pl.when(computed)
        def _():
            value = jnp.where(flag > 0, run(params), keep)
            plgpu.store(out, value.astype(o_ref.dtype), mask=row < n_rows)

        @pl.when(~computed)
        def _():
            plgpu.store(out, keep.astype(o_ref.dtype), mask=row < n_rows)


def _typed(value: float, ref) -> jax.Array:
    """``value`` in ``ref``'s dtype, for a masked load's ``other``.

    A Python float would be float64 under ``jax_enable_x64``: a tile of float64 in the kernel.
    """
    return jnp.asarray(value, ref.dtype)


def _like(x: jax.Array, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype (or those given), varying over manual mesh axes as ``x`` does."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)  # jax >= 0.10; none outside shard_map
    extra = {"manual_axis_type": mat} if getattr(mat, "varying", None) else {}
    return jax.ShapeDtypeStruct(x.shape if shape is None else shape, dtype or x.dtype, **extra)


def rows_forward(
    rows_fn: Callable[..., jax.Array],
    x: jax.Array,
    params: Sequence[jax.Array],
    fills: Sequence[float],
    axis: int,
    interpret: bool = False,
) -> jax.Array:
    """``rows_fn`` applied to every row of ``x`` along ``axis``, in a Pallas kernel.

    Args:
      rows_fn: ``rows_fn(x, *params) -> p`` on a block of rows along axis 1 (masked entries and
        padding ``-inf``; each parameter one value per row, shape ``(rows, 1)``).
      x: the logits, ``fits(x.shape, axis)``.
      params: per-row values, each broadcastable to ``x``'s shape with ``axis`` kept as 1, in the
        dtype ``rows_fn`` computes in (float32 for a half-precision ``x``).
      fills: for each parameter, a valid value to give the padding rows of the last block.
      axis: the row axis (non-negative).
      interpret: run in Pallas' interpret mode (on any backend; for the tests).

    Returns:
      The output, shape and dtype of ``x`` (a half-precision ``x`` is loaded as it is and
      converted in registers; ``rows_fn`` runs in float32).
    """
    x2, per_row = as_rows(x, params, axis)
    compute = _args.compute_dtype(x.dtype)
    out = _call("forward", rows_fn, [x2], per_row, fills, compute, interpret)
    return from_rows(out, x.shape, axis)


def rows_map(
    rows_fn: Callable[..., jax.Array],
    w: jax.Array,
    p: jax.Array,
    params: Sequence[jax.Array],
    fills: Sequence[float],
    axis: int,
    interpret: bool = False,
) -> jax.Array:
    """``rows_fn(w, p, *params)`` on the rows of ``w`` and ``p`` along ``axis``, in a Pallas kernel.

    As :func:`rows_forward`, with two arrays of rows (a tangent and an output, for the
    derivative rules), both padded with 0: each program reads its rows of both once and writes
    its rows of the result once.

    Returns:
      The result, shape and dtype of ``w``.
    """
    compute = _args.compute_dtype(p.dtype)
    w2, per_row = as_rows(w, params, axis)
    p2, _ = as_rows(p, (), axis)
    out = _call("jacobian", rows_fn, [w2, p2], per_row, fills, compute, interpret, pad=0.0)
    return from_rows(out, w.shape, axis)


def as_rows(x: jax.Array, params: Sequence[jax.Array], axis: int) -> tuple[jax.Array, list]:
    """``x`` as rows ``(n_rows, n_cols)`` (``axis`` last), each per-row parameter ``(n_rows, 1)``.

    The parameters (broadcastable to ``x``'s shape with ``axis`` kept as 1) are converted to the
    compute dtype (float32 for a half-precision ``x``). :func:`from_rows` inverts it.
    """
    moved = jnp.moveaxis(x, axis, -1)
    x2 = moved.reshape(-1, moved.shape[-1])
    compute = _args.compute_dtype(x.dtype)
    row_shape = x.shape[:axis] + (1,) + x.shape[axis + 1 :]
    per_row = [
        jnp.moveaxis(jnp.broadcast_to(p, row_shape), axis, -1).reshape(-1, 1).astype(compute)
        for p in params
    ]
    return x2, per_row


def from_rows(out: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """Rows ``(n_rows, n_cols)`` back in ``shape``, their entries along ``axis``."""
    moved = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    return jnp.moveaxis(out.reshape(moved), -1, axis)


def rows_threshold(
    rows_fn: Callable[..., jax.Array],
    x: jax.Array,
    params: Sequence[jax.Array],
    fills: Sequence[float],
    where: jax.Array | None = None,
    otherwise: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``rows_fn``'s one value per row (a threshold) for every row of ``x``, in a Pallas kernel.

    Args:
      rows_fn: ``rows_fn(x, *params) -> t`` on a block of rows along axis 1 (padding ``-inf``),
        ``t`` of shape ``(rows, 1)``.
      x: rows ``(n_rows, n_cols)``, ``n_cols <= MAX_COLUMNS``.
      params: per-row values, each ``(n_rows, 1)`` in the dtype ``rows_fn`` computes in.
      fills: for each parameter, a valid value to give the padding rows of the last block.
      where: ``(n_rows, 1)`` booleans, or ``None`` for every row: the rows to compute. A program
        whose rows are all False returns without reading them.
      otherwise: ``(n_rows, 1)``, the value of the rows not computed (with ``where``).
      interpret: run in Pallas' interpret mode.

    Returns:
      ``(n_rows, 1)`` in the compute dtype (float32 for a half-precision ``x``).
    """
    compute = _args.compute_dtype(x.dtype)
    params, fills = list(params), list(fills)
    if where is not None:
        assert otherwise is not None, "where needs otherwise"
        params = [where.astype(compute), otherwise.astype(compute), *params]
        fills = [0.0, 0.0, *fills]
    out = _like(x, (x.shape[0], 1), compute)
    role = "threshold" if where is None else "resolve"
    return _call(role, rows_fn, [x], params, fills, compute, interpret, out, where is not None)


def _call(
    role, rows_fn, rows, params, fills, compute, interpret, out=None, guarded=False, pad=-jnp.inf
):
    """The ``pallas_call`` of :func:`_kernel`: one program per block of rows.

    ``role`` names the kernel (``smvariants_<role>``, as a GPU profiler shows it); ``rows``:
    arrays ``(n_rows, n_cols)``, loaded padded with ``pad``.
    """
    rows = tuple(rows)
    n_rows, n_cols = rows[0].shape
    columns, block_rows, warps = _layout(n_rows, n_cols)
    kernel = partial(
        _kernel,
        rows_fn=rows_fn,
        fills=tuple(fills),
        n_rows=n_rows,
        n_cols=n_cols,
        block=(block_rows, columns),
        compute=compute,
        per_row=out is not None,
        guarded=guarded,
        pad=pad,
        n_in=len(rows),
    )
    anywhere = pl.BlockSpec(memory_space=pl.ANY)  # whole arrays; the kernel masks its loads
    return pl.pallas_call(
        kernel,
        out_shape=_like(rows[0]) if out is None else out,
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=[anywhere] * (len(rows) + len(params)),
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=f"smvariants_{role}",
    )(*rows, *params)
