"""experiments/finetune_head.py: quick runs, files and contents, refusal, errors, 4 devices."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "finetune_head.py"
VARIANTS = "softmax,sparsemax,entmax:alpha=1.5,entmax:alpha=learned"


def run_script(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    done = run_script("--quick", "--out", out, "--variants", VARIANTS)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_writes_metrics_summary_and_plots(quick_run):
    out, done = quick_run
    records = json.loads((out / "metrics.json").read_text())
    assert [r["variant"] for r in records] == VARIANTS.split(",")
    for r in records:
        for key in ("accuracy", "ece", "support_size", "sparsity", "step_time_ms", "loss"):
            assert np.isfinite(r[key]), key
        assert 0.5 < r["accuracy"] <= 1  # digits are learnable even in a quick run
        assert r["backend"] == "cpu" and r["devices"] == 1 and r["seeds"] == 1
    by_name = {r["variant"]: r for r in records}
    assert by_name["softmax"]["sparsity"] == 0 and by_name["softmax"]["support_size"] == 10
    assert by_name["sparsemax"]["sparsity"] > 0.3
    assert 1 < by_name["entmax:alpha=learned"]["alpha"] < 3
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == VARIANTS.split(",")
    for name in ("accuracy_vs_sparsity.png", "reliability.png", "support_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["quick"] is True
    assert "| sparsemax |" in done.stdout
    with np.load(out / "test_logits.npz") as saved:
        assert saved["logits"].shape == (len(saved["y"]), 10)
    sparsity = ROOT / "experiments" / "sparsity.py"
    args = ["--quick", "--from-run", str(out), "--out", str(out / "sp")]
    done = subprocess.run(
        [sys.executable, str(sparsity), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test-set logits of" in done.stdout


def test_refuses_to_overwrite_and_resumes(quick_run):
    out, _ = quick_run
    before = (out / "metrics.json").read_bytes()
    done = run_script("--quick", "--out", out, "--variants", VARIANTS)
    assert done.returncode == 2
    assert "already holds results" in done.stderr and "Traceback" not in done.stderr
    assert (out / "metrics.json").read_bytes() == before
    # --resume keeps finished variants (same numbers) and adds new ones.
    done = run_script("--quick", "--out", out, "--resume", "--variants", VARIANTS + ",entmax15")
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())
    assert records[: len(VARIANTS.split(","))] == json.loads(before)
    assert records[-1]["variant"] == "entmax15"


def test_four_devices_match_one(quick_run, tmp_path):
    out, _ = quick_run
    four = tmp_path / "four"
    done = run_script(
        "--quick", "--out", four, "--variants", VARIANTS,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((out / "metrics.json").read_text())
    many = json.loads((four / "metrics.json").read_text())
    for a, b in zip(one[: len(many)], many, strict=True):
        assert b["devices"] == 4
        for key in ("accuracy", "loss", "ece", "support_size", "sparsity"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_features_file(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5)) + 3 * np.eye(5)[y]
    features = write_npz(tmp_path / "f.npz", X=x, y=y)
    done = run_script("--quick", "--out", tmp_path / "out", "--features", features,
                      "--variants", "softmax,sparsemax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(r["accuracy"] > 0.8 for r in records)
    assert not (tmp_path / "out" / "backbone.npz").exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "does not exist"),
        ({"X": np.ones((4, 2))}, "lacks array(s) y"),
        ({"X": np.ones((4, 2)), "y": np.zeros(3, np.int64)}, "one label per row"),
        ({"X": np.ones((4, 2)), "y": np.zeros(4)}, "integer class ids"),
        (
            {"X": np.ones((6, 2)), "y": np.arange(6), "split": np.zeros(6, np.int64)},
            "split is empty",
        ),
    ],
)
def test_bad_features_are_one_line_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    done = run_script("--quick", "--out", out, "--features", path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_malformed_file_and_unknown_variant(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    done = run_script("--quick", "--out", tmp_path / "a", "--features", bad)
    assert done.returncode == 2 and "not a readable .npz" in done.stderr
    done = run_script("--quick", "--out", tmp_path / "b", "--variants", "softmax,softermax")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "known variants: entmax, entmax15, softmax, sparsemax" in done.stderr
    assert not (tmp_path / "b").exists()  # nothing was written
