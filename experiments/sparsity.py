"""Output sparsity of the variants across alpha and temperature.

For a set of logits, computes the mean support size and the fraction of exact zeros of
alpha-entmax over a grid of alpha (1 = softmax, 1.5 = entmax15, 2 = sparsemax, beyond) and
temperatures. Logits come from a file (``--logits FILE.npz`` with an array ``logits``), from a
fine-tuned head's test set (``--from-run DIR``, the ``test_logits.npz`` that
experiments/finetune_head.py writes) or, by default, from a synthetic Gaussian batch.

The last axis of the logits is the class axis; any leading axes are rows, so attention scores
``[batch, heads, q, k]`` work as they are. ``-inf`` entries are masked (as after a causal or
padding mask): they are left out of the normalisation and the statistics, and fully masked rows
are left out of the means.

    python experiments/sparsity.py --out results/sparsity
    python experiments/sparsity.py --from-run results/finetune-<timestamp> --out results/sp
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

import smvariants as sm

# Everything a run writes: any of them marks a folder with results (refused without --force).
OUTPUTS = (
    "sparsity.json",
    "sparsity.csv",
    "config.json",
    "sparsity_vs_alpha.png",
    "support_vs_temperature.png",
)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The --quick settings: small grids and data (flags given win).
QUICK = {"alphas": (1.0, 1.5, 2.0), "temperatures": (0.5, 1.0, 2.0), "examples": 128, "classes": 20}


@dataclasses.dataclass
class Config:
    """Settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/sparsity-<timestamp>
    logits: str = ""  # .npz file with an array "logits" (last axis: classes; -inf: masked)
    from_run: str = ""  # a finetune_head.py results folder (uses its test_logits.npz)
    alphas: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)  # finite, >= 1
    temperatures: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # finite, > 0
    examples: int = 2048  # synthetic logits: number of rows
    classes: int = 100  # synthetic logits: number of classes
    scale: float = 2.0  # synthetic logits: standard deviation
    seed: int = 0  # synthetic logits: random seed (>= 0)
    force: bool = False  # overwrite results already in --out
    quick: bool = False  # recorded only: parse_args applies QUICK under the flags given


