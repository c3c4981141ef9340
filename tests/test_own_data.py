"""Bringing your own data: a dataset with only a train split, a folder of class sub-folders (with and
without a test sub-folder), at image sizes other than CIFAR's, each through dvc repro to evaluate and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cifar100_dvc.scratch import TINY_PARAMS, dvc, init_repo, make_project, run_module
from cifar100_dvc.synthetic import COARSE_NAMES, make_image, make_rows, write_hub_dataset, write_image_folder

FOLDER_CLASSES = ["cat", "dog house", "sea-shore", "Zebra 2"]  # spaces, capitals: names as users give them


def own_dataset(tmp_path, layout: str):
    """(the dataset directory, its label column, its class names) for ``layout``."""
    if layout == "hub-train-only":
        return write_hub_dataset(tmp_path / "hub", {"train": make_rows(400, seed=4)}), "coarse_label", COARSE_NAMES
    splits = {"train": 36, "test": 8} if layout == "folder-with-test" else {"": 44}
    return write_image_folder(tmp_path / "photos", splits, FOLDER_CLASSES), "label", sorted(FOLDER_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "image_size"), [("hub-train-only", 20), ("folder-with-test", 64), ("folder-without-test", 20)]
)
def test_own_dataset_runs_through_dvc_repro_to_evaluate_and_export(tmp_path, layout, image_size):
    import tensorflow as tf

    dataset, label, class_names = own_dataset(tmp_path, layout)
    # 12 epochs: a folder's ~140 train images are 4 steps an epoch, and 6 epochs (24 steps) left the
    # float32 path (an AVX2-only CPU) at 31% on 4 classes, a coin toss from the 1.5x-chance bar.
    settings = {**TINY_PARAMS, "prepare.label": label, "prepare.image_size": image_size, "train.epochs": 12}
    settings["export.tflite"] = True
    root = init_repo(make_project(tmp_path / "repo", dataset, **settings))
    dvc(root, "repro")

    info = json.loads((root / "data" / "prepared" / "dataset.json").read_text())
    assert info["class_names"] == class_names and info["image_shape"] == [image_size, image_size, 3]
    assert info["test_from_train"] == (layout != "folder-with-test")
    counts = {split: info["splits"][split]["num_examples"] for split in ("train", "val", "test")}
    total = {"hub-train-only": 400, "folder-with-test": 4 * 44, "folder-without-test": 4 * 44}[layout]
    assert sum(counts.values()) == total and min(counts.values()) > 0
    if layout == "folder-with-test":
        assert counts["test"] == 4 * 8  # the test/ sub-folder, as it is
    else:  # carved from train: prepare.test_fraction (0.1) of each (balanced) class, rounded per class
        per_class = total // len(class_names)
        assert info["test_fraction"] == 0.1 and counts["test"] == len(class_names) * round(0.1 * per_class)
    assert sum(info["resized_images"].values()) == total  # no image was of the chosen size
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    assert metrics["num_examples"] == counts["test"] and metrics["accuracy"] > 1.5 / len(class_names)

    exported = root / "models" / "export"
    assert (exported / "model.tflite").stat().st_size > 0
    assert (exported / "class_names.txt").read_text().splitlines() == class_names
    served = tf.saved_model.load(str(exported / "saved_model"))
    images = np.random.default_rng(0).integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
    assert served.serve(tf.constant(images)).shape == (2, len(class_names))

    # predict takes files of any other size and converts them to the model's own
    photo = tmp_path / "photo.png"
    Image.fromarray(make_image(0, np.random.default_rng(1), size=57)[:, :45]).save(photo)
    result = run_module("tools.predict", "--model", str(root / "models" / "model.keras"), "--json", str(photo), cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    (prediction,) = json.loads(result.stdout)
    assert prediction["predictions"][0]["class"] in class_names
