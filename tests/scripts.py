"""The experiment scripts run as a user runs them: in a subprocess, from the repository root."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Several host devices: only the CPU platform has them, so such runs pin it (also on a GPU host).
FOUR_CPUS = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def runner(name: str) -> Callable[..., subprocess.CompletedProcess]:
    """``run_script(*args, env=None)`` for ``experiments/<name>``: its exit code and output."""
    script = ROOT / "experiments" / name

    def run_script(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=600,
        )

    return run_script
