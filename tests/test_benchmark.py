"""experiments/benchmark.py: complete, consistent tables; timing, references, peers, deadlines.

No assertion on speed: the figures depend on the machine. Timing is checked on fake calls of
known duration; the float64 references against tests/reference.py.
"""

import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scripts
from cases import KERNEL_CALL

import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark  # noqa: E402
import common  # noqa: E402

run_script = scripts.runner("benchmark.py")


def test_quick_run(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--out", out, "--variants", "sparsemax,entmax15"]
    # JAX's persistent cache, on in the environment, serves none of the (cold) compiles.
    cache = tmp_path / "jax-cache"
    done = run_script(
        *args,
        env={
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(cache.glob("*"))
    result = json.loads((out / "benchmark.json").read_text())
    env = result["environment"]
    assert env["backend"] == jax.default_backend() and env["backend"]
    assert env["jax"] and env["malloc_env"]["MALLOC_TOP_PAD_"]
    assert env["timing"] == {"jax": "per-call" if env["backend"] == "cpu" else "batched"}
    assert result["incomplete"] is None and result["config"]["dtypes"] == ["float32"]
    timed = [r for r in result["records"] if r["time_ms"] is not None]
    # 2 shapes x 2 modes x (baseline + 2 variants), float32 only under --quick.
    assert len(timed) == 12 and len(result["records"]) == 12
    for r in timed:
        assert r["time_ms"] > 0 and math.isfinite(r["vs_softmax"]) and r["vs_copy"] > 0
        if r["variant"] == "jax.nn.softmax":
            assert r["vs_softmax"] == 1.0
        # Cold compile times, the lowering part of them, and float32 exactness (sparsemax and
        # entmax15 are exact to rounding; softmax is within a few ulps).
        assert 0 < r["lower_s"] < r["compile_s"] < 120
        assert r["max_abs_err"] is not None and 0 <= r["max_abs_err"] < 1e-6, r
        assert r["device"] == env["backend"] and r["calls_per_batch"] >= 1
    # --variants also selects the peers: no PyTorch rows, installed or not.
    assert {r["variant"] for r in result["records"]} == {"jax.nn.softmax", "sparsemax", "entmax15"}
    assert "peers" in env and env["peers"] == {}
    markdown = (out / "benchmark.md").read_text()
    assert "| 64x1000 | float32 | fwd+bwd | sparsemax |" in markdown
    assert "Input: logits ~ normal(0, 3)" in markdown and result["config"]["logit_scale"] == 3
    # The summary: one row per variant, a column per shape and mode, ratios to jax.nn.softmax.
    header = "| variant | 256x32 fwd | 256x32 fwd+bwd | 64x1000 fwd | 64x1000 fwd+bwd |"
    assert header in markdown and header in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| sparsemax |"))
    ratios = [float(v) for v in row.strip("| ").split("|")[1:]]

    def pick(key, variant, shape, mode):
        return next(
            r[key]
            for r in timed
            if r["variant"] == variant and r["shape"] == shape and r["mode"] == mode
        )

    shapes_modes = [(s, m) for s in ([256, 32], [64, 1000]) for m in ("fwd", "fwd+bwd")]
    expected = [pick("vs_softmax", "sparsemax", s, m) for s, m in shapes_modes]
    np.testing.assert_allclose(ratios, expected, rtol=0.01, atol=0.006)
    # The error table and the compile table (shape x mode), in the markdown and on stdout,
    # with the figures of the records: the fwd+bwd columns are the gradient's errors.
    assert markdown.count(header) == 3 and "Max |error|" in done.stdout
    errors = [r for r in done.stdout.splitlines() if r.startswith("| entmax15 |")][1]
    shown = [float(v) for v in errors.strip("| ").split("|")[1:]]
    np.testing.assert_allclose(
        shown, [pick("max_abs_err", "entmax15", s, m) for s, m in shapes_modes], rtol=0.06
    )
    compiles = [r for r in done.stdout.splitlines() if r.startswith("| entmax15 |")][2]
    shown = [float(v) for v in compiles.strip("| ").split("|")[1:]]
    expected = [pick("compile_s", "entmax15", s, m) for s, m in shapes_modes]
    np.testing.assert_allclose(shown, expected, atol=0.006)
    assert "Slowest compile:" in done.stdout and "of 8 compiles of our variants" in done.stdout
    again = run_script(*args)
    assert again.returncode == 2 and "already holds results" in again.stderr


def test_measure_batched_with_peers_and_failures(monkeypatch):
    """Batched timing on the CPU, bfloat16; a JAX row and a peer fail without ending the run."""

    def boom(x):
        raise RuntimeError("no kernel for this case")

    monkeypatch.setitem(benchmark.VARIANTS, "boom", boom)
    names = ("sparsemax", "boom", "torch entmax.sparsemax", "adasplash triton_sparsemax")
    config = benchmark.Config(
        shapes=((8, 16),), dtypes=("bfloat16",), variants=names, timing="batched",
        min_batch_ms=2.0, batches=2,
    )  # fmt: skip
    peers = benchmark.find_peers(names)
    try:
        import entmax  # noqa: F401
        import torch
    except ImportError:
        assert not peers.fns and peers.status
        torch = None
    else:
        assert list(peers.fns) == ["torch entmax.sparsemax"]
        assert peers.status["entmax"].startswith("entmax ")
        if not torch.cuda.is_available():
            assert peers.status["adasplash"] == "not run: needs a CUDA device"

        def broken(t):
            raise ValueError("peer broke")

        peers.fns["torch.softmax"] = broken
    records = benchmark.measure(config, peers)
    by = {(r["variant"], r["mode"]): r for r in records}
    for mode in benchmark.MODES:
        assert by[("boom", mode)]["time_ms"] is None
        assert by[("boom", mode)]["note"].startswith("fails: RuntimeError: no kernel")
        for name in ("jax.nn.softmax", "sparsemax"):
            r = by[(name, mode)]
            # n calls a batch (the calibration itself is checked on fake calls below: here a
            # loaded machine can stretch a single call past the batch time).
            assert 1 <= r["calls_per_batch"] <= benchmark.MAX_CALLS_PER_BATCH
            assert r["time_ms"] > 0 and r["compile_s"] > 0
            # bfloat16 outputs: ours is computed in float32, so within a rounding of the float64
            # reference (probabilities <= 1); jax.nn.softmax computes in bfloat16. Gradients
            # (|w| up to about 4) are rounded to bfloat16 too.
            bound = 2**-8 if name == "sparsemax" else 2**-5
            assert 0 <= r["max_abs_err"] <= bound * (1 if mode == "fwd" else 4), r
        if torch is not None:
            r = by[("torch entmax.sparsemax", mode)]
            assert r["time_ms"] > 0 and r["compile_s"] is None
            assert 0 <= r["max_abs_err"] <= 2**-5 * (1 if mode == "fwd" else 4), r
            assert r["device"] == peers.device and r["first_call_s"] > 0
            assert by[("torch.softmax", mode)]["note"] == "fails: ValueError: peer broke"
    assert [r["variant"] for r in records][:2] == ["jax.nn.softmax", "sparsemax"]


def test_batched_time_fills_a_batch_and_takes_the_median():
    calls = []

    def run_n(n):  # 1 ms a call
        calls.append(n)
        time.sleep(1e-3 * n)

    seconds, n = benchmark.batched_time(run_n, min_batch_s=0.02, batches=3)
    # n grows from 1 until a batch takes 20 ms (about 20 calls; fewer if the machine is loaded).
    assert n > 1 and calls[-3:] == [n] * 3 and calls[:2] == [1, 1]
    assert 1e-3 <= seconds < 5e-3
    # A call longer than a batch: one call a batch.
    seconds, n = benchmark.batched_time(lambda n: time.sleep(0.01 * n), 0.005, 3)
    assert n == 1 and seconds >= 0.01
    config = benchmark.Config(repeats=4, budget_s=0.0)
    counted = []
    seconds, n = benchmark.time_calls(lambda n: counted.append(n), "per-call", config)
    assert n == 1 and counted == [1] * 4 and seconds >= 0


def test_timing_and_shapes_by_backend():
    config = benchmark.Config()
    assert benchmark.timing_method(config, "cpu") == "per-call"
    assert benchmark.timing_method(config, "gpu") == "batched"
    assert benchmark.timing_method(config, "cuda") == "batched"
    forced = dataclasses.replace(config, timing="batched")
    assert benchmark.timing_method(forced, "cpu") == "batched"
    assert benchmark.default_shapes("cpu") == benchmark.SHAPES
    assert (65536, 1024) not in benchmark.SHAPES
    for backend in ("gpu", "tpu"):
        shapes = benchmark.default_shapes(backend)
        assert (65536, 1024) in shapes and (8192, 32000) in shapes and (32, 128000) in shapes
    config, _ = benchmark.parse_args(["--shapes", "large,4x3"])
    assert config.shapes == ((65536, 1024), (8192, 32000), (4, 3))
    config, _ = benchmark.parse_args(["--shapes", "all"])
    assert len(config.shapes) == 9
    config, _ = benchmark.parse_args(["--shapes", "mid"])
    assert config.shapes == benchmark.MID_SHAPES
    assert all(32 < classes <= 512 for _, classes in config.shapes)
    config, _ = benchmark.parse_args([])
    assert config.shapes == () and config.dtypes == () and config.timing == "auto"


def test_xla_backward_rows_run_only_on_accelerators_and_lower_without_the_kernel():
    """The comparison rows of the derivative rule: run by default on accelerators only; for
    ``cuda`` their gradient has the forward kernel alone, the plain row's also the Jacobian's."""
    assert not set(benchmark.ACCELERATOR_VARIANTS) & set(benchmark.default_variants("cpu"))
    assert set(benchmark.ACCELERATOR_VARIANTS) <= set(benchmark.default_variants("gpu"))
    x = jnp.ones((8, 40), jnp.float32)
    for plain, name in [
        ("sparsemax", "sparsemax (XLA backward)"),
        ("entmax15", "entmax15 (XLA backward)"),
    ]:
        kernels = []
        for row in (plain, name):
            grad = jax.grad(lambda x, f=benchmark.VARIANTS[row]: jnp.sum(f(x) * x))
            lowered = jax.jit(grad).trace(x).lower(lowering_platforms=("cuda",))
            kernels.append(lowered.as_text().count(KERNEL_CALL))
        assert kernels == [2, 1], name
        np.testing.assert_array_equal(benchmark.VARIANTS[name](x), benchmark.VARIANTS[plain](x))


def _rows(seed, n_rows, n, ties=False):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_rows, n)) * rng.choice([0.1, 1, 5])
    if ties:
        z = np.round(z * 2) / 2
    return z


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("ties", [False, True])
def test_float64_references_agree_with_the_test_references(n, ties):
    z = _rows(n + 100 * ties, 6, n, ties)
    alpha_rows = np.linspace(1.1, 1.9, 6)
    cases = [
        (benchmark.softmax64(z / 0.5), reference.softmax(z, temperature=0.5)),
        (benchmark.sparsemax64(z), reference.sparsemax(z)),
        (benchmark.entmax15_64(z), reference.entmax15(z)),
        (benchmark.entmax64(z, 1.25), reference.entmax(z, 1.25)),
        (benchmark.entmax64(z, alpha_rows), reference.entmax(z, alpha_rows[:, None])),
        (benchmark.entmax64(z, np.full(6, 1.5)), reference.entmax15(z)),
        (benchmark.normmax64(z, 2.0), reference.normmax(z, 2.0)),
        (benchmark.normmax64(z, 1.5), reference.normmax(z, 1.5)),
    ]
    if n >= 2:
        cases.append((benchmark.budget64(z, 2.0), reference.budget_sparsemax(z, 2.0)))
    for got, want in cases:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # The bisection agrees with the closed forms near their alphas.
    np.testing.assert_allclose(benchmark.entmax64(z, 1.5 + 1e-9), reference.entmax15(z), atol=1e-7)
    np.testing.assert_allclose(benchmark.entmax64(z, 2 - 1e-9), reference.sparsemax(z), atol=1e-7)
    assert np.isnan(benchmark.budget64(np.zeros((2, 1)), 2.0)).all()


@pytest.mark.parametrize(
    "key",
    [("softmax", 0.5), ("sparsemax",), ("entmax15",), ("entmax", 1.3), ("entmax", 3.0),
     ("entmax rows", 1.1, 1.9), ("normmax", 2.0), ("normmax", 3.0), ("budget", 2.0)],
)  # fmt: skip
def test_float64_gradients_are_the_references_derivatives(key):
    """vjp64 (the fwd+bwd error column) against central differences of the reference itself."""
    z, w = _rows(7, 6, 9), np.random.default_rng(8).normal(size=(6, 9))
    alpha = np.linspace(1.1, 1.9, 6)[:, None]
    got = benchmark.vjp64(key, benchmark.reference64(key, z, alpha), w, alpha)
    h, fd = 1e-6, np.zeros_like(z)
    for j in range(z.shape[1]):
        e = np.zeros_like(z)
        e[:, j] = h
        up = benchmark.reference64(key, z + e, alpha)
        fd[:, j] = np.sum((up - benchmark.reference64(key, z - e, alpha)) * w, -1) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7)
    assert np.abs(got).max() > 1e-3  # not trivially zero
    # A row with no solution (fewer entries than the budget) has a nan gradient.
    p = benchmark.budget64(np.zeros((1, 1)), 2.0)
    assert np.isnan(benchmark.vjp64(("budget", 2.0), p, np.ones((1, 1)), None)).all()


