"""Speed of every variant as ratios to jax.nn.softmax and to a memory-copy roofline, one process.

    python experiments/benchmark.py --out results/bench          # the full table
    python experiments/benchmark.py --quick --out /tmp/bench     # a smoke run in seconds

For each shape and dtype it times, with ``jax.jit`` compiled once beforehand, ``block_until_ready``
and the median of many repeats: the forward pass, and forward + backward (``jax.grad`` of
``sum(f(x) * w)`` for a fixed random ``w``). Every time is reported as a ratio to
``jax.nn.softmax`` (same shape, dtype and mode) measured in the same run, and to a memory-copy
roofline: a jitted ``x * 1.0001`` that reads and writes the input once, the least any normalizer can
do (forward: 1 read + 1 write of x; forward + backward: counted as 3 such copies: x and w read, the
gradient written, plus the output). Peers in the same table: optax's simplex projection (vmapped
over rows; it is sparsemax) and, when installed (``pip install -e ".[peers]"``), the PyTorch
``entmax`` package, timed with the same method.

Shared machines are noisy: run it with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456``
(the script re-executes itself with them unless ``--no-malloc-env``) and compare ratios, not times.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import smvariants as sm

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
SHAPES = ((4096, 32), (1024, 1000), (256, 32000), (32, 128000))
QUICK_SHAPES = ((256, 32), (64, 1000))
# Everything a run writes: any of them marks a folder with results (refused without --force).
OUTPUTS = ("benchmark.json", "benchmark.md", "benchmark.csv")
# The dtypes a case can take (the PyTorch peers have each of them too).
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Config:
    """Settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/benchmark-<timestamp>
    shapes: tuple[tuple[int, int], ...] = SHAPES  # (batch, classes), each >= 1
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # from DTYPES
    variants: tuple[str, ...] = ()  # empty: all (see VARIANTS and TORCH_VARIANTS)
    repeats: int = 30  # timed calls per case (>= 1; fast cases get more within the budget)
    budget_s: float = 1.0  # time per case spent on repeats beyond --repeats (>= 0)
    force: bool = False  # overwrite results already in --out
    quick: bool = False  # tiny shapes and few repeats


def per_row_alpha(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """A (batch, 1) alpha array spread over [lo, hi] (the general, per-row path)."""
    return jnp.linspace(lo, hi, x.shape[0], dtype=jnp.float32)[:, None]


# name -> function of x (the benchmark's variants; "softmax (jax.nn)" is the baseline).
VARIANTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "jax.nn.softmax": jax.nn.softmax,
    "softmax": sm.softmax,
    "softmax T=0.5": lambda x: sm.softmax(x, temperature=0.5),
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax a=1.25": lambda x: sm.entmax(x, alpha=1.25),
    "entmax a=1.5 (array)": lambda x: sm.entmax(x, alpha=per_row_alpha(x, 1.5, 1.5)),
    "entmax a=1.1..1.9 per row": lambda x: sm.entmax(x, alpha=per_row_alpha(x, 1.1, 1.9)),
    "normmax a=2": lambda x: sm.normmax(x, alpha=2.0),
    "budget_sparsemax b=2": lambda x: sm.budget_sparsemax(x, budget=2.0),
    "optax projection_simplex": jax.vmap(optax.projections.projection_simplex),
}


