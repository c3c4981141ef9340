"""DVC stage ``prepare``: data/raw -> TFRecord shards of square RGB uint8 images in data/prepared.

Splits: ``train`` and ``val`` (carved from the raw train split, stratified by class, seeded)
and ``test`` (the raw test split, never used for model selection; for a dataset with only a train
split, carved from it first, stratified and seeded, ``prepare.test_fraction`` of each class).
Every image becomes ``prepare.image_size`` pixels square (``to_rgb_uint8``: resized on its shorter
side, centre-cropped). ``dataset.json`` records the class names from the dataset's own features
(with the known misnamings of ``KNOWN_CLASS_NAME_FIXES`` corrected, and which ones were), counts
per split and class, where the test split came from, the images resized and converted per split,
the train split's per-channel mean and standard deviation, and the shard list.

It streams: the labels are read first (one column) to decide every split, then each output split's
rows are decoded batch by batch and written, so memory holds one batch of images whatever the
image size or the dataset's length.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, atomic_output, progress, run_main
from cifar100_dvc.images import SOURCE_FILE_COLUMN, decode_image, find_image_column, to_rgb_uint8
from cifar100_dvc.params import PrepareParams, load_params
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.records import DatasetInfo, SplitInfo, write_shards

log = logging.getLogger(__name__)

_READ_BATCH = 1000  # rows per Arrow read while decoding

# (label column, name in the dataset's features) -> the class's real name. Class names travel
# from the features into dataset.json, the model, the plots and predict, so a typo in a dataset
# card would reach every user; corrected here, in one visible place, and logged when applied.
KNOWN_CLASS_NAME_FIXES = {
    ("fine_label", "cra"): "crab",  # uoft-cs/cifar100's card (and dataset_infos.json) name fine class 26 "cra"
}


@dataclass
class SplitStats:
    """What writing one output split saw: images resized and non-RGB modes converted."""

    resized: int = 0
    converted_modes: Counter = field(default_factory=Counter)


def stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train indices in shuffled order, val indices sorted): round(val_fraction * n_c) of each class c to val."""
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = int(round(len(members) * val_fraction))
        val_parts.append(members[:num_val])
        train_parts.append(members[num_val:])
    train = rng.permutation(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    return train, val


@dataclass
class ChannelSums:
    """Exact per-channel pixel sums of a stream of uint8 images, for their mean and standard deviation."""

    count: int = 0
    total: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    total_squares: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))

    def add(self, images_uint8: np.ndarray) -> None:
        pixels = images_uint8.reshape(-1, 3).astype(np.int64)
        self.count += len(pixels)
        self.total += pixels.sum(axis=0)
        self.total_squares += (pixels * pixels).sum(axis=0)

    def mean_and_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) standard deviation, in 0..255 units."""
        mean = self.total / max(1, self.count)
        variance = np.maximum(self.total_squares / max(1, self.count) - mean * mean, 0.0)
        return mean.tolist(), np.sqrt(variance).tolist()


def class_names_for(features, label_column: str) -> list[str]:
    """The names of ``label_column``'s classes, from the dataset's features."""
    from datasets import ClassLabel

    class_columns = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    if label_column not in features:
        raise StageError(f"prepare.label {label_column!r} is not a column of the dataset; class-label columns: {class_columns}")
    if label_column not in class_columns:
        raise StageError(f"prepare.label {label_column!r} is not a class-label column; class-label columns: {class_columns}")
    return list(features[label_column].names)


def fix_class_names(class_names: list[str], label_column: str) -> tuple[list[str], dict[str, str]]:
    """(``class_names`` with ``KNOWN_CLASS_NAME_FIXES`` applied, {old name: new name} of each fix applied)."""
    fixed, renamed = [], {}
    for name in class_names:
        new_name = KNOWN_CLASS_NAME_FIXES.get((label_column, name))
        if new_name is not None and new_name not in class_names:  # never create a duplicate name
            renamed[name] = new_name
            name = new_name
        fixed.append(name)
    return fixed, renamed


def split_labels(dataset, split: str, label_column: str, num_classes: int) -> np.ndarray:
    """The labels of every row (int64), read from their column alone; StageError naming the first row out of range."""
    labels = list(dataset.select_columns([label_column])[label_column])
    for row, label in enumerate(labels):
        if label is None or not 0 <= label < num_classes:
            raise StageError(f"split {split!r}, row {row}: label {label!r} out of range 0..{num_classes - 1}")
    return np.asarray(labels, np.int64)


def decoded_rows(dataset, rows: np.ndarray, split: str, image_column: str, image_size: int, stats: SplitStats):
    """(image uint8 [S, S, 3], raw row) of ``rows`` of ``dataset``, in that order, decoded a batch at a time;
    StageError naming the raw split, the row and, when the dataset records one, its file."""
    from datasets import Image

    columns = [image_column, *([SOURCE_FILE_COLUMN] if SOURCE_FILE_COLUMN in dataset.column_names else [])]
    images = dataset.select_columns(columns).cast_column(image_column, Image(decode=False)).select(rows)
    for start, batch in zip(range(0, len(rows), _READ_BATCH), images.iter(batch_size=_READ_BATCH)):
        files = batch.get(SOURCE_FILE_COLUMN) or [None] * len(batch[image_column])
        for row, encoded, file in zip(rows[start : start + _READ_BATCH], batch[image_column], files):
            try:
                image = decode_image(_image_bytes(encoded))
            except (OSError, ValueError) as error:
                source = f" ({file})" if file else ""
                raise StageError(f"split {split!r}, row {row}{source}: {image_column} is {error}") from None
            if image.mode != "RGB":
                stats.converted_modes[image.mode] += 1
            pixels, was_resized = to_rgb_uint8(image, image_size)
            stats.resized += was_resized
            yield pixels, int(row)


def _image_bytes(encoded) -> bytes:
    if encoded is None:
        raise ValueError("missing")
    if encoded.get("bytes") is not None:
        return encoded["bytes"]
    if encoded.get("path"):
        return Path(encoded["path"]).read_bytes()
    raise ValueError("missing")


@dataclass(frozen=True)
class SplitPlan:
    """Which rows of which raw split make each output split, decided from the labels alone."""

    sources: dict[str, tuple[str, np.ndarray]]  # output split -> (raw split, its rows in writing order)
    test_from_train: bool


def plan_splits(labels: dict[str, np.ndarray], params: PrepareParams) -> SplitPlan:
    """Stratified, seeded splits: ``test`` is the raw test split when there is one, else
    ``test_fraction`` of each class of train; ``val`` is ``val_fraction`` of each class of the rest."""
    rng = np.random.default_rng(params.seed)
    train_rows = np.arange(len(labels["train"]))
    test_from_train = "test" not in labels
    if test_from_train:
        train_rows, test_rows = stratified_split(labels["train"], params.test_fraction, rng)
        test = ("train", test_rows)
    else:
        test = ("test", np.arange(len(labels["test"])))
    kept, val = stratified_split(labels["train"][train_rows], params.val_fraction, rng)
    if len(kept) == 0:
        raise StageError(f"split 'train' is empty after holding out prepare.val_fraction={params.val_fraction}")
    if len(test[1]) == 0:
        raise StageError(f"split 'test' is empty: prepare.test_fraction={params.test_fraction} of each class is less than 1")
    return SplitPlan({"train": ("train", train_rows[kept]), "val": ("train", train_rows[val]), "test": test}, test_from_train)


def run(params: PrepareParams, paths: ProjectPaths) -> DatasetInfo:
    """Decode, split and shard data/raw into data/prepared, streaming; return what dataset.json records."""
    import datasets

    started = time.perf_counter()
    if not paths.raw_dir.is_dir():
        raise StageError(f"{paths.raw_dir} not found: run the fetch stage first (dvc repro fetch)")
    try:
        raw = datasets.load_from_disk(str(paths.raw_dir))
    except Exception as error:  # corrupt or foreign directory
        raise StageError(f"{paths.raw_dir} is not a saved dataset ({type(error).__name__}: {error}); run fetch again") from None
    features = raw["train"].features
    image_column = find_image_column(features)
    class_names, renamed_classes = fix_class_names(class_names_for(features, params.label), params.label)
    for old_name, new_name in renamed_classes.items():
        log.info("class %r of %s renamed %r: a known misnaming in the dataset's card", old_name, params.label, new_name)

    sources = {}
    for split in ("train", "test"):
        if split in raw:
            dataset = raw[split]
            if dataset.num_rows == 0:
                raise StageError(f"split {split!r} is empty")
            sources[split] = dataset.select(range(min(params.limit, dataset.num_rows))) if params.limit else dataset
    labels = {split: split_labels(dataset, split, params.label, len(class_names)) for split, dataset in sources.items()}
    plan = plan_splits(labels, params)
    if plan.test_from_train:
        log.info("the dataset has no test split: test is %.0f%% of each class of train", 100 * params.test_fraction)

    with atomic_output(paths.prepared_dir) as staged:
        staged.mkdir()
        split_infos, stats, train_sums = {}, {}, ChannelSums()
        for split, (source, rows) in plan.sources.items():
            stats[split] = SplitStats()
            pixels = decoded_rows(sources[source], rows, source, image_column, params.image_size, stats[split])
            pixels = progress(pixels, len(rows), f"prepare {split}", every=10_000)
            if split == "train":
                pixels = _summed(pixels, train_sums)
            examples = ((image, labels[source][row]) for image, row in pixels)
            shards = write_shards(staged, split, examples, len(rows), params.examples_per_shard)
            counts = np.bincount(labels[source][rows], minlength=len(class_names)).tolist()
            split_infos[split] = SplitInfo(num_examples=int(len(rows)), class_counts=counts, shards=shards)
        mean_rgb, std_rgb = train_sums.mean_and_std()
        info = DatasetInfo(
            label_column=params.label,
            class_names=class_names,
            renamed_classes=renamed_classes,
            image_shape=[params.image_size, params.image_size, 3],
            mean_rgb=mean_rgb,
            std_rgb=std_rgb,
            splits=split_infos,
            resized_images={split: stats[split].resized for split in stats},
            converted_modes={split: dict(stats[split].converted_modes) for split in stats},
            test_from_train=plan.test_from_train,
            test_fraction=params.test_fraction if plan.test_from_train else None,
        )
        info.write(staged)

    seconds = time.perf_counter() - started
    total = sum(split.num_examples for split in info.splits.values())
    log.info(
        "wrote %s: %s examples of %dx%d in %.1f s (%.0f images/s); resized %s; converted modes %s",
        paths.prepared_dir,
        {name: split.num_examples for name, split in info.splits.items()},
        params.image_size,
        params.image_size,
        seconds,
        total / seconds,
        info.resized_images,
        info.converted_modes,
    )
    return info


def _summed(pixels, sums: ChannelSums):
    """``pixels`` (image, row) passed through, each image added to ``sums``."""
    for image, row in pixels:
        sums.add(image)
        yield image, row


def main() -> None:
    paths = ProjectPaths()
    run_main("prepare", lambda: run(load_params(paths.params_file).prepare, paths))


if __name__ == "__main__":
    main()
