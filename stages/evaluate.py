"""DVC stage ``evaluate``: test-split metrics of models/model.keras, and the plots a user wants.

metrics/metrics.json: accuracy, top-5 accuracy, cross-entropy and the example count on ``test``,
with the test-time views of ``evaluate.tta_flip`` / ``tta_translate``, and ``single_view_accuracy``
(the image as is, one view: what those views add); the same under ``val``, on which recipes are
chosen. ``cross_entropy`` is plain (no label smoothing) and of the probabilities actually
predicted (averaged over the views); it is not comparable to the training loss that dvclive and
models/history.json record (label-smoothed, one view, on train and val).
metrics/class_accuracy.json: accuracy of every class. plots/: training curves, a confusion
matrix (PNG, and the rows DVC's confusion template reads), classes ranked by accuracy, and a
grid of test images with true and predicted labels.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, atomic_output, run_main
from cifar100_dvc.inference import load_model, predict_with_views
from cifar100_dvc.params import EvaluateParams, load_params
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.records import DatasetInfo, read_arrays

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure pieces


def compute_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1/top-5 accuracy and mean plain (unsmoothed) cross-entropy of predicted class probabilities [N, C]."""
    num_examples = len(labels)
    k = min(5, probabilities.shape[1])
    top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    picked = probabilities[np.arange(num_examples), labels]
    return {
        "accuracy": float(np.mean(top_k[:, 0] == labels)),
        "top5_accuracy": float(np.mean((top_k == labels[:, None]).any(axis=1))),
        "cross_entropy": float(np.mean(-np.log(np.clip(picked, 1e-12, 1.0)))),  # not "loss": see the module doc
        "num_examples": int(num_examples),
    }


def summary_line(metrics: dict) -> str:
    """``accuracy 88.62% (one view 87.54%), top-5 99.60%`` of one split's metrics (``-`` without any)."""
    if "accuracy" not in metrics:
        return "-"
    return (
        f"accuracy {metrics['accuracy']:.2%} (one view {metrics['single_view_accuracy']:.2%}), "
        f"top-5 {metrics['top5_accuracy']:.2%}, {metrics['num_examples']} images"
    )


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def class_accuracy(counts: np.ndarray) -> np.ndarray:
    """Per-class recall from a confusion matrix; NaN for a class with no test example."""
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(counts) / np.maximum(totals, 1), np.nan)


# ---------------------------------------------------------------- plots


CUT_SHORT_LABEL = "cut short by the time budget"


def epoch_positions(history: dict) -> tuple[list[float], bool]:
    """(x of each history row in epochs, whether the last row's epoch was cut short by the time budget).

    A row's optional ``epoch_fraction`` (share of the epoch's steps that ran, 1.0 if absent)
    puts a cut-short epoch at its fractional position; without it, the summary's
    ``stopped_by_time_budget`` still marks the last epoch as cut short. The networks of an
    ensemble (rows with a ``member``) follow one another on the axis, in the order trained.
    """
    rows = history["epochs"]
    positions: list[float] = []
    member, offset = None, 0.0
    for row in rows:
        if row.get("member") != member:  # the next network starts where the one before ended
            member, offset = row.get("member"), positions[-1] if positions else 0.0
        positions.append(offset + row["epoch"] - 1 + row.get("epoch_fraction", 1.0))
    cut_short = bool(rows) and bool(history.get("stopped_by_time_budget")) and rows[-1].get("epoch_fraction", 0.0) < 1.0
    return positions, cut_short


def curve_points(rows: list[dict], positions: list[float], full: int, key: str) -> list[tuple[float, float, bool]]:
    """(x, value, whether the epoch is whole) of the history ``rows`` that hold ``key``: val is scored
    only every few epochs with ``train.validation_freq``, so its curve joins the epochs that have it.
    ``full``: how many rows are whole epochs (the last may be cut short by the time budget)."""
    return [(x, row[key], index < full) for index, (x, row) in enumerate(zip(positions, rows)) if row.get(key) is not None]


