"""experiments/finetune_head.py: quick runs, files and contents, refusal, errors, 4 devices."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import scripts

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "finetune_head.py"
VARIANTS = "softmax,sparsemax,entmax:alpha=1.5,entmax:alpha=learned"
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402
import finetune_head  # noqa: E402
import sparsity  # noqa: E402

FOUR_CPUS = scripts.FOUR_CPUS


@pytest.fixture
def optax_promotion():
    """Standard dtype promotion for runs in this process (conftest.py makes it strict).

    optax's Adam raises a Python float to the int32 step count (bias correction), which strict
    promotion refuses; the experiment's own code passes under strict promotion.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield


run_script = scripts.runner("finetune_head.py")


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
        assert r["backend"] == jax.default_backend() and r["devices"] == 1 and r["seeds"] == 1
    by_name = {r["variant"]: r for r in records}
    assert by_name["softmax"]["sparsity"] == 0 and by_name["softmax"]["support_size"] == 10
    assert by_name["sparsemax"]["sparsity"] > 0.3
    assert 1 < by_name["entmax:alpha=learned"]["alpha"] < 2  # bounded to (1, 2) by default
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


def test_no_progress_bars_in_logs(quick_run):
    _, done = quick_run  # stderr is a pipe, not a terminal
    assert "seed 0" not in done.stderr and "it/s" not in done.stderr, done.stderr[-2000:]


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
    config_hash = json.loads((out / "config.json").read_text())["config_hash"]
    for spec in VARIANTS.split(","):
        assert read_json(finetune_head._run_file(out, spec))["config_hash"] == config_hash
    # Temporary files of a killed run are removed at the start of the next one.
    stale = [out / ".metrics.json.0123.tmp", out / "runs" / ".softmax.json.4567.tmp"]
    for path in stale:
        path.write_text("half")
    # A run file written with other settings is not reused: that variant runs again.
    other = finetune_head._run_file(out, "entmax15")
    fake = {"accuracy": 0.123, "loss": 1, "ece": 0, "support_size": 1, "sparsity": 0}
    fake.update(step_time_ms=1, steps=1, support_sizes=[1], reliability=[[1, 1, 1]])
    other.write_text(
        json.dumps({"config_hash": "0" * 16, "backend": "cpu", "devices": 1, "runs": [fake]})
    )
    # --resume keeps finished variants (same numbers) and adds new ones.
    done = run_script("--quick", "--out", out, "--resume", "--variants", VARIANTS + ",entmax15")
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())
    assert records[: len(VARIANTS.split(","))] == json.loads(before)
    assert records[-1]["variant"] == "entmax15" and records[-1]["accuracy"] > 0.5
    assert read_json(other)["config_hash"] == config_hash
    assert not any(path.exists() for path in stale)
    assert not (out / common.LOCK_NAME).exists()


