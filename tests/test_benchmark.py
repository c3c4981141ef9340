"""The benchmark command runs end to end on a small dataset and reports every figure it promises.

Its numbers are not checked here (timings on a shared machine are noise in a test); the README
reports them from full runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cifar100_dvc import hardware
from cifar100_dvc.paths import REPO_ROOT


@pytest.mark.slow
def test_benchmark_writes_every_measurement(hub_dataset, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "tools.benchmark", "--dataset", str(hub_dataset), "--label", "fine_label"]
    command += ["--out", str(out), "--train-images", "256", "--input-images", "64", "--repeats", "1"]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    machine = results["machine_report"]
    assert set(machine["cpu_flags"]) <= set(hardware.REPORTED_FLAGS) and machine["onednn"] is True
    assert results["compute"]["policy"] in ("float32", "mixed_bfloat16") and results["compute"]["fused_batch_norm"]
    assert results["compute"]["bfloat16"] == (results["compute"]["policy"] == "mixed_bfloat16")
    assert results["prepare"]["images"] == 800 and results["prepare"]["images_per_s"] > 0
    source = results["input"]
    assert min(source["notebook_images_per_s"], source["reader_images_per_s"], source["reader_augment_images_per_s"]) > 0
    # notebook, baseline and resnet at their batches; airbench's 1024 cut to the 500 train images
    # (600 rows of 100 fine classes: prepare's val takes one of each)
    assert [row["batch_size"] for row in results["train"]] == [32, 256, 256, 500]
    assert ["airbench" in row["name"] for row in results["train"]] == [False, False, False, True]
    ceiling, project_dtype = results["matmul_gflops_per_s"], "bfloat16" if results["compute"]["bfloat16"] else "float32"
    assert set(ceiling) == {"float32", project_dtype} and min(ceiling.values()) > 0
    for row in results["train"]:
        assert row["images_per_s"] > 0 and row["compute_only_images_per_s"] > 0
        assert row["end_to_end_fraction_of_compute"] == pytest.approx(
            row["images_per_s"] / row["compute_only_images_per_s"], abs=2e-3
        )
        assert row["training_flops_per_image"] > 1e6
        peak = ceiling["float32" if "notebook" in row["name"] else project_dtype]
        assert row["share_of_matmul_peak"] == pytest.approx(row["gflops_per_s"] / peak, abs=2e-3)
    assert results["baseline_speedup"] == pytest.approx(
        results["train"][1]["images_per_s"] / results["train"][0]["images_per_s"], abs=0.01
    )
    # The last step is the project row: its bfloat16 compute, or on a CPU without bfloat16 float32 too.
    project_step = "+ mixed_bfloat16 compute" if results["compute"]["bfloat16"] else "the project settings (float32"
    steps = [step["name"] for step in results["baseline_steps"]]
    assert [name.split(" ")[0] for name in steps[:3]] == ["notebook", "+", "+"] and steps[3].startswith(project_step)
    assert all(step["compute_only_images_per_s"] > 0 for step in results["baseline_steps"])
    assert [step["name"].split(" ")[0] for step in results["airbench_steps"]] == ["Keras'", "+", "+", "+"]
    assert all(step["compute_only_images_per_s"] > 0 for step in results["airbench_steps"])
    convolutions = results["airbench_convolutions"]  # airbench's step, at its 500-image batch
    assert convolutions["batch_size"] == 500 and convolutions["dtype"] == project_dtype
    assert list(convolutions["passes"]) == ["forward", "input gradient", "kernel gradient"]
    assert all(timed["seconds"] > 0 and timed["gflops_per_s"] > 0 for timed in convolutions["passes"].values())
    assert convolutions["convolutions_share_of_step"] == pytest.approx(
        sum(timed["share_of_step"] for timed in convolutions["passes"].values()), abs=2e-3
    )
    assert 0 < results["noop_dvc_repro_seconds"] < 60

    table = (out / "results.md").read_text()
    for heading in (
        "oneDNN on",
        "Project rows: ",
        "input: notebook pipeline",
        "input: project reader + augmentation",
        "train: baseline, notebook settings",
        "train: airbench [64, 128, 128] (the default)",
        "train: resnet [16, 32, 64, 128], batch 256",
        "prepare (800 images",
        "No-op `dvc repro`",
        "+ fused BatchNorm",
        "Share of the machine's peak",
        "| training | MFLOPs per image |",
        "+ fused GELU (the project's airbench)",
        "| convolutions, kernel gradient |",
        "| the rest: BatchNorm, GELU, pooling, loss, optimizer, lookahead |",
    ):
        assert heading in table


def test_arrays_writes_the_prepared_images_and_labels_as_prepare_stored_them(prepared_paths, tmp_path):
    """The PyTorch comparison trains on exactly the pipeline's images: every example, in stored order."""
    import numpy as np

    from cifar100_dvc.records import DatasetInfo, read_split
    from tools import arrays

    out = tmp_path / "splits.npz"
    arrays.main([str(prepared_paths.prepared_dir), str(out)])
    saved = np.load(out)
    info = DatasetInfo.read(prepared_paths.prepared_dir)
    for prefix, split in (("train", "train"), ("test", "val")):
        images, labels = saved[f"{prefix}_images"], saved[f"{prefix}_labels"]
        assert images.dtype == np.uint8 and images.shape == (info.splits[split].num_examples, *info.image_shape)
        first_images, first_labels = next(read_split(prepared_paths.prepared_dir, split, 7).as_numpy_iterator())
        np.testing.assert_array_equal(images[:7], first_images)
        np.testing.assert_array_equal(labels[:7], first_labels)
        assert labels.min() >= 0 and labels.max() < len(info.class_names)