def plot_training_curves(history: dict, path: Path) -> None:
    """Loss and accuracy per epoch; an epoch cut short by the time budget is a hollow marker at its fraction."""
    import matplotlib.pyplot as plt

    positions, cut_short = epoch_positions(history)
    full = len(positions) - 1 if cut_short else len(positions)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "top-1 accuracy")):
        for prefix, label in (("", "train"), ("val_", "val")):
            points = curve_points(history["epochs"], positions, full, prefix + metric)
            if not points:
                continue
            (line,) = axis.plot([x for x, _, _ in points], [value for _, value, _ in points], label=label)
            whole = [(x, value) for x, value, is_whole in points if is_whole]
            axis.plot([x for x, _ in whole], [value for _, value in whole], "o", color=line.get_color())
            if not points[-1][2]:  # the epoch cut short by the time budget
                axis.plot(points[-1][0], points[-1][1], "o", color=line.get_color(), markerfacecolor="none")
        if cut_short:
            axis.plot([], [], "o", color="gray", markerfacecolor="none", label=CUT_SHORT_LABEL)
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    epochs = f"{positions[-1]:.2f}".rstrip("0").rstrip(".") if positions else "0"
    note = f" ({CUT_SHORT_LABEL})" if cut_short else ""
    networks = f" over {history['ensemble']} networks trained in turn" if history.get("ensemble", 1) > 1 else ""
    figure.suptitle(f"{history['arch']}: {epochs} epochs{networks}{note}, {history['train_seconds']:.0f} s")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


CONFUSION_SHARE_FLOOR = 1e-3  # log colour scale from 0.1% to 100% of a true class


def confusion_colors(counts: np.ndarray, cmap_name: str = "viridis"):
    """(RGBA [C, C, 4] of each cell's share of its true class, the colour map, the norm).

    The scale is logarithmic so that rare confusions stay visible at 100 classes; a share of
    0 (no prediction) cannot sit on it, so it takes the floor's colour, the lowest, rather
    than rendering blank like missing data.
    """
    import matplotlib
    from matplotlib.colors import LogNorm

    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cmap = matplotlib.colormaps[cmap_name]
    norm = LogNorm(vmin=CONFUSION_SHARE_FLOOR, vmax=1.0, clip=True)
    return cmap(norm(np.maximum(shares, CONFUSION_SHARE_FLOOR))), cmap, norm