def check_config(config: Config) -> None:
    """Raises a :class:`common.UsageError` for a setting out of its range."""
    if not config.alphas or not config.temperatures:
        raise common.UsageError("--alphas and --temperatures need at least one value each")
    bad = [a for a in config.alphas if not common.is_finite_number(a) or a < 1]
    if bad:
        raise common.UsageError(f"alphas must be finite and >= 1, got {', '.join(map(str, bad))}")
    bad = [t for t in config.temperatures if not common.is_finite_number(t) or t <= 0]
    if bad:
        raise common.UsageError(
            f"temperatures must be finite and > 0, got {', '.join(map(str, bad))}"
        )
    # entmax computes in float32 and refuses what it cannot hold there.
    common.check_float32(config.alphas, "--alphas", reciprocal=True)
    common.check_float32(config.temperatures, "--temperatures", positive=True, reciprocal=True)
    for name in ("examples", "classes"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise common.UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if not common.is_finite_number(config.scale) or config.scale <= 0:
        raise common.UsageError(f"scale must be finite and > 0, got {config.scale}")
    common.check_seed(config.seed, "--seed")
    if config.logits and config.from_run:
        raise common.UsageError("give either --logits or --from-run, not both")


def load_logits(config: Config) -> tuple[np.ndarray, str]:
    """The logits to analyse and a description of where they came from."""
    if config.from_run:
        return _run_logits(pathlib.Path(config.from_run)), f"test-set logits of {config.from_run}"
    if config.logits:
        return _read_logits(pathlib.Path(config.logits)), f"logits file {config.logits}"
    rng = np.random.default_rng(config.seed)
    logits = rng.normal(scale=config.scale, size=(config.examples, config.classes))
    return logits.astype(np.float32), f"synthetic N(0, {config.scale}^2) logits"


def _run_logits(run: pathlib.Path) -> np.ndarray:
    """A finetune_head.py folder's test_logits.npz, if it belongs to the settings of the run.

    The file carries the ``config_hash`` of the run that wrote it; it must equal the one in the
    folder's config.json (else it is another run's, e.g. left by an interrupted one).
    """
    path = run / "test_logits.npz"
    if not path.is_file():
        raise common.UsageError(f"{run} has no test_logits.npz (not a finetune run?)")
    arrays = common.read_npz(path, "logits")
    config_path = run / "config.json"
    if config_path.is_file():
        try:
            expected = common.read_json(config_path).get("config_hash")
        except (OSError, ValueError, AttributeError):
            raise common.UsageError(f"{config_path} is not a valid config.json") from None
        found = str(arrays["config_hash"]) if "config_hash" in arrays else None
        if expected is not None and found != expected:
            raise common.UsageError(
                f"{path} is not from the run in {config_path} (config_hash {found} != "
                f"{expected}; the run was interrupted before its first head?)"
            )
    return _check_logits(arrays, path)


def _read_logits(path: pathlib.Path) -> np.ndarray:
    """The array ``logits`` of an ``.npz`` file, checked (see :func:`_check_logits`)."""
    return _check_logits(common.read_npz(path, "logits"), path)


def _check_logits(arrays: dict[str, np.ndarray], path: pathlib.Path) -> np.ndarray:
    """``logits`` as float32: at least 1-D, no empty axis, no NaN or +inf, some row unmasked.

    ``-inf`` entries are masked; finite values beyond the float32 range are an error.
    """
    if "logits" not in arrays:
        raise common.UsageError(f"logits file {path} lacks an array 'logits'")
    logits = arrays["logits"]
    if logits.ndim < 1 or 0 in logits.shape or not np.issubdtype(logits.dtype, np.floating):
        raise common.UsageError(
            f"logits in {path} must be a float array (last axis: classes) with no empty axis, "
            f"got shape {logits.shape} ({logits.dtype})"
        )
    if np.isnan(logits).any() or (logits == np.inf).any():
        raise common.UsageError(f"logits in {path} have NaN or +inf values (-inf means masked)")
    logits = common.to_float32(logits, f"logits in {path}")
    if not (logits > -np.inf).any(-1).any():
        raise common.UsageError(f"logits in {path}: every row is fully masked (-inf)")
    return logits


def check_scaled(logits: np.ndarray, temperatures: Sequence[float], source: str) -> None:
    """Refuses logits whose row maximum over T overflows float32 at some temperature T.

    entmax shifts a row by its maximum ``m`` before dividing by ``T``, and gives a ``nan`` row
    where ``m / T`` reaches +inf and a row of zeros where it reaches -inf (documented); their
    counts would be wrong (no entry > 0), so such input is refused.
    """
    row_max = logits.max(axis=-1)  # -inf for a fully masked row
    largest = np.float32(np.abs(row_max[np.isfinite(row_max)]).max(initial=0))
    for t in temperatures:
        with np.errstate(over="ignore"):
            scaled = largest / np.float32(t)
        if not np.isfinite(scaled):
            raise common.UsageError(
                f"{source}: a row maximum / T overflows float32 at --temperatures {t:g} "
                f"(|maximum| up to {float(largest):.3g}); use temperatures above "
                f"{float(largest) / FLOAT32_MAX:.3g} or rescale the logits"
            )


def measure(logits: np.ndarray, alpha: float, temperature: float) -> dict[str, float]:
    """Mean support size and sparsity of entmax_alpha(logits / temperature) over the last axis.

    ``-inf`` entries are masked (``where=``): not counted as zeros nor in the class count. Means
    are over the rows with at least one unmasked entry.
    """
    x = jnp.asarray(logits)
    mask = x > -jnp.inf
    live = np.asarray(jnp.any(mask, axis=-1))
    p = sm.entmax(x, alpha=alpha, temperature=temperature, where=mask)
    # check_scaled refuses the input that gives nan rows; were one left, its counts would be
    # wrong (no entry > 0), so it is an error rather than a number.
    if not np.isfinite(np.asarray(p)).all():
        raise common.UsageError(
            f"entmax at alpha {alpha:g}, temperature {temperature:g} gave non-finite rows; "
            "rescale the logits"
        )
    support = np.asarray(sm.stats.support_size(p, where=mask))[live]
    zeros = np.asarray(sm.stats.sparsity(p, where=mask))[live]
    largest = np.asarray(jnp.max(p, axis=-1))[live]
    return {
        "alpha": alpha,
        "temperature": temperature,
        "support_size": float(np.mean(support)),
        "sparsity": float(np.mean(zeros)),
        "max_probability": float(np.mean(largest)),
    }


def run(config: Config) -> list[dict[str, Any]]:
    """Measures the grid and writes ``config.out``; returns the table rows."""
    check_config(config)
    logits, source = load_logits(config)
    check_scaled(logits, config.temperatures, source)
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("sparsity")
    with common.output_folder(out, OUTPUTS, config.force) as out:
        if config.force:
            common.remove_outputs(out, OUTPUTS)
        common.write_json(out / "config.json", dataclasses.asdict(config))
        grid = [(a, t) for a in config.alphas for t in config.temperatures]
        rows = [measure(logits, a, t) for a, t in common.progress(grid, desc="grid")]
        masked = float(np.mean(logits == -np.inf))
        rows_used = int(np.sum((logits > -np.inf).any(-1)))
        for row in rows:
            row["source"] = source
            row["shape"] = "x".join(map(str, logits.shape))
            row["classes"] = int(logits.shape[-1])
            row["rows"] = rows_used
            row["masked_fraction"] = masked
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
    parser = common.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--quick sets {QUICK} (flags given explicitly win)",
    )
    parser.add_argument("--out", help="results folder (default results/sparsity-<timestamp>)")
    parser.add_argument(
        "--logits", help=".npz with an array 'logits' (last axis: classes; -inf entries: masked)"
    )
    parser.add_argument("--from-run", help="a finetune_head.py folder")
    numbers = common.comma_separated(common.number)
    parser.add_argument("--alphas", type=numbers, help=f"default {defaults.alphas}")
    parser.add_argument("--temperatures", type=numbers, help=f"default {defaults.temperatures}")
    parser.add_argument("--seed", type=common.integer, help=f"default {defaults.seed}")
    parser.add_argument("--force", action="store_true", help="overwrite results in --out")
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    config = common.config_from_flags(defaults, parser.parse_args(argv), QUICK)
    check_config(config)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, runs, prints the table (sparsity, with mean support size)."""
    rows = run(parse_args(argv))
    print(f"sparsity (mean support size) of entmax_alpha(z / T) on {rows[0]['source']}:")
    print(table(rows))


if __name__ == "__main__":
    common.run_main(main)
