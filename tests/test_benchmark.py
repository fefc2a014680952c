"""experiments/benchmark.py: a quick run writes a complete, consistent table (no timing asserts)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmark.py"
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark  # noqa: E402
import common  # noqa: E402


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
    assert env["backend"] == jax.default_backend() and env["backend"]
    assert env["jax"] and env["malloc_env"]["MALLOC_TOP_PAD_"]
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


def test_every_file_is_written_atomically(tmp_path, monkeypatch, capsys):
    record = {"shape": [2, 3], "dtype": "float32", "mode": "fwd", "variant": "jax.nn.softmax"}
    record.update(time_ms=0.01, vs_softmax=1.0, vs_copy=2.0, temp_vs_input=None)
    monkeypatch.setattr(benchmark, "measure", lambda config: [record])  # no timing here
    written = []
    atomic_file = common.atomic_file

    def spy(path):
        written.append(pathlib.Path(path).name)
        return atomic_file(path)

    monkeypatch.setattr(common, "atomic_file", spy)
    out = tmp_path / "out"
    common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--out", str(out)])
    assert sorted(written) == sorted(path.name for path in out.iterdir())
    assert sorted(written) == ["benchmark.csv", "benchmark.json", "benchmark.md"]
    assert "| jax.nn.softmax |" in (out / "benchmark.md").read_text()
    # A second run on the folder is refused while a live process holds it, and when it holds
    # results; --force overwrites.
    (out / common.LOCK_NAME).write_text(f"{os.getppid()}\n")
    with pytest.raises(SystemExit) as exit_:
        common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--out", str(out)])
    assert exit_.value.code == 2 and "in use by another run" in capsys.readouterr().err
    (out / common.LOCK_NAME).unlink()
    common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--force", "--out", str(out)])
    assert not (out / common.LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtypes", "int32"], "--dtypes takes a comma-separated list from float32, bfloat16"),
        (["--dtypes", ","], "got nothing"),
        (["--shapes", "0x32"], "both sizes >= 1, got 0x32"),
        (["--shapes", "4x"], "--shapes takes BATCHxCLASSES,..., got '4x'"),
        (["--shapes", "4x3x2"], "both sizes >= 1, got 4x3x2"),
        (["--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
        (["--variants", "sparsemax,fastmax"], "unknown variants ['fastmax']"),
    ],
)
def test_bad_flags_are_one_line_errors_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_variant_names_with_parameters_are_split_on_commas():
    config, _ = benchmark.parse_args(["--variants", "softmax T=0.5,entmax a=1.25,sparsemax"])
    assert config.variants == ("softmax T=0.5", "entmax a=1.25", "sparsemax")