def plot_confusion_matrix(counts: np.ndarray, class_names: list[str], path: Path) -> None:
    """Row-normalized, log-colored (zero at the lowest colour), one labeled tick per class: readable at 100 classes."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    num_classes = len(class_names)
    side = max(6.0, num_classes * 0.16)
    colors, cmap, norm = confusion_colors(counts)
    figure, axis = plt.subplots(figsize=(side + 2, side))
    axis.imshow(colors, interpolation="nearest")
    font = 10 if num_classes <= 20 else 6
    axis.set_xticks(range(num_classes), class_names, rotation=90, fontsize=font)
    axis.set_yticks(range(num_classes), class_names, fontsize=font)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix: share of each true class predicted as each class")
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axis, fraction=0.03, extend="min")
    colorbar.set_label(f"share of the true class (log scale; {CONFUSION_SHARE_FLOOR:.1%} or less, including 0: lowest colour)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_class_accuracy(accuracy: np.ndarray, class_names: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    order = np.argsort(np.nan_to_num(accuracy, nan=-1.0))[::-1]
    figure, axis = plt.subplots(figsize=(max(6.0, len(order) * 0.14), 4.5))
    axis.bar(range(len(order)), np.nan_to_num(accuracy[order]), color="tab:blue")
    axis.set_xticks(range(len(order)), [class_names[i] for i in order], rotation=90, fontsize=6 if len(order) > 20 else 9)
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    axis.set_title("classes ranked by test accuracy")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_samples(
    images_uint8: np.ndarray, labels: np.ndarray, predictions: np.ndarray, class_names: list[str], path: Path
) -> None:
    """A grid of test images titled 'true / predicted', green when right and red when wrong."""
    import matplotlib.pyplot as plt

    count = len(images_uint8)
    columns = int(np.ceil(np.sqrt(count)))
    grid_rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(grid_rows, columns, figsize=(columns * 1.6, grid_rows * 1.8), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, label, predicted in zip(axes.flat, images_uint8, labels, predictions):
        axis.imshow(image, interpolation="nearest")
        axis.set_title(
            f"{class_names[label]}\n{class_names[predicted]}", fontsize=7, color="green" if label == predicted else "red"
        )
    figure.suptitle("test images: true (top) / predicted (bottom)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- the stage


def split_metrics(model, images_uint8, labels, params: EvaluateParams, num_classes: int, paths: ProjectPaths):
    """(metrics of one split with the configured test-time views plus its one-view accuracy, the probabilities)."""
    probabilities, single = predict_with_views(model, images_uint8, params.batch_size, params.tta_flip, params.tta_translate)
    if probabilities.shape[1] != num_classes:
        raise StageError(f"{paths.model_file} predicts {probabilities.shape[1]} classes but the data has {num_classes}: retrain")
    metrics = compute_metrics(probabilities, labels)
    metrics["single_view_accuracy"] = compute_metrics(single, labels)["accuracy"]  # what the extra views buy
    return metrics, probabilities


def run(params: EvaluateParams, paths: ProjectPaths) -> dict:
    """Evaluate on the test (and val) split; write metrics atomically and all plots; return the metrics."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    info = DatasetInfo.read(paths.prepared_dir)
    model = load_model(paths.model_file)
    images_uint8, labels = read_arrays(paths.prepared_dir, "test")
    if len(labels) == 0:
        raise StageError(f"{paths.prepared_dir}: the test split is empty")
    metrics, probabilities = split_metrics(model, images_uint8, labels, params, info.num_classes, paths)
    val_images_uint8, val_labels = read_arrays(paths.prepared_dir, "val")
    if len(val_labels):  # recipes are chosen on val, with the same test-time views as test
        metrics["val"] = split_metrics(model, val_images_uint8, val_labels, params, info.num_classes, paths)[0]
    predictions = probabilities.argmax(axis=1)
    counts = confusion_matrix(labels, predictions, info.num_classes)
    per_class = class_accuracy(counts)
    try:
        history = json.loads(paths.history_file.read_text())
    except (FileNotFoundError, ValueError) as error:
        raise StageError(f"{paths.history_file} is missing or invalid ({error}): run train again") from None

    with atomic_output(paths.plots_dir) as staged:
        staged.mkdir()
        plot_training_curves(history, staged / "training_curves.png")
        plot_confusion_matrix(counts, info.class_names, staged / "confusion_matrix.png")
        plot_class_accuracy(per_class, info.class_names, staged / "class_accuracy.png")
        shown = min(params.sample_images, len(labels))
        plot_samples(images_uint8[:shown], labels[:shown], predictions[:shown], info.class_names, staged / "samples.png")
        with (staged / "confusion.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["actual", "predicted"])
            writer.writerows((info.class_names[a], info.class_names[p]) for a, p in zip(labels, predictions))
    with atomic_output(paths.class_accuracy_file) as staged:
        rows = [
            {"class": name, "accuracy": None if np.isnan(value) else round(float(value), 6)}
            for name, value in zip(info.class_names, per_class)
        ]
        staged.write_text(json.dumps(rows, indent=1) + "\n")
    with atomic_output(paths.metrics_file) as staged:
        staged.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("test: %s; val: %s (%s)", summary_line(metrics), summary_line(metrics.get("val", {})), paths.metrics_file)
    return metrics


def main() -> None:
    paths = ProjectPaths()
    run_main("evaluate", lambda: run(load_params(paths.params_file).evaluate, paths))


if __name__ == "__main__":
    main()
