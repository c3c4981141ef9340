"""dvc.yaml declares exactly what each stage's code reads and writes."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from cifar100_dvc.params import Params, to_dict
from cifar100_dvc.paths import REPO_ROOT, STAGE_INPUTS, STAGE_OUTPUTS, ProjectPaths

PIPELINE = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
PATHS = ProjectPaths()
LIBRARY = "cifar100_dvc"  # the package every stage imports its shared code from


def imported_library_modules(path: Path, seen: set[str] | None = None) -> set[str]:
    """Library modules (``cifar100_dvc/X.py``, repository-relative) that the module at ``path`` imports,
    at any depth and inside functions too: ``from cifar100_dvc.X import ...``, ``from cifar100_dvc import X``,
    ``import cifar100_dvc.X``. Importing any of them runs ``cifar100_dvc/__init__.py`` first."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == LIBRARY:  # from cifar100_dvc import hardware
            names = ["__init__"] + [alias.name for alias in node.names if (REPO_ROOT / LIBRARY / f"{alias.name}.py").is_file()]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{LIBRARY}."):
            names = ["__init__", node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == LIBRARY or alias.name.startswith(f"{LIBRARY}."):
                    names += ["__init__", *alias.name.split(".")[1:2]]
        for name in names:
            module = f"{LIBRARY}/{name}.py"
            if module not in seen:
                seen.add(module)
                imported_library_modules(REPO_ROOT / module, seen)
    return seen


def declared(stage: dict, key: str) -> set[str]:
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(key, [])}


def test_stages_are_the_five_in_order():
    assert list(PIPELINE["stages"]) == ["fetch", "prepare", "train", "evaluate", "export"]
    for name, stage in PIPELINE["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"


def is_code(dep: str) -> bool:
    return dep.startswith(("stages/", f"{LIBRARY}/"))


def test_code_deps_are_exactly_the_modules_each_stage_imports():
    for name, stage in PIPELINE["stages"].items():
        # `python -m stages.NAME` runs the package's __init__ first, which imports the library's.
        entry_points = {f"stages/{name}.py", "stages/__init__.py"}
        code = entry_points | {f"{LIBRARY}/__init__.py"}
        for module in entry_points:
            code |= imported_library_modules(REPO_ROOT / module)
        assert {dep for dep in declared(stage, "deps") if is_code(dep)} == code, name


def test_data_deps_and_outputs_match_the_declared_paths():
    for name, stage in PIPELINE["stages"].items():
        data_deps = {dep for dep in declared(stage, "deps") if not is_code(dep)}
        assert data_deps == {PATHS.relative(getattr(PATHS, attr)) for attr in STAGE_INPUTS[name]}, name
        outputs = declared(stage, "outs") | declared(stage, "metrics") | declared(stage, "plots")
        assert outputs == {PATHS.relative(getattr(PATHS, attr)) for attr in STAGE_OUTPUTS[name]}, name


def test_each_stage_depends_on_its_own_params_section():
    sections = set(to_dict(Params()))
    for name, stage in PIPELINE["stages"].items():
        assert stage["params"] == [name], name
        assert name in sections


def test_checkpoints_are_not_an_output_and_metrics_are_uncached():
    train = PIPELINE["stages"]["train"]
    declared = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in train["outs"]]
    assert "checkpoints" not in declared  # a fresh clone has none: DVC must not ask to run train for it
    assert "/checkpoints" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    evaluate = PIPELINE["stages"]["evaluate"]
    assert evaluate["metrics"] == [{"metrics/metrics.json": {"cache": False}}]


def test_top_level_plots_point_at_declared_outputs():
    outputs = set()
    for stage in PIPELINE["stages"].values():
        outputs |= declared(stage, "outs") | declared(stage, "metrics") | declared(stage, "plots")

    def covered(path: str) -> bool:
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outputs)

    assert PIPELINE["plots"], "dvc.yaml declares no plots"  # else the loop below checks nothing
    for plot in PIPELINE["plots"]:
        if isinstance(plot, str):
            assert covered(plot), plot
            continue
        (definition,) = plot.values()
        for path in definition["y"]:
            assert covered(path), path
