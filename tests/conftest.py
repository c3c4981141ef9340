"""Fixtures shared by the tests: small generated data, the one tiny recipe, and artifacts made once
per session (a prepared dataset, a trained model, a reproduced DVC repository) that each test
gets its own copy of, so tests stay independent without paying for the same work again.

pytest loads this file before any test module, so its import of ``cifar100_dvc`` (below) sets
TensorFlow's oneDNN default (cifar100_dvc/__init__.py) before any test imports TensorFlow."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cifar100_dvc.params import TrainParams
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.scratch import QUIET_OFFLINE_ENV, TINY_PARAMS, TINY_TRAIN, commit, dvc, init_repo, make_project
from cifar100_dvc.synthetic import make_rows, write_hub_dataset


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Keep the Hugging Face cache of the tests away from the user's (and offline)."""
    cache = tmp_path_factory.mktemp("hf-home")
    saved = {key: os.environ.get(key) for key in ("HF_HOME", *QUIET_OFFLINE_ENV)}
    os.environ.update({"HF_HOME": str(cache), **QUIET_OFFLINE_ENV})
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


@pytest.fixture
def tiny_train() -> TrainParams:
    return TINY_TRAIN


@pytest.fixture
def project(tmp_path, hub_dataset) -> Path:
    """A copy of the project on the synthetic dataset with the tiny recipe, nothing run yet."""
    return make_project(tmp_path / "project", hub_dataset, **TINY_PARAMS)


@pytest.fixture(scope="session")
def prepared_paths(tmp_path_factory, hub_dataset) -> ProjectPaths:
    """fetch + prepare (coarse labels) of the synthetic dataset, done once, in process."""
    from cifar100_dvc.params import FetchParams, PrepareParams
    from stages import fetch, prepare

    paths = ProjectPaths(tmp_path_factory.mktemp("prepared-project"))
    fetch.run(FetchParams(dataset=str(hub_dataset)), paths)
    prepare.run(PrepareParams(label="coarse_label", val_fraction=0.1, seed=0, examples_per_shard=128), paths)
    return paths


@pytest.fixture(scope="session")
def trained_paths(tmp_path_factory, prepared_paths) -> ProjectPaths:
    """prepared_paths (raw and prepared data) plus a model trained once with the tiny recipe for 6
    epochs (well above chance), its history, dvclive logs and (emptied) checkpoints."""
    from stages import train

    paths = ProjectPaths(tmp_path_factory.mktemp("trained-project"))
    shutil.copytree(prepared_paths.raw_dir, paths.raw_dir)
    shutil.copytree(prepared_paths.prepared_dir, paths.prepared_dir)
    train.run(dataclasses.replace(TINY_TRAIN, epochs=6, warmup_epochs=1.0), paths)
    return paths


@pytest.fixture
def project_with(tmp_path, hub_dataset, trained_paths) -> Callable[..., Path]:
    """``project_with("prepared_dir", "model_file")``: a project copy (in ``tmp_path/name``) holding
    copies of those session artifacts (ProjectPaths attributes of ``trained_paths``), ready for a stage."""

    def make(*outputs: str, name: str = "project") -> Path:
        root = make_project(tmp_path / name, hub_dataset, **TINY_PARAMS)
        for name in outputs:
            source, target = getattr(trained_paths, name), getattr(ProjectPaths(root), name)
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        return root

    return make


@dataclasses.dataclass(frozen=True)
class ReproducedRepo:
    root: Path
    first_repro: subprocess.CompletedProcess  # the output of its first `dvc repro`


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory, hub_dataset) -> ReproducedRepo:
    """A git + DVC repository of the project with the tiny recipe, after one full ``dvc repro``,
    everything committed: made once, copied by ``repo`` for each test that needs one."""
    root = init_repo(make_project(tmp_path_factory.mktemp("reproduced") / "repo", hub_dataset, **TINY_PARAMS))
    first = dvc(root, "repro")
    commit(root, "reproduced")
    return ReproducedRepo(root, first)


@pytest.fixture
def repo(tmp_path, reproduced_repo) -> Path:
    """This test's own copy of ``reproduced_repo`` (git history, DVC cache and outputs included):
    every stage up to date, nothing shared with other tests."""
    root = tmp_path / "repo"
    shutil.copytree(reproduced_repo.root, root, symlinks=True)
    return root