def test_resume_refuses_other_settings_and_bad_data_first(quick_run, tmp_path, capsys):
    out, _ = quick_run
    before = snapshot(out)
    rng = np.random.default_rng(0)
    other = write_npz(tmp_path / "other.npz", X=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    for extra in (
        ["--features", other],
        ["--split-seed", 1],
        ["--epochs", 5],
        ["--learned-alpha-range", "1,3"],
    ):
        status, err = main_error(["--quick", "--resume", "--out", out, *extra], capsys)
        assert status == 2 and "was run with other settings" in err, extra
        assert len(err.strip().splitlines()) == 1
    # An empty split is found before anything is written, even into an existing run.
    split = np.array([0, 0, 1, 1, 0, 1])
    empty = write_npz(tmp_path / "emptytest.npz", X=np.ones((6, 2)), y=np.arange(6), split=split)
    status, err = main_error(["--quick", "--resume", "--out", out, "--features", empty], capsys)
    assert status == 2 and "the test split is empty" in err
    assert snapshot(out) == before
    # Results without a config.json: their settings are unknown, so they are not resumed.
    bare = tmp_path / "bare"
    (bare / "runs").mkdir(parents=True)
    (bare / "runs" / "softmax.json").write_text("[]")
    status, err = main_error(["--quick", "--resume", "--out", bare, "--features", other], capsys)
    assert status == 2 and "no readable config.json" in err
    assert [path.name for path in bare.rglob("*")] == ["runs", "softmax.json"]


def test_four_devices_match_one(quick_run, tmp_path):
    out, _ = quick_run
    if jax.default_backend() != "cpu":  # compare CPU with CPU: an accelerator rounds otherwise
        out = tmp_path / "one"
        done = run_script(
            "--quick", "--out", out, "--variants", VARIANTS, env={"JAX_PLATFORMS": "cpu"}
        )
        assert done.returncode == 0, done.stderr[-3000:]
    four = tmp_path / "four"
    done = run_script("--quick", "--out", four, "--variants", VARIANTS, env=FOUR_CPUS)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((out / "metrics.json").read_text())
    many = json.loads((four / "metrics.json").read_text())
    for a, b in zip(one[: len(many)], many, strict=True):
        assert b["devices"] == 4 and b["backend"] == "cpu"
        for key in ("accuracy", "loss", "ece", "support_size", "sparsity"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)
        steps = [
            read_json(finetune_head._run_file(folder, a["variant"]))["runs"][0]["steps"]
            for folder in (out, four)
        ]
        assert steps[0] == steps[1] > 0


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


def small_features(path, n=60, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return write_npz(path, X=rng.normal(size=(n, 4)) + 3 * np.eye(4)[y], y=y)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is free
    return child.pid


def test_a_training_split_smaller_than_the_device_count_trains(tmp_path, optax_promotion):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] + [0, 1, 2] * 4)
    split = np.array([0, 0, 0] + [1, 2] * 6)  # 3 training examples
    x = rng.normal(size=(15, 4)) + 3 * np.eye(4)[y]
    features = write_npz(tmp_path / "f.npz", X=x, y=y, split=split)
    variants = "softmax,entmax:alpha=learned"
    args = ["--quick", "--features", features, "--variants", variants]
    done = run_script(*args, "--out", tmp_path / "four", env=FOUR_CPUS)
    assert done.returncode == 0, done.stderr[-3000:]
    # On one CPU device the training is the same: padding rows have weight 0.
    if jax.default_backend() == "cpu":  # in this process (faster)
        common.run_main(finetune_head.main, [*map(str, args), "--out", str(tmp_path / "one")])
    else:
        done = run_script(*args, "--out", tmp_path / "one", env={"JAX_PLATFORMS": "cpu"})
        assert done.returncode == 0, done.stderr[-3000:]
    for spec in variants.split(","):
        four = read_json(finetune_head._run_file(tmp_path / "four", spec))
        one = read_json(finetune_head._run_file(tmp_path / "one", spec))
        assert four["devices"] == 4 and one["devices"] == 1
        (run4,), (run1,) = four["runs"], one["runs"]
        assert run4["steps"] == run1["steps"] == finetune_head.QUICK["epochs"]  # 1 per epoch
        assert np.isfinite(run4["step_time_ms"]) and run4["step_time_ms"] > 0
        for key in ("accuracy", "loss", "alpha"):
            if key in run1:
                np.testing.assert_allclose(run4[key], run1[key], rtol=1e-4, err_msg=key)


def test_step_time_excludes_compilation(monkeypatch, optax_promotion):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    # A clock that jumps by 1000 s at each compilation: a timed step that compiles shows it.
    real = time.perf_counter
    clock = types.SimpleNamespace(perf_counter=lambda: real() + 1000.0 * len(compiles))
    monkeypatch.setattr(finetune_head, "time", clock)
    rng = np.random.default_rng(0)
    y = (np.arange(12) % 3).astype(np.int32)
    x = (rng.normal(size=(12, 4)) + 3 * np.eye(4)[y]).astype(np.float32)
    data = {"parts": {"train": (x, y), "test": (x, y)}, "num_classes": 3}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for spec in (finetune_head.LEARNED, "softmax"):
            variant = finetune_head.resolve_variant(spec)
            config = finetune_head.Config(epochs=4)
            result, _ = finetune_head.train_head(variant, data, 0, config, mesh)
            assert result["step_time_ms"] < 1000, spec  # no compilation inside a timed step
            assert result["steps"] == 4
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles  # the listener saw the compilations (outside the timed steps)


def test_learned_alpha_stays_in_its_range():
    assert finetune_head.Config().learned_alpha_range == (1.0, 2.0)
    for lo, hi in ((1.0, 2.0), (1.2, 1.4)):
        alpha_of = finetune_head.resolve_variant(finetune_head.LEARNED, (lo, hi))["alpha"]
        assert float(alpha_of({"alpha_raw": np.float32(0)})) == pytest.approx((lo + hi) / 2)
        for raw in (-1e4, -30.0, 30.0, 1e4):
            assert lo <= float(alpha_of({"alpha_raw": np.float32(raw)})) <= hi
    config = finetune_head.parse_args(["--learned-alpha-range", "1.2,1.4"])
    assert config.learned_alpha_range == (1.2, 1.4)


def test_variant_specs_with_several_parameters(tmp_path, optax_promotion):
    specs = "softmax,entmax:alpha=1.3,temperature=2,sparsemax"
    assert finetune_head.parse_args(["--variants", specs]).variants == (
        "softmax",
        "entmax:alpha=1.3,temperature=2",
        "sparsemax",
    )
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    argv = ["--quick", "--features", features, "--out", out, "--variants", specs]
    common.run_main(finetune_head.main, list(map(str, argv)))
    records = read_json(out / "metrics.json")
    assert [r["variant"] for r in records] == [
        "softmax",
        "entmax:alpha=1.3,temperature=2",
        "sparsemax",
    ]
    assert finetune_head._run_file(out, "entmax:alpha=1.3,temperature=2").is_file()


