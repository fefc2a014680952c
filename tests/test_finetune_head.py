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
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402
import finetune_head  # noqa: E402


def run_script(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def main_error(argv, capsys):
    """Runs finetune_head.py's main in this process; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        common.run_main(finetune_head.main, [str(arg) for arg in argv])
    return exit_.value.code, capsys.readouterr().err


def snapshot(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


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


def test_progress_bar_over_each_heads_epochs(quick_run):
    _, done = quick_run
    for spec in VARIANTS.split(","):
        assert f"{spec} seed 0" in done.stderr


def test_backbone_cache_is_keyed_on_its_settings(quick_run):
    out, _ = quick_run
    config = finetune_head.parse_args(["--quick"])
    pretrain = finetune_head.load_raw(config, None)["pretrain"]
    name = finetune_head.backbone_file(config, pretrain)
    assert [path.name for path in out.glob("backbone*")] == [name]
    others = [
        finetune_head.parse_args(["--quick", "--split-seed", "1"]),
        finetune_head.parse_args(["--quick", "--hidden", "16"]),
        finetune_head.parse_args([]),  # a full run after --quick: more backbone epochs
    ]
    for other in others:
        pretrain = finetune_head.load_raw(other, None)["pretrain"]
        assert finetune_head.backbone_file(other, pretrain) != name
    # Nothing else but what OUTPUTS names (all of it removed by --force).
    assert {path.name for path in out.iterdir()} - {name, "sp"} == set(finetune_head.OUTPUTS)


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


def test_resume_refuses_other_settings_and_bad_data_first(quick_run, tmp_path, capsys):
    out, _ = quick_run
    before = snapshot(out)
    rng = np.random.default_rng(0)
    other = write_npz(tmp_path / "other.npz", X=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    for extra in (["--features", other], ["--split-seed", 1], ["--epochs", 5]):
        status, err = main_error(["--quick", "--resume", "--out", out, *extra], capsys)
        assert status == 2 and "was run with other settings" in err, extra
        assert len(err.strip().splitlines()) == 1
    # An empty split is found before anything is written, even into an existing run.
    split = np.array([0, 0, 2, 2, 0, 2])
    empty_val = write_npz(tmp_path / "emptyval.npz", X=np.ones((6, 2)), y=np.arange(6), split=split)
    status, err = main_error(["--quick", "--resume", "--out", out, "--features", empty_val], capsys)
    assert status == 2 and "the val split is empty" in err
    assert snapshot(out) == before


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
    done = run_script("--quick", "--seeds", 2, "--out", tmp_path / "out", "--features", features,
                      "--variants", "softmax,sparsemax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(r["accuracy"] > 0.8 for r in records)
    assert all(r["seeds"] == 2 for r in records)  # the flag given wins over --quick's 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["seeds"] == 2 and config["epochs"] == finetune_head.QUICK["epochs"]
    assert not list((tmp_path / "out").glob("backbone*"))


def test_quick_keeps_the_flags_given():
    config = finetune_head.parse_args(["--quick", "--epochs", "7", "--backbone-epochs", "3"])
    assert (config.epochs, config.backbone_epochs) == (7, 3)
    assert config.seeds == finetune_head.QUICK["seeds"]
    assert finetune_head.parse_args(["--epochs", "7"]).seeds == finetune_head.Config().seeds


def test_force_removes_the_previous_runs_files(tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "sparsemax.json").write_text("[]")  # a later --resume must not pick it up
    np.savez(out / "test_logits.npz", logits=np.zeros((2, 7), np.float32), y=np.zeros(2, int))
    np.savez(out / "backbone-0123456789abcdef.npz", w0=np.zeros(1))
    (out / "metrics.json").write_text("[]")
    (out / "notes.txt").write_text("not ours")
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    features = write_npz(tmp_path / "f.npz", X=rng.normal(size=(60, 4)) + 3 * np.eye(4)[y], y=y)
    done = run_script("--quick", "--force", "--out", out, "--features", features,
                      "--variants", "softmax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [path.name for path in (out / "runs").iterdir()] == ["softmax.json"]
    with np.load(out / "test_logits.npz") as saved:
        assert saved["logits"].shape == (len(saved["y"]), 3)
    assert not list(out.glob("backbone*"))
    assert (out / "notes.txt").read_text() == "not ours"


def test_result_files_honour_the_umask(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            common.write_json(tmp_path / f"{umask}.json", {"a": 1})
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask}.json").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "does not exist"),
        ("not a zip", "is not a valid .npz of numeric arrays"),
        ({"X": np.array([{}, []], dtype=object)}, "is not a valid .npz of numeric arrays"),
        ({"X": np.ones((4, 2))}, "lacks array(s) y"),
        ({"X": np.ones((4, 2)), "y": np.zeros(3, np.int64)}, "one label per row"),
        ({"X": np.ones((4, 2)), "y": np.zeros(4)}, "integer class ids"),
        (
            {"X": np.ones((6, 2)), "y": np.arange(6), "split": np.zeros(6, np.int64)},
            "split is empty",
        ),
        (
            {"X": np.ones((3, 2)), "y": np.arange(3), "split": np.array(["train", "tst", "val"])},
            "unknown split names tst (known: train, val, test)",
        ),
        ({"X": np.ones((3, 2)), "y": np.arange(3), "split": np.arange(3) + 1}, "split must hold"),
    ],
)
def test_bad_features_are_one_line_errors_before_writing(tmp_path, capsys, arrays, message):
    path = tmp_path / "bad.npz"
    if isinstance(arrays, str):
        path.write_text(arrays)
    elif arrays is not None:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    status, err = main_error(["--quick", "--out", out, "--features", path], capsys)
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was written


def test_unknown_variant(tmp_path, capsys):
    out = tmp_path / "b"
    status, err = main_error(["--quick", "--out", out, "--variants", "softmax,softermax"], capsys)
    assert status == 2 and "known variants: entmax, entmax15, softmax, sparsemax" in err
    assert not out.exists()  # nothing was written
