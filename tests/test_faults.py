"""Every fault gives one ``error:`` line naming what and where, and leaves nothing behind.

Oversized images, foreign or corrupt models, interrupted and failed writes: each case is
reproduced on small generated data and checked for its exit status, its one error line (no
traceback), the files that remain and, for ``predict``, that the good files still get classified.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.synthetic import COARSE_NAMES, make_image
from tests.conftest import STAGE_ENV


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.predict", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **STAGE_ENV},
        timeout=300,
    )


@pytest.fixture(scope="module")
def project_model(tmp_path_factory) -> Path:
    """An untrained model built by this project (20 coarse classes): what predict needs, in a second."""
    from stages.network import InputSpec, build_network

    spec = InputSpec((32, 32, 3), tuple(COARSE_NAMES), (128.0, 128.0, 128.0), (64.0, 64.0, 64.0))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    build_network("resnet", spec, (8, 8, 16, 16)).save(path)
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
    from stages.common import atomic_output

    final = previous_output(tmp_path)
    with atomic_output(final) as staged:
        staged.mkdir()
        (staged / "shard.tfrecord").write_text("new")
    assert sorted(path.name for path in final.iterdir()) == ["shard.tfrecord"]
    assert siblings(final) == ["prepared"]


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_interrupted_write_leaves_the_previous_output_as_it_was(tmp_path, kind):
    from stages.common import atomic_output

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
    from stages.common import atomic_output, run_main

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


def test_a_killed_run_s_staging_folder_is_cleared_by_the_next_run(tmp_path):
    from stages.common import atomic_output

    final = previous_output(tmp_path)
    (final.parent / ".prepared.partial-k1ll3d9x" / "prepared").mkdir(parents=True)  # what kill -9 leaves
    (final.parent / ".raw.partial-0therrun").mkdir()  # another output's: not ours to touch
    with atomic_output(final) as staged:
        assert siblings(final) == sorted([".raw.partial-0therrun", staged.parent.name, "prepared"])
        staged.mkdir()
    assert siblings(final) == [".raw.partial-0therrun", "prepared"]


def test_git_and_dvc_do_not_see_staging_folders(tmp_path):
    import shutil

    from dvc.repo import Repo

    from stages.paths import REPO_ROOT

    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    staging = tmp_path / "models" / ".model.keras.partial-k1ll3d9x"
    staging.mkdir(parents=True)
    (staging / "model.keras").write_text("half")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert untracked == ["??", ".dvcignore", "??", ".gitignore"]
    repo = Repo.init(str(tmp_path), no_scm=True, force=True)
    assert repo.dvcignore.is_ignored_dir(str(staging))
