"""Helpers shared by the experiment scripts: output folders, atomic writes, inputs, flags, errors.

The scripts run as ``python experiments/<script>.py``; Python then puts this folder on
``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None):
    """Runs ``main`` and turns a :class:`UsageError` into a one-line message and exit status 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def default_out_dir(prefix: str) -> pathlib.Path:
    """``results/<prefix>-<timestamp>`` (new for every run)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("results") / f"{prefix}-{stamp}"


def prepare_out_dir(
    out: pathlib.Path, markers: Iterable[str], force: bool, resume: bool | None = None
) -> pathlib.Path:
    """Creates ``out``; refuses a folder that already holds results unless forced or resuming.

    ``resume`` is None for a script without ``--resume``.
    """
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = [name for name in markers if (out / name).exists()]
    if existing and not (force or resume):
        raise UsageError(
            f"{out} already holds results ({', '.join(existing)}); use --force to overwrite"
            + ("" if resume is None else " or --resume to continue")
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_outputs(out: pathlib.Path, names: Iterable[str]) -> None:
    """Deletes the files and folders ``names`` in ``out`` that exist (a previous run's results)."""
    for name in names:
        path = pathlib.Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    # Mode 0o666 before the umask, like open(): results are as readable as any other file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically (a temporary file, then a rename)."""
    _atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


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
    _atomic_write_bytes(path, buffer.getvalue().encode())


def save_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """Writes arrays to an ``.npz`` file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(path, buffer.getvalue())


def save_figure(fig: Any, path: pathlib.Path) -> None:
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _atomic_write_bytes(path, buffer.getvalue())


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    if not path.is_file():
        raise UsageError(f"{kind} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception:  # zip, pickle and format errors all mean "not a valid .npz"
        raise UsageError(f"{kind} file {path} is not a valid .npz of numeric arrays") from None


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

    ``split`` holds 0/1/2 or "train"/"val"/"test" per row. Every problem is a :class:`UsageError`
    naming the file and what is wrong.
    """
    path = pathlib.Path(path)
    arrays = read_npz(path, "features")
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise UsageError(f"features file {path} lacks array(s) {', '.join(missing)}")
    x, y = arrays["X"], arrays["y"]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise UsageError(f"features file {path}: X must be a 2-D numeric array, got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(
            f"features file {path}: y must have one label per row of X "
            f"({x.shape[0]}), got shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UsageError(f"features file {path}: y must hold non-negative integer class ids")
    if not np.isfinite(x).all():
        raise UsageError(f"features file {path}: X has non-finite values")
    out = {"X": x.astype(np.float32), "y": y.astype(np.int32)}
    if "split" in arrays:
        if arrays["split"].shape != y.shape:
            raise UsageError(f"features file {path}: split must have shape {y.shape}")
        out["split"] = _split_codes(arrays["split"], path)
    return out


def comma_separated(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: ``"a,b"`` -> ``(cast("a"), cast("b"))``, blank items dropped."""

    def parse(text: str) -> tuple[Any, ...]:
        return tuple(cast(item.strip()) for item in text.split(",") if item.strip())

    parse.__name__ = f"comma-separated {cast.__name__}"  # argparse names it in its errors
    return parse


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
    """A tqdm progress bar on stderr (a plain iterable if tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