def test_errors_and_samples():
    ref = np.array([[0.5, 0.5, 0.0]])
    assert benchmark.max_abs_error(np.array([[0.5, 0.25, 0.25]]), ref) == 0.25
    assert benchmark.max_abs_error(np.array([[np.nan, 0.5, 0.0]]), ref) == math.inf
    # A finite output where the reference is nan is wrong too; nan on both sides agrees.
    nan_ref = np.full((1, 3), np.nan)
    assert benchmark.max_abs_error(np.full((1, 3), 0.3), nan_ref) == math.inf
    assert benchmark.max_abs_error(np.full((1, 3), np.nan), nan_ref) == 0
    assert benchmark.error_note(np.full((1, 3), 0.3), nan_ref).startswith("finite output")
    assert benchmark.error_note(np.array([[np.nan, 0.5, 0.0]]), ref) == "non-finite output"
    with pytest.raises(ValueError, match="output shape"):
        benchmark.max_abs_error(np.zeros((2, 3)), ref)
    rows = benchmark.sample_rows(4096, 32)
    assert len(rows) == benchmark.ERROR_ROWS and rows[0] == 0 and rows[-1] == 4095
    assert len(benchmark.sample_rows(32, 128000)) == 1 and len(benchmark.sample_rows(8, 10)) == 8
    # Every row of the table has a reference.
    assert set(benchmark.REFERENCES) == set(benchmark.ALL_VARIANTS)


