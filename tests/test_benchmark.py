"""experiments/benchmark.py: a quick run writes a complete, consistent table (no timing asserts)."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmark.py"


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600
    )


def test_quick_run(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--out", out, "--dtypes", "float32", "--variants", "sparsemax,entmax15"]
    done = run_script(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    env = result["environment"]
    assert env["backend"] == "cpu" and env["jax"] and env["malloc_env"]["MALLOC_TOP_PAD_"]
    timed = [r for r in result["records"] if r["time_ms"] is not None]
    # 2 shapes x 2 modes x (baseline + 2 variants).
    assert len(timed) == 12
    for r in timed:
        assert r["time_ms"] > 0 and math.isfinite(r["vs_softmax"]) and r["vs_copy"] > 0
        if r["variant"] == "jax.nn.softmax":
            assert r["vs_softmax"] == 1.0
    # --variants also selects the peers: no PyTorch rows, installed or not.
    assert {r["variant"] for r in result["records"]} == {"jax.nn.softmax", "sparsemax", "entmax15"}
    markdown = (out / "benchmark.md").read_text()
    assert "| 64x1000 | float32 | fwd+bwd | sparsemax |" in markdown
    # The summary: one row per variant, a column per shape and mode, ratios to jax.nn.softmax.
    header = "| variant | 256x32 fwd | 256x32 fwd+bwd | 64x1000 fwd | 64x1000 fwd+bwd |"
    assert header in markdown and header in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| sparsemax |"))
    ratios = [float(v) for v in row.strip("| ").split("|")[1:]]
    expected = [
        next(
            r["vs_softmax"]
            for r in timed
            if r["variant"] == "sparsemax" and r["shape"] == shape and r["mode"] == mode
        )
        for shape in ([256, 32], [64, 1000])
        for mode in ("fwd", "fwd+bwd")
    ]
    np.testing.assert_allclose(ratios, expected, rtol=0.01, atol=0.006)
    again = run_script(*args)
    assert again.returncode == 2 and "already holds results" in again.stderr


def test_unknown_variant_is_a_one_line_error(tmp_path):
    done = run_script("--quick", "--out", tmp_path / "b", "--variants", "fastmax")
    assert done.returncode == 2 and "unknown variants ['fastmax']" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()
