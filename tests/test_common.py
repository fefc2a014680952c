"""experiments/common.py: variant lists, output-folder lock, atomic files, SIGTERM, progress."""

import errno
import io
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402


@pytest.mark.parametrize(
    ("text", "specs"),
    [
        ("softmax", ("softmax",)),
        ("softmax,sparsemax", ("softmax", "sparsemax")),
        ("entmax:alpha=1.3,temperature=2", ("entmax:alpha=1.3,temperature=2",)),
        (
            "softmax,entmax:alpha=1.3,temperature=2,sparsemax",
            ("softmax", "entmax:alpha=1.3,temperature=2", "sparsemax"),
        ),
        (
            " entmax:alpha=1.3 , max_iter=20,, softmax:temperature=0.5,entmax:alpha=learned ",
            ("entmax:alpha=1.3,max_iter=20", "softmax:temperature=0.5", "entmax:alpha=learned"),
        ),
        ("", ()),
        # A parameter after a spec with none yet starts its parameters (it was joined with ",":
        # "unknown variant 'softmax,temperature=2'").
        ("softmax,temperature=2", ("softmax:temperature=2",)),
        (
            "sparsemax,entmax,alpha=1.3,temperature=2,softmax",
            ("sparsemax", "entmax:alpha=1.3,temperature=2", "softmax"),
        ),
    ],
)
def test_split_specs_keeps_parameters_with_their_variant(text, specs):
    assert common.split_specs(text) == specs


def test_split_specs_refuses_a_leading_parameter():
    with pytest.raises(common.UsageError, match="no variant before it"):
        common.split_specs("alpha=1.3,softmax")


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_is_quiet_without_a_terminal(monkeypatch):
    items = [1, 2, 3]
    for tty in (False, True):
        stream = _Stream(tty=tty)
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(common.progress(items, desc="x")) == items
        assert bool(stream.getvalue()) == tty  # a bar on a terminal only


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is free
    return child.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / common.LOCK_NAME
    # A live process (our parent) holds it: refused, and the folder is left as it was.
    lock.write_text(f"{os.getppid()}\n")
    with pytest.raises(common.UsageError, match="in use by another run"):
        with common.output_folder(out, ["r.json"], force=False):
            pass
    assert lock.read_text() == f"{os.getppid()}\n"
    # Its process is gone: taken over, held with our pid, removed at the end.
    lock.write_text(f"{_dead_pid()}\n")
    with common.output_folder(out, ["r.json"], force=False) as folder:
        assert lock.read_text() == f"{os.getpid()}\n"
        # A second run (here: the same process) on the folder in use is refused.
        with pytest.raises(common.UsageError, match=f"process {os.getpid()}"):
            with common.output_folder(folder, ["r.json"], force=False):
                pass
        assert lock.exists()
    assert not lock.exists()
    # A folder where the lock file goes: a one-line error, not a traceback.
    lock.mkdir()
    with pytest.raises(common.UsageError, match="is a folder, not a run's lock file"):
        with common.output_folder(out, ["r.json"], force=False):
            pass
    assert lock.is_dir()


def test_refusing_results_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("{}")
    with pytest.raises(common.UsageError, match="already holds results"):
        with common.output_folder(out, ["r.json"], force=False):
            pass
    assert [p.name for p in out.iterdir()] == ["r.json"]


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    stale = [out / ".metrics.json.0123.tmp", out / "runs" / ".softmax.json.4567.tmp"]
    for path in stale:
        path.write_text("half")
    (out / "notes.tmp").write_text("not ours")  # not a temporary file of the atomic writer
    with common.output_folder(out, [], force=False, subfolders=("runs",)):
        assert not any(path.exists() for path in stale)
    assert (out / "notes.tmp").read_text() == "not ours"