def test_resume_adds_variants_and_refuses_other_devices(tmp_path, capsys, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", str(features), "--out", str(out)]
    common.run_main(finetune_head.main, [*args, "--variants", "softmax,sparsemax"])
    before = read_json(out / "metrics.json")
    # A resumed run with another list adds to the folder's results (its summaries listed only
    # the new list's variants, and the files of the others were left unreferenced).
    common.run_main(finetune_head.main, [*args, "--resume", "--variants", "entmax15,softmax"])
    records = read_json(out / "metrics.json")
    assert [r["variant"] for r in records] == ["softmax", "sparsemax", "entmax15"]
    assert records[:2] == before
    assert read_json(out / "config.json")["variants"] == ["softmax", "sparsemax", "entmax15"]
    # A finished run from another device count is not put in one table with this run's.
    path = finetune_head._run_file(out, "sparsemax")
    path.write_text(json.dumps({**read_json(path), "devices": 4}))
    state = snapshot(out)
    status, err = main_error([*args, "--resume", "--variants", "softmax"], capsys)
    assert status == 2 and "sparsemax ran on " in err and " with 4 device(s), this run has " in err
    assert snapshot(out) == state


def test_duplicate_and_long_variant_specs(tmp_path, capsys, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", str(features), "--out", str(out)]
    status, err = main_error([*args, "--variants", "softmax,sparsemax,softmax"], capsys)
    assert status == 2 and "--variants: 'softmax' is given twice" in err and not out.exists()
    # A spec longer than a file name holds (it crashed after training, leaving config.json).
    long = "softmax:temperature=" + "0" * 300 + "2"
    common.run_main(finetune_head.main, [*args, "--variants", long])
    assert read_json(out / "metrics.json")[0]["variant"] == long
    assert len(finetune_head._run_file(out, long).name) < 130


def test_an_interrupted_run_is_neither_mixed_nor_read_stale(tmp_path, capsys, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = list(
        map(str, ["--quick", "--features", features, "--variants", "softmax", "--out", out])
    )
    common.run_main(finetune_head.main, args)
    # What a run stopped after its first head leaves: config.json and test_logits.npz.
    finished = ["metrics.json", "summary.csv", "runs"]
    common.remove_outputs(out, [*finished, "accuracy_vs_sparsity.png", "reliability.png"])
    common.remove_outputs(out, ["support_size.png"])
    before = snapshot(out)
    # A new run with other settings is refused (it would have kept the old test_logits.npz).
    status, err = main_error([*args, "--epochs", "5"], capsys)
    assert status == 2 and "already holds results (config.json, test_logits.npz)" in err
    status, err = main_error([*args, "--epochs", "5", "--resume"], capsys)
    assert status == 2 and "was run with other settings (epochs 4 -> 5)" in err
    assert snapshot(out) == before
    # Logits that are not from the run config.json describes are refused by sparsity.py ...
    np.savez(out / "test_logits.npz", logits=np.zeros((2, 7), np.float32), y=np.zeros(2, int))
    sp = tmp_path / "sp"
    with pytest.raises(SystemExit) as exit_:
        common.run_main(sparsity.main, ["--quick", "--from-run", str(out), "--out", str(sp)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is not from the run in" in err and not sp.exists()
    # ... and replaced by --resume with the same settings.
    common.run_main(finetune_head.main, [*args, "--resume"])
    config_hash = read_json(out / "config.json")["config_hash"]
    with np.load(out / "test_logits.npz") as saved:
        assert str(saved["config_hash"]) == config_hash and str(saved["variant"]) == "softmax"
        assert saved["logits"].shape == (len(saved["y"]), 3)
    common.run_main(sparsity.main, ["--quick", "--from-run", str(out), "--out", str(sp)])
    assert read_json(sp / "sparsity.json")[0]["classes"] == 3


def test_a_folder_in_use_is_refused_and_sigterm_cleans_up(tmp_path, capsys):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", features, "--variants", "softmax", "--out", out]
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args), "--epochs", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():  # then it holds the lock and trains
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        status, err = main_error(args, capsys)
        assert status == 2 and f"is in use by another run (process {child.pid}" in err
        assert len(err.strip().splitlines()) == 1
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp")) and not (out / common.LOCK_NAME).exists()


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
    assert all(r["backend"] == jax.default_backend() for r in records)
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
    # A lock and a temporary file left by a killed run: taken over and removed.
    (out / common.LOCK_NAME).write_text(f"{dead_pid()}\n")
    (out / ".summary.csv.0123.tmp").write_text("half")
    features = small_features(tmp_path / "f.npz")
    done = run_script("--quick", "--force", "--out", out, "--features", features,
                      "--variants", "softmax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [path.name for path in (out / "runs").iterdir()] == ["softmax.json"]
    with np.load(out / "test_logits.npz") as saved:
        assert saved["logits"].shape == (len(saved["y"]), 3)
    assert not list(out.glob("backbone*"))
    assert (out / "notes.txt").read_text() == "not ours"
    assert not (out / common.LOCK_NAME).exists() and not list(out.glob("*.tmp"))


def test_result_files_honour_the_umask(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            common.write_json(tmp_path / f"{umask}.json", {"a": 1})
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask}.json").stat().st_mode & 0o777 == mode


def test_plots_of_all_zero_probabilities(tmp_path):
    probs, y = np.zeros((5, 3)), np.arange(5) % 3
    runs = [
        {
            "reliability": finetune_head.reliability(probs, y),
            "support_sizes": np.sum(probs > 0, -1).tolist(),
        }
    ]
    records = [{"variant": "v", "sparsity": 1.0, "accuracy": 0.4, "accuracy_std": 0.0}]
    finetune_head.plot(records, {"v": runs}, tmp_path)
    for name in ("accuracy_vs_sparsity.png", "reliability.png", "support_size.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Confidence 0 falls in the first bin: accuracy 2/5 at confidence 0.
    assert finetune_head.expected_calibration_error(probs, y) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "does not exist"),
        ("not a zip", "is not a valid .npz of numeric arrays"),
        ({"X": np.array([{}, []], dtype=object)}, "is not a valid .npz of numeric arrays"),
        ({"X": np.ones((4, 2))}, "lacks array(s) y"),
        ({"X": np.ones((4, 2)), "y": np.zeros(3, np.int64)}, "one label per row"),
        ({"X": np.ones((4, 2)), "y": np.zeros(4)}, "integer class ids"),
        ({"X": np.ones((4, 2)), "y": np.zeros(4, np.int64)}, "at least two classes"),
        ("folder", "is a folder, not an .npz file"),
        (
            {"X": np.ones((6, 2)), "y": np.arange(6), "split": np.zeros(6, np.int64)},
            "split is empty",
        ),
        (
            {"X": np.ones((3, 2)), "y": np.arange(3), "split": np.array(["train", "tst", "val"])},
            "unknown split names tst (known: train, val, test)",
        ),
        ({"X": np.ones((3, 2)), "y": np.arange(3), "split": np.arange(3) + 1}, "split must hold"),
        (
            {"X": np.ones((6, 2)), "y": np.array([0, 1, 2, 0, 1, 10**9])},
            "the largest is 1000000000 but 3, 4, 5, 6, 7 and 999999992 more never occur",
        ),
        ({"X": np.ones((6, 2)), "y": np.array([0, 1, 3, 0, 1, 3])}, "but 2 never occur"),
        (
            {"X": np.full((6, 2), 1e300), "y": np.arange(6) % 3},
            "every feature is constant on the train split",
        ),
        # Nothing to learn: it failed after config.json, blaming the learning rate.
        (
            {"X": np.arange(12.0).reshape(6, 2), "y": np.arange(6) % 3, "split": [0] + [2] * 5},
            "every feature is constant on the train split (1 row(s)): nothing to learn",
        ),
        (
            {
                "X": np.r_[np.ones((20, 3)), np.eye(3)],
                "y": np.arange(23) % 3,
                "split": [0] * 20 + [2] * 3,
            },
            "every feature is constant on the train split (20 row(s)): nothing to learn",
        ),
        pytest.param(
            {"X": np.ones((6, 2), np.longdouble) * 10**400, "y": np.arange(6) % 3},
            "X has values beyond the float64 range (|x| up to 1e+400",
            marks=pytest.mark.skipif(
                np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                reason="long double is float64 here",
            ),
        ),
        ({"X": np.ones((6, 0)), "y": np.arange(6) % 3}, "at least one row and column"),
        ({"X": np.ones((6, 2), np.complex64), "y": np.arange(6) % 3}, "2-D real numeric array"),
        (
            # Column 0 is nearly constant on the train split (std 4.7e-31) and 1e33 in test: 2e63.
            {
                "X": np.array([0, 1e-30, 0, 0, 0, 1e33])[:, None] * [1, 0] + [0, 1],
                "y": np.arange(6) % 3,
                "split": np.array([0, 0, 0, 1, 2, 2]),
            },
            "the test split's X standardised with the train split's mean and std",
        ),
    ],
)
def test_bad_features_are_one_line_errors_before_writing(tmp_path, capsys, arrays, message):
    path = tmp_path / "bad.npz"
    if arrays == "folder":
        path.mkdir()
    elif isinstance(arrays, str):
        path.write_text(arrays)
    elif arrays is not None:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    status, err = main_error(["--quick", "--out", out, "--features", path], capsys)
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "-1"], "--learning-rate must be a finite number > 0, got -1.0"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
        (["--split-seed", "-1"], "--split-seed must be an integer >= 0, got -1"),
        (["--split-seed", str(2**63)], "--split-seed must be at most 9223372036854775807 (2**63"),
        # float32 (the head's arithmetic) cannot hold these: inf, or 0 (no training at all).
        (["--learning-rate", "1e39"], "--learning-rate 1e+39 is beyond the float32 range"),
        (["--learning-rate", "1e-60"], "--learning-rate 1e-60 is below float32's smallest"),
        (["--learned-alpha-range", "1,1e39"], "--learned-alpha-range 1e+39 is beyond the float32"),
        (["--hidden", str(10**20)], "--hidden must be at most 2147483647 (2**31 - 1)"),
        # Accepted by the range check, but held by no memory: it failed after config.json.
        (["--hidden", str(2**31 - 1)], "--hidden: these sizes need about"),
        (["--variants", "softmax,budget_sparsemax"], "'budget_sparsemax': its loss is multi-label"),
        (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
        (["--learned-alpha-range", "2,1"], "1 <= lo < hi, got 2.0,1.0"),
        (["--learned-alpha-range", "0.5,2"], "1 <= lo < hi, got 0.5,2.0"),
        (["--learned-alpha-range", "1,inf"], "two finite numbers"),
        (["--learned-alpha-range", "1.5"], "two finite numbers"),
        (["--variants", "entmax:max_iter=inf"], "variant 'entmax:max_iter=inf': "),
        (["--variants", "softmax,entmax:alpha=1.3,temperature=0"], "variant 'entmax:alpha=1.3,"),
        (["--variants", "alpha=1.3,softmax"], "'alpha=1.3' is a parameter with no variant"),
        (["--variants", ","], "no variants given"),
        # Numbers as smvariants.registry reads them: float("1_5") is 15, int("\u0663") is 3.
        (["--learned-alpha-range", "1,1_5"], "argument --learned-alpha-range: invalid comma-sep"),
        (["--learning-rate", "1_0"], "argument --learning-rate: invalid float value: '1_0'"),
        (["--seeds", "\u0663"], "argument --seeds: invalid int value: '\u0663'"),
        (["--split-seed", "1_0"], "argument --split-seed: invalid int value: '1_0'"),
        # One variant spelled two ways was trained and reported twice.
        (
            ["--variants", "softmax:temperature=2,softmax:temperature=2.0"],
            "--variants: 'softmax:temperature=2.0' is given twice (also as 'softmax:temperature=2'",
        ),
        (
            ["--variants", "entmax:alpha=1.3,temperature=2,entmax:temperature=2,alpha=1.3"],
            "--variants: 'entmax:temperature=2,alpha=1.3' is given twice (also as 'entmax:alpha",
        ),
        (["--variants", "sparsemax,sparsemax:"], "'sparsemax:' is given twice (also as 'sparse"),
        (["--variants", "softmax,entmax15,softmax"], "--variants: 'softmax' is given twice\n"),
    ],
)
def test_bad_flags_are_one_line_errors_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    status, err = main_error(["--quick", "--out", out, *flags], capsys)
    assert status == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was written


def test_unknown_variant(tmp_path, capsys):
    out = tmp_path / "b"
    status, err = main_error(["--quick", "--out", out, "--variants", "softmax,softermax"], capsys)
    known = ", ".join(finetune_head.registry.names())
    assert status == 2 and f"known variants: {known}" in err and "softermax" in err
    assert not out.exists()  # nothing was written


def test_every_variant_that_help_lists_trains(tmp_path, capsys, optax_promotion):
    with pytest.raises(SystemExit):
        finetune_head.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    listed = shown.split("comma-separated specs (")[1].split(", name:key=value")[0].split(", ")
    assert set(listed) <= set(finetune_head.registry.names()) and "budget_sparsemax" not in listed
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    argv = ["--quick", "--epochs", "1", "--features", features, "--out", out]
    common.run_main(finetune_head.main, [*map(str, argv), "--variants", ",".join(listed)])
    assert [r["variant"] for r in read_json(out / "metrics.json")] == listed


def test_standardizing_does_not_depend_on_units_and_keeps_dead_columns_bounded():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(90, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 100, 0]).astype(np.float32)
    x[:60, 4] = 0  # a dead ReLU unit: 0 on every training row, small on some test rows
    x[60:, 4] = np.where(np.arange(30) % 3 == 0, 0.01, 0)
    y = np.arange(90) % 3

    def parts(x):
        return {"train": (x[:60], y[:60]), "test": (x[60:], y[60:]), "val": (x[:0], y[:0])}

    plain = finetune_head.standardize(parts(x), "test")
    # Features in other units (1e-8 of them) standardise to the same parts, to float32 rounding
    # (the train std plus 1e-6 divided small units by 1e-6: the head barely trained); the dead
    # column, only centred, keeps its units (and stays small).
    small = finetune_head.standardize(parts(x * np.float32(1e-8)), "test")
    for name in plain:
        np.testing.assert_allclose(small[name][0][:, :4], plain[name][0][:, :4], atol=1e-5)
        assert np.abs(small[name][0][:, 4]).max(initial=0) <= 1e-10
    train = plain["train"][0]
    np.testing.assert_allclose(train[:, :4].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train[:, :4].std(0), 1, rtol=1e-5)
    # The dead column is centred but not scaled: 0.01 stays 0.01 (it was 0.01 / 1e-6 = 1e4,
    # swamping the logits of the test rows where the unit is active).
    assert not train[:, 4].any() and np.abs(plain["test"][0][:, 4]).max() == np.float32(0.01)
    # A column constant at a large value is constant up to float64 rounding of its mean.
    x[:, 3] = 1e6
    assert np.abs(finetune_head.standardize(parts(x), "test")["test"][0][:, 3]).max() == 0


