"""experiments/benchmark.py: a quick run writes a complete, consistent table (no timing asserts)."""

import json
import math
import pathlib
import subprocess
import sys

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
    markdown = (out / "benchmark.md").read_text()
    assert "| 64x1000 | float32 | fwd+bwd | sparsemax |" in markdown
    assert "| 64x1000 | float32 | fwd | sparsemax |" in done.stdout
    again = run_script(*args)
    assert again.returncode == 2 and "already holds results" in again.stderr


def test_unknown_variant_is_a_one_line_error(tmp_path):
    done = run_script("--quick", "--out", tmp_path / "b", "--variants", "fastmax")
    assert done.returncode == 2 and "unknown variants ['fastmax']" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()
