"""The code stays ruff- and mypy-clean: CI runs only the test suite, so the suite checks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "examples", "benchmarks"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')"
)
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", *PATHS)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = _run("ruff", "format", "--check", *PATHS)
    assert fmt.returncode == 0, fmt.stdout[-4000:]


def test_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    done = _run(
        sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"), "src/sketchtune"
    )
    assert done.returncode == 0, done.stdout[-4000:]


def test_the_package_is_typed() -> None:
    assert (ROOT / "src" / "sketchtune" / "py.typed").exists()
