"""Registers and spills of every Pallas GPU kernel of smvariants on sm_90a (H100/H200), no GPU.

Each case (variant, shape, dtype, forward or gradient) is lowered for ``cuda`` on this machine;
the Triton IR of each ``pallas_call`` is taken from the lowering (jaxlib's Triton dialect reads
the bytecode that XLA would compile) and compiled by the ``triton`` package for sm_90a down to a
cubin, whose ptxas report gives the registers a thread uses and the bytes it spills. A kernel
that spills reloads those values from memory in every iteration of its solver. The seconds
Triton took to compile each kernel on this machine come with them (a GPU compiles each kernel
once per program and shape, at ``jit`` time).

    pip install triton        # ~300 MB; any machine, no GPU or CUDA driver needed
    python tools/kernel_registers.py                      # the benchmark's shapes, every variant
    python tools/kernel_registers.py --shapes 2x16384 --json /tmp/registers.json

The Triton here is the ``triton`` package, not the one inside XLA that compiles the kernels on a
GPU: the counts are what that compiler makes of the same IR, close to but not exactly XLA's.
It needs jaxlib 0.10, whose lowering for ``cuda`` holds the Triton IR (later jaxlibs compile it
while lowering, with a GPU).
It runs in a subprocess (``--python``: another environment's interpreter), as jaxlib and triton
each carry their own LLVM. The kernels are named by role (``smvariants_forward``,
``_threshold``, ``_resolve``, ``_jacobian``); ``resolve`` re-solves, on the whole row, the rows
of a split forward pass that the subset does not certify, and may spill on long rows. The exit
status is 1 if a kernel does not compile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib import triton as jaxlib_triton
from jax._src.lib import version as jaxlib_version
from jax._src.lib.mlir import ir

import smvariants as sm

SHAPES = ((4096, 32), (1024, 1000), (256, 32000), (32, 128000), (65536, 1024), (8192, 32000))
DTYPES = ("float32", "bfloat16")


def _per_row_alpha(x: jax.Array) -> jax.Array:
    return jnp.full(x.shape[:-1] + (1,), 1.5, jnp.float32)


VARIANTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax a=1.25": lambda x: sm.entmax(x, alpha=1.25),
    "entmax a=1.5 (array)": lambda x: sm.entmax(x, alpha=_per_row_alpha(x)),
    "entmax a=3": lambda x: sm.entmax(x, alpha=3.0),
    "normmax a=2": lambda x: sm.normmax(x, alpha=2.0),
    "budget_sparsemax b=2": lambda x: sm.budget_sparsemax(x, budget=2.0),
    "sparsemax T=0.5": lambda x: sm.sparsemax(x, temperature=0.5),
}

# Run by --python: compiles each {"key", "ir", "warps", "stages"} of the JSON list on stdin and
# prints {"key": {"registers", "spill_bytes", "shared_bytes", "compile_s"} or {"error"}} as
# JSON. ptxas runs again for its report, with the options Triton gives it.
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
ptxas = get_ptxas(90).path
out = {}
with tempfile.TemporaryDirectory() as tmp:
    for k in json.load(sys.stdin):
        path = os.path.join(tmp, k["key"] + ".ttir")
        with open(path, "w") as f:
            f.write(k["ir"])
        try:
            options = {"num_warps": k["warps"], "num_stages": k["stages"]}
            began = time.perf_counter()
            compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
            seconds = time.perf_counter() - began  # Triton's own compile, its ptxas included
            with open(path + ".ptx", "w") as f:
                f.write(compiled.asm["ptx"])
            cmd = [ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", path + ".ptx",
                   "-o", path + ".cubin"]
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            out[k["key"]] = {
                "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
                "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
                "shared_bytes": compiled.metadata.shared,
                "compile_s": round(seconds, 2),
            }
        except Exception as e:  # one kernel's failure is reported, the others still run
            out[k["key"]] = {"error": (str(e) or type(e).__name__)[-2000:]}
json.dump(out, sys.stdout)
"""


def _triton_calls(op: ir.Operation) -> Iterator[ir.Operation]:
    """The Triton custom calls in ``op``'s regions, depth first."""
    for region in op.regions:
        for block in region:
            for inner in block.operations:
                if inner.operation.name == "stablehlo.custom_call":
                    target = ir.StringAttr(inner.attributes["call_target_name"]).value
                    if "triton" in target:
                        yield inner
                yield from _triton_calls(inner.operation)