def test_atomic_file_removes_its_temporary_file_on_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_file(path) as handle:
            handle.write(b"new, half written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


SIGTERM_SCRIPT = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import common

def main(argv):
    out = pathlib.Path(argv[0])
    with common.output_folder(out, ["result.json"], force=False):
        with common.atomic_file(out / "result.json") as handle:
            handle.write(b"partial")
            print("ready", flush=True)
            time.sleep(60)

common.run_main(main, sys.argv[2:])
"""


def _start(script: str, out) -> subprocess.Popen:
    """``script`` in a child Python with the experiments on its path and ``out`` as argv[2]."""
    return subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT / "experiments"), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_removes_the_temporary_file_and_the_lock(tmp_path):
    out = tmp_path / "out"
    child = _start(SIGTERM_SCRIPT, out)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert {p.name for p in out.iterdir()} - {common.LOCK_NAME}  # the temporary file
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == [
        "error: stopped by SIGTERM; finished parts stay in the output folder"
    ]
    assert list(out.iterdir()) == []  # no result, no temporary file, no lock


# The script run from its command line (run_main(main), argv None), with an atexit handler that
# crashes as XLA's threads sometimes do in the interpreter's shutdown after a Ctrl-C.
SIGINT_SCRIPT = """
import atexit, os, pathlib, signal, sys, time
sys.path.insert(0, sys.argv[1])
import common

atexit.register(os.kill, os.getpid(), signal.SIGSEGV)

def main(argv):
    out = pathlib.Path(sys.argv[2])
    with common.output_folder(out, ["result.json"], force=False):
        with common.atomic_file(out / "result.json") as handle:
            handle.write(b"partial")
            print("unflushed", end="")  # flushed by run_main before it ends the process
            print("ready", file=sys.stderr, flush=True)
            time.sleep(60)

common.run_main(main)
"""


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_script_without_the_interpreters_shutdown(tmp_path, signum, status):
    out = tmp_path / "out"
    child = _start(SIGINT_SCRIPT, out)
    try:
        assert child.stderr.readline().strip() == "ready"
        child.send_signal(signum)
        out_text, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == status, err[-3000:]  # not -11: the crashing handler did not run
    assert out_text == "unflushed"
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert list(out.iterdir()) == []  # no result, no temporary file, no lock


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exception_was_lost_still_stops_the_run(capsys):
    # Python ignores an exception raised in a __del__ or a garbage-collection callback: a Ctrl-C
    # that came while JAX's ran (often in a run's first seconds) let the run go on to exit 0.
    steps = []

    class Dropped:
        def __del__(self):
            common._on_signal(signal.SIGINT, None)  # as the handler runs on a Ctrl-C here

    def main(argv):
        Dropped()
        for step in common.progress(range(3)):
            steps.append(step)

    with pytest.raises(SystemExit) as stop:
        common.run_main(main, [])
    assert stop.value.code == 130 and steps == []
    assert "stopped by SIGINT" in capsys.readouterr().err


def _refuse_writes_under(folder, monkeypatch):
    """Makes ``folder`` read-only: chmod, or (root ignores modes) failing os.open/os.mkdir."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_open, real_mkdir = os.open, os.mkdir

    def denied(path):
        return pathlib.Path(path).resolve().is_relative_to(folder.resolve())

    def fake_open(path, flags, *args, **kwargs):
        if denied(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_a_read_only_out_is_a_usage_error(tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    _refuse_writes_under(read_only, monkeypatch)
    try:
        for out in (read_only, read_only / "sub"):
            with pytest.raises(common.UsageError, match="Permission denied"):
                with common.output_folder(out, [], force=False):
                    pass
            assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def test_load_features_checks_labels_and_keeps_the_precision_of_x(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, X=np.ones((3, 2)), y=np.array([0, 10**9, 1]))
    with pytest.raises(common.UsageError, match=r"largest is 1000000000 but 2, 3, 4, 5, 6 and"):
        common.load_features(path)
    np.savez(path, X=np.ones((4, 2)), y=np.array([0, 1, 3, 5]))
    with pytest.raises(common.UsageError, match="the largest is 5 but 2, 4 never occur"):
        common.load_features(path)
    np.savez(path, X=np.array([[1e30, 0.0], [0.0, 1.0]], np.float32), y=np.array([1, 0]))
    loaded = common.load_features(path)
    assert loaded["X"].dtype == np.float32 and loaded["y"].tolist() == [1, 0]
    # Float64 X stays float64 until it is standardised (it was cast to float32 here: X + 1e9
    # lost every distinct value, X * 1e-46 underflowed to 0, X * 1e300 was refused).
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    for values in (x + 1e9, x * 1e-46, x * 1e300):
        np.savez(path, X=values, y=np.array([0, 1]))
        loaded = common.load_features(path)
        assert loaded["X"].dtype == np.float64 and np.array_equal(loaded["X"], values)
    # Integers: as the smallest float that holds them (int64's 2**53 + 1 is not float32's).
    for dtype, expected in ((np.int16, np.float32), (np.int64, np.float64)):
        np.savez(path, X=x.astype(dtype), y=np.array([0, 1]))
        assert common.load_features(path)["X"].dtype == expected
    if np.finfo(np.longdouble).max > np.finfo(np.float64).max:  # x86: 80-bit long double
        np.savez(path, X=np.array([[1, 2], [3, 4]], np.longdouble) * 10**400, y=np.array([0, 1]))
        with pytest.raises(common.UsageError, match=r"beyond the float64 range \(\|x\| up to 4e"):
            common.load_features(path)


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("+3", 3), ("-2", -2), ("1.5", 1.5), ("1e-3", 1e-3), ("-.5E+2", -50.0)],
)
def test_number_flags_read_plain_ascii_numbers(text, value):
    parse = common.integer if isinstance(value, int) else common.number
    assert parse(text) == value and type(parse(text)) is type(value)
    assert math.isnan(common.number("nan")) and common.number("inf") == math.inf  # checked later


@pytest.mark.parametrize("text", ["1_5", "1_0.5", "\u0663", "\u0967.\u096b", "1e1_0", "", "two"])
def test_number_flags_refuse_what_the_registry_refuses(text):
    # float() and int() read "1_5" as 15 and "\u0663" (Arabic-Indic 3) as 3; a spec refuses them.
    for parse in (common.number, common.integer):
        with pytest.raises(ValueError):
            parse(text)
    assert (common.number.__name__, common.integer.__name__) == ("float", "int")  # argparse


def test_load_features_refuses_a_complex_x(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, X=np.ones((3, 2), np.complex64) * 1j, y=np.array([0, 1, 0]))
    with pytest.raises(common.UsageError, match="X must be a 2-D real numeric array"):
        common.load_features(path)


def test_write_json_writes_strict_json(tmp_path):
    path = tmp_path / "r.json"
    common.write_json(path, {"a": float("nan"), "b": [float("inf"), 1.5], "c": (-math.inf,)})
    text = path.read_text()

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [None, 1.5], "c": [None]}


