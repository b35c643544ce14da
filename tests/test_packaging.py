"""The package metadata: what a user's pip sees. No cap without a recorded, tested reason."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# An upper bound needs a reason a user can read, here, and a test that shows it.
RECORDED_CAPS: dict[str, str] = {}


def requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def test_no_dependency_is_capped_without_a_recorded_reason() -> None:
    capped = {
        f"{r.name}{r.specifier}"
        for r in requirements()
        if any(s.operator in ("<", "<=", "==", "===", "~=") for s in r.specifier)
        and r.name not in RECORDED_CAPS
    }
    assert not capped, f"caps without a recorded reason (a torch-2.14 user is downgraded): {capped}"


def test_torch_is_never_capped() -> None:
    torch_specs = [r.specifier for r in requirements() if r.name == "torch"]
    assert torch_specs, "torch must be a dependency"
    for spec in torch_specs:
        assert spec.contains("2.14.1") and spec.contains("2.15.0") and spec.contains("3.0")


def test_every_runtime_dependency_has_a_lower_bound() -> None:
    """`.ci/lowest` installs each lower bound: a dependency without one is untested there."""
    missing = [
        str(r)
        for r in (Requirement(d) for d in PROJECT["dependencies"])
        if not any(s.operator in (">=", ">") for s in r.specifier)
    ]
    assert not missing, missing


def test_the_lowest_job_pins_each_runtime_dependency_to_its_lower_bound() -> None:
    spec = importlib.util.spec_from_file_location("lowest", ROOT / ".ci" / "lowest_constraints.py")
    assert spec is not None and spec.loader is not None
    lowest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lowest)
    pins = {Requirement(line).name: Requirement(line).specifier for line in lowest.constraints()}
    pinned = [Requirement(d) for d in PROJECT["dependencies"]]
    for extra in ("plots", "transformers"):
        pinned.extend(Requirement(r) for r in PROJECT["optional-dependencies"][extra])
    for req in pinned:
        (floor,) = (s.version for s in req.specifier if s.operator == ">=")
        assert str(pins[req.name]) == f"=={floor}", req
    assert "lowest" not in (ROOT / ".ci" / "run").read_text()  # a separate, longer job


def test_the_readme_set_up_keeps_torch_on_the_tested_build() -> None:
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", constraints, re.M)
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, re.M)
    assert commands and all("pip install -c constraints.txt -e" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for c in commands if c.endswith("python -m pytest"))
    assert test_command in ci  # CI runs the README's test command verbatim
