"""TFRecord shards: how ``prepare`` writes them and the one fast reader ``train``/``evaluate`` use.

A record holds one image's raw uint8 pixels (size*size*3 bytes, no codec: decoding is a memcpy)
and its integer label. ``dataset.json`` beside the shards describes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from cifar100_dvc.common import StageError

SPLITS = ("train", "val", "test")
_READ_BUFFER_BYTES = 4 << 20
INFO_FILE = "dataset.json"
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


@dataclass(frozen=True)
class SplitInfo:
    num_examples: int
    class_counts: list[int]  # examples per class, in label order
    shards: list[str]  # file names, relative to the prepared directory


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` records about the prepared data."""

    label_column: str
    class_names: list[str]
    image_shape: list[int]
    mean_rgb: list[float]  # train split, 0..255 units
    std_rgb: list[float]
    splits: dict[str, SplitInfo]
    resized_images: dict[str, int]  # per split: images that were not image_shape's size
    converted_modes: dict[str, dict[str, int]]  # per split: non-RGB source modes and counts
    renamed_classes: dict[str, str] = field(default_factory=dict)  # name in the dataset's card -> name in class_names
    test_from_train: bool = False  # the dataset had no test split: test was carved from train
    test_fraction: float | None = None  # the share of each class of train it took, when it was

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def write(self, directory: Path) -> None:
        (directory / INFO_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> DatasetInfo:
        path = directory / INFO_FILE
        try:
            raw = json.loads(path.read_text())
            raw["splits"] = {name: SplitInfo(**split) for name, split in raw["splits"].items()}
            return cls(**raw)
        except FileNotFoundError:
            raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)") from None
        except (ValueError, TypeError, KeyError) as error:
            raise StageError(f"{path} is not a valid dataset description: {error}") from None


def serialize_example(image_uint8: np.ndarray, label: int) -> bytes:
    """One tf.train.Example with the raw pixel bytes and the label."""
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_uint8.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    # deterministic: map entries in key order. Otherwise protobuf orders them per process, and the same
    # pixels would give other bytes, so another DVC hash, on every run.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def write_shards(
    directory: Path,
    split: str,
    examples: Iterable[tuple[np.ndarray, int]],
    num_examples: int,
    examples_per_shard: int,
) -> list[str]:
    """Write ``examples`` as ``{split}-NNNNN-of-MMMMM.tfrecord`` files; return their names."""
    num_shards = max(1, -(-num_examples // examples_per_shard))
    names = [f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord" for index in range(num_shards)]
    writer = None
    for position, (image_uint8, label) in enumerate(examples):
        if position % examples_per_shard == 0:
            if writer is not None:
                writer.close()
            writer = tf.io.TFRecordWriter(str(directory / names[position // examples_per_shard]))
        writer.write(serialize_example(image_uint8, label))
    if writer is not None:
        writer.close()
    return names


def parse_batch(serialized: tf.Tensor, image_shape: tuple[int, int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of serialized records -> (uint8 images [B, H, W, C], int32 labels [B])."""
    parsed = tf.io.parse_example(serialized, _FEATURES)
    images = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), (-1, *image_shape))
    return images, tf.cast(parsed["label"], tf.int32)


def read_split(
    prepared_dir: Path,
    split: str,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 50_000,
    repeat: bool = False,
    drop_remainder: bool = False,
    skip_batches: int = 0,
    batch_transform: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    cache: bool = True,
) -> tf.data.Dataset:
    """The shards of ``split`` as a dataset of (images uint8, labels int32) batches.

    Fast by construction: when shuffling, shards are read in parallel and interleaved
    (otherwise in stored order, shard after shard); the serialized
    records are cached in memory after the first pass; shuffling moves only byte strings;
    parsing and decoding happen once per batch; the next batches are prefetched.
    With ``shuffle_seed`` and ``repeat`` the stream is a pure function of the seed, so
    ``skip_batches`` resumes it exactly where a run of ``skip_batches`` steps stopped.
    ``batch_transform(images, position, example_ids)`` (augmentation) gets each batch's position
    in the stream, from which it can derive stateless randomness that a resumed run repeats, and
    each example's id (its place in the read order, 0..N-1: the same on every pass).
    """
    info = DatasetInfo.read(prepared_dir)
    if split not in info.splits:
        raise StageError(f"{prepared_dir}: no split {split!r} (have {sorted(info.splits)})")
    paths = [str(prepared_dir / name) for name in info.splits[split].shards]
    for path in paths:
        if not Path(path).is_file():
            raise StageError(f"{path} is missing: run the prepare stage again (dvc repro prepare)")
    if shuffle_seed is None:  # stored order: shard after shard
        records = tf.data.TFRecordDataset(paths, buffer_size=_READ_BUFFER_BYTES)
    else:  # several shards at once, their records interleaved (deterministically)
        records = tf.data.Dataset.from_tensor_slices(paths).interleave(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=max(1, min(len(paths), 8)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    # A known length lets Keras show progress and end evaluation without an "ran out of data" warning.
    records = records.apply(tf.data.experimental.assert_cardinality(info.splits[split].num_examples))
    records = records.enumerate()  # (example id, record): ids before any shuffle, so they stay with their record
    if cache:
        records = records.cache()
    if shuffle_seed is not None:
        records = records.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()
    batches = records.batch(batch_size, drop_remainder=drop_remainder)
    if skip_batches:
        batches = batches.skip(skip_batches)
    image_shape = tuple(info.image_shape)
    batches = batches.map(
        lambda example_ids, serialized: (*parse_batch(serialized, image_shape), example_ids), num_parallel_calls=tf.data.AUTOTUNE
    )
    if batch_transform is None:
        batches = batches.map(lambda images, labels, example_ids: (images, labels))
    else:
        batches = batches.enumerate(start=skip_batches).map(
            lambda position, batch: (batch_transform(batch[0], position, batch[2]), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return batches.prefetch(tf.data.AUTOTUNE)


def read_arrays(
    prepared_dir: Path, split: str, batch_size: int = 4096, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All of ``split`` (or its first ``limit`` examples) in memory, in stored order:
    (uint8 images [N, size, size, 3], int32 labels [N])."""
    images, labels = [], []
    for batch_images, batch_labels in read_split(prepared_dir, split, batch_size, cache=False):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        if limit is not None and sum(map(len, labels)) >= limit:
            images, labels = [np.concatenate(images)[:limit]], [np.concatenate(labels)[:limit]]
            break
    if not images:
        shape = DatasetInfo.read(prepared_dir).image_shape
        return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images), np.concatenate(labels)
