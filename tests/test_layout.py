"""One home per role, with the imports pointing one way: stages and tools use the library; nothing
imports a stage module, and the library imports neither a stage nor a tool."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cifar100_dvc.paths import REPO_ROOT

STAGES = REPO_ROOT / "stages"
LIBRARY = REPO_ROOT / "cifar100_dvc"
TOOLS = REPO_ROOT / "tools"


def imported_packages_and_modules(path: Path) -> set[str]:
    """Every module name the module at ``path`` (a top-level package's) imports, at any depth and inside
    functions too: ``from stages import fetch`` (or ``from . import fetch`` in stages/) gives ``stages``
    and ``stages.fetch``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module if node.level == 0 else ".".join(filter(None, [path.parent.name, node.module]))
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def imports_package(path: Path, package: str) -> list[str]:
    return sorted(name for name in imported_packages_and_modules(path) if name == package or name.startswith(f"{package}."))


def modules(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.py"))


def test_stages_holds_exactly_the_dvc_stages():
    pipeline = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert {path.stem for path in modules(STAGES)} == {"__init__", *pipeline["stages"]}


@pytest.mark.parametrize("path", modules(LIBRARY) + modules(TOOLS), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_library_and_tools_never_import_a_stage(path):
    assert imports_package(path, "stages") == []


@pytest.mark.parametrize("path", modules(STAGES), ids=lambda path: f"stages/{path.name}")
def test_a_stage_imports_no_other_stage(path):
    assert imports_package(path, "stages") == []


@pytest.mark.parametrize("path", modules(LIBRARY), ids=lambda path: f"cifar100_dvc/{path.name}")
def test_the_library_never_imports_a_tool(path):
    assert imports_package(path, "tools") == []


@pytest.mark.parametrize("folder", [STAGES, TOOLS], ids=["stages", "tools"])
def test_entry_point_packages_import_the_library_first(folder):
    # `python -m stages.NAME` / `tools.NAME` runs the package's __init__ first: it must import
    # cifar100_dvc, whose __init__ sets TensorFlow's oneDNN default before TensorFlow is imported.
    assert imported_packages_and_modules(folder / "__init__.py") == {"cifar100_dvc"}
