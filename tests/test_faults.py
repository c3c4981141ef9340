"""Every fault gives one ``error:`` line naming what and where, and leaves nothing behind.

Oversized images, foreign or corrupt models, interrupted and failed writes: each case is
reproduced on small generated data and checked for its exit status, its one error line (no
traceback), the files that remain and, for ``predict``, that the good files still get classified.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.scratch import TINY_PARAMS, environment, make_project, run_module
from cifar100_dvc.synthetic import COARSE_NAMES, make_image


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return run_module("tools.predict", *args, timeout=300)


@pytest.fixture(scope="module")
def project_model(tmp_path_factory) -> Path:
    """An untrained model built by this project (20 coarse classes): what predict needs, in a second."""
    from cifar100_dvc.network import InputSpec, build_network
    from cifar100_dvc.params import TrainParams

    spec = InputSpec((32, 32, 3), tuple(COARSE_NAMES), (128.0, 128.0, 128.0), (64.0, 64.0, 64.0))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    build_network(TrainParams(arch="resnet", widths=(8, 8, 16, 16)), spec).save(path)
    return path


# ---------------------------------------------------------------- images


def test_predict_reports_oversized_and_non_image_files_and_classifies_the_rest(project_model, tmp_path):
    Image.fromarray(make_image(0, np.random.default_rng(0))).save(tmp_path / "a_good.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "b_bomb.png")  # 48 KB, 400 million pixels
    (tmp_path / "c_text.png").write_text("not an image")
    Image.fromarray(make_image(7, np.random.default_rng(1))).save(tmp_path / "d_good.png")
    result = run_predict("--model", str(project_model), "--top-k", "1", str(tmp_path))
    assert result.returncode == 1
    assert sorted(error_lines(result)) == [
        f"error: predict: {tmp_path / 'b_bomb.png'}: too large to decode: 400,000,000 pixels, "
        "more than the 25,000,000 pixels (5000x5000) accepted",
        f"error: predict: {tmp_path / 'c_text.png'}: not a readable image (no known image format)",
    ]
    classified = result.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in classified] == [str(tmp_path / "a_good.png"), str(tmp_path / "d_good.png")]


# ---------------------------------------------------------------- models


def foreign_model(path: Path, input_dtype: str = "uint8", input_shape=(32, 32, 3), units: int = 20) -> Path:
    """A valid .keras file of a small model that is not this project's (no class names)."""
    import keras

    inputs = keras.Input(shape=input_shape, dtype=input_dtype)
    keras.Model(inputs, keras.layers.Dense(units)(keras.layers.Flatten()(inputs))).save(path)
    return path


def corrupt_model(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (foreign_model, "is not a model of this project: it has no class_names layer"),
        (corrupt_model, "is not a readable Keras model file (not a .keras zip archive)"),
    ],
    ids=["foreign", "corrupt"],
)
def test_predict_names_what_is_wrong_with_a_model(tmp_path, make, message):
    model_file = make(tmp_path / "m.keras")
    Image.fromarray(make_image(0, np.random.default_rng(0))).save(tmp_path / "good.png")
    result = run_predict("--model", str(model_file), str(tmp_path / "good.png"))
    assert result.returncode == 1
    assert error_lines(result) == [f"error: predict: {model_file} {message}"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("model_kwargs", "problem"),
    [
        ({"input_dtype": "float32"}, "it takes float32 inputs, not uint8 pixels"),
        ({"input_shape": (64, 32, 3)}, "it takes inputs of shape (None, 64, 32, 3), not square RGB images (None, size, size, 3)"),
        ({}, "it has no class_names layer"),
    ],
    ids=["float-input", "not-square", "no-class-names"],
)
def test_foreign_models_are_told_apart(tmp_path, model_kwargs, problem):
    import keras

    from cifar100_dvc.inference import foreign_model_problem

    model = keras.models.load_model(foreign_model(tmp_path / "m.keras", **model_kwargs))
    assert foreign_model_problem(model) == problem


def test_a_model_whose_outputs_and_class_names_disagree_is_refused(project_model):
    import keras

    from cifar100_dvc.inference import foreign_model_problem
    from cifar100_dvc.network import ClassNames

    model = keras.models.load_model(project_model, compile=False)
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8")
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(inputs))
    lying = keras.Model(inputs, ClassNames(["a", "b"], name="class_names")(logits))
    assert foreign_model_problem(model) is None
    assert foreign_model_problem(lying) == "it has 3 outputs but 2 class names"


