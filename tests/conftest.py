"""Shared fixtures: synthetic hub-layout datasets, a project copy to run stages in, params edits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.paths import REPO_ROOT, ProjectPaths
from stages.synthetic import make_rows, write_hub_dataset

# Stage subprocesses: quiet TensorFlow, never reach for the hub, no telemetry.
STAGE_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Keep the Hugging Face cache of the tests away from the user's (and offline)."""
    cache = tmp_path_factory.mktemp("hf-home")
    saved = {key: os.environ.get(key) for key in ("HF_HOME", *STAGE_ENV)}
    os.environ.update({"HF_HOME": str(cache), **STAGE_ENV})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def hub_dataset(tmp_path_factory) -> Path:
    """600 train / 200 test rows, 100 fine and 20 coarse classes, some odd modes and sizes."""
    directory = tmp_path_factory.mktemp("hub-dataset")
    return write_hub_dataset(
        directory, {"train": make_rows(600, seed=1, odd_every=7), "test": make_rows(200, seed=2, odd_every=9)}
    )


def set_params(root: Path, **overrides) -> None:
    """Edit ``root``/params.yaml: ``set_params(root, **{"train.epochs": 2})``."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# Params that make the whole pipeline run in seconds on the synthetic data.
TINY_PARAMS = {
    "prepare.label": "coarse_label",
    "prepare.examples_per_shard": 128,
    "train.widths": [8, 8, 16, 16],
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.learning_rate": 0.1,
    "train.warmup_epochs": 0.5,
    "train.shuffle_buffer": 1000,
    "evaluate.batch_size": 100,
    "evaluate.sample_images": 9,
}


def make_project(root: Path, dataset: Path, **overrides) -> Path:
    """A copy of the project's code, dvc.yaml and params.yaml at ``root``, set up for ``dataset``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO_ROOT / name, root / name)
    set_params(root, **{"fetch.dataset": str(dataset), **TINY_PARAMS, **overrides})
    return root


@pytest.fixture
def project(tmp_path, hub_dataset) -> Path:
    return make_project(tmp_path / "project", hub_dataset)


def run_stage(root: Path, stage: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m stages.<stage>`` in ``root``, as DVC runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **STAGE_ENV},
    )


@pytest.fixture(scope="session")
def prepared_paths(tmp_path_factory, hub_dataset) -> ProjectPaths:
    """fetch + prepare (coarse labels) of the synthetic dataset, done once, in process."""
    from stages import fetch, prepare
    from stages.params import FetchParams, PrepareParams

    paths = ProjectPaths(tmp_path_factory.mktemp("prepared-project"))
    fetch.run(FetchParams(dataset=str(hub_dataset)), paths)
    prepare.run(PrepareParams(label="coarse_label", val_fraction=0.1, seed=0, examples_per_shard=128), paths)
    return paths
