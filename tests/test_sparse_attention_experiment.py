"""experiments/sparse_attention.py: a quick run, its files, refusal, resume, errors, 4 devices."""

import csv
import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
import scripts

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402
import sparse_attention  # noqa: E402

FOUR_CPUS = scripts.FOUR_CPUS
# Small and fast: two variants (a fixed and a learned alpha), a few steps.
FLAGS = ["--quick", "--variants", "sparsemax,learned", "--steps", "12", "--alpha-every", "4"]
FLAGS += ["--eval-size", "24", "--batch-size", "6"]


run_script = scripts.runner("sparse_attention.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse_attention") / "run"
    done = run_script(*FLAGS, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_writes_metrics_tables_and_plots(quick_run):
    out, done = quick_run
    records = json.loads((out / "metrics.json").read_text())
    assert [r["variant"] for r in records] == ["sparsemax", "learned"]
    for r in records:
        for key in sparse_attention.SCALARS:
            assert np.isfinite(r[key]), key
        assert 0 <= r["token_accuracy"] <= 1 and 0 <= r["sequence_accuracy"] <= 1
        assert r["backend"] == jax.default_backend() and r["devices"] == 1 and r["seeds"] == 1
        assert r["step_time_ms"] > 0
        # The held-out loss (of the accuracies' tokens), not the last training batch's.
        assert r["loss"] > 0 and r["train_loss"] > 0 and r["loss"] != r["train_loss"]
    assert records[0]["mean_sparsity"] > 0  # sparsemax attention has exact zeros
    assert 1 < records[1]["mean_alpha"] < 2
    for name in ("alpha.png", "sparsity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "per_head.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 4  # variants x layers x heads (one seed)
    learned = [row for row in rows if row["variant"] == "learned"]
    assert all(1 < float(row["alpha"]) < 2 for row in learned)
    assert all(0 <= float(row["sparsity"]) <= 1 for row in rows)
    run = json.loads((out / "runs" / "learned.json").read_text())["runs"][0]
    steps = [entry["step"] for entry in run["alpha_history"]]
    assert steps == [1, 5, 9, 12]  # every --alpha-every steps and the last
    assert np.array(run["alpha_history"][0]["alpha"]).shape == (2, 4)  # layers x heads
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 12 and len(config["config_hash"]) == 16
    assert "| sparsemax |" in done.stdout and "| learned (mean alpha ->" in done.stdout
    assert not list(out.rglob(".*.tmp")) and not (out / ".lock").exists()


def test_no_progress_bars_in_logs(quick_run):
    _, done = quick_run
    assert "it/s" not in done.stderr and "\r" not in done.stderr


def test_refuses_to_overwrite_and_resumes(quick_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quick_run[0], out)
    before = (out / "runs" / "learned.json").read_bytes()
    refused = run_script(*FLAGS, "--out", out)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "already holds results" in refused.stderr
    other = run_script(*FLAGS, "--out", out, "--resume", "--steps", "13")
    assert other.returncode == 2 and "other settings" in other.stderr
    resumed = run_script(*FLAGS, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "runs" / "learned.json").read_bytes() == before  # not trained again
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (quick_run[0] / "metrics.json").read_text()
    )


def test_four_devices_match_one(quick_run, tmp_path):
    out = tmp_path / "four"
    done = run_script(*FLAGS, "--out", out, env=FOUR_CPUS)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((quick_run[0] / "metrics.json").read_text())
    four = json.loads((out / "metrics.json").read_text())
    assert [r["devices"] for r in four] == [4, 4]
    for a, b in zip(one, four, strict=True):
        for key in ("token_accuracy", "sequence_accuracy", "mean_sparsity", "mean_support_size"):
            assert abs(a[key] - b[key]) <= 1e-3, key
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * a["loss"]
    alpha_one = json.loads((quick_run[0] / "runs" / "learned.json").read_text())["runs"][0]
    alpha_four = json.loads((out / "runs" / "learned.json").read_text())["runs"][0]
    np.testing.assert_allclose(alpha_one["alpha"], alpha_four["alpha"], atol=1e-4)


def test_make_batch_reverses_the_valid_tokens():
    config = sparse_attention.Config(min_length=2, max_length=6, vocab=5)
    tokens, targets, lengths = sparse_attention.make_batch(np.random.default_rng(0), 50, config)
    assert tokens.shape == targets.shape == (50, 6) and lengths.min() >= 2 and lengths.max() <= 6
    for t, y, n in zip(tokens, targets, lengths, strict=True):
        assert list(y[:n]) == list(t[:n][::-1]) and not t[n:].any() and not y[n:].any()
        assert t[:n].min() >= 1 and t[:n].max() < 5


def test_attention_statistics_count_only_unmasked_pairs():
    p = np.zeros((1, 1, 3, 3))
    p[0, 0, 0, :2] = [0.5, 0.5]
    p[0, 0, 1, :2] = [1.0, 0.0]
    stats = sparse_attention.attention_statistics([p], np.array([2]))
    assert stats["sparsity"] == [[0.25]]  # 1 zero among the 4 pairs of the 2 valid positions
    assert stats["support_size"] == [[1.5]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variants", "softmax,bogus"], "unknown 'bogus'"),
        (["--variants", "softmax,learned,softmax"], "--variants: 'softmax' is given twice"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0"),
        (["--d-model", "30", "--heads", "4"], "must be a multiple of --heads"),
        (["--min-length", "5", "--max-length", "3"], "must be >= --min-length"),
        (["--vocab", "2"], "--vocab must be an integer >= 3"),
        (["--learned-alpha-range", "2,1"], "--learned-alpha-range must be"),
        (["--seeds", "x"], "invalid int value"),
        # Numbers as smvariants.registry reads them: int("1_0") is 10, float("\u0660.1") 0.1.
        (["--seeds", "1_0"], "argument --seeds: invalid int value: '1_0'"),
        (["--learning-rate", "\u0660.1"], "argument --learning-rate: invalid float value"),
        (["--learned-alpha-range", "1,1_5"], "argument --learned-alpha-range: invalid comma"),
        # What float32 (the model's arithmetic) or array sizes cannot take, refused up front.
        (["--learned-alpha-range", "1,1e39"], "--learned-alpha-range 1e+39 is beyond the float32"),
        (["--learning-rate", "1e39"], "--learning-rate 1e+39 is beyond the float32 range"),
        (["--learning-rate", "1e-60"], "--learning-rate 1e-60 is below float32's smallest"),
        (["--d-model", str(10**20)], "--d-model must be at most 2147483647 (2**31 - 1)"),
        (["--vocab", str(10**20)], "--vocab must be an integer >= 3 and <= 2147483647"),
        (["--benchmark"], "--benchmark takes no other flag"),  # it ignored --quick, --out
        # Sizes the checks accepted but no memory holds failed after config.json was written.
        (["--max-length", str(2**31 - 1)], "these sizes need about"),
        (["--eval-size", str(2**31 - 1), "--max-length", "1000"], "these sizes need about"),
    ],
)
def test_bad_flags_are_one_line_errors_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        common.run_main(sparse_attention.main, ["--quick", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_quick_keeps_the_flags_given():
    config = sparse_attention.parse_args(["--quick", "--steps", "7"])
    assert config.steps == 7 and config.seeds == sparse_attention.QUICK["seeds"] and config.quick


def snapshot(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_plain_resume_continues_the_folders_own_variants(quick_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quick_run[0], out)
    before = snapshot(out / "runs")
    # No --variants: the folder's (sparsemax, learned); it added and trained the default list.
    flags = [flag for flag in FLAGS if flag not in ("--variants", "sparsemax,learned")]
    resumed = run_script(*flags, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = json.loads((out / "metrics.json").read_text())
    assert [r["variant"] for r in records] == ["sparsemax", "learned"]
    assert json.loads((out / "config.json").read_text())["variants"] == ["sparsemax", "learned"]
    assert snapshot(out / "runs") == before


def test_resume_refuses_the_previous_results_format_and_a_run_file_lacking_a_key(
    quick_run, tmp_path, capsys
):
    import hashlib

    def resume_error(out):
        argv = [*FLAGS, "--out", str(out), "--resume"]
        with pytest.raises(SystemExit) as exit_:
            common.run_main(sparse_attention.main, argv)
        return exit_.value.code, capsys.readouterr().err

    # A run file without train_loss (as before train_loss was recorded) but with this run's
    # config_hash: a one-line error before anything is written, not a KeyError traceback.
    out = tmp_path / "lacking"
    shutil.copytree(quick_run[0], out)
    path = out / "runs" / "sparsemax.json"
    finished = json.loads(path.read_text())
    del finished["runs"][0]["train_loss"]
    path.write_text(json.dumps(finished))
    state = snapshot(out)
    status, err = resume_error(out)
    assert status == 2 and f"{path} lacks train_loss in run 0 (damaged, or written by" in err
    assert err.count("\n") == 1 and snapshot(out) == state
    # A whole folder of the version before train_loss: its config.json had no results_format
    # (nor experiment), and its config_hash was the hash of the settings alone, the same as a
    # current run's settings. It gave KeyError: 'train_loss' after config.json was rewritten.
    config = json.loads((out / "config.json").read_text())
    for key in common.IDENTITY:
        del config[key]
    kept = {k: v for k, v in config.items() if k not in sparse_attention.RESUME_FREE}
    config["config_hash"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    config["config_hash"] = config["config_hash"][:16]
    (out / "config.json").write_text(json.dumps(config))
    for path in (out / "runs").glob("*.json"):
        old = json.loads(path.read_text())
        for run in old["runs"]:
            run.pop("train_loss", None)
        path.write_text(json.dumps({**old, "config_hash": config["config_hash"]}))
    state = snapshot(out)
    status, err = resume_error(out)
    changed = "other settings (experiment None -> 'sparse_attention'; results_format None -> 2)"
    assert status == 2 and f"{changed} (results of another version of the script, or of" in err
    assert err.count("\n") == 1 and snapshot(out) == state


def test_resume_on_a_folder_of_another_script(quick_run, capsys):
    import finetune_head

    # It said "error: variant 'learned': unknown variant ...": the folder's variants were read
    # as finetune_head.py's before its config.json was checked.
    out = quick_run[0]
    state = snapshot(out)
    with pytest.raises(SystemExit) as exit_:
        common.run_main(finetune_head.main, ["--quick", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == (
        f"error: --resume: {out} holds results of sparse_attention.py, not of finetune_head.py; "
        "use another --out, or --force to start over\n"
    )
    assert snapshot(out) == state
