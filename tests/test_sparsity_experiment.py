"""experiments/sparsity.py: quick runs on synthetic logits and a file, refusal, errors."""

import csv
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import scripts

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402
import sparsity  # noqa: E402

run_script = scripts.runner("sparsity.py")


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
    # No progress bar: stderr is a pipe here, not a terminal.
    assert "grid" not in done.stderr and "it/s" not in done.stderr, done.stderr[-2000:]
    # Refuses to overwrite, without touching the results.
    before = (out / "sparsity.json").read_bytes()
    again = run_script("--quick", "--out", out)
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert (out / "sparsity.json").read_bytes() == before
    # --force overwrites; a grid given explicitly wins over --quick's.
    done = run_script("--quick", "--alphas", "1.25", "--out", out, "--force")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "sparsity.json").read_text())
    assert {(r["alpha"], r["temperature"]) for r in rows} == {(1.25, t) for t in (0.5, 1.0, 2.0)}


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


def test_logits_near_the_float32_limit_are_counted_right():
    # Row maxima over T finite in float32: every row counts (a nan row would count as support
    # 0). Entries far below their row's maximum are zeros at any T (their x / T may overflow).
    logits = np.array([[3e38, -3e38, 0.0], [1e38, 1e38, 1e38], [0.0, -3e38, -1.0]], np.float32)
    sparsity.check_scaled(logits, (1.0, 2.0), "logits")
    sparsity.check_scaled(logits[1:], (0.5,), "logits")  # -3e38 / 0.5 overflows: a zero
    for alpha, t in ((1.0, 1.0), (2.0, 1.0), (2.0, 0.5)):
        row = sparsity.measure(logits[1:] if t < 1 else logits, alpha, t)
        if t < 1:  # the second and third rows: uniform, and one-hot (sparsemax at T = 0.5)
            assert row["support_size"] == pytest.approx((3 + 1) / 2)
        else:
            assert row["support_size"] == pytest.approx((1 + 3 + (2 if alpha == 1 else 1)) / 3)


def test_masked_attention_scores(tmp_path):
    # [batch, heads, q, k] scores with a causal mask (-inf), and one fully masked row.
    neg = -np.inf
    scores = np.array(
        [[[[3.0, neg, neg, neg], [1.0, 1.0, neg, neg], [2.0, 2.0, 2.0, neg], [neg] * 4]]]
    )  # float64: cast to float32, -inf kept
    np.savez(tmp_path / "att.npz", logits=scores)
    out = tmp_path / "out"
    done = run_script("--logits", tmp_path / "att.npz", "--out", out, "--alphas", "2",
                      "--temperatures", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "sparsity.json").read_text())
    # sparsemax over the unmasked entries of the three live rows: one-hot, then uniform.
    assert row["support_size"] == pytest.approx((1 + 2 + 3) / 3)
    assert row["sparsity"] == 0  # masked entries are not counted as zeros
    assert row["rows"] == 3 and row["classes"] == 4 and row["shape"] == "1x1x4x4"
    assert row["masked_fraction"] == pytest.approx(10 / 16)
    # A masked -inf next to large logits: sparse, and matches the row alone.
    logits = np.array([[5.0, 0.0, 0.0, neg], [5.0, 0.0, 0.0, 0.0]], np.float32)
    masked = sparsity.measure(logits, 1.5, 1.0)
    alone = sparsity.measure(logits[:1, :3], 1.5, 1.0)
    assert masked["support_size"] == pytest.approx((alone["support_size"] + 1) / 2)
    assert alone["sparsity"] == pytest.approx(2 / 3)


def test_quick_keeps_the_flags_given():
    config = sparsity.parse_args(["--quick", "--temperatures", "3"])
    assert config.temperatures == (3.0,) and config.alphas == sparsity.QUICK["alphas"]
    assert sparsity.parse_args(["--alphas", "1.2"]).temperatures == sparsity.Config().temperatures


