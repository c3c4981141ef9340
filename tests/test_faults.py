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