def test_deadline_keeps_what_was_measured(tmp_path, monkeypatch):
    def group(config, shape, dtype, names, peers):
        time.sleep(0.2)
        return [benchmark._record(shape, dtype, "fwd", "jax.nn.softmax", time_ms=1.0)]

    monkeypatch.setattr(benchmark, "measure_group", group)
    config = benchmark.Config(
        out=str(tmp_path / "out"), shapes=((2, 3), (4, 5)), dtypes=("float32",), deadline_s=0.1,
        variants=("sparsemax",),
    )  # fmt: skip
    result = benchmark.run(config)
    assert [r["shape"] for r in result["records"]] == [[2, 3]]
    assert result["incomplete"].endswith("1 of 2 shape-dtype groups")
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved["incomplete"] == result["incomplete"]
    assert "**Incomplete**" in (tmp_path / "out" / "benchmark.md").read_text()


def test_a_deadline_shorter_than_the_first_group_still_measures_it(tmp_path, monkeypatch):
    def group(config, shape, dtype, names, peers):
        return [benchmark._record(shape, dtype, "fwd", "jax.nn.softmax", time_ms=1.0)]

    monkeypatch.setattr(benchmark, "measure_group", group)
    config = benchmark.Config(
        out=str(tmp_path / "out"), shapes=((2, 3), (4, 5)), dtypes=("float32",), deadline_s=1e-9,
        variants=("sparsemax",),
    )  # fmt: skip
    result = benchmark.run(config)
    assert [r["shape"] for r in result["records"]] == [[2, 3]]
    assert result["incomplete"].endswith("1 of 2 shape-dtype groups")