def test_a_plain_resume_continues_the_folders_own_variants(tmp_path, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", str(features), "--out", str(out)]
    common.run_main(finetune_head.main, [*args, "--variants", "softmax,sparsemax"])
    before = snapshot(out / "runs")
    # No --variants: the folder's list (the default list was added to it and trained).
    common.run_main(finetune_head.main, [*args, "--resume"])
    assert [r["variant"] for r in read_json(out / "metrics.json")] == ["softmax", "sparsemax"]
    assert read_json(out / "config.json")["variants"] == ["softmax", "sparsemax"]
    assert snapshot(out / "runs") == before  # nothing trained again


def _old_format(folder):
    """Makes ``folder`` as the version before RESULTS_FORMAT left it: no format, no experiment.

    Its config_hash is then the hash of its settings alone, as that version computed it (the
    same settings as a current run's), and its run files carry it.
    """
    import hashlib

    config = read_json(folder / "config.json")
    for key in common.IDENTITY:
        del config[key]
    kept = {k: v for k, v in config.items() if k not in finetune_head.RESUME_FREE}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
    (folder / "config.json").write_text(json.dumps({**config, "config_hash": digest}))
    for path in (folder / "runs").glob("*.json"):
        path.write_text(json.dumps({**read_json(path), "config_hash": digest}))
    return digest


def test_resume_refuses_results_of_another_format_or_lacking_a_key(
    tmp_path, capsys, optax_promotion
):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", features, "--out", out, "--variants", "softmax"]
    common.run_main(finetune_head.main, list(map(str, args)))
    # A run file that lacks what the summaries read (damaged, or hand-made): a one-line error
    # before anything is written (it was a KeyError traceback after config.json was rewritten).
    path = finetune_head._run_file(out, "softmax")
    finished = read_json(path)
    run = dict(finished["runs"][0])
    del run["ece"]
    path.write_text(json.dumps({**finished, "runs": [run]}))
    state = snapshot(out)
    status, err = main_error([*args, "--resume"], capsys)
    assert status == 2 and f"{path} lacks ece in run 0" in err, err
    assert len(err.strip().splitlines()) == 1 and snapshot(out) == state
    # A folder written by the version before the val metrics (same settings): refused as
    # another format of results, not reused.
    path.write_text(json.dumps(finished))
    _old_format(out)
    state = snapshot(out)
    status, err = main_error([*args, "--resume"], capsys)
    changed = "was run with other settings (experiment None -> 'finetune_head'; results_format"
    assert status == 2 and f"{changed} None -> 2) (results of another version" in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == state


def test_the_val_split_is_optional_and_evaluated_when_it_has_rows(tmp_path, optax_promotion):
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(size=(90, 4)) + 3 * np.eye(4)[y]
    variants = "softmax,entmax:alpha=learned"
    splits = {"no_val": np.arange(90) % 2 * 2, "val": np.arange(90) % 3}  # train/test, 0/1/2
    for name, split in splits.items():
        split = rng.permutation(split)
        features = write_npz(tmp_path / f"{name}.npz", X=x, y=y, split=split)
        out = tmp_path / name
        argv = ["--quick", "--features", features, "--out", out, "--variants", variants]
        common.run_main(finetune_head.main, list(map(str, argv)))
        records = read_json(out / "metrics.json")
        for spec, record in zip(variants.split(","), records, strict=True):
            (run,) = read_json(finetune_head._run_file(out, spec))["runs"]
            assert run["accuracy"] > 0.8
            if name == "no_val":  # trained and tested without val rows (it was refused)
                assert "val_accuracy" not in run and "val_loss" not in record
            else:  # the val rows are evaluated, for model selection
                assert run["val_accuracy"] > 0.8 and np.isfinite(run["val_loss"])
                assert record["val_accuracy"] == run["val_accuracy"]
                assert record["val_loss"] == run["val_loss"]
    assert "val" not in finetune_head.table(records)  # the printed table stays as it was


@pytest.mark.parametrize("rate", ["1e-12", "1e-30"])
def test_a_learning_rate_too_small_to_change_a_weight_is_an_error(
    tmp_path, capsys, optax_promotion, rate
):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    argv = ["--quick", "--features", features, "--out", out, "--variants", "softmax"]
    # Adam's steps of about the rate are below half a float32 ulp of every weight: the head stays
    # at its random start (chance accuracy, reported as a result with exit status 0).
    status, err = main_error([*argv, "--learning-rate", rate], capsys)
    assert status == 2 and "variant softmax seed 0: " in err
    assert f"left the head's weights bit-identical: --learning-rate {rate} is too small" in err
    assert "(use a larger one), or the training features do not vary" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "metrics.json").exists()