def kernels(fn: Callable, *args) -> list[dict]:
    """Each Pallas kernel of ``jit(fn)(*args)`` lowered for ``cuda``, in program order.

    Its name, Triton IR (as text), warps and pipeline stages.
    """
    if jaxlib_version > (0, 10, 2):  # Pallas compiles the IR itself there (with a GPU only)
        raise SystemExit("kernel_registers.py: needs jaxlib 0.10, whose lowering holds Triton IR")
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    found = []
    for call in _triton_calls(lowered.compiler_ir("stablehlo").operation):
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        context = ir.Context()
        jaxlib_triton.dialect.register_dialect(context)
        with context:
            text = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
        found.append(
            {
                "name": ir.StringAttr(config["name"]).value,
                "ir": text,
                "warps": ir.IntegerAttr(config["num_warps"]).value,
                "stages": ir.IntegerAttr(config["num_stages"]).value,
            }
        )
    return found


def cases(shapes, dtypes, variants) -> Iterator[tuple[str, Callable, jax.ShapeDtypeStruct]]:
    """``(label, function, argument)``: forward and gradient of each variant, shape, dtype."""
    for shape in shapes:
        for dtype in dtypes:
            x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
            for name in variants:
                f = VARIANTS[name]

                def loss(x, f=f):
                    weights = lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
                    return jnp.sum(f(x).astype(jnp.float32) * weights)

                label = f"{name} {shape[0]}x{shape[1]} {dtype}"
                yield f"{label} forward", f, x
                yield f"{label} gradient", jax.grad(loss), x


def compile_all(unique: dict[str, dict], python: str) -> dict[str, dict]:
    """:data:`_COMPILE` on ``unique`` (key -> kernel) in a subprocess of ``python``."""
    has_triton = subprocess.run([python, "-c", "import triton"], capture_output=True, check=False)
    if has_triton.returncode:
        raise SystemExit(
            f"kernel_registers.py: {python} cannot import triton (pip install triton, or give "
            "--python an interpreter that can)"
        )
    todo = [{"key": k, **v} for k, v in unique.items()]
    with tempfile.TemporaryFile("w+") as stdin:
        json.dump(todo, stdin)
        stdin.seek(0)
        done = subprocess.run(
            [python, "-c", _COMPILE], stdin=stdin, capture_output=True, text=True, check=False
        )
    if done.returncode:
        raise SystemExit(f"kernel_registers.py: the Triton compile failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _shape(text: str) -> tuple[int, int]:
    rows, _, classes = text.partition("x")
    return int(rows), int(classes)


def main(argv: list[str] | None = None) -> int:
    """Print every kernel's registers and spills; 1 if a kernel does not compile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names, comma-separated")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with triton")
    parser.add_argument("--json", default="", help="also write every kernel's figures here")
    parser.add_argument("--x64", action="store_true", help="with jax_enable_x64 (other kernels)")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    names = [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    shapes = [_shape(s) for s in args.shapes.split(",")]
    unique: dict[str, dict] = {}
    uses: dict[str, list[str]] = {}
    for label, fn, x in cases(shapes, args.dtypes.split(","), names):
        for kernel in kernels(fn, x):
            key = hashlib.sha1(f"{kernel['warps']} {kernel['ir']}".encode()).hexdigest()[:12]
            unique.setdefault(key, kernel)
            uses.setdefault(key, []).append(label)
    results = compile_all(unique, args.python)
    print("| kernel | warps | registers | spilled bytes | Triton compile s | first case (of n) |")
    print("|---|---|---|---|---|---|")
    failed = False
    for key, kernel in unique.items():
        r = results[key]
        first = f"{uses[key][0]} ({len(uses[key])})"
        if "error" in r:
            failed = True
            print(f"| {kernel['name']} | {kernel['warps']} | error | | | {first} |")
            print(r["error"], file=sys.stderr)
            continue
        figures = f"{r['registers']} | {r['spill_bytes']} | {r['compile_s']}"
        print(f"| {kernel['name']} | {kernel['warps']} | {figures} | {first} |")
    if args.json:
        records = [
            {"kernel": k["name"], "warps": k["warps"], "cases": uses[key], **results[key]}
            for key, k in unique.items()
        ]
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