@pytest.mark.parametrize("make", [foreign_model, corrupt_model], ids=["foreign", "corrupt"])
def test_evaluate_refuses_a_model_that_is_not_this_project_s(tmp_path, project_with, make):
    from cifar100_dvc.common import StageError
    from cifar100_dvc.params import EvaluateParams
    from stages import evaluate

    paths = ProjectPaths(project_with("prepared_dir"))
    paths.model_file.parent.mkdir()
    make(paths.model_file)
    with pytest.raises(StageError, match=f"^{paths.model_file} is not a (model of this project|readable Keras model file)"):
        evaluate.run(EvaluateParams(), paths)
    assert not paths.metrics_file.exists() and not paths.plots_dir.exists()


# ---------------------------------------------------------------- atomic outputs


def previous_output(root: Path) -> Path:
    """A complete earlier ``data/prepared`` with one file, as a finished run leaves it."""
    final = root / "data" / "prepared"
    final.mkdir(parents=True)
    (final / "dataset.json").write_text("previous")
    return final


def siblings(final: Path) -> list[str]:
    return sorted(path.name for path in final.parent.iterdir())


def test_success_swaps_a_directory_in_whole(tmp_path):
    from cifar100_dvc.common import atomic_output

    final = previous_output(tmp_path)
    with atomic_output(final) as staged:
        staged.mkdir()
        (staged / "shard.tfrecord").write_text("new")
    assert sorted(path.name for path in final.iterdir()) == ["shard.tfrecord"]
    assert siblings(final) == ["prepared"]


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_interrupted_write_leaves_the_previous_output_as_it_was(tmp_path, kind):
    from cifar100_dvc.common import atomic_output

    final = previous_output(tmp_path) if kind == "directory" else tmp_path / "model.keras"
    if kind == "file":
        final.write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_output(final) as staged:
        if kind == "directory":
            staged.mkdir()
            (staged / "half.tfrecord").write_text("half")
        else:
            staged.write_text("half")
        raise KeyboardInterrupt
    assert (final / "dataset.json" if kind == "directory" else final).read_text() == "previous"
    assert siblings(final) == [final.name]


def test_run_main_reports_an_interrupt_truthfully_and_keeps_the_output(tmp_path, capsys):
    from cifar100_dvc.common import atomic_output, run_main

    final = previous_output(tmp_path)

    def body() -> None:
        with atomic_output(final) as staged:
            staged.mkdir()
            (staged / "half.tfrecord").write_text("half")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    with pytest.raises(SystemExit) as exited:
        run_main("prepare", body)
    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "error: prepare: interrupted; outputs not yet finished were left as they were"
    ]
    assert (final / "dataset.json").read_text() == "previous" and siblings(final) == ["prepared"]


def test_a_ctrl_c_whose_exception_a_finalizer_swallowed_still_stops_the_stage(capsys):
    import signal
    import time

    from cifar100_dvc.common import raise_if_interrupted, run_main

    steps_after_ctrl_c = []

    def body() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C ...
            time.sleep(1.0)
        except KeyboardInterrupt:
            pass  # ... whose exception is dropped, as Python drops one raised inside a __del__
        for step in range(3):  # training goes on, and stops at its next step
            raise_if_interrupted()
            steps_after_ctrl_c.append(step)

    with pytest.raises(SystemExit) as exited:
        run_main("train", body)
    assert exited.value.code == 130 and steps_after_ctrl_c == []
    assert capsys.readouterr().err.splitlines() == ["error: train: interrupted; outputs not yet finished were left as they were"]
    assert getattr(signal.getsignal(signal.SIGINT), "__name__", None) != "_interrupt"  # the previous handler is back
    raise_if_interrupted()  # and nothing is left pending after the stage


def test_a_killed_run_s_staging_folder_is_cleared_by_the_next_run(tmp_path):
    from cifar100_dvc.common import atomic_output

    final = previous_output(tmp_path)
    (final.parent / ".prepared.partial-k1ll3d9x" / "prepared").mkdir(parents=True)  # what kill -9 leaves
    (final.parent / ".raw.partial-0therrun").mkdir()  # another output's: not ours to touch
    with atomic_output(final) as staged:
        assert siblings(final) == sorted([".raw.partial-0therrun", staged.parent.name, "prepared"])
        staged.mkdir()
    assert siblings(final) == [".raw.partial-0therrun", "prepared"]


