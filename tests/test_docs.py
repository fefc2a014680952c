"""The docs run as written: every docstring Example and every Python block of the README."""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import jax
import pytest

import smvariants

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(smvariants.__path__, prefix="smvariants.")
) + ["smvariants"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    # Examples are written for JAX's defaults (float32), not for the suite's x64 setting.
    with jax.enable_x64(False):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


PUBLIC_FUNCTIONS = [
    getattr(module, name)
    for module in (smvariants, smvariants.losses, smvariants.stats)
    for name in getattr(module, "__all__", dir(module))
    if not name.startswith("_") and inspect.isfunction(getattr(module, name))
]


@pytest.mark.parametrize("fn", PUBLIC_FUNCTIONS, ids=lambda fn: fn.__name__)
def test_public_functions_document_formula_args_returns_example_references(fn):
    sections = ["Args:", "Returns:", "Examples:", "References:"]
    if fn.__module__ != "smvariants.stats" or fn.__name__ == "tsallis_entropy":
        sections.append(".. math::")
    for section in sections:
        assert section in fn.__doc__, f"{fn.__name__} lacks {section}"


def test_readme_python_blocks_run():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