def test_an_input_that_overflows_its_dtype_has_no_error_figure():
    # normal * 1e5 overflows float16 (max 65504): inf inputs, nan outputs and nan references.
    config = benchmark.Config(
        shapes=((8, 4),), dtypes=("float16",), variants=("softmax",), repeats=1, budget_s=0.0,
        logit_scale=1e5,
    )  # fmt: skip
    records = benchmark.measure(config, benchmark.find_peers(config.variants))
    assert records
    for r in records:
        assert r["max_abs_err"] is None and r["note"].startswith("input not finite: "), r
        assert "overflow float16 at --logit-scale 100000" in r["note"]


def test_quick_keeps_the_flags_given():
    config, _ = benchmark.parse_args(
        ["--quick", "--repeats", "30", "--batches", "5", "--min-batch-ms", "20"]
    )
    assert (config.repeats, config.batches, config.min_batch_ms) == (30, 5, 20.0)
    assert config.shapes == benchmark.QUICK_SHAPES
    assert config.budget_s == benchmark.QUICK["budget_s"]
    config, _ = benchmark.parse_args(["--quick", "--shapes", "8x4", "--dtypes", "bfloat16"])
    assert config.shapes == ((8, 4),) and config.dtypes == ("bfloat16",)
    assert config.repeats == benchmark.QUICK["repeats"]
    config, _ = benchmark.parse_args(["--repeats", "5"])
    assert config.repeats == 5 and config.batches == benchmark.Config().batches


