"""evaluate's numbers are exactly right for predictions we know."""

from __future__ import annotations

import math

import numpy as np

from cifar100_dvc.inference import predict_probabilities, predict_with_views, shifted_views, softmax
from stages.evaluate import (
    class_accuracy,
    compute_metrics,
    confusion_colors,
    confusion_matrix,
    curve_points,
    epoch_positions,
    plot_confusion_matrix,
    plot_training_curves,
)


def test_metrics_of_known_probabilities():
    probabilities = np.array(
        [
            [0.7, 0.1, 0.1, 0.05, 0.03, 0.02],  # label 0: top-1 right
            [0.1, 0.2, 0.3, 0.25, 0.1, 0.05],  # label 1: 4th of 6 -> top-5 right, top-1 wrong
            [0.5, 0.2, 0.12, 0.1, 0.07, 0.01],  # label 5: last -> both wrong
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # label 3: right
        ]
    )
    labels = np.array([0, 1, 5, 3])
    metrics = compute_metrics(probabilities, labels)
    assert metrics["accuracy"] == 0.5
    assert metrics["top5_accuracy"] == 0.75
    assert metrics["num_examples"] == 4
    expected_loss = -(math.log(0.7) + math.log(0.2) + math.log(0.01) + math.log(1.0)) / 4
    assert math.isclose(metrics["cross_entropy"], expected_loss, rel_tol=1e-12)
    assert "loss" not in metrics  # the training loss is label-smoothed: a different quantity


def test_confusion_matrix_and_per_class_accuracy():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    counts = confusion_matrix(labels, predictions, num_classes=4)
    assert counts.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    accuracy = class_accuracy(counts)
    assert accuracy[:3].tolist() == [0.5, 2 / 3, 1.0]
    assert np.isnan(accuracy[3])  # no test example of class 3


def test_softmax_is_stable_and_normalized():
    probabilities = softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]]))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5], [0.25, 0.75]])


def test_confusion_cells_with_no_prediction_take_the_lowest_colour(tmp_path):
    counts = np.array([[98, 2, 0], [0, 100, 0], [0, 0, 0]])  # class 2: no test example
    colors, cmap, _ = confusion_colors(counts)
    lowest = np.array(cmap(0.0))
    for row, column in [(0, 2), (1, 0), (2, 2)]:
        np.testing.assert_allclose(colors[row, column], lowest)
    np.testing.assert_allclose(colors[1, 1], cmap(1.0))  # all of class 1 right: the top colour
    assert not np.allclose(colors[0, 1], lowest)  # a 2% confusion is visible against empty cells
    assert np.all(colors[..., 3] == 1.0)  # opaque: nothing renders blank
    plot_confusion_matrix(counts, ["a", "b", "c"], tmp_path / "confusion_matrix.png")
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def history(stopped_by_time_budget: bool, last_fraction: float | None) -> dict:
    rows = [{"epoch": epoch, "loss": 3.0 - epoch, "accuracy": 0.1 * epoch, "val_loss": 3.1 - epoch} for epoch in (1, 2, 3)]
    if last_fraction is not None:
        rows[-1]["epoch_fraction"] = last_fraction
    return {"arch": "resnet", "train_seconds": 60.0, "stopped_by_time_budget": stopped_by_time_budget, "epochs": rows}


def test_an_epoch_cut_short_by_the_time_budget_sits_at_its_fraction(tmp_path):
    assert epoch_positions(history(True, 0.4)) == ([1.0, 2.0, 2.4], True)
    assert epoch_positions(history(False, None)) == ([1.0, 2.0, 3.0], False)
    assert epoch_positions(history(True, None)) == ([1.0, 2.0, 3.0], True)  # no fraction recorded: still marked
    assert epoch_positions(history(True, 1.0)) == ([1.0, 2.0, 3.0], False)  # the budget ran out on the epoch's last step
    plot_training_curves(history(True, 0.4), tmp_path / "training_curves.png")
    assert (tmp_path / "training_curves.png").stat().st_size > 0


def test_val_scored_every_few_epochs_is_drawn_at_the_epochs_that_have_it(tmp_path):
    gappy = history(True, 0.4)
    del gappy["epochs"][0]["val_loss"]  # train.validation_freq: 2 scores val after epochs 2 and 3 only
    positions, cut_short = epoch_positions(gappy)
    assert curve_points(gappy["epochs"], positions, 2, "val_loss") == [(2.0, 3.1 - 2, True), (2.4, 3.1 - 3, False)]
    assert curve_points(gappy["epochs"], positions, 2, "val_accuracy") == []  # never scored: no curve
    assert len(curve_points(gappy["epochs"], positions, 2, "loss")) == 3
    plot_training_curves(gappy, tmp_path / "training_curves.png")
    assert (tmp_path / "training_curves.png").stat().st_size > 0


def test_shifted_views_move_the_content_one_pixel_each_way_and_reflect_the_edge():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    down_right, up_left = shifted_views(images, 1)
    assert down_right.shape == up_left.shape == images.shape
    np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
    np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
    np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])  # row -1 reflects row 1


class PixelLogits:
    """A stand-in model whose 3 logits are three pixels of the image: every view gives other logits."""

    def predict(self, images, batch_size, verbose):
        return images[:, 0, :3, 0].astype(np.float32) / 10.0


def test_test_time_views_are_weighted_as_airbench_weights_them():
    images = np.random.default_rng(0).integers(0, 255, size=(5, 4, 4, 1), dtype=np.uint8)
    model = PixelLogits()
    one = predict_probabilities(model, images, 2, tta_flip=False)
    np.testing.assert_allclose(one, softmax(model.predict(images, 2, 0).astype(np.float64)))

    def mirrored_pair(view):
        return (predict_probabilities(model, view, 2, False) + predict_probabilities(model, view[:, :, ::-1], 2, False)) / 2

    down_right, up_left = shifted_views(images, 1)
    expected = 0.5 * mirrored_pair(images) + 0.25 * mirrored_pair(down_right) + 0.25 * mirrored_pair(up_left)
    averaged, as_is = predict_with_views(model, images, 2, tta_flip=True, tta_translate=1)
    np.testing.assert_allclose(averaged, expected)
    np.testing.assert_allclose(as_is, one)  # evaluate's single_view_accuracy, from the same pass
    assert not np.allclose(expected, one)  # the views do change the answer here