@pytest.mark.parametrize(
    ("args", "arrays", "message"),
    [
        (["--logits", "missing.npz"], None, "does not exist"),
        (["--logits", "bad.npz"], "not a zip", "is not a valid .npz of numeric arrays"),
        (["--logits", "bad.npz"], {"scores": np.ones((2, 2))}, "lacks an array 'logits'"),
        (["--logits", "bad.npz"], {"logits": np.array([[1.0, np.nan]])}, "NaN or +inf"),
        (["--logits", "bad.npz"], {"logits": np.array([[1.0, np.inf]])}, "NaN or +inf"),
        (["--logits", "bad.npz"], {"logits": np.zeros((0, 3))}, "no empty axis"),
        (["--logits", "bad.npz"], {"logits": np.float64(1.0)}, "float array (last axis"),
        (["--logits", "bad.npz"], {"logits": np.ones((2, 3), int)}, "float array (last axis"),
        (
            ["--logits", "bad.npz"],
            {"logits": np.array([[1e300, 0.0]])},
            "beyond the float32 range (|x| up to 1e+300",
        ),
        (["--logits", "bad.npz"], {"logits": np.full((2, 3), -np.inf)}, "every row is fully"),
        (["--from-run", "."], None, "no test_logits.npz"),
        (["--quick", "--alphas", "0.5"], None, "alphas must be finite and >= 1, got 0.5"),
        (["--alphas", "1,nan"], None, "alphas must be finite and >= 1, got nan"),
        (["--alphas", "inf"], None, "alphas must be finite and >= 1, got inf"),
        (["--temperatures", "inf"], None, "temperatures must be finite and > 0, got inf"),
        (["--temperatures", "0"], None, "temperatures must be finite and > 0, got 0.0"),
        (["--seed", "-1"], None, "--seed must be an integer >= 0, got -1"),
        (["--seed", "x"], None, "argument --seed: invalid int value: 'x'"),
        # Numbers as smvariants.registry reads them: float("1_5") is 15, int("\u0661") is 1.
        (["--alphas", "1,1_5"], None, "argument --alphas: invalid comma-separated float value"),
        (["--temperatures", "\u0967"], None, "argument --temperatures: invalid comma-separated"),
        (["--seed", "\u0661"], None, "argument --seed: invalid int value: '\u0661'"),
        (["--seed", "1_0"], None, "argument --seed: invalid int value: '1_0'"),
        (["--alphas", ""], None, "need at least one value"),
        # Values float32 cannot hold (entmax computes in float32).
        (["--temperatures", "1e-40"], None, "--temperatures 1e-40 is below float32's smallest"),
        (["--temperatures", "1e39"], None, "--temperatures 1e+39 is beyond the float32 range"),
        (["--temperatures", "1e38"], None, "--temperatures 1e+38 is above 8.5e+37, the recip"),
        # entmax refuses an alpha whose 1 / (alpha - 1) is flushed: before a file is written.
        (["--alphas", "3e38"], None, "--alphas 3e+38 is above 8.5e+37, the reciprocal"),
        (["--alphas", "1e39"], None, "--alphas 1e+39 is beyond the float32 range"),
        (["--seed", str(2**63)], None, "--seed must be at most 9223372036854775807"),
        # x / T overflows float32 at T = 0.5: entmax gives a nan row there.
        (
            ["--logits", "bad.npz", "--temperatures", "1,0.5"],
            {"logits": np.array([[3e38, -3e38, 0.0], [1e38, 1e38, 1e38]], np.float32)},
            "a row maximum / T overflows float32 at --temperatures 0.5 (|maximum| up to 3e+38)",
        ),
        (["--logits", "a.npz", "--from-run", "."], None, "not both"),
    ],
)
def test_errors_are_one_line_and_write_nothing(
    tmp_path, capsys, monkeypatch, args, arrays, message
):
    monkeypatch.chdir(tmp_path)
    if isinstance(arrays, str):
        pathlib.Path("bad.npz").write_text(arrays)
    elif arrays is not None:
        np.savez("bad.npz", **arrays)
    with pytest.raises(SystemExit) as exit_:
        common.run_main(sparsity.main, [*args, "--out", "out"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not pathlib.Path("out").exists()


def test_refuses_a_folder_in_use(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / common.LOCK_NAME).write_text(f"{os.getppid()}\n")  # a live process holds it
    with pytest.raises(SystemExit) as exit_:
        common.run_main(sparsity.main, ["--quick", "--out", str(out)])
    assert exit_.value.code == 2 and "in use by another run" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == [common.LOCK_NAME]