def test_resume_on_a_folder_of_another_script(quick_run, tmp_path, capsys):
    import sparse_attention

    # A sparse_attention.py folder: refused as such (it was "variant 'learned': unknown variant",
    # from the folder's variants read as this script's).
    out = tmp_path / "sparse"
    (out / "runs").mkdir(parents=True)
    config = sparse_attention.Config(variants=("sparsemax", "learned"))
    identity = {"experiment": "sparse_attention", "results_format": 2}
    record = common.settings_record(config, sparse_attention.RESUME_FREE, **identity)
    common.write_json(out / "config.json", record)
    common.write_json(out / "runs" / "learned.json", {"config_hash": record["config_hash"]})
    state = snapshot(out)
    status, err = main_error(["--quick", "--resume", "--out", out], capsys)
    assert status == 2 and err.strip() == (
        f"error: --resume: {out} holds results of sparse_attention.py, not of finetune_head.py; "
        "use another --out, or --force to start over"
    )
    assert snapshot(out) == state
    # And the other way round (it was "--variants: unknown 'softmax:temperature=0.5', ...").
    out, _ = quick_run
    state = snapshot(out)
    with pytest.raises(SystemExit) as exit_:
        common.run_main(sparse_attention.main, ["--quick", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds results of finetune_head.py, not of sparse_" in err
    assert snapshot(out) == state


def test_float64_features_keep_their_precision_until_standardised(tmp_path, optax_promotion):
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    x = rng.normal(size=(150, 4)) + 3 * np.eye(4)[y]
    # float32 could not hold these (it was cast to first): X * 1e-46 underflowed to 0, X + 1e9
    # lost every distinct value (both failed blaming the learning rate), X + 1e7 was quantised.
    accuracy = {}
    for name, values in {"x": x, "tiny": x * 1e-46, "1e9": x + 1e9, "1e7": x + 1e7}.items():
        features = write_npz(tmp_path / f"{name}.npz", X=values, y=y)
        out = tmp_path / name
        argv = ["--quick", "--features", features, "--out", out, "--variants", "softmax"]
        common.run_main(finetune_head.main, list(map(str, argv)))
        accuracy[name] = read_json(out / "metrics.json")[0]["accuracy"]
        config = finetune_head.parse_args(list(map(str, argv)))
        raw = finetune_head.load_raw(config, common.load_features(features))
        parts = finetune_head.load_data(finetune_head.Config(), raw, None)["parts"]
        if name == "x":
            expected = parts
        for split, (standardised, _) in parts.items():  # the same numbers, to float32 rounding
            assert standardised.dtype == np.float32
            np.testing.assert_allclose(standardised, expected[split][0], atol=1e-5, err_msg=name)
    assert accuracy["x"] > 0.9
    for name, value in accuracy.items():
        assert abs(value - accuracy["x"]) <= 0.02, (name, accuracy)


def test_float32_features_standardise_as_before():
    # The backbone's features (and float32 files) give the numbers of the plain float64 formula
    # bit for bit: the power-of-two units change no rounding.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * [1, 1e-3, 1e3, 5, 1e-20, 1e20] + [0, 1, -3, 1e4, 0, 0]
    x = x.astype(np.float32)
    y = np.arange(200) % 4
    parts = {
        "train": (x[:120], y[:120]),
        "val": (x[120:150], y[120:150]),
        "test": (x[150:], y[150:]),
    }
    train = x[:120].astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    for name, (standardised, labels) in finetune_head.standardize(parts, "test").items():
        assert np.array_equal(standardised, ((parts[name][0] - mean) / std).astype(np.float32))
        assert labels is parts[name][1]
    # Values near the float64 limits: the squares of the std would overflow or underflow.
    for factor in (1e280, 1e-280):  # columns up to 1e300 and down to 1e-300
        big = {
            name: (part.astype(np.float64) * factor, labels)
            for name, (part, labels) in parts.items()
        }
        for name, (standardised, _) in finetune_head.standardize(big, "test").items():
            plain = finetune_head.standardize(parts, "test")[name][0]
            np.testing.assert_allclose(standardised, plain, atol=1e-4, err_msg=(factor, name))


def test_a_dead_backbone_is_refused_before_config_json(tmp_path, capsys, monkeypatch):
    # Every ReLU unit 0 on every row: the features are constant, the head has nothing to learn
    # (it failed after config.json, blaming the learning rate).
    dead = [
        {"w": np.zeros((64, 64), np.float32), "b": -np.ones(64, np.float32)},
        {"w": np.zeros((64, 32), np.float32), "b": -np.ones(32, np.float32)},
        {"w": np.zeros((32, 10), np.float32), "b": np.zeros(10, np.float32)},
    ]
    monkeypatch.setattr(finetune_head, "load_backbone", lambda config, pretrain, cache: dead)
    out = tmp_path / "out"
    status, err = main_error(["--quick", "--out", out, "--variants", "softmax"], capsys)
    assert status == 2 and "every feature is constant on the train split" in err, err
    assert len(err.strip().splitlines()) == 1 and not list(out.iterdir())


def test_weights_left_bit_identical_name_both_causes(optax_promotion):
    # Features that do not vary give a zero gradient for the weights: bit-identical weights are
    # not always a learning rate too small (standardize refuses such features before this).
    y = (np.arange(12) % 3).astype(np.int32)
    x = np.zeros((12, 4), np.float32)
    data = {"parts": {"train": (x, y), "test": (x, y)}, "num_classes": 3}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    variant = finetune_head.resolve_variant("softmax")
    with pytest.raises(common.UsageError) as error:
        finetune_head.train_head(variant, data, 0, finetune_head.Config(epochs=2), mesh)
    message = str(error.value)
    assert "--learning-rate 0.02 is too small for a float32 update of them" in message
    assert "or the training features do not vary" in message and "\n" not in message


def test_resume_takes_a_variant_spelled_another_way_as_the_folders(tmp_path, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", str(features), "--out", str(out)]
    common.run_main(finetune_head.main, [*args, "--variants", "softmax,entmax:alpha=1.3"])
    before = snapshot(out / "runs")
    # These were trained again and reported twice, under their new spellings.
    again = "softmax:,entmax:alpha=1.30,temperature=1.0,entmax:alpha=1.3"
    status_args = [*args, "--resume", "--variants", again]
    common.run_main(finetune_head.main, status_args)
    records = read_json(out / "metrics.json")
    assert [r["variant"] for r in records] == [
        "softmax",
        "entmax:alpha=1.3",
        "entmax:alpha=1.30,temperature=1.0",  # another variant: temperature is a parameter
    ]
    assert read_json(out / "config.json")["variants"] == [r["variant"] for r in records]
    runs = snapshot(out / "runs")
    assert {path: runs[path] for path in before} == before  # reused, not trained again
    assert len(runs) == 3


def test_resume_without_a_learned_alpha_keeps_the_folders_range(tmp_path, capsys, optax_promotion):
    features = small_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    args = ["--quick", "--features", str(features), "--out", str(out)]
    common.run_main(finetune_head.main, [*args, "--variants", "softmax"])
    runs, config = snapshot(out / "runs"), read_json(out / "config.json")
    # The range changes nothing without entmax:alpha=learned (it was "was run with other
    # settings (learned_alpha_range [1.0, 2.0] -> [1.0, 3.0])").
    common.run_main(finetune_head.main, [*args, "--resume", "--learned-alpha-range", "1,3"])
    assert snapshot(out / "runs") == runs  # nothing trained again
    resumed = read_json(out / "config.json")
    assert resumed["learned_alpha_range"] == [1.0, 2.0]
    assert resumed["config_hash"] == config["config_hash"]
    # With the learned variant the range matters: another one is refused, as before.
    state = snapshot(out)
    learned = [*args, "--resume", "--variants", finetune_head.LEARNED]
    status, err = main_error([*learned, "--learned-alpha-range", "1,3"], capsys)
    assert status == 2 and "other settings (learned_alpha_range [1.0, 2.0] -> [1.0, 3.0])" in err
    assert snapshot(out) == state
    common.run_main(finetune_head.main, learned)  # the folder's range: softmax is reused
    path = finetune_head._run_file(out, "softmax")
    assert path.read_bytes() == runs[path]
    variants = [r["variant"] for r in read_json(out / "metrics.json")]
    assert variants == ["softmax", finetune_head.LEARNED]
