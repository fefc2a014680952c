"""experiments/sparsity.py: quick runs on synthetic logits and a file, refusal, errors."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "sparsity.py"


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_quick_synthetic_run_and_contents(tmp_path):
    out = tmp_path / "sp"
    done = run_script("--quick", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "sparsity.json").read_text())
    assert {(r["alpha"], r["temperature"]) for r in rows} == {
        (a, t) for a in (1.0, 1.5, 2.0) for t in (0.5, 1.0, 2.0)
    }
    at = {(r["alpha"], r["temperature"]): r for r in rows}
    assert all(at[1.0, t]["sparsity"] == 0 for t in (0.5, 1.0, 2.0))  # softmax is dense
    # Sparser with larger alpha and with lower temperature.
    assert at[1.5, 1.0]["sparsity"] < at[2.0, 1.0]["sparsity"]
    assert at[2.0, 0.5]["sparsity"] > at[2.0, 2.0]["sparsity"]
    with open(out / "sparsity.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 9
    for name in ("sparsity_vs_alpha.png", "support_vs_temperature.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| 2 |" in done.stdout
    # Refuses to overwrite, without touching the results.
    before = (out / "sparsity.json").read_bytes()
    again = run_script("--quick", "--out", out)
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert (out / "sparsity.json").read_bytes() == before
    assert run_script("--quick", "--out", out, "--force").returncode == 0


def test_logits_file_matches_direct_computation(tmp_path):
    logits = np.array([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    np.savez(tmp_path / "l.npz", logits=logits)
    out = tmp_path / "out"
    done = run_script("--logits", tmp_path / "l.npz", "--out", out, "--alphas", "2",
                      "--temperatures", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "sparsity.json").read_text())
    # sparsemax: row 0 is one-hot (3 zeros of 4), row 1 uniform (no zeros).
    assert row["support_size"] == 2.5 and row["sparsity"] == 0.375


def test_errors(tmp_path):
    done = run_script("--logits", tmp_path / "missing.npz", "--out", tmp_path / "a")
    assert done.returncode == 2 and "does not exist" in done.stderr
    np.savez(tmp_path / "wrong.npz", scores=np.ones((2, 2)))
    done = run_script("--logits", tmp_path / "wrong.npz", "--out", tmp_path / "b")
    assert done.returncode == 2 and "lacks an array 'logits'" in done.stderr
    done = run_script("--from-run", tmp_path, "--out", tmp_path / "c")
    assert done.returncode == 2 and "no test_logits.npz" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "a").exists()
