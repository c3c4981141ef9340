"""Scratch copies of the project: its code, dvc.yaml and params.yaml in another folder, optionally
a git + DVC repository, and the environment to run its stages and dvc commands in.

One home for what the benchmark (timing a no-op ``dvc repro``) and the tests (every stage and
dvc command on small data) both need, so a copy is made, edited and run the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from cifar100_dvc.params import Params, TrainParams, to_dict
from cifar100_dvc.paths import REPO_ROOT
from cifar100_dvc.recipes import recipe

# The one tiny recipe: a network and schedule that learn the tests' synthetic data in seconds; the
# benchmark's no-op `dvc repro` trains it too. A test that needs a longer or different run says so
# with dataclasses.replace(TINY_TRAIN, ...).
TINY_TRAIN = TrainParams(
    arch="resnet", widths=(8, 8, 16, 16), epochs=2, batch_size=32, learning_rate=0.1, warmup_epochs=0.5, shuffle_buffer=1000
)
# airbench93's recipe (Nesterov SGD, triangle, lookahead), the settings its published-element tests compare against.
AIRBENCH93_TRAIN = recipe(Params(), "airbench93").train
# airbench93 at a tiny width, its whitening bias and lookahead epochs within the short run; a higher
# rate and output scale than published, so that 64 steps of batch 32 learn the synthetic classes.
TINY_AIRBENCH = dataclasses.replace(
    TINY_TRAIN,
    arch="airbench",
    epochs=4,
    airbench=dataclasses.replace(
        AIRBENCH93_TRAIN.airbench,
        widths=(16, 32, 32),
        learning_rate=30.0,
        output_scale=1 / 3,
        whiten_bias_epochs=1,
        lookahead_start_epoch=1,
    ),
)
# The same tiny network trained as the default trains airbench (Muon, a linear decay, no lookahead),
# its logits / its last width, as airbench94_muon divides them.
TINY_MUON = dataclasses.replace(
    TINY_AIRBENCH,
    airbench=dataclasses.replace(Params().train.airbench, widths=(16, 32, 32), output_scale=1 / 32, whiten_bias_epochs=1),
)
# The same recipe as params.yaml overrides (for stage and dvc runs), with small prepare/evaluate/export settings.
TINY_PARAMS = {
    "prepare.label": "coarse_label",
    "prepare.examples_per_shard": 128,
    **{f"train.{key}": value for key, value in to_dict(TINY_TRAIN).items()},
    "evaluate.batch_size": 100,
    "evaluate.sample_images": 9,
    "export.tflite": False,  # the TFLite conversion takes seconds; tests/test_predict_export.py runs it once
}

# What a copy needs to run the pipeline and the tools: the code, the pipeline, its params and ignore rules.
PROJECT_FILES = ("stages", "cifar100_dvc", "tools", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")

# Stage and dvc subprocesses: quiet TensorFlow, never reach for the hub, no telemetry, a git
# identity for commits, and output that is not held back in buffers.
QUIET_OFFLINE_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "PYTHONUNBUFFERED": "1",
    "GIT_AUTHOR_NAME": "scratch",
    "GIT_AUTHOR_EMAIL": "scratch@localhost",
    "GIT_COMMITTER_NAME": "scratch",
    "GIT_COMMITTER_EMAIL": "scratch@localhost",
}


def environment(offline: bool = True) -> dict[str, str]:
    """This process's environment, quiet and (unless ``offline`` is False) offline, with this
    interpreter first on PATH (dvc runs ``python -m stages.X`` through the shell and must find the same Python)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    settings = {key: value for key, value in QUIET_OFFLINE_ENV.items() if offline or not key.startswith("HF_")}
    return {**os.environ, **settings, "PATH": path}


def set_params(root: Path, **overrides: Any) -> None:
    """Edit ``root``/params.yaml in place: ``set_params(root, **{"train.epochs": 2})``."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, dataset: Path | str, **overrides: Any) -> Path:
    """A copy of the project at ``root`` whose ``fetch.dataset`` is ``dataset``, with ``overrides``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, root / name)
    set_params(root, **{"fetch.dataset": str(dataset), **overrides})
    return root


def sh(root: Path, *command: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``command`` in ``root`` with ``environment()``; with ``check``, fail with its output."""
    result = subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(root: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``root``, with this interpreter's DVC."""
    return sh(root, sys.executable, "-m", "dvc", *args, **kwargs)


def commit(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", message)


def init_repo(root: Path) -> Path:
    """Make the project copy at ``root`` a git + DVC repository with everything committed."""
    sh(root, "git", "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    commit(root, "project")
    return root


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: float = 600, offline: bool = True):
    """``python -m MODULE ARGS`` with ``environment()``, output captured (the result is not checked)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(offline),
    )


def run_stage(root: Path, stage: str, timeout: float = 600, offline: bool = True) -> subprocess.CompletedProcess:
    """``python -m stages.<stage>`` in ``root``, as DVC runs it (the result is not checked)."""
    return run_module(f"stages.{stage}", cwd=root, timeout=timeout, offline=offline)
