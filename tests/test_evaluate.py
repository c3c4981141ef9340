"""evaluate's numbers are exactly right for predictions we know."""

from __future__ import annotations

import math

import numpy as np

from stages.evaluate import class_accuracy, compute_metrics, confusion_matrix, softmax


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
    assert math.isclose(metrics["loss"], expected_loss, rel_tol=1e-12)


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
