"""Helpers shared by the experiment scripts: output folders, atomic writes, inputs, flags, errors.

The scripts run as ``python experiments/<script>.py``; Python then puts this folder on
``sys.path``, so they import this module as ``common``.

Output folders: a run holds ``<out>/.lock`` (created with ``O_CREAT | O_EXCL``, holding its pid)
while it writes, so a second run on the same folder is refused; a lock whose process is gone is
taken over. Every file goes through :func:`atomic_file` (a temporary ``.<name>.<uuid>.tmp`` in
the same folder, then a rename): a reader never sees half a file. Temporary files are removed on
exceptions and on SIGTERM (see :func:`run_main`); ones left by a killed run are removed at the
start of the next run on the folder.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import numpy as np


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class Interrupted(BaseException):
    """Raised by the SIGTERM handler that :func:`run_main` installs.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Signals received in this run: an exception raised where Python ignores exceptions (JAX's
# garbage-collection callback, often running at a Ctrl-C in the first seconds) is lost, and the
# run went on to exit 0; :func:`progress` and :func:`run_main` raise it again.
_RECEIVED: list[int] = []


def _on_signal(signum: int, frame: Any) -> None:
    # Once: a second signal during the clean-up ends the process the default way.
    signal.signal(signum, signal.SIG_DFL)
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raises :class:`Interrupted` if a signal came whose exception was lost (see _RECEIVED)."""
    if _RECEIVED:
        raise Interrupted(_RECEIVED[0])


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None):
    """Runs ``main``; turns errors and signals into one line on stderr and an exit status.

    A :class:`UsageError` exits with status 2. SIGTERM and SIGINT (Ctrl-C) raise
    :class:`Interrupted` in the main thread, so that ``finally`` blocks (the lock, temporary
    files) run, and exit with 128 + 15 and 130; one whose exception was lost stops the run at
    the next step of a loop (:func:`progress`), or at its end.

    With ``argv`` None (the script run from its command line), a signal ends the process at once
    after that (see :func:`_exit_at_once`); called with ``argv`` (a test, another program), it
    raises :class:`SystemExit` as for the other errors.
    """
    in_main_thread = _is_main_thread()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _on_signal) for sig in handled} if in_main_thread else {}
    try:
        result = main(argv)
        raise_if_interrupted()
        return result
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(
            f"error: stopped by {name}; finished parts stay in the output folder", file=sys.stderr
        )
        status = 128 + stop.signum
    except KeyboardInterrupt:  # a Ctrl-C before the handler was installed
        print("error: interrupted; finished parts stay in the output folder", file=sys.stderr)
        status = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _RECEIVED.clear()
    if argv is None:
        _exit_at_once(status)
    raise SystemExit(status)


def _exit_at_once(status: int) -> None:
    """Ends the process with ``status`` now, without the interpreter's shutdown.

    A signal can stop JAX inside XLA (a compilation, a transfer) while its threads go on; the
    interpreter's shutdown then sometimes crashes in their C++ destructors (SIGSEGV: exit status
    139 where 130 was due). The files are safe by now: the ``finally`` blocks ran (temporary files
    removed, lock released), and what the atexit handler would still do is done here.
    """
    _clean_up_at_exit()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or replaced streams
            stream.flush()
    os._exit(status)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are :class:`UsageError` (one line, exit status 2)."""

    def error(self, message: str):  # noqa: D102 (argparse's)
        raise UsageError(message)


# --------------------------------------------------------------------------------------------------
# Output folders: lock, refusal, stale temporary files.

LOCK_NAME = ".lock"
_HELD_LOCKS: set[pathlib.Path] = set()  # locks this process holds
_LIVE_TMP: set[pathlib.Path] = set()  # temporary files being written by this process
# A lock file still empty after this long is from a process that died before writing its pid.
_EMPTY_LOCK_GRACE_S = 10.0