def _median_time(fn: Callable[[], Any], repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, more while within ``budget_s``."""
    times = []
    began = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - began < budget_s and len(times) < 2000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _jax_case(f, x, w, mode):
    if mode == "fwd":
        compiled = jax.jit(f).lower(x).compile()
        return (lambda: compiled(x).block_until_ready()), compiled

    def loss(x):
        return jnp.sum(f(x).astype(jnp.float32) * w)

    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    return (lambda: compiled(x).block_until_ready()), compiled


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


# The PyTorch entmax package's functions (peers, timed when it is installed).
TORCH_VARIANTS = (
    "torch entmax.sparsemax",
    "torch entmax.entmax15",
    "torch entmax.entmax_bisect a=1.5",
    "torch entmax.normmax_bisect a=2",
    "torch entmax.budget_bisect b=2",
)


def _torch_cases(shape, dtype, names):
    """Name -> (fwd, fwd+bwd) closures for the PyTorch entmax package, or None if missing."""
    try:
        import entmax
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    x = torch.randn(*shape, dtype=tdtype) * 3
    w = torch.randn(*shape, dtype=tdtype)
    fns = {
        "torch entmax.sparsemax": entmax.sparsemax,
        "torch entmax.entmax15": entmax.entmax15,
        "torch entmax.entmax_bisect a=1.5": lambda t: entmax.entmax_bisect(t, alpha=1.5),
        "torch entmax.normmax_bisect a=2": lambda t: entmax.normmax_bisect(t, alpha=2.0),
        "torch entmax.budget_bisect b=2": lambda t: entmax.budget_bisect(t, budget=2.0),
    }
    cases = {}
    for name, fn in fns.items():
        if name not in names:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)  # every function normalises the last dimension by default

        def fwd_bwd(fn=fn):
            xx = x.detach().requires_grad_(True)
            (fn(xx) * w).sum().backward()

        cases[name] = (fwd, fwd_bwd)
    return cases


def measure(config: Config) -> list[dict[str, Any]]:
    """Times every case; returns one record per (shape, dtype, variant, mode)."""
    names = config.variants or tuple(VARIANTS) + TORCH_VARIANTS
    cases = [(s, d, m) for s in config.shapes for d in config.dtypes for m in ("fwd", "fwd+bwd")]
    records = []
    for shape, dtype, mode in common.progress(cases, desc="benchmark"):
        key_x, key_w = jax.random.split(jax.random.key(0))
        x = (jax.random.normal(key_x, shape) * 3).astype(dtype)
        w = jax.random.normal(key_w, shape, jnp.float32)
        copy = jax.jit(lambda x: x * jnp.asarray(1.0001, x.dtype)).lower(x).compile()
        copies = 1 if mode == "fwd" else 3
        copy_time = copies * _median_time(
            lambda copy=copy, x=x: copy(x).block_until_ready(), config.repeats, config.budget_s
        )
        timed = {}
        failed = {}
        jax_names = [n for n in names if n in VARIANTS and n != "jax.nn.softmax"]
        for name in ["jax.nn.softmax", *jax_names]:
            try:
                run_once, compiled = _jax_case(VARIANTS[name], x, w, mode)
            except Exception as error:  # a peer that cannot run this case is reported, not fatal
                failed[name] = f"fails: {type(error).__name__}"
                continue
            run_once()  # warm-up (compilation is done; first-call allocations are not timed)
            timed[name] = (_median_time(run_once, config.repeats, config.budget_s), compiled)
        torch_names = [n for n in names if n in TORCH_VARIANTS]
        torch_cases = _torch_cases(shape, dtype, torch_names) if torch_names else {}
        if torch_cases is not None:
            for name, (fwd, fwd_bwd) in torch_cases.items():
                fn = fwd if mode == "fwd" else fwd_bwd
                fn()
                timed[name] = (_median_time(fn, config.repeats, config.budget_s), None)
        base = timed["jax.nn.softmax"][0]
        input_bytes = x.size * x.dtype.itemsize
        for name, (seconds, compiled) in timed.items():
            temp = _temp_bytes(compiled) if compiled is not None else None
            records.append(
                {
                    "shape": list(shape),
                    "dtype": dtype,
                    "mode": mode,
                    "variant": name,
                    "time_ms": seconds * 1e3,
                    "vs_softmax": seconds / base,
                    "vs_copy": seconds / copy_time,
                    "temp_vs_input": None if temp is None else temp / input_bytes,
                }
            )
        if torch_cases is None:
            failed["torch entmax"] = "not installed"
        for name, note in failed.items():
            records.append(
                {"shape": list(shape), "dtype": dtype, "mode": mode, "variant": name,
                 "time_ms": None, "vs_softmax": None, "vs_copy": None, "temp_vs_input": None,
                 "note": note}
            )  # fmt: skip
    return records


def environment() -> dict[str, Any]:
    """Backend, device, versions and the malloc settings of this run."""
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table: time ratios to jax.nn.softmax and to the copy roofline."""
    lines = [
        "| shape | dtype | mode | variant | / jax.nn.softmax | / copy | temp / input | ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        shape = "x".join(map(str, r["shape"]))
        if r["time_ms"] is None:
            lines.append(f"| {shape} | {r['dtype']} | {r['mode']} | {r['variant']} | "
                         f"{r.get('note', '')} | | | |")  # fmt: skip
            continue
        temp = "" if r["temp_vs_input"] is None else f"{r['temp_vs_input']:.1f}"
        lines.append(
            f"| {shape} | {r['dtype']} | {r['mode']} | {r['variant']} | {r['vs_softmax']:.2f} "
            f"| {r['vs_copy']:.2f} | {temp} | {r['time_ms']:.3f} |"
        )
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    """One markdown table per dtype: each variant's time / jax.nn.softmax, shapes as columns.

    Its first row is jax.nn.softmax's own time / the copy roofline, so that every ratio below can
    be turned into a ratio to the roofline.
    """
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        rows = [r for r in records if r["dtype"] == dtype]
        columns = list(dict.fromkeys((tuple(r["shape"]), r["mode"]) for r in rows))
        cell = {(tuple(r["shape"]), r["mode"], r["variant"]): r for r in rows}
        head = [f"{'x'.join(map(str, shape))} {mode}" for shape, mode in columns]
        lines = [
            f"**{dtype}**: time / jax.nn.softmax (first row: jax.nn.softmax / memory copy)",
            "",
            "| variant | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            key = "vs_copy" if variant == "jax.nn.softmax" else "vs_softmax"
            values = []
            for shape, mode in columns:
                r = cell.get((shape, mode, variant))
                value = None if r is None else r[key]
                values.append(r.get("note", "") if value is None and r else _ratio(value))
            lines.append(f"| {variant} | " + " | ".join(values) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def check_config(config: Config) -> None:
    """Raises a :class:`common.UsageError` for a setting out of its range or unknown."""
    known = tuple(VARIANTS) + TORCH_VARIANTS
    unknown = [n for n in config.variants if n not in known]
    if unknown:
        raise common.UsageError(f"unknown variants {unknown}; known: {', '.join(known)}")
    if not config.dtypes or any(d not in DTYPES for d in config.dtypes):
        raise common.UsageError(
            f"--dtypes takes a comma-separated list from {', '.join(DTYPES)}, "
            f"got {','.join(config.dtypes) or 'nothing'}"
        )
    if not config.shapes or any(
        len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
        for shape in config.shapes
    ):
        shown = ",".join("x".join(map(str, shape)) for shape in config.shapes) or "nothing"
        raise common.UsageError(
            f"--shapes takes BATCHxCLASSES,... with both sizes >= 1, got {shown}"
        )
    if (
        isinstance(config.repeats, bool)
        or not isinstance(config.repeats, int)
        or config.repeats < 1
    ):
        raise common.UsageError(f"--repeats must be an integer >= 1, got {config.repeats!r}")
    if not common.is_finite_number(config.budget_s) or config.budget_s < 0:
        raise common.UsageError(f"budget_s must be finite and >= 0, got {config.budget_s!r}")


def run(config: Config) -> dict[str, Any]:
    """Measures and writes ``benchmark.json``, ``.csv`` and ``.md`` into ``config.out``."""
    if config.quick:
        config = dataclasses.replace(config, shapes=QUICK_SHAPES, repeats=5, budget_s=0.05)
    check_config(config)
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("benchmark")
    with common.output_folder(out, OUTPUTS, config.force) as out:
        if config.force:
            common.remove_outputs(out, OUTPUTS)
        records = measure(config)
        result = {
            "environment": environment(),
            "config": dataclasses.asdict(config),
            "records": records,
        }
        common.write_json(out / "benchmark.json", result)
        env = result["environment"]
        header = (
            f"backend {env['backend']} ({env['device']}), jax {env['jax']}, "
            f"{env['cpu_count']} CPUs, {env['date']}; medians; ratios measured in one run.\n\n"
        )
        common.write_csv(out / "benchmark.csv", records)
        common.write_text(
            out / "benchmark.md",
            header + summary(records) + "\n\nAll records:\n\n" + table(records) + "\n",
        )
    return result


def _shape(text: str) -> tuple[int, ...]:
    """``BATCHxCLASSES`` -> (batch, classes); the checks are in :func:`check_config`."""
    try:
        return tuple(int(n) for n in text.strip().split("x"))
    except ValueError:
        raise common.UsageError(f"--shapes takes BATCHxCLASSES,..., got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    """CLI flags -> (:class:`Config`, whether to skip the malloc re-exec)."""
    defaults = Config()
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--shapes", default="", help="e.g. 4096x32,1024x1000")
    parser.add_argument(
        "--dtypes", default=",".join(defaults.dtypes), help=f"from {', '.join(DTYPES)}"
    )
    parser.add_argument(
        "--variants",
        default="",
        help=f"comma-separated from: {', '.join(tuple(VARIANTS) + TORCH_VARIANTS)}",
    )
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-malloc-env", action="store_true", help="do not set MALLOC_* and re-run"
    )
    args = parser.parse_args(argv)
    shapes = tuple(_shape(s) for s in args.shapes.split(",") if s.strip()) or defaults.shapes
    config = dataclasses.replace(
        defaults,
        out=args.out,
        shapes=shapes,
        dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
        variants=tuple(filter(None, (v.strip() for v in args.variants.split(",")))),
        repeats=args.repeats,
        force=args.force,
        quick=args.quick,
    )
    check_config(config)
    return config, args.no_malloc_env


def main(argv: Sequence[str] | None = None) -> None:
    """Sets the malloc environment (by re-executing), measures, prints the table."""
    config, no_malloc_env = parse_args(argv)
    if not no_malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    result = run(config)
    print(summary(result["records"]))


if __name__ == "__main__":
    common.run_main(main)
