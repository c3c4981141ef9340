"""dvc.yaml declares exactly what each stage's code reads and writes."""

from __future__ import annotations

import ast

import yaml

from stages.params import Params, to_dict
from stages.paths import REPO_ROOT, STAGE_INPUTS, STAGE_OUTPUTS, ProjectPaths

PIPELINE = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
PATHS = ProjectPaths()


def imported_stage_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """``stages`` modules imported (at any depth, inside functions too) by ``stages/<module>.py``."""
    seen = set() if seen is None else seen
    tree = ast.parse((REPO_ROOT / "stages" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "stages":  # from stages import hardware
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
            names = [node.module.split(".", 1)[1]]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("stages.")]
        for name in names:
            if name not in seen:
                seen.add(name)
                imported_stage_modules(name, seen)
    return seen


def declared(stage: dict, key: str) -> set[str]:
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(key, [])}


def test_stages_are_the_four_in_order():
    assert list(PIPELINE["stages"]) == ["fetch", "prepare", "train", "evaluate"]
    for name, stage in PIPELINE["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"


def test_code_deps_are_exactly_the_modules_each_stage_imports():
    for name, stage in PIPELINE["stages"].items():
        # `python -m stages.NAME` runs the package's __init__ first (it sets TensorFlow's oneDNN default).
        modules = {name, "__init__"} | imported_stage_modules(name)
        code = {f"stages/{module}.py" for module in modules}
        assert {dep for dep in declared(stage, "deps") if dep.startswith("stages/")} == code, name


def test_data_deps_and_outputs_match_the_declared_paths():
    for name, stage in PIPELINE["stages"].items():
        data_deps = {dep for dep in declared(stage, "deps") if not dep.startswith("stages/")}
        assert data_deps == {PATHS.relative(getattr(PATHS, attr)) for attr in STAGE_INPUTS[name]}, name
        outputs = declared(stage, "outs") | declared(stage, "metrics") | declared(stage, "plots")
        assert outputs == {PATHS.relative(getattr(PATHS, attr)) for attr in STAGE_OUTPUTS[name]}, name


def test_each_stage_depends_on_its_own_params_section():
    sections = set(to_dict(Params()))
    for name, stage in PIPELINE["stages"].items():
        assert stage["params"] == [name], name
        assert name in sections


def test_checkpoints_persist_and_metrics_are_uncached():
    train = PIPELINE["stages"]["train"]
    checkpoint = next(entry for entry in train["outs"] if isinstance(entry, dict) and "checkpoints" in entry)["checkpoints"]
    assert checkpoint == {"persist": True, "cache": False}
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