def default_out_dir(prefix: str) -> pathlib.Path:
    """``results/<prefix>-<timestamp>`` (new for every run)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("results") / f"{prefix}-{stamp}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _lock_holder(lock: pathlib.Path) -> tuple[int | None, str]:
    """(pid or None if unreadable, the raw text) of a lock file."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None, ""
    except IsADirectoryError:
        raise UsageError(f"{lock} is a folder, not a run's lock file: remove it") from None
    try:
        return int(text.strip()), text
    except ValueError:
        return None, text


def acquire_lock(folder: pathlib.Path) -> pathlib.Path:
    """Creates ``folder/.lock`` holding this pid (``O_CREAT | O_EXCL``); takes over a stale one.

    Raises:
        UsageError: another live process holds the lock, or the folder is not writable.
    """
    lock = pathlib.Path(folder) / LOCK_NAME
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid, text = _lock_holder(lock)
            if pid is None:
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if age < _EMPTY_LOCK_GRACE_S:
                    raise UsageError(
                        f"{folder} is in use by another run (lock file {lock} is being written)"
                    ) from None
            elif _pid_alive(pid) and not (pid == os.getpid() and lock not in _HELD_LOCKS):
                raise UsageError(
                    f"{folder} is in use by another run (process {pid}, lock file {lock}); wait "
                    "for it to finish, or delete the lock file if no run uses the folder"
                ) from None
            # Stale (its process is gone): remove it unless someone replaced it meanwhile.
            with contextlib.suppress(FileNotFoundError):
                if lock.read_text() == text:
                    lock.unlink()
            continue
        except OSError as error:
            raise UsageError(f"cannot write in --out {folder}: {error.strerror}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        _HELD_LOCKS.add(lock)
        return lock
    raise UsageError(f"could not take the lock {lock}; is another run starting on {folder}?")


def release_lock(lock: pathlib.Path) -> None:
    """Removes a lock taken by :func:`acquire_lock` (if it still holds this pid)."""
    _HELD_LOCKS.discard(lock)
    pid, _ = _lock_holder(lock)
    if pid == os.getpid():
        lock.unlink(missing_ok=True)


def remove_stale_temp_files(folder: pathlib.Path, subfolders: Iterable[str] = ()) -> list[str]:
    """Deletes ``.*.tmp`` files (left by a killed run) in ``folder`` and its ``subfolders``.

    Call it only while holding the folder's lock: then no other run is writing them.
    """
    removed = []
    for where in [pathlib.Path(folder), *(pathlib.Path(folder) / name for name in subfolders)]:
        if where.is_dir():
            for path in where.glob(".*.tmp"):
                if path not in _LIVE_TMP and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
    return removed


@contextlib.contextmanager
def output_folder(
    out: pathlib.Path,
    markers: Iterable[str],
    force: bool,
    resume: bool | None = None,
    subfolders: Iterable[str] = (),
) -> Iterator[pathlib.Path]:
    """Creates and locks ``out`` for one run; refuses a folder in use or holding results.

    Args:
        out: the results folder.
        markers: names whose presence means the folder holds (possibly partial) results.
        force: results may be overwritten (the script removes them).
        resume: results may be continued (the script checks they match); None for a script
            without ``--resume``.
        subfolders: folders inside ``out`` where the run writes too (for stale temporary files).

    Yields:
        ``out``, locked (``out/.lock``) until the block ends, with stale ``.*.tmp`` files removed.

    Raises:
        UsageError: ``out`` is not a writable folder, another run holds it, or it holds results
            and neither ``force`` nor ``resume`` is set. The folder is then left as it was.
    """
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {out}: {error.strerror}") from None
    try:
        lock = acquire_lock(out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        existing = [name for name in markers if (out / name).exists()]
        if existing and not (force or resume):
            raise UsageError(
                f"{out} already holds results ({', '.join(existing)}); use --force to overwrite"
                + ("" if resume is None else " or --resume to continue")
            )
        remove_stale_temp_files(out, subfolders)
        yield out
    finally:
        release_lock(lock)


def remove_outputs(out: pathlib.Path, names: Iterable[str]) -> None:
    """Deletes the files and folders ``names`` in ``out`` that exist (a previous run's results)."""
    for name in names:
        path = pathlib.Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@atexit.register
def _clean_up_at_exit() -> None:
    for path in list(_LIVE_TMP):
        path.unlink(missing_ok=True)
    for lock in list(_HELD_LOCKS):
        release_lock(lock)


# --------------------------------------------------------------------------------------------------
# Atomic writes: every output file goes through atomic_file.


@contextlib.contextmanager
def atomic_file(path: pathlib.Path) -> Iterator[io.BufferedWriter]:
    """A binary file handle whose contents appear at ``path`` only when the block succeeds.

    It writes ``.<name>.<uuid>.tmp`` next to ``path``, then renames it over ``path``; on an
    exception (or SIGTERM under :func:`run_main`) the temporary file is deleted and ``path`` is
    left as it was. New files get mode 0o666 before the umask, like ``open()``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    _LIVE_TMP.add(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
        _LIVE_TMP.discard(tmp)


def write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_file(path) as handle:
        handle.write(data)


def write_text(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode())


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically (a temporary file, then a rename).

    A float that is not finite is written as ``null``: Python's ``NaN``/``Infinity`` are not
    JSON, and strict readers (browsers, ``jq``) refuse the whole file.
    """
    text = json.dumps(_finite_or_none(value), indent=2, sort_keys=False, allow_nan=False)
    write_text(path, text + "\n")


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists, tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def read_json(path: pathlib.Path) -> Any:
    """Reads a JSON file written by :func:`write_json`."""
    return json.loads(pathlib.Path(path).read_text())


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes a list of flat dicts as CSV (columns in first-seen order), atomically."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """Writes arrays to an ``.npz`` file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def save_figure(fig: Any, path: pathlib.Path) -> None:
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------
# Inputs.

SPLITS = {"train": 0, "val": 1, "test": 2}


def read_npz(path: str | os.PathLike, kind: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file.

    Args:
        path: the file.
        kind: what it should hold ("features", "logits"), for the messages.

    Returns:
        The arrays by name.

    Raises:
        UsageError: the file is missing, or is not an ``.npz`` of plain (non-object) arrays.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise UsageError(f"{kind} file {path} is a folder, not an .npz file")
    if not path.is_file():
        raise UsageError(f"{kind} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception:  # zip, pickle and format errors all mean "not a valid .npz"
        raise UsageError(f"{kind} file {path} is not a valid .npz of numeric arrays") from None


def to_float32(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as float32; a finite value that float32 cannot hold is a :class:`UsageError`."""
    return to_float(array, np.float32, what)


def to_float(array: np.ndarray, dtype: Any, what: str) -> np.ndarray:
    """``array`` as the float ``dtype``; a finite value it cannot hold is a :class:`UsageError`."""
    with np.errstate(over="ignore"):  # reported below, with the values
        out = array.astype(dtype)
    overflow = np.isfinite(array) & ~np.isfinite(out)
    if overflow.any():
        largest = np.format_float_scientific(np.max(np.abs(array[overflow])), 2, trim="-")
        name, top = np.dtype(dtype).name, float(np.finfo(dtype).max)
        raise UsageError(
            f"{what} has values beyond the {name} range (|x| up to {largest}, {name} holds up "
            f"to {top:.3g}); rescale them"
        )
    return out


def _label_gaps(labels: np.ndarray) -> tuple[list[int], int]:
    """The first missing ids in 0..max of sorted unique ``labels``, and how many are missing."""
    missing, count, expected = [], 0, 0
    for value in labels.tolist():
        if value > expected:
            count += value - expected
            missing += range(expected, min(value, expected + 5 - len(missing)))
        expected = value + 1
    return missing[:5], count


def _split_codes(split: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """A ``split`` array of 0/1/2 or "train"/"val"/"test" -> 0/1/2 (int32)."""
    if split.dtype.kind in "US":
        names = split.astype(str)
        unknown = sorted(set(names.tolist()) - set(SPLITS))
        if unknown:
            raise UsageError(
                f"features file {path}: unknown split names {', '.join(unknown)} "
                f"(known: {', '.join(SPLITS)})"
            )
        return np.vectorize(SPLITS.get, otypes=[np.int32])(names)
    if not np.issubdtype(split.dtype, np.integer) or not np.isin(split, [0, 1, 2]).all():
        raise UsageError(f"features file {path}: split must hold 0/1/2 or {', '.join(SPLITS)}")
    return split.astype(np.int32)


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads ``X`` (n, d), ``y`` (n,) and optional ``split`` (n,) from an ``.npz`` file.

    ``X`` keeps its precision, as a float of at most 64 bits (float16 and small integers as
    float32, float64 and larger integers as float64; a longer float is cast to float64, values
    beyond its range refused): the features are standardised before they are cast to float32
    (finetune_head.standardize), so that neither their units nor an offset shared by the rows
    rounds them away (``X * 1e-46`` underflows float32, ``X + 1e9`` is rounded to steps of 64
    there). ``y`` must hold the class ids 0..K-1, each at least once; ``split`` holds 0/1/2 or
    "train"/"val"/"test" per row. Every problem is a :class:`UsageError` naming the file and
    what is wrong.
    """
    path = pathlib.Path(path)
    arrays = read_npz(path, "features")
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise UsageError(f"features file {path} lacks array(s) {', '.join(missing)}")
    x, y = arrays["X"], arrays["y"]
    # Real numbers only: float32 of a complex X would drop its imaginary part silently.
    if x.ndim != 2 or x.dtype.kind not in "iuf" or 0 in x.shape:
        raise UsageError(
            f"features file {path}: X must be a 2-D real numeric array with at least one row and "
            f"column, got shape {x.shape} ({x.dtype})"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(
            f"features file {path}: y must have one label per row of X "
            f"({x.shape[0]}), got shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UsageError(f"features file {path}: y must hold non-negative integer class ids")
    labels = np.unique(y)  # sorted; at most n of them, whatever the largest id
    if len(labels) < 2:
        raise UsageError(
            f"features file {path}: y must hold at least two classes (one class is always right)"
        )
    gaps, count = _label_gaps(labels)
    if count:
        shown = ", ".join(map(str, gaps)) + (f" and {count - len(gaps)} more" if count > 5 else "")
        raise UsageError(
            f"features file {path}: y must hold the class ids 0..K-1 each at least once; "
            f"the largest is {int(labels[-1])} but {shown} never occur (renumber the classes)"
        )
    if not np.isfinite(x).all():
        raise UsageError(f"features file {path}: X has non-finite values (NaN or inf)")
    dtype = np.promote_types(x.dtype, np.float32)  # float32, float64 or a longer float
    dtype = np.dtype(np.float64) if dtype.itemsize > 8 else dtype
    out = {"X": to_float(x, dtype, f"features file {path}: X"), "y": y.astype(np.int32)}
    if "split" in arrays:
        if arrays["split"].shape != y.shape:
            raise UsageError(f"features file {path}: split must have shape {y.shape}")
        out["split"] = _split_codes(arrays["split"], path)
    return out


# --------------------------------------------------------------------------------------------------
# Flags and configs.


def split_specs(text: str) -> tuple[str, ...]:
    """Variant specs from a comma-separated list, where a spec may itself hold commas.

    A piece with ``=`` but no ``:`` is a further parameter of the spec before it, so
    ``"softmax,entmax:alpha=1.3,temperature=2,sparsemax"`` gives ``("softmax",
    "entmax:alpha=1.3,temperature=2", "sparsemax")``, and ``"softmax,temperature=2"`` (a spec
    with no parameter yet) gives ``("softmax:temperature=2",)``. Blank pieces are dropped.

    Raises:
        UsageError: the list starts with a parameter (``"alpha=1.3,softmax"``).
    """
    specs: list[str] = []
    for piece in (item.strip() for item in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not specs:
                raise UsageError(
                    f"--variants {text!r}: {piece!r} is a parameter with no variant before it "
                    "(write name:key=value,key=value)"
                )
            specs[-1] += ("," if ":" in specs[-1] else ":") + piece
        else:
            specs.append(piece)
    return tuple(specs)


def _plain_number(text: str) -> str:
    """``text`` if it is a number as smvariants.registry reads one in a spec, else ValueError.

    ``float`` and ``int`` read ``"1_5"`` as 15 and non-ASCII digits (``"٣"``, ``"१.५"``) too; the
    registry refuses them (``registry._number``, private and worded for specs), and so do the
    flags: ASCII decimal or scientific notation (``inf`` and ``nan`` are read, for the range
    checks to name them).
    """
    if "_" in text or not text.isascii():
        raise ValueError(f"not a plain number: {text!r}")
    return text


def number(text: str) -> float:
    """An argparse ``type`` for a float flag: ``float(text)``, strict (see _plain_number)."""
    return float(_plain_number(text))


def integer(text: str) -> int:
    """An argparse ``type`` for an int flag: ``int(text)``, strict (see _plain_number)."""
    return int(_plain_number(text))


# argparse names the type in its errors ("invalid float value: '1_5'"), as for float and int.
number.__name__, integer.__name__ = "float", "int"


def comma_separated(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: ``"a,b"`` -> ``(cast("a"), cast("b"))``, blank items dropped."""

    def parse(text: str) -> tuple[Any, ...]:
        return tuple(cast(item.strip()) for item in text.split(",") if item.strip())

    parse.__name__ = f"comma-separated {cast.__name__}"  # argparse names it in its errors
    return parse


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not bool) that is finite."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def config_from_flags(defaults: Any, flags: argparse.Namespace, quick: dict[str, Any]) -> Any:
    """A config dataclass from parsed flags: ``defaults``, ``quick`` under ``--quick``, the flags.

    Args:
        defaults: the config dataclass instance with the default settings.
        flags: parsed flags named like the config fields; None marks a flag not given.
        quick: the settings ``--quick`` changes; a flag the user gives wins over them.

    Returns:
        A copy of ``defaults`` with those settings.
    """
    given = {key: value for key, value in vars(flags).items() if value is not None}
    return dataclasses.replace(defaults, **{**(quick if flags.quick else {}), **given})


def progress(iterable: Iterable[Any], total: int | None = None, desc: str = ""):
    """A tqdm progress bar on stderr when stderr is a terminal; else (logs, pipes) the iterable.

    Also the plain iterable if tqdm is missing. Every step first raises a signal whose exception
    was lost (:func:`raise_if_interrupted`).
    """
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and _stderr_is_terminal():
        iterable = tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    for item in iterable:
        raise_if_interrupted()
        yield item


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


# --------------------------------------------------------------------------------------------------
# Settings records and --resume (generic versions, for scripts whose results are one file per
# variant under runs/).


# The entries of a settings record that say which script wrote a folder and in which format of
# results (each script's ``EXPERIMENT`` and ``RESULTS_FORMAT``): a folder that differs in them is
# refused by ``--resume`` whatever its other settings, and they are named first in the message.
IDENTITY = ("experiment", "results_format")


def settings_record(config: Any, free: Iterable[str], **extra: Any) -> dict[str, Any]:
    """What config.json holds: the config dataclass's fields, ``extra``, and ``config_hash``.

    ``config_hash`` (16 hex digits) covers every entry but the names in ``free`` (those that may
    change on ``--resume``, such as ``out`` or ``force``); a run's files carry it, and only
    matching ones are reused. ``extra`` holds the script's ``experiment`` and ``results_format``
    (see IDENTITY), so that a run file of another script or of another format of results never
    matches.
    """
    import hashlib

    record = json.loads(json.dumps({**dataclasses.asdict(config), **extra}))  # lists, as read back
    kept = {key: value for key, value in record.items() if key not in set(free)}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    record["config_hash"] = digest[:16]
    return record


def saved_settings(out: pathlib.Path) -> Any:
    """The folder's config.json as read, or None when it is missing or not JSON."""
    try:
        return read_json(pathlib.Path(out) / "config.json")
    except (OSError, ValueError):
        return None


def _check_experiment(out: pathlib.Path, saved: dict[str, Any], experiment: Any) -> None:
    """Refuses a folder whose config.json names another script than ``experiment``."""
    found = saved.get("experiment")
    if experiment is not None and found is not None and found != experiment:
        raise UsageError(
            f"--resume: {out} holds results of {found}.py, not of {experiment}.py; use another "
            "--out, or --force to start over"
        )


def check_resumable(
    out: pathlib.Path, outputs: Iterable[str], record: dict[str, Any], free: Iterable[str]
) -> None:
    """Refuses ``--resume`` on a folder holding results of other (or unknown) settings.

    The entries of IDENTITY are compared first: a folder of another script is refused as such,
    and one of another format of results (an earlier version of the script) with those entries
    alone as the settings that differ.

    Raises:
        UsageError: ``out`` holds any of ``outputs`` but no readable config.json, or one of
            another script, or one whose settings (all but ``free``) differ from ``record``'s.
    """
    existing = [name for name in outputs if (pathlib.Path(out) / name).exists()]
    if not existing:
        return
    saved = saved_settings(out)
    if not isinstance(saved, dict):
        raise UsageError(
            f"--resume: {out} holds results ({', '.join(existing)}) but no readable config.json; "
            "use --force to start over"
        )
    _check_experiment(out, saved, record.get("experiment"))

    def changes(keys: Iterable[str]) -> list[str]:
        return [
            f"{key} {saved.get(key)!r} -> {record.get(key)!r}"
            for key in keys
            if saved.get(key) != record.get(key)
        ]

    changed = changes(key for key in IDENTITY if key in record)
    note = " (results of another version of the script, or of another script)" if changed else ""
    changed = changed or changes(sorted((set(saved) | set(record)) - set(free)))
    if changed:
        raise UsageError(
            f"--resume: {out} was run with other settings ({'; '.join(changed)}){note}; "
            "use the same flags, or --force to start over"
        )


def resumed_variants(
    out: pathlib.Path,
    variants: Sequence[str] | None,
    resume: bool,
    default: Sequence[str],
    identity: dict[str, Any] | None = None,
    key: Callable[[str], Any] | None = None,
) -> tuple[str, ...]:
    """The variants a run reports: ``--variants``, the default ones, or the folder's (``--resume``).

    Args:
        out: the results folder.
        variants: the ``--variants`` given, or None when the flag was not given.
        resume: whether the run continues the folder.
        default: the variants of a run without ``--variants`` (on ``--resume``: of a folder
            without a list of its own).
        identity: this script's ``experiment`` and ``results_format`` (see IDENTITY): the folder's
            list is used only where its config.json has the same.
        key: what makes two names one variant (default: the name itself); see check_unique.

    Returns:
        Without ``--resume``, ``variants`` (``default`` if None). With it, the folder's own list
        when ``variants`` is None (a plain ``--resume`` continues the folder's variants), else the
        folder's list followed by the new ones of ``variants``: the summaries keep the variants
        run before (finished ones are not run again), then the new ones; a new one equal by
        ``key`` to one of the folder's is that one (as the folder spells it).

    Raises:
        UsageError: on ``--resume``, the folder's config.json names another script (checked
            first, before its variants are read as this script's).
    """
    given = tuple(default) if variants is None else tuple(variants)
    if not resume:
        return given
    saved = saved_settings(out)  # none or unreadable: check_resumable says what is wrong
    if not isinstance(saved, dict):
        return given
    identity = identity or {}
    _check_experiment(out, saved, identity.get("experiment"))
    if any(saved.get(key) != value for key, value in identity.items()):
        return given  # another format of results: check_resumable refuses the folder
    before = saved.get("variants")
    if not isinstance(before, list) or not all(isinstance(v, str) for v in before):
        return given
    key = key or _same
    merged: dict[Any, str] = {}
    for name in [*before, *(() if variants is None else variants)]:
        merged.setdefault(key(name), name)
    return tuple(merged.values())


def _same(name: str) -> str:
    return name


def check_unique(names: Sequence[str], flag: str, key: Callable[[str], Any] | None = None) -> None:
    """Refuses a list that gives one name twice (two runs would write one results file).

    Args:
        names: the list, as given.
        flag: the flag that gave it, for the message.
        key: what makes two names one (default: the name itself); for variant specs, the parsed
            variant, so that ``softmax:temperature=2`` and ``softmax:temperature=2.0`` are one.
    """
    key = key or _same
    seen: dict[Any, str] = {}
    for index, name in enumerate(names):
        first = seen.setdefault(key(name), name)
        if len(seen) <= index:  # the key was there before
            also = "" if first == name else f" (also as {first!r}: the same variant)"
            raise UsageError(f"{flag}: {name!r} is given twice{also}")


def reusable_runs(
    paths: dict[str, pathlib.Path],
    config_hash: str,
    backend: str,
    devices: int,
    keys: dict[str, Iterable[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The finished run files that ``--resume`` reuses, by variant (see :func:`load_finished`).

    Args:
        paths: each variant's run file.
        config_hash: this run's.
        backend: this run's JAX backend.
        devices: this run's device count.
        keys: by variant, what every run (seed) in its file must hold: the entries the script's
            summaries and plots read.

    Raises:
        UsageError: one ran on another backend or device count than this run (its step times
            would sit in one table with this run's, under this run's backend), or one lacks an
            entry of ``keys`` (a damaged file, or one of another version of the script): a
            one-line error before anything is written, not a KeyError halfway through.
    """
    finished = {name: load_finished(path, config_hash) for name, path in paths.items()}
    reused = {name: run for name, run in finished.items() if run is not None}
    for name, run in reused.items():
        if (run.get("backend"), run.get("devices")) != (backend, devices):
            raise UsageError(
                f"--resume: {name} ran on {run.get('backend')} with {run.get('devices')} "
                f"device(s), this run has {backend} with {devices}; run there, or use --force "
                "to start over"
            )
        wanted = tuple((keys or {}).get(name, ()))
        for seed, result in enumerate(run["runs"]):
            missing = (
                [key for key in wanted if key not in result] if isinstance(result, dict) else []
            )
            if not isinstance(result, dict) or missing:
                lacks = ", ".join(missing) if missing else "a result (not a JSON object)"
                raise UsageError(
                    f"--resume: {paths[name]} lacks {lacks} in run {seed} (damaged, or written "
                    f"by another version of the script); delete it to run {name} again, or use "
                    "--force to start over"
                )
    return reused


def load_finished(path: pathlib.Path, config_hash: str) -> dict[str, Any] | None:
    """A run file (``{"config_hash", "runs": [...]}``) written with ``config_hash``; else None."""
    try:
        saved = read_json(path)
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(saved, dict)
        and saved.get("config_hash") == config_hash
        and isinstance(saved.get("runs"), list)
        and len(saved["runs"]) > 0
    )
    return saved if ok else None


# The largest size or count a flag takes: int32's, as for the library's own integer arguments;
# far beyond what memory holds, and a larger one (past int64) fails inside NumPy or JAX only
# after the run has started.
MAX_SIZE = 2**31 - 1
# The largest seed: jax.random.key takes a seed that fits an int64.
MAX_SEED = 2**63 - 1
_FLOAT32 = np.finfo(np.float32)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_positive_ints(config: Any, names: Iterable[str]) -> None:
    """Refuses a setting among ``names`` of ``config`` that is not an integer in 1..MAX_SIZE."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        if value > MAX_SIZE:
            raise UsageError(f"{_flag(name)} must be at most {MAX_SIZE} (2**31 - 1), got {value}")


def physical_memory() -> int | None:
    """This machine's memory in bytes, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(needed: float, flags: str, memory: int | None = None) -> None:
    """Refuses settings whose arrays need more than this machine's memory, before any file.

    ``needed`` is the script's estimate of its largest arrays in bytes (a lower bound: XLA's
    temporaries come on top), ``flags`` names the settings it grows with. On an accelerator the
    device's memory is usually smaller still; this check catches the sizes no machine holds.
    """
    memory = physical_memory() if memory is None else memory
    if memory and needed > memory:
        raise UsageError(
            f"{flags}: these sizes need about {needed / 2**30:,.0f} GiB of arrays, more than "
            f"this machine's {memory / 2**30:,.0f} GiB"
        )


def check_seed(value: Any, flag: str) -> None:
    """Refuses a seed ``--flag`` that is not an integer in 0..MAX_SEED (jax.random.key's range)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{flag} must be an integer >= 0, got {value!r}")
    if value > MAX_SEED:
        raise UsageError(
            f"{flag} must be at most {MAX_SEED} (2**63 - 1, what jax.random.key takes), got {value}"
        )


def float32_problem(value: float, positive: bool = False, reciprocal: bool = False) -> str | None:
    """Why the computations, in float32, cannot use the finite number ``value``; None if they can.

    Args:
        value: a finite setting.
        positive: a step size, temperature or scale: one below float32's smallest normal number
            is 0 there too (XLA on the CPU flushes subnormal numbers to 0, so a learning rate
            trains nothing and a temperature divides by 0; the library refuses such temperatures).
        reciprocal: a temperature or an alpha, whose reciprocal is computed: one above the
            reciprocal of float32's smallest normal number has it flushed to 0 (the library
            refuses such values).

    Returns:
        None, or what is wrong as a phrase ("beyond the float32 range (...)").
    """
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = np.float32(value)
    if not np.isfinite(as_float32):
        return f"beyond the float32 range (up to {float(_FLOAT32.max):.3g})"
    if positive and abs(as_float32) < _FLOAT32.tiny:
        tiny = float(_FLOAT32.tiny)
        return f"below float32's smallest normal number {tiny:.3g} (XLA flushes it to 0)"
    if reciprocal and abs(as_float32) > 1 / _FLOAT32.tiny:
        bound = float(1 / _FLOAT32.tiny)
        return (
            f"above {bound:.2g}, the reciprocal of float32's smallest normal number (XLA flushes "
            "its reciprocal to 0)"
        )
    return None


def check_float32(
    values: Iterable[float], flag: str, positive: bool = False, reciprocal: bool = False
) -> None:
    """Refuses finite ``values`` of ``flag`` that float32 cannot hold (see float32_problem)."""
    for value in values:
        problem = float32_problem(value, positive, reciprocal)
        if problem:
            raise UsageError(f"{flag} {value:g} is {problem}")


def check_learning_rate(rate: Any) -> None:
    """Refuses a ``--learning-rate`` that is not a finite number > 0 and normal in float32."""
    if not is_finite_number(rate) or rate <= 0:
        raise UsageError(f"--learning-rate must be a finite number > 0, got {rate}")
    check_float32([rate], "--learning-rate", positive=True)


def check_alpha_range(bounds: Iterable[Any]) -> None:
    """Refuses a ``--learned-alpha-range`` that is not two finite numbers with 1 <= lo < hi.

    Both must be finite in float32, and lo < hi still hold there (bounded_alpha computes in it).
    """
    bounds = tuple(bounds)
    if (
        len(bounds) != 2
        or not all(is_finite_number(b) for b in bounds)
        or not 1 <= bounds[0] < bounds[1]
    ):
        raise UsageError(
            "--learned-alpha-range must be two finite numbers lo,hi with 1 <= lo < hi, "
            f"got {','.join(map(str, bounds))}"
        )
    check_float32(bounds, "--learned-alpha-range", reciprocal=True)
    if not np.float32(bounds[0]) < np.float32(bounds[1]):
        raise UsageError(
            f"--learned-alpha-range {bounds[0]:g},{bounds[1]:g}: lo and hi are the same number "
            "in float32; widen the range"
        )
