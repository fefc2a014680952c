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
    for module in (smvariants, smvariants.losses, smvariants.stats, smvariants.registry)
    for name in getattr(module, "__all__", dir(module))
    if not name.startswith("_") and inspect.isfunction(getattr(module, name))
    and getattr(module, name).__module__.startswith("smvariants")
]  # fmt: skip

SECTION = re.compile(r"^(Args|Returns|Raises|Examples|References|Note|Attributes):$")


def google_sections(doc):
    """A docstring's Google-style sections, as a parser such as Sphinx napoleon finds them.

    A section is a line ``Name:`` at the docstring's base indentation; ``Args`` maps each
    ``name:`` entry one level in (two spaces) to its text.
    """
    sections, current = {}, None
    for line in inspect.cleandoc(doc).splitlines()[1:]:
        match = SECTION.match(line)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif line and not line.startswith(" "):
            current = None  # prose at the base indentation ends a section
        elif current is not None:
            current.append(line)
    args = {}
    for line in sections.get("Args", []):
        entry = re.match(r"^  (\*{0,2}\w+): ", line)
        if entry:
            args[entry.group(1).lstrip("*")] = line
    return sections, args


@pytest.mark.parametrize("fn", PUBLIC_FUNCTIONS, ids=lambda fn: f"{fn.__module__}.{fn.__name__}")
def test_public_functions_document_formula_args_returns_example_references(fn):
    sections, args = google_sections(fn.__doc__)
    required = ["Returns", "Examples"]
    if fn.__module__ != "smvariants.registry":
        required.append("References")  # the math's sources; the registry has no math
    for section in required:
        assert sections.get(section), f"{fn.__name__} lacks a {section} section"
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    assert sorted(args) == sorted(params), f"{fn.__name__}: Args documents {sorted(args)}"
    if fn.__module__ in ("smvariants._normalizers", "smvariants.losses"):
        assert ".. math::" in fn.__doc__, f"{fn.__name__} lacks its formula"


def test_section_parser_sees_what_a_template_would_hide():
    indented = "Summary.\n\n        Args:\n          x: a.\n\n    Returns:\n      y.\n"
    sections, args = google_sections(indented)
    assert "Args" not in sections and args == {}  # Args indented too deep is not a section


def test_readme_python_blocks_run():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
