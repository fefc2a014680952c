"""tools/kernel_registers.py: the Triton IR it takes from a ``cuda`` lowering, and its verdict.

Compiling needs the ``triton`` package (not in the test extra: ~300 MB); without it the tool
stops with a one-line reason, which is checked instead.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from scripts import ROOT

import smvariants as sm

_spec = importlib.util.spec_from_file_location(
    "kernel_registers", ROOT / "tools" / "kernel_registers.py"
)
kernel_registers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_registers)

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Later jaxlibs compile a kernel's Triton IR themselves when lowering (which needs a GPU).
pytestmark = pytest.mark.skipif(
    kernel_registers.jaxlib_version > (0, 10, 2), reason="lowerings hold Triton IR in jaxlib 0.10"
)


def _grad(f):
    return jax.grad(lambda x: jnp.sum(f(x) * lax.broadcasted_iota(x.dtype, x.shape, 1)))


def test_kernels_are_taken_from_the_cuda_lowering_with_their_layout():
    x = jax.ShapeDtypeStruct((4096, 32), jnp.float32)
    (forward,) = kernel_registers.kernels(sm.entmax15, x)
    assert forward["name"] == "smvariants_forward" and forward["warps"] == 4
    assert "tt.func public @smvariants_forward" in forward["ir"] and "tt.load" in forward["ir"]
    names = [k["name"] for k in kernel_registers.kernels(_grad(sm.entmax15), x)]
    assert sorted(names) == ["smvariants_forward", "smvariants_jacobian"]
    # Rows of 2^14 are held whole at 32 warps; longer ones split, their rule on XLA.
    whole = jax.ShapeDtypeStruct((2, 16384), jnp.float32)
    assert [
        (k["name"], k["warps"]) for k in kernel_registers.kernels(_grad(sm.sparsemax), whole)
    ] in (
        [("smvariants_forward", 32), ("smvariants_jacobian", 32)],
        [("smvariants_jacobian", 32), ("smvariants_forward", 32)],
    )
    split = jax.ShapeDtypeStruct((2, 16385), jnp.float32)
    names = sorted(k["name"] for k in kernel_registers.kernels(_grad(sm.sparsemax), split))
    assert names == ["smvariants_resolve", "smvariants_threshold"]


@pytest.mark.parametrize("shape", [(4096, 32), (64, 1000), (2, 32000)])
def test_kernels_hold_no_64_bit_tile_under_x64(shape):
    """With ``jax_enable_x64`` (as here), counts of a row's entries were int64 tiles: twice the
    registers of the float32 row. Counted in int32 (``_numerics.count``), only per-row
    scalars may be 64-bit."""
    assert jax.config.read("jax_enable_x64")
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for name, f in kernel_registers.VARIANTS.items():
        for kernel in kernel_registers.kernels(_grad(f), x):
            tiles = re.findall(r"tensor<\d+x(\d+)x[if]64>", kernel["ir"])
            assert all(columns == "1" for columns in tiles), (name, kernel["name"], tiles)


@pytest.mark.skipif(HAS_TRITON, reason="the test interpreter has triton")
def test_without_triton_the_tool_says_so(capsys):
    with pytest.raises(SystemExit, match="cannot import triton"):
        kernel_registers.main(
            ["--shapes", "8x32", "--dtypes", "float32", "--variants", "sparsemax"]
        )


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_no_kernel_spills_on_sm90_up_to_the_split(tmp_path, capsys):
    """Rows held whole (up to 2^14), subsets and the derivative rule's kernel: no spilled
    register (only the re-solve of uncertified rows holds a row of 2^15), also with 64-bit
    types enabled (as here: conftest.py), where counts of entries were int64 tiles.

    (Budget sparsemax spills 32-64 bytes at 2^14, an array alpha about 150: not checked.)"""
    out = tmp_path / "registers.json"
    args = ["--shapes", "4096x32,64x1000,2x16384,2x32000", "--json", str(out)]
    variants = ["sparsemax", "entmax15", "entmax a=1.25", "normmax a=2"]
    args += ["--dtypes", "float32", "--variants", ",".join(variants), "--python", sys.executable]
    assert kernel_registers.main(args) == 0
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} == {
        "smvariants_forward",
        "smvariants_jacobian",
        "smvariants_threshold",
        "smvariants_resolve",
    }
    # A register or two is ptxas' own choice (it keeps some 4-warp kernels at 128 registers:
    # alpha 1.25 at 1000 classes spills 8 bytes); a row held by too few threads spills hundreds.
    for r in records:
        assert r["kernel"] == "smvariants_resolve" or r["spill_bytes"] <= 8, r