@pytest.mark.parametrize(
    ("value", "positive", "problem"),
    [
        (1e39, False, "beyond the float32 range"),
        (-1e39, False, "beyond the float32 range"),
        (3e38, False, None),
        (1e-60, False, None),  # 0 in float32 is fine for a setting that may be 0
        (1e-60, True, "below float32's smallest normal number"),
        (1e-39, True, "below float32's smallest normal number"),  # subnormal: XLA flushes it
        (float(np.finfo(np.float32).tiny), True, None),
    ],
)
def test_float32_problem(value, positive, problem):
    found = common.float32_problem(value, positive)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda: common.check_learning_rate(1e39), "--learning-rate 1e+39 is beyond the float32"),
        (lambda: common.check_learning_rate(1e-60), "--learning-rate 1e-60 is below float32's"),
        (lambda: common.check_alpha_range((1, 1e39)), "--learned-alpha-range 1e+39 is beyond"),
        (lambda: common.check_alpha_range((1, 1e38)), "--learned-alpha-range 1e+38 is above 8.5"),
        (lambda: common.check_alpha_range((1, 1 + 1e-9)), "the same number in float32"),
        (lambda: common.check_seed(2**63, "--seed"), "--seed must be at most 9223372036854775807"),
        (lambda: common.check_seed(-1, "--seed"), "--seed must be an integer >= 0, got -1"),
        (lambda: common.check_seed(True, "--seed"), "--seed must be an integer >= 0, got True"),
    ],
)
def test_setting_checks_refuse_what_float32_and_jax_cannot_take(check, message):
    with pytest.raises(common.UsageError, match=re.escape(message)):
        check()


def test_seeds_up_to_2_63_minus_1_are_accepted_by_jax_random_key():
    import jax

    common.check_seed(common.MAX_SEED, "--seed")
    jax.random.key(common.MAX_SEED)  # the largest accepted seed is one jax takes


def test_sizes_are_bounded():
    import types

    common.check_positive_ints(types.SimpleNamespace(hidden=common.MAX_SIZE), ["hidden"])
    with pytest.raises(common.UsageError, match=r"--hidden must be at most 2147483647"):
        common.check_positive_ints(types.SimpleNamespace(hidden=10**20), ["hidden"])


def test_check_memory_refuses_what_no_machine_holds():
    common.check_memory(2**30, "--x", memory=2**31)  # fits
    with pytest.raises(common.UsageError, match=r"--x: these sizes need about 4 GiB of arrays"):
        common.check_memory(2**32, "--x", memory=2**31)
    common.check_memory(2**60, "--x", memory=0)  # unknown memory: no check
    assert common.physical_memory() is None or common.physical_memory() > 2**26


IDENTITY = {"experiment": "finetune_head", "results_format": 2}


def _folder_with_settings(path, **settings):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(settings))
    return path


def test_a_plain_resume_continues_the_folders_own_variants(tmp_path):
    default = ("softmax", "sparsemax", "entmax15", "entmax:alpha=learned")
    out = _folder_with_settings(tmp_path / "out", variants=["softmax", "sparsemax"], **IDENTITY)
    # No --variants: the folder's list (it added the default list to it).
    assert common.resumed_variants(out, None, True, default, IDENTITY) == ("softmax", "sparsemax")
    # A list given adds to the folder's; without --resume, the list or the default.
    given = ("entmax15", "softmax")
    resumed = common.resumed_variants(out, given, True, default, IDENTITY)
    assert resumed == ("softmax", "sparsemax", "entmax15")
    assert common.resumed_variants(out, given, False, default, IDENTITY) == given
    assert common.resumed_variants(out, None, False, default, IDENTITY) == default
    assert common.resumed_variants(tmp_path / "new", None, True, default, IDENTITY) == default
    # A folder of another format of results: not its list (check_resumable refuses the folder).
    old = _folder_with_settings(tmp_path / "old", variants=["sparsemax"])
    assert common.resumed_variants(old, None, True, default, IDENTITY) == default


