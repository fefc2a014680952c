"""On a GPU: rows of 16385-32768 entries held whole by one program, or split (the default)?

Compiled for sm_90a (``tools/kernel_registers.py``), a program holding a row of 2^15 spills
registers in every variant but sparsemax, so such rows take the split forward pass (two reads
of the row instead of one) and XLA's derivative rule since ``_pallas.SPLIT_COLUMNS`` became
2^14. This times both, in one process, interleaved: ms a call (back-to-back calls, one
synchronisation, as ``experiments/benchmark.py`` times accelerators), forward and
forward+backward, and prints one Markdown table; a ratio above 1 says that holding the rows
whole (2^15) was slower. Run by ``tools/gpu_check.sh``; on a CPU it runs too (the same
programs there: ratios near 1).

    python tools/split_ab.py [--shapes 256x32000,8192x32000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import smvariants as sm
from smvariants import _pallas

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import benchmark  # noqa: E402

VARIANTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax a=1.25": lambda x: sm.entmax(x, alpha=1.25),
    "entmax a=1.5 (array)": lambda x: sm.entmax(x, alpha=jnp.full((x.shape[0], 1), 1.5)),
    "budget_sparsemax b=2": lambda x: sm.budget_sparsemax(x, budget=2.0),
}
SETTINGS = {"split (2^14)": 1 << 14, "held whole (2^15)": 1 << 15}


def run_n(f: Callable, mode: str, held: int, x: jax.Array, w: jax.Array) -> Callable:
    """``experiments/benchmark.py``'s ``run_n(n)`` of ``f`` in ``mode`` (one of its MODES).

    Traced with rows of up to ``held`` entries held whole by one program.
    """
    saved = _pallas.SPLIT_COLUMNS
    _pallas.SPLIT_COLUMNS = held
    try:
        call, *_ = benchmark._jax_compile(f, x, w, mode)
    finally:
        _pallas.SPLIT_COLUMNS = saved
    return benchmark._jax_run_n(call, x)


def main(argv: list[str] | None = None) -> int:
    """Print the table; 0 always (a comparison, not a check)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="256x32000,8192x32000")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--min-batch-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| variant | shape | mode | split ms | held whole ms | held / split |")
    print("|---|---|---|---|---|---|")
    data = {}  # the inputs of each shape, made once
    for text in args.shapes.split(","):
        rows, classes = (int(n) for n in text.split("x"))
        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (rows, classes), jnp.float32)
        data[text] = (x, jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32))
    # Variant by variant (the first ones matter most, if a time box stops the run).
    for name, f in VARIANTS.items():
        for text, (x, w) in data.items():
            for mode in benchmark.MODES:
                runs = {s: run_n(f, mode, held, x, w) for s, held in SETTINGS.items()}
                times: dict[str, list[float]] = {s: [] for s in SETTINGS}
                for r in range(args.rounds):  # both orders: no first-position advantage
                    for s in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                        seconds, _ = benchmark.batched_time(runs[s], args.min_batch_ms / 1e3, 5)
                        times[s].append(seconds)
                split, held = (1e3 * float(np.median(times[s])) for s in SETTINGS)
                ratio = held / split
                print(f"| {name} | {text} | {mode} | {split:.3f} | {held:.3f} | {ratio:.2f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
