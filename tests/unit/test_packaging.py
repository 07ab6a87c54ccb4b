"""Packaging: requirements.txt is the runtime closure of pyproject's pins, requirements-dev.txt adds the
test tools, and both agree with pyproject.toml and with this venv's installed metadata."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools import pin_requirements as pr

ROOT = Path(__file__).resolve().parents[2]
IMPORTING_FOLDERS = ("llmrec_tasks", "dags", "plugins")
TEST_TOOLS = {"pytest", "moto", "playwright", "ruff", "responses", "iniconfig", "cfn-lint"}


def read_pins(name: str) -> tuple[dict[str, str], list[str]]:
    """(canonical name -> pinned version, option lines such as ``-r``) of one requirements file."""
    pins, options = {}, []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {line!r} is not pinned exactly"
        pins[canonicalize_name(req.name)] = spec.version
    return pins, options


@pytest.fixture(scope="module")
def runtime() -> dict[str, str]:
    pins, options = read_pins(pr.RUNTIME_FILE)
    assert options == [], "the runtime file stands alone"
    return pins


@pytest.fixture(scope="module")
def dev() -> dict[str, str]:
    pins, options = read_pins(pr.DEV_FILE)
    assert options == [f"-r {pr.RUNTIME_FILE}"], "the dev file includes the runtime file"
    return pins


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_runtime_file_has_no_test_tool(runtime, project):
    tools = pr.closure(Requirement(r) for r in project["optional-dependencies"]["dev"])
    assert set(tools) >= TEST_TOOLS, "TEST_TOOLS names a package no dev tool pulls in"
    assert not TEST_TOOLS & set(runtime), "the Docker image must not install test tools"


def test_the_runtime_file_is_closed_under_the_installed_requirements(runtime):
    # Every requirement of every runtime package (markers and asked-for extras honoured) is pinned
    # in the runtime file at a version that satisfies it.
    asked = pr.closure(Requirement(f"{name}=={version}") for name, version in runtime.items())
    missing = sorted(set(asked) - set(runtime))
    assert not missing, f"{pr.RUNTIME_FILE} lacks what its packages require: {missing}"
    for name, extras in asked.items():
        for req in pr.requires(name, extras):
            pin = runtime[canonicalize_name(req.name)]
            assert req.specifier.contains(pin, prereleases=True), f"{name} requires {req}, pinned {pin}"


def test_the_dev_file_adds_only_the_tools_closure(runtime, dev, project):
    assert not set(dev) & set(runtime), "a package pinned in both files could drift apart"
    tools = pr.closure(Requirement(r) for r in project["optional-dependencies"]["dev"])
    assert set(tools) <= set(runtime) | set(dev)
    assert set(dev) <= set(tools), "the dev file pins something no tool needs"


def test_the_files_are_what_the_tool_writes_from_this_venv():
    # Regenerating changes nothing: the pins are the installed versions of exactly the closure.
    for name, text in pr.render().items():
        assert (ROOT / name).read_text() == text, f"{name} is stale: run tools/pin_requirements.py"


def test_every_pyproject_pin_equals_the_requirements_pin(runtime, dev, project):
    extras = project["optional-dependencies"]
    roots = [*project["dependencies"], *(r for group in extras.values() for r in group)]
    assert set(extras) == {*pr.RUNTIME_EXTRAS, *pr.DEV_EXTRAS}
    for line in roots:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"pyproject.toml: {line!r} is not pinned exactly"
        name = canonicalize_name(req.name)
        assert spec.version == {**runtime, **dev}[name], f"pyproject.toml pins {line}, the files do not"
    # torch unpinned pulls a CUDA build of several GB.
    assert "torch==2.13.0" in project["dependencies"]


def imported_top_level_modules() -> dict[str, Path]:
    """Third-party top-level modules imported by the package, the DAGs and the plugin."""
    local = {p.stem for folder in IMPORTING_FOLDERS for p in (ROOT / folder).glob("*.py")}
    local |= {"llmrec_tasks"}
    found: dict[str, Path] = {}
    for folder in IMPORTING_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".", 1)[0] for n in names} - local - sys.stdlib_module_names:
                    found.setdefault(top, path)
    return found


def test_every_imported_module_comes_from_a_runtime_distribution(runtime):
    modules = imported_top_level_modules()
    assert {"airflow", "torch", "faiss", "lightgbm", "great_expectations", "fastapi"} <= set(modules)
    providers = importlib.metadata.packages_distributions()
    for module, path in modules.items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & set(runtime), f"{path.relative_to(ROOT)} imports {module}, not in {pr.RUNTIME_FILE}"
