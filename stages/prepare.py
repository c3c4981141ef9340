"""DVC stage ``prepare``: data/raw -> TFRecord shards of 32x32 RGB uint8 images in data/prepared.

Splits: ``train`` and ``val`` (carved from the raw train split, stratified by class, seeded)
and ``test`` (the raw test split, never used for model selection). ``dataset.json`` records
the class names from the dataset's own features (with the known misnamings of
``KNOWN_CLASS_NAME_FIXES`` corrected, and which ones were), counts per split and class, the
train split's per-channel mean and standard deviation, and the shard list.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, atomic_output, progress, run_main
from cifar100_dvc.images import IMAGE_SHAPE, decode_image, find_image_column, to_rgb_uint8
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
class DecodedSplit:
    images_uint8: np.ndarray  # [N, 32, 32, 3]
    labels: np.ndarray  # [N] int64
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


def channel_stats(images_uint8: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of [N, H, W, 3] pixels, in 0..255 units.

    Sums are exact integers, accumulated in chunks so memory stays at one chunk of int64.
    """
    count = images_uint8.shape[0] * images_uint8.shape[1] * images_uint8.shape[2]
    total = np.zeros(3, np.int64)
    total_squares = np.zeros(3, np.int64)
    for start in range(0, len(images_uint8), chunk):
        pixels = images_uint8[start : start + chunk].reshape(-1, 3).astype(np.int64)
        total += pixels.sum(axis=0)
        total_squares += (pixels * pixels).sum(axis=0)
    mean = total / count
    variance = np.maximum(total_squares / count - mean * mean, 0.0)
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


def decode_split(dataset, split: str, image_column: str, label_column: str, num_classes: int) -> DecodedSplit:
    """Decode every row of ``dataset`` to 32x32 RGB uint8; raise StageError naming a bad row."""
    from datasets import Image

    num_rows = dataset.num_rows
    if num_rows == 0:
        raise StageError(f"split {split!r} is empty")
    raw_rows = dataset.select_columns([image_column, label_column]).cast_column(image_column, Image(decode=False))
    decoded = DecodedSplit(np.empty((num_rows, *IMAGE_SHAPE), np.uint8), np.empty(num_rows, np.int64))
    rows = ((row, item) for row, item in enumerate(_iter_rows(raw_rows, image_column, label_column)))
    for row, (encoded, label) in progress(rows, num_rows, f"prepare {split}", every=10_000):
        if label is None or not 0 <= label < num_classes:
            raise StageError(f"split {split!r}, row {row}: label {label!r} out of range 0..{num_classes - 1}")
        try:
            image = decode_image(_image_bytes(encoded))
        except ValueError as error:
            raise StageError(f"split {split!r}, row {row}: {image_column} is {error}") from None
        if image.mode != "RGB":
            decoded.converted_modes[image.mode] += 1
        decoded.images_uint8[row], was_resized = to_rgb_uint8(image)
        decoded.resized += was_resized
        decoded.labels[row] = label
    return decoded


def _iter_rows(raw_rows, image_column: str, label_column: str):
    for batch in raw_rows.iter(batch_size=_READ_BATCH):
        yield from zip(batch[image_column], batch[label_column])


def _image_bytes(encoded) -> bytes:
    if encoded is None:
        raise ValueError("missing")
    if encoded.get("bytes") is not None:
        return encoded["bytes"]
    if encoded.get("path"):
        return Path(encoded["path"]).read_bytes()
    raise ValueError("missing")


def run(params: PrepareParams, paths: ProjectPaths) -> DatasetInfo:
    """Decode, split and shard data/raw into data/prepared; return what dataset.json records."""
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

    decoded = {}
    for split in ("train", "test"):
        dataset = raw[split]
        if params.limit is not None:
            dataset = dataset.select(range(min(params.limit, dataset.num_rows)))
        decoded[split] = decode_split(dataset, split, image_column, params.label, len(class_names))

    rng = np.random.default_rng(params.seed)
    train_indices, val_indices = stratified_split(decoded["train"].labels, params.val_fraction, rng)
    if len(train_indices) == 0:
        raise StageError(f"split 'train' is empty after holding out prepare.val_fraction={params.val_fraction}")
    split_examples = {
        "train": (decoded["train"].images_uint8[train_indices], decoded["train"].labels[train_indices]),
        "val": (decoded["train"].images_uint8[val_indices], decoded["train"].labels[val_indices]),
        "test": (decoded["test"].images_uint8, decoded["test"].labels),
    }
    mean_rgb, std_rgb = channel_stats(split_examples["train"][0])

    with atomic_output(paths.prepared_dir) as staged:
        staged.mkdir()
        split_infos = {}
        for split, (images_uint8, labels) in split_examples.items():
            shards = write_shards(staged, split, zip(images_uint8, labels), len(labels), params.examples_per_shard)
            counts = np.bincount(labels, minlength=len(class_names)).tolist()
            split_infos[split] = SplitInfo(num_examples=int(len(labels)), class_counts=counts, shards=shards)
        info = DatasetInfo(
            label_column=params.label,
            class_names=class_names,
            renamed_classes=renamed_classes,
            image_shape=list(IMAGE_SHAPE),
            mean_rgb=mean_rgb,
            std_rgb=std_rgb,
            splits=split_infos,
            resized_images={split: decoded[split].resized for split in decoded},
            converted_modes={split: dict(decoded[split].converted_modes) for split in decoded},
        )
        info.write(staged)

    seconds = time.perf_counter() - started
    total = sum(split.num_examples for split in info.splits.values())
    log.info(
        "wrote %s: %s examples in %.1f s (%.0f images/s); resized %s; converted modes %s",
        paths.prepared_dir,
        {name: split.num_examples for name, split in info.splits.items()},
        seconds,
        total / seconds,
        info.resized_images,
        info.converted_modes,
    )
    return info


def main() -> None:
    paths = ProjectPaths()
    run_main("prepare", lambda: run(load_params(paths.params_file).prepare, paths))


if __name__ == "__main__":
    main()
