"""Output sparsity of the variants across alpha and temperature.

For a set of logits, computes the mean support size and the fraction of exact zeros of
alpha-entmax over a grid of alpha (1 = softmax, 1.5 = entmax15, 2 = sparsemax, beyond) and
temperatures. Logits come from a file (``--logits FILE.npz`` with an array ``logits``), from a
fine-tuned head's test set (``--from-run DIR``, the ``test_logits.npz`` that
experiments/finetune_head.py writes) or, by default, from a synthetic Gaussian batch.

    python experiments/sparsity.py --out results/sparsity
    python experiments/sparsity.py --from-run results/finetune-<timestamp> --out results/sp
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

import smvariants as sm

RESULT_FILES = ("sparsity.json", "sparsity.csv")
# The --quick settings: small grids and data (flags given win).
QUICK = {"alphas": (1.0, 1.5, 2.0), "temperatures": (0.5, 1.0, 2.0), "examples": 128, "classes": 20}


@dataclasses.dataclass
class Config:
    """Settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/sparsity-<timestamp>
    logits: str = ""  # .npz file with an array "logits" (rows = examples)
    from_run: str = ""  # a finetune_head.py results folder (uses its test_logits.npz)
    alphas: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)  # the alpha grid
    temperatures: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # the temperature grid
    examples: int = 2048  # synthetic logits: number of rows
    classes: int = 100  # synthetic logits: number of classes
    scale: float = 2.0  # synthetic logits: standard deviation
    seed: int = 0  # synthetic logits: random seed
    force: bool = False  # overwrite results already in --out
    quick: bool = False  # recorded only: parse_args applies QUICK under the flags given


def load_logits(config: Config) -> tuple[np.ndarray, str]:
    """The logits to analyse and a description of where they came from."""
    if config.logits and config.from_run:
        raise common.UsageError("give either --logits or --from-run, not both")
    if config.from_run:
        path = pathlib.Path(config.from_run) / "test_logits.npz"
        if not path.is_file():
            raise common.UsageError(
                f"{config.from_run} has no test_logits.npz (not a finetune run?)"
            )
        return _read_logits(path), f"test-set logits of {config.from_run}"
    if config.logits:
        return _read_logits(pathlib.Path(config.logits)), f"logits file {config.logits}"
    rng = np.random.default_rng(config.seed)
    logits = rng.normal(scale=config.scale, size=(config.examples, config.classes))
    return logits.astype(np.float32), f"synthetic N(0, {config.scale}^2) logits"


def _read_logits(path: pathlib.Path) -> np.ndarray:
    """The array ``logits`` of an ``.npz`` file: finite floats, at least one row and column."""
    arrays = common.read_npz(path, "logits")
    if "logits" not in arrays:
        raise common.UsageError(f"logits file {path} lacks an array 'logits'")
    logits = arrays["logits"]
    if logits.ndim != 2 or 0 in logits.shape or not np.issubdtype(logits.dtype, np.floating):
        raise common.UsageError(
            f"logits in {path} must be a 2-D float array with at least one row and column, "
            f"got shape {logits.shape} ({logits.dtype})"
        )
    if not np.isfinite(logits).all():
        raise common.UsageError(f"logits in {path} have non-finite values (NaN or inf)")
    return logits.astype(np.float32)


def measure(logits: np.ndarray, alpha: float, temperature: float) -> dict[str, float]:
    """Mean support size and sparsity of entmax_alpha(logits / temperature)."""
    p = sm.entmax(jnp.asarray(logits), alpha=alpha, temperature=temperature)
    return {
        "alpha": alpha,
        "temperature": temperature,
        "support_size": float(jnp.mean(sm.stats.support_size(p))),
        "sparsity": float(jnp.mean(sm.stats.sparsity(p))),
        "max_probability": float(jnp.mean(jnp.max(p, axis=-1))),
    }


def run(config: Config) -> list[dict[str, Any]]:
    """Measures the grid and writes ``config.out``; returns the table rows."""
    if not config.alphas or not config.temperatures:
        raise common.UsageError("--alphas and --temperatures need at least one value each")
    if any(a < 1 for a in config.alphas) or any(t <= 0 for t in config.temperatures):
        raise common.UsageError("alphas must be >= 1 and temperatures > 0")
    logits, source = load_logits(config)
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("sparsity")
    out = common.prepare_out_dir(out, RESULT_FILES, config.force)
    common.write_json(out / "config.json", dataclasses.asdict(config))
    grid = [(a, t) for a in config.alphas for t in config.temperatures]
    rows = [measure(logits, a, t) for a, t in common.progress(grid, desc="grid")]
    for row in rows:
        row["source"] = source
        row["classes"] = int(logits.shape[1])
        row["backend"] = jax.default_backend()
    common.write_json(out / "sparsity.json", rows)
    common.write_csv(out / "sparsity.csv", rows)
    plot(rows, config, out)
    return rows


def plot(rows: list[dict[str, Any]], config: Config, out: pathlib.Path) -> None:
    """sparsity_vs_alpha.png and support_vs_temperature.png."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in config.temperatures:
        sel = [r for r in rows if r["temperature"] == t]
        ax.plot([r["alpha"] for r in sel], [r["sparsity"] for r in sel], "o-", label=f"T = {t}")
    ax.set(xlabel="alpha (1 softmax, 1.5 entmax15, 2 sparsemax)", ylabel="fraction of exact zeros")
    ax.set_title("sparsity vs alpha")
    ax.legend(fontsize=8)
    common.save_figure(fig, out / "sparsity_vs_alpha.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in config.alphas:
        sel = [r for r in rows if r["alpha"] == a]
        ax.plot(
            [r["temperature"] for r in sel], [r["support_size"] for r in sel], "o-", label=f"a={a}"
        )
    ax.set(xscale="log", xlabel="temperature", ylabel="mean support size")
    ax.set_title("support size vs temperature")
    ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, out / "support_vs_temperature.png")


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: sparsity for each alpha (rows) and temperature (columns)."""
    temperatures = sorted({r["temperature"] for r in rows})
    lines = [
        "| alpha \\ T | " + " | ".join(f"{t:g}" for t in temperatures) + " |",
        "|---" * (len(temperatures) + 1) + "|",
    ]
    for a in sorted({r["alpha"] for r in rows}):
        cells = {r["temperature"]: r for r in rows if r["alpha"] == a}
        lines.append(
            f"| {a:g} | "
            + " | ".join(
                f"{cells[t]['sparsity']:.3f} ({cells[t]['support_size']:.1f})" for t in temperatures
            )
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Config:
    """CLI flags -> :class:`Config`: the defaults, then QUICK under ``--quick``, then the flags."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--quick sets {QUICK} (flags given explicitly win)",
    )
    parser.add_argument("--out", help="results folder (default results/sparsity-<timestamp>)")
    parser.add_argument("--logits", help=".npz with an array 'logits'")
    parser.add_argument("--from-run", help="a finetune_head.py folder")
    numbers = common.comma_separated(float)
    parser.add_argument("--alphas", type=numbers, help=f"default {defaults.alphas}")
    parser.add_argument("--temperatures", type=numbers, help=f"default {defaults.temperatures}")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--force", action="store_true", help="overwrite results in --out")
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    return common.config_from_flags(defaults, parser.parse_args(argv), QUICK)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, runs, prints the table (sparsity, with mean support size)."""
    rows = run(parse_args(argv))
    print(f"sparsity (mean support size) of entmax_alpha(z / T) on {rows[0]['source']}:")
    print(table(rows))


if __name__ == "__main__":
    common.run_main(main)
