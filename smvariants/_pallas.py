"""Pallas GPU kernels: a variant's whole forward pass with its rows held on chip.

On XLA:GPU every trip of a data-dependent ``while_loop`` (and every ``cond``) waits for the host
before it launches the next kernels, and re-reads the rows from memory. Here the same solver and
output map as on the other backends (the variant table's own functions, traced into the kernel)
run inside one kernel per block of rows: each program loads its rows once (masked entries and
the padding up to a power of two as ``-inf``), iterates in registers, and writes the output
once. Short rows are packed several to a program.

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

# Rows up to this many entries (after padding to a power of two) are held by one program. Longer
# ones stay on the XLA path.
MAX_COLUMNS = 1 << 17
# Entries a program holds when rows are short: 4096 is 32 per thread at 4 warps.
_TILE = 4096


def fits(shape: tuple[int, ...], axis: int) -> bool:
    """Whether rows of ``shape`` along ``axis`` take a kernel (non-empty, ``<= MAX_COLUMNS``)."""
    return plgpu is not None and 0 not in shape and shape[axis] <= MAX_COLUMNS


def _layout(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """``(columns, rows)`` of a program's block (powers of two, as Triton needs) and its warps."""
    columns = pl.next_power_of_2(n_cols)
    rows = max(1, min(_TILE // columns, pl.next_power_of_2(n_rows)))
    warps = min(32, max(4, rows * columns // 1024))
    return columns, rows, warps


def _kernel(*refs, rows_fn, fills, n_rows, n_cols, block, compute):
    """A block of rows: load (padding ``-inf``), ``rows_fn`` in ``compute``, store what is valid."""
    x_ref, *param_refs, o_ref = refs
    block_rows, columns = block
    start = pl.program_id(0) * jnp.int32(block_rows)  # int32 indices, also under jax_enable_x64
    # A traced 0, not the literal: the column slice is then dynamic, so a block wider than the
    # row (padding to a power of two) passes Pallas' static bounds check; the masks cover it.
    first = jnp.int32(0)
    row = start + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (1, columns), 1)
    valid = (row < n_rows) & (col < n_cols)
    rows = pl.ds(start, block_rows)
    with _backend.kernel_body():
        x = plgpu.load(x_ref.at[rows, pl.ds(first, columns)], mask=valid, other=-jnp.inf)
        x = x.astype(compute)  # half precision: converted in registers
        # Per-row values (temperature, parameters) of padding rows: a valid value, never stored.
        params = [
            plgpu.load(ref.at[rows, pl.ds(first, 1)], mask=row < n_rows, other=fill)
            for ref, fill in zip(param_refs, fills, strict=True)
        ]
        p = rows_fn(x, *params)
    plgpu.store(o_ref.at[rows, pl.ds(first, columns)], p.astype(o_ref.dtype), mask=valid)


def _like(x: jax.Array) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype, varying over ``shard_map``'s manual mesh axes as ``x`` does."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)  # jax >= 0.10; none outside shard_map
    extra = {"manual_axis_type": mat} if getattr(mat, "varying", None) else {}
    return jax.ShapeDtypeStruct(x.shape, x.dtype, **extra)


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
    moved = jnp.moveaxis(x, axis, -1)
    x2 = moved.reshape(-1, moved.shape[-1])
    n_rows, n_cols = x2.shape
    compute = _args.compute_dtype(x.dtype)  # float32 for half precision
    row_shape = x.shape[:axis] + (1,) + x.shape[axis + 1 :]
    per_row = [
        jnp.moveaxis(jnp.broadcast_to(p, row_shape), axis, -1).reshape(n_rows, 1).astype(compute)
        for p in params
    ]
    columns, block_rows, warps = _layout(n_rows, n_cols)
    kernel = partial(
        _kernel,
        rows_fn=rows_fn,
        fills=tuple(fills),
        n_rows=n_rows,
        n_cols=n_cols,
        block=(block_rows, columns),
        compute=compute,
    )
    anywhere = pl.BlockSpec(memory_space=pl.ANY)  # whole arrays; the kernel masks its loads
    out = pl.pallas_call(
        kernel,
        out_shape=_like(x2),
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=[anywhere] * (1 + len(per_row)),
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="smvariants_rows",
    )(x2, *per_row)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)