def test_git_and_dvc_do_not_see_staging_folders_nor_a_linked_venv(tmp_path):
    import shutil

    from dvc.repo import Repo

    from cifar100_dvc.paths import REPO_ROOT

    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    staging = tmp_path / "models" / ".model.keras.partial-k1ll3d9x"
    staging.mkdir(parents=True)
    (staging / "model.keras").write_text("half")
    (tmp_path / ".venv").symlink_to(tmp_path / "elsewhere")  # a .venv that is a link, not a folder
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert untracked == ["??", ".dvcignore", "??", ".gitignore"]
    repo = Repo.init(str(tmp_path), no_scm=True, force=True)
    assert repo.dvcignore.is_ignored_dir(str(staging))


# ---------------------------------------------------------------- failed writes


def test_an_io_error_in_a_stage_is_one_line_naming_the_file(capsys):
    from cifar100_dvc.common import run_main

    def body() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/prepared/x.tfrecord")

    with pytest.raises(SystemExit) as exited:
        run_main("prepare", body)
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: prepare: cannot write /data/prepared/x.tfrecord: No space left on device"
    ]


def test_a_bug_keeps_its_traceback():
    from cifar100_dvc.common import run_main

    with pytest.raises(ZeroDivisionError):
        run_main("prepare", lambda: 1 / 0)


def test_a_tensorflow_write_error_names_the_output_and_leaves_nothing(tmp_path):
    import tensorflow as tf

    from cifar100_dvc.common import StageError, atomic_output

    final = previous_output(tmp_path)
    with pytest.raises(StageError, match=f"^cannot write {final}: File too large$"), atomic_output(final) as staged:
        staged.mkdir()
        raise tf.errors.OutOfRangeError(None, None, f"{staged}/train-00000-of-00001.tfrecord; File too large")
    assert (final / "dataset.json").read_text() == "previous" and siblings(final) == ["prepared"]


def test_a_tensorflow_error_that_is_not_about_a_file_stays_a_bug():
    import tensorflow as tf

    from cifar100_dvc.common import io_error_reason

    assert io_error_reason(tf.errors.OutOfRangeError(None, None, "/x/shard.tfrecord; No space left on device")) == (
        "No space left on device"
    )
    assert io_error_reason(tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [32,10] vs. [32,20]")) is None


def run_stage_with_file_size_limit(root: Path, stage: str, kilobytes: int) -> subprocess.CompletedProcess:
    """The stage with writes failing past ``kilobytes`` per file (EFBIG; Python ignores SIGXFSZ)."""
    return subprocess.run(
        ["bash", "-c", f'ulimit -f {kilobytes} && exec "$0" -m stages.{stage}', sys.executable],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )


def test_prepare_that_cannot_write_says_so_in_one_line_and_leaves_nothing(project_with):
    root = project_with("raw_dir")
    result = run_stage_with_file_size_limit(root, "prepare", 100)  # a shard is ~400 KB
    assert result.returncode == 1
    assert error_lines(result) == [f"error: prepare: cannot write {root / 'data' / 'prepared'}: File too large"]
    assert sorted(path.name for path in (root / "data").iterdir()) == ["raw"]


def test_fetch_that_cannot_write_says_so_in_one_line_and_leaves_nothing(tmp_path, hub_dataset):
    root = make_project(tmp_path / "project", hub_dataset, **TINY_PARAMS)
    result = run_stage_with_file_size_limit(root, "fetch", 100)  # the train split's Arrow file is ~1.2 MB
    assert result.returncode == 1
    assert error_lines(result) == [f"error: fetch: cannot write {root / 'data' / 'raw'}: File too large"]
    assert list((root / "data").iterdir()) == []


@pytest.mark.slow
def test_train_that_cannot_write_says_so_in_one_line_and_leaves_nothing(project_with):
    root = project_with("prepared_dir")
    result = run_stage_with_file_size_limit(root, "train", 60)  # a checkpoint is ~120 KB
    assert result.returncode == 1
    assert error_lines(result) == [f"error: train: cannot write {root / 'checkpoints' / 'epoch-0001.keras'}: File too large"]
    assert "Exception ignored" not in result.stderr
    assert list((root / "checkpoints").iterdir()) == [] and not (root / "models").exists()