def test_every_file_is_written_atomically(tmp_path, monkeypatch, capsys):
    record = benchmark._record([2, 3], "float32", "fwd", "jax.nn.softmax")
    record.update(time_ms=0.01, vs_softmax=1.0, vs_copy=2.0, compile_s=0.1, max_abs_err=1e-7)
    monkeypatch.setattr(benchmark, "measure", lambda config, *args: [record])  # no timing here
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
    markdown = (out / "benchmark.md").read_text()
    assert "| jax.nn.softmax |" in markdown and "| 1.0e-07 |" in markdown
    assert "Slowest compile: 0.10 s (jax.nn.softmax, 2x3" in capsys.readouterr().out
    # A second run on the folder is refused while a live process holds it, and when it holds
    # results; --force overwrites.
    (out / common.LOCK_NAME).write_text(f"{os.getppid()}\n")
    with pytest.raises(SystemExit) as exit_:
        common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--out", str(out)])
    assert exit_.value.code == 2 and "in use by another run" in capsys.readouterr().err
    (out / common.LOCK_NAME).unlink()
    common.run_main(benchmark.main, ["--quick", "--no-malloc-env", "--force", "--out", str(out)])
    assert not (out / common.LOCK_NAME).exists()


def test_unknown_variant_is_a_one_line_error(tmp_path):
    done = run_script("--quick", "--out", tmp_path / "b", "--variants", "fastmax")
    assert done.returncode == 2 and "unknown variants ['fastmax']" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtypes", "int32"], "--dtypes takes a comma-separated list from float32, bfloat16"),
        (["--dtypes", ","], "got nothing"),
        (["--shapes", "0x32"], "both sizes >= 1, got 0x32"),
        (
            ["--shapes", "4x"],
            "--shapes takes BATCHxCLASSES,... or default, large, mid, all, got '4x'",
        ),
        (["--shapes", "4x3x2"], "both sizes >= 1, got 4x3x2"),
        (["--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
        (["--batches", "0"], "--batches must be an integer >= 1, got 0"),
        (["--min-batch-ms", "0"], "--min-batch-ms must be finite and > 0, got 0.0"),
        (["--deadline-s", "-1"], "--deadline-s must be finite and >= 0, got -1.0"),
        (["--deadline-s", "nan"], "--deadline-s must be finite and >= 0, got nan"),
        (["--logit-scale", "0"], "--logit-scale must be finite and > 0, got 0.0"),
        (["--logit-scale", "inf"], "--logit-scale must be finite and > 0, got inf"),
        (["--logit-scale", "1e39"], "--logit-scale 1e+39 is beyond the float32 range"),
        (["--shapes", f"{10**20}x3"], "--shapes takes sizes up to 2147483647"),
        (["--timing", "fast"], "--timing takes auto, per-call, batched, got 'fast'"),
        # Read as 10, 15 and 3 before (the registry refuses such numbers in a spec).
        (["--repeats", "1_0"], "argument --repeats: invalid int value: '1_0'"),
        (["--logit-scale", "1_5"], "argument --logit-scale: invalid float value: '1_5'"),
        (["--shapes", "٣x32"], "--shapes takes BATCHxCLASSES,... or default, large, mid, all"),
        (["--variants", "sparsemax,fastmax"], "unknown variants ['fastmax']"),
        # It measured sparsemax twice.
        (["--variants", "sparsemax,entmax15,sparsemax"], "--variants: 'sparsemax' is given twice"),
        # Sizes no memory holds: an out-of-memory traceback, or an abort (SIGABRT) that left a
        # stale lock, once the folder was made.
        (["--shapes", "1000000x1000000"], "--shapes: these sizes need about 14,901 GiB of arrays"),
        (["--shapes", "8x4,2000000000x2000000000"], "--shapes: these sizes need about"),
        (["--shapes", "2147483647x2147483647", "--dtypes", "bfloat16"], "these sizes need about"),
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


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_the_logit_scale_is_the_inputs_standard_deviation(monkeypatch, scale):
    seen = []

    def record(x):  # traced: the std is reported when it runs
        jax.debug.callback(lambda std: seen.append(float(std)), jnp.std(x.astype(jnp.float32)))
        return jax.nn.softmax(x)

    monkeypatch.setitem(benchmark.VARIANTS, "record", record)
    config, _ = benchmark.parse_args(["--logit-scale", str(scale)])
    config = dataclasses.replace(
        config, shapes=((64, 256),), dtypes=("float32",), variants=("record",), repeats=1
    )
    benchmark.measure(config, benchmark.find_peers(config.variants))
    assert config.logit_scale == scale and seen
    np.testing.assert_allclose(seen, scale, rtol=0.05)


def test_variant_names_with_parameters_are_split_on_commas():
    config, _ = benchmark.parse_args(
        ["--variants", "softmax T=0.5,entmax a=1.25,sparsemax,adasplash triton_entmax a=1.5"]
    )
    assert config.variants == (
        "softmax T=0.5",
        "entmax a=1.25",
        "sparsemax",
        "adasplash triton_entmax a=1.5",
    )


def test_a_dtype_or_shape_given_twice_is_measured_once(tmp_path, monkeypatch):
    # --dtypes float32,float32 ran the group twice and called the finished run "Incomplete:
    # ... 1 of 2 shape-dtype groups"; shapes were deduplicated already, dtypes are now too.
    config, _ = benchmark.parse_args(
        ["--dtypes", "float32,bfloat16,float32", "--shapes", "2x3,2x3"]
    )
    assert config.dtypes == ("float32", "bfloat16") and config.shapes == ((2, 3),)
    groups = []

    def group(config, shape, dtype, names, peers):
        groups.append((shape, dtype))
        return [benchmark._record(shape, dtype, "fwd", "jax.nn.softmax", time_ms=1.0)]

    monkeypatch.setattr(benchmark, "measure_group", group)
    config = benchmark.Config(
        out=str(tmp_path / "out"), shapes=((2, 3), (2, 3)), dtypes=("float32", "float32"),
        variants=("sparsemax",),
    )  # fmt: skip
    result = benchmark.run(config)
    assert groups == [((2, 3), "float32")] and result["incomplete"] is None
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())["config"]
    assert saved["dtypes"] == ["float32"] and saved["shapes"] == [[2, 3]]


def test_memory_estimate_is_the_largest_group():
    assert benchmark.memory_estimate([(2, 3), (4, 5)], ["float32", "bfloat16"]) == 20 * 16
    assert benchmark.memory_estimate([(4, 5)], ["bfloat16"]) == 20 * 12
    # Python integers: beyond int64 (which NumPy and XLA would overflow) it is still a number.
    assert benchmark.memory_estimate([(2**40, 2**40)], ["float32"]) == 2**80 * 16
    out = "unused"
    config = benchmark.Config(out=out, shapes=((10**6, 10**6),), dtypes=("float32",))
    with pytest.raises(common.UsageError, match="--shapes: these sizes need about"):
        benchmark.run(config)
    assert not pathlib.Path(out).exists()
