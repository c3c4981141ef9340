"""train and evaluate on the synthetic data: the model learns, outputs are whole and atomic."""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest

from stages import evaluate, train
from stages.evaluate import load_model, predict_probabilities
from stages.params import EvaluateParams, TrainParams
from stages.paths import ProjectPaths
from stages.records import DatasetInfo, read_arrays
from stages.synthetic import COARSE_NAMES

FAST_TRAIN = TrainParams(
    widths=(8, 8, 16, 16), epochs=6, batch_size=32, learning_rate=0.1, warmup_epochs=1.0, shuffle_buffer=1000
)


def copy_prepared(prepared_paths: ProjectPaths, tmp_path) -> ProjectPaths:
    import shutil

    paths = ProjectPaths(tmp_path)
    shutil.copytree(prepared_paths.prepared_dir, paths.prepared_dir)
    return paths


@pytest.mark.slow
def test_chain_learns_far_above_chance_and_writes_everything(prepared_paths, tmp_path):
    paths = copy_prepared(prepared_paths, tmp_path)
    summary = train.run(FAST_TRAIN, paths)
    assert summary["epochs_completed"] == 6 and not summary["stopped_by_time_budget"]
    assert [row["epoch"] for row in summary["epochs"]] == [1, 2, 3, 4, 5, 6]
    metrics = evaluate.run(EvaluateParams(batch_size=64, tta_flip=True, sample_images=9), paths)
    assert metrics["num_examples"] == 200
    assert metrics["accuracy"] > 0.3  # 20 classes: chance is 0.05 (0.5 seen with these settings)
    assert set(metrics) == {"accuracy", "top5_accuracy", "loss", "num_examples"}
    assert json.loads(paths.metrics_file.read_text()) == metrics
    per_class = json.loads(paths.class_accuracy_file.read_text())
    assert [row["class"] for row in per_class] == COARSE_NAMES
    for name in ("training_curves.png", "confusion_matrix.png", "class_accuracy.png", "samples.png", "confusion.csv"):
        assert (paths.plots_dir / name).stat().st_size > 0, name
    assert len((paths.plots_dir / "confusion.csv").read_text().splitlines()) == 201
    assert (paths.live_dir / "plots" / "metrics" / "eval" / "accuracy.tsv").is_file()
    assert [path.name for path in paths.checkpoint_dir.iterdir()] == ["README.txt"]  # finished: nothing to resume


def test_saved_model_classifies_raw_uint8_and_carries_class_names(prepared_paths, tmp_path):
    paths = copy_prepared(prepared_paths, tmp_path)
    train.run(dataclasses.replace(FAST_TRAIN, epochs=1), paths)
    model = load_model(paths.model_file)
    assert keras.saving.get_registered_name(type(model.get_layer("class_names"))) == "cifar100_dvc>ClassNames"
    info = DatasetInfo.read(paths.prepared_dir)
    assert model.get_layer("class_names").class_names == info.class_names
    images_uint8, _ = read_arrays(paths.prepared_dir, "test")
    probabilities = predict_probabilities(model, images_uint8[:10], batch_size=5, tta_flip=False)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert not model.compiled  # saved for inference: no optimizer state


def test_time_budget_stops_training_early(prepared_paths, tmp_path):
    paths = copy_prepared(prepared_paths, tmp_path)
    summary = train.run(dataclasses.replace(FAST_TRAIN, epochs=50, time_budget_minutes=0.001), paths)
    assert summary["stopped_by_time_budget"] and summary["epochs_completed"] == 1
    assert paths.model_file.is_file()


def test_batch_larger_than_the_train_split_is_refused(prepared_paths, tmp_path):
    from stages.common import StageError

    paths = copy_prepared(prepared_paths, tmp_path)
    with pytest.raises(StageError, match="train.batch_size=4096 exceeds the 540 train examples"):
        train.run(dataclasses.replace(FAST_TRAIN, batch_size=4096), paths)
    assert not paths.model_file.exists()


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    schedule = train.WarmupSchedule(peak=0.4, warmup_steps=10, total_steps=110, decay="linear")
    values = [float(schedule(step)) for step in (0, 4, 9, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.04, 0.2, 0.4, 0.4, 0.2, 0.0], atol=1e-6)
    cosine = train.WarmupSchedule(peak=1.0, warmup_steps=0, total_steps=100, decay="cosine")
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 50, 100)], [1.0, 0.5, 0.0], atol=1e-6)
    constant = train.WarmupSchedule(peak=0.3, warmup_steps=0, total_steps=100, decay="constant")
    assert float(constant(99)) == pytest.approx(0.3)


def test_device_settings_auto_resolve_by_hardware():
    cpu = train.resolve_device_settings(TrainParams(), num_gpus=0)
    assert (cpu.mixed_precision_policy, cpu.jit_compile, cpu.steps_per_execution) == ("float32", False, 1)
    forced = train.resolve_device_settings(TrainParams(mixed_precision="on", jit_compile="on", steps_per_execution=4), num_gpus=0)
    assert (forced.mixed_precision_policy, forced.jit_compile, forced.steps_per_execution) == ("mixed_bfloat16", True, 4)
    bf16_cpu = train.resolve_device_settings(TrainParams(), num_gpus=0, cpu_has_bfloat16=True)
    assert (bf16_cpu.mixed_precision_policy, bf16_cpu.jit_compile, bf16_cpu.steps_per_execution) == ("mixed_bfloat16", False, 1)
    switched_off = train.resolve_device_settings(TrainParams(mixed_precision="off"), num_gpus=0, cpu_has_bfloat16=True)
    assert switched_off.mixed_precision_policy == "float32"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse amx_tile amx_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),
        ("Features\t: fp asimd\n", False),
    ],
)
def test_cpu_bfloat16_detection_reads_the_flags(tmp_path, cpuinfo, expected):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert train.cpu_has_bfloat16(tmp_path / "cpuinfo") is expected
    assert train.cpu_has_bfloat16(tmp_path / "missing") is False


DISTRIBUTED_SCRIPT = """
import json, logging, sys
import tensorflow as tf
logging.basicConfig(level=logging.INFO)
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
import dataclasses
from stages import train
from stages.paths import ProjectPaths
from tests.test_train_evaluate import FAST_TRAIN
summary = train.run(dataclasses.replace(FAST_TRAIN, distribute=sys.argv[2]), ProjectPaths(Path(sys.argv[1])))
print("SUMMARY" + json.dumps(summary["epochs"][-1]))
"""


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(prepared_paths, tmp_path):
    import os
    import subprocess
    import sys

    from stages.paths import REPO_ROOT

    finals = {}
    for distribute in ("off", "mirrored"):
        paths = copy_prepared(prepared_paths, tmp_path / distribute)
        result = subprocess.run(
            [sys.executable, "-c", DISTRIBUTED_SCRIPT, str(paths.root), distribute],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if distribute == "mirrored":
            strategy_lines = [line for line in result.stderr.splitlines() if "MirroredStrategy over" in line]
            assert strategy_lines and "CPU:0" in strategy_lines[0] and "CPU:1" in strategy_lines[0], strategy_lines
        finals[distribute] = json.loads(result.stdout.split("SUMMARY", 1)[1])
    # Each replica normalizes its half batch with its own BatchNorm statistics: close, not equal.
    assert finals["mirrored"]["loss"] == pytest.approx(finals["off"]["loss"], rel=0.15)
    assert finals["mirrored"]["val_accuracy"] == pytest.approx(finals["off"]["val_accuracy"], abs=0.2)
    assert finals["mirrored"]["val_accuracy"] > 0.3