def test_a_variant_spelled_two_ways_is_one_variant(tmp_path):
    # finetune_head's key is the parsed variant; here a table of spellings stands for it.
    aliases = {"sparsemax:": "sparsemax", "softmax:temperature=2.0": "softmax:temperature=2"}

    def key(name):
        return aliases.get(name, name)

    common.check_unique(["sparsemax:", "softmax:temperature=2.0"], "-v", key)
    common.check_unique(["sparsemax", "sparsemax:"], "-v")  # by the name itself: two names
    with pytest.raises(common.UsageError) as error:
        common.check_unique(["sparsemax", "softmax:temperature=2.0", "sparsemax:"], "-v", key)
    assert str(error.value) == (
        "-v: 'sparsemax:' is given twice (also as 'sparsemax': the same variant)"
    )
    with pytest.raises(common.UsageError, match=r"^-v: 'a' is given twice$"):
        common.check_unique(["a", "b", "a"], "-v", key)
    # --resume: a spelling of one of the folder's variants is that variant, as the folder has it.
    out = _folder_with_settings(tmp_path / "out", variants=["sparsemax", "entmax15"], **IDENTITY)
    given = ("sparsemax:", "softmax")
    resumed = common.resumed_variants(out, given, True, (), IDENTITY, key)
    assert resumed == ("sparsemax", "entmax15", "softmax")
    by_name = ("sparsemax", "entmax15", "sparsemax:", "softmax")  # without key: two names
    assert common.resumed_variants(out, given, True, (), IDENTITY) == by_name


def test_resume_refuses_a_folder_of_another_script_first(tmp_path):
    out = _folder_with_settings(
        tmp_path / "out", variants=["learned"], experiment="sparse_attention", results_format=2
    )
    message = f"--resume: {out} holds results of sparse_attention.py, not of finetune_head.py"
    with pytest.raises(common.UsageError, match=re.escape(message)):
        common.resumed_variants(out, None, True, ("softmax",), IDENTITY)
    record = {"variants": ["softmax"], "epochs": 4, **IDENTITY, "config_hash": "0" * 16}
    with pytest.raises(common.UsageError, match=re.escape(message)):
        common.check_resumable(out, ["config.json"], record, ("variants", "config_hash"))


def test_resume_refuses_a_folder_of_another_results_format(tmp_path):
    # An earlier version of a script wrote run files of another format with the same settings:
    # refused as other settings, naming the format alone.
    out = _folder_with_settings(tmp_path / "out", variants=["softmax"], epochs=4, seeds=1)
    record = {"variants": ["softmax"], "epochs": 4, "seeds": 2, **IDENTITY, "config_hash": "x"}
    with pytest.raises(common.UsageError) as error:
        common.check_resumable(out, ["config.json"], record, ("variants", "config_hash"))
    assert str(error.value) == (
        f"--resume: {out} was run with other settings (experiment None -> 'finetune_head'; "
        "results_format None -> 2) (results of another version of the script, or of another "
        "script); use the same flags, or --force to start over"
    )
    # The format is part of config_hash: a run file of another format never matches.
    import dataclasses

    @dataclasses.dataclass
    class Settings:
        epochs: int = 4

    hashes = {
        common.settings_record(Settings(), ())["config_hash"],
        common.settings_record(Settings(), (), **IDENTITY)["config_hash"],
        common.settings_record(Settings(), (), **{**IDENTITY, "results_format": 3})["config_hash"],
    }
    assert len(hashes) == 3


def test_a_reused_run_file_lacking_a_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "softmax.json"
    finished = {"config_hash": "h", "backend": "cpu", "devices": 1, "runs": [{"accuracy": 0.9}]}
    path.write_text(json.dumps(finished))
    keys = {"softmax": ("accuracy",)}
    assert common.reusable_runs({"softmax": path}, "h", "cpu", 1, keys) == {"softmax": finished}
    with pytest.raises(common.UsageError) as error:
        common.reusable_runs({"softmax": path}, "h", "cpu", 1, {"softmax": ("accuracy", "loss")})
    assert str(error.value).startswith(f"--resume: {path} lacks loss in run 0 (damaged, or")
    path.write_text(json.dumps({**finished, "runs": [[0.9]]}))
    with pytest.raises(common.UsageError, match="lacks a result"):
        common.reusable_runs({"softmax": path}, "h", "cpu", 1, keys)
    assert common.reusable_runs({"softmax": path}, "other", "cpu", 1, keys) == {}  # not reused
