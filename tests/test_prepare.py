"""prepare: what it writes, the reader gives back exactly; splits are stratified and seeded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cifar100_dvc.images import decode_image, to_rgb_uint8
from cifar100_dvc.records import DatasetInfo, read_arrays, read_split
from cifar100_dvc.synthetic import COARSE_NAMES, FINE_NAMES, hub_fine_names, make_rows, write_hub_dataset
from stages.prepare import ChannelSums, fix_class_names, stratified_split


def decoded_rows(rows):
    images = np.stack([to_rgb_uint8(decode_image(row.encoded))[0] for row in rows])
    return images, np.array([row.coarse_label for row in rows])


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 20)
    train, val = stratified_split(labels, 0.25, np.random.default_rng(3))
    assert len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val])) == list(range(200))
    assert np.bincount(labels[val]).tolist() == [5] * 10
    again_train, again_val = stratified_split(labels, 0.25, np.random.default_rng(3))
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    other_train, _ = stratified_split(labels, 0.25, np.random.default_rng(4))
    assert not np.array_equal(train, other_train)


def test_streamed_channel_stats_equal_numpy():
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    sums = ChannelSums()
    for start in range(0, 50, 7):  # as prepare adds images while it writes them
        sums.add(images[start : start + 7])
    mean, std = sums.mean_and_std()
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-9)


def test_reader_gives_back_bit_identical_pixels_and_labels(prepared_paths):
    train_rows, test_rows = make_rows(600, seed=1, odd_every=7), make_rows(200, seed=2, odd_every=9)
    source_images, source_labels = decoded_rows(train_rows)
    train_index, val_index = stratified_split(source_labels, 0.1, np.random.default_rng(0))
    for split, (expected_images, expected_labels) in {
        "train": (source_images[train_index], source_labels[train_index]),
        "val": (source_images[val_index], source_labels[val_index]),
        "test": decoded_rows(test_rows),
    }.items():
        images, labels = read_arrays(prepared_paths.prepared_dir, split)
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(images, expected_images, err_msg=split)
        np.testing.assert_array_equal(labels, expected_labels, err_msg=split)


def test_dataset_json_describes_the_shards(prepared_paths):
    info = DatasetInfo.read(prepared_paths.prepared_dir)
    assert info.class_names == COARSE_NAMES  # from the dataset card, not hard-coded
    assert info.label_column == "coarse_label"
    assert {name: split.num_examples for name, split in info.splits.items()} == {"train": 540, "val": 60, "test": 200}
    assert info.splits["val"].class_counts == [3] * 20  # 30 per class, 10% held out
    assert len(info.splits["train"].shards) == 5  # ceil(540 / 128)
    train_images, _ = read_arrays(prepared_paths.prepared_dir, "train")
    mean, std = train_images.reshape(-1, 3).mean(axis=0), train_images.reshape(-1, 3).std(axis=0)
    np.testing.assert_allclose(info.mean_rgb, mean, rtol=1e-9)
    np.testing.assert_allclose(info.std_rgb, std, rtol=1e-9)
    # every 7th row from row 1 is odd: 6 modes then 2 sizes, in turn; counted per output split
    assert set(info.resized_images) == set(info.converted_modes) == {"train", "val", "test"}
    odd_sizes = sum(1 for i in range(600) if i % 7 == 1 and (i // 7) % 8 >= 6)
    assert info.resized_images["train"] + info.resized_images["val"] == odd_sizes
    modes = {mode for split in ("train", "val") for mode in info.converted_modes[split]}
    assert modes == {"L", "LA", "RGBA", "P", "I;16", "CMYK"}
    assert not info.test_from_train and info.test_fraction is None
    assert json.loads((prepared_paths.prepared_dir / "dataset.json").read_text())["splits"]["test"]["num_examples"] == 200


def test_reader_shuffles_deterministically_and_resumes_exactly(prepared_paths):
    def stream(skip=0):
        dataset = read_split(
            prepared_paths.prepared_dir, "train", 32, shuffle_seed=5, repeat=True, drop_remainder=True, skip_batches=skip
        )
        return [labels.numpy().tolist() for _, labels in dataset.take(40 - skip)]

    full = stream()
    assert full == stream()
    assert full[17:] == stream(skip=17)
    epoch_one, epoch_two = sum(full[:16], []), sum(full[16:32], [])
    assert epoch_one != epoch_two  # reshuffled every pass


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_reader_batches_keep_every_example_once(prepared_paths, split):
    info = DatasetInfo.read(prepared_paths.prepared_dir)
    batches = list(read_split(prepared_paths.prepared_dir, split, 64))
    assert sum(len(labels) for _, labels in batches) == info.splits[split].num_examples


def test_known_misnamings_are_fixed_only_in_their_column():
    assert fix_class_names(["crocodile", "cra"], "fine_label") == (["crocodile", "crab"], {"cra": "crab"})
    assert fix_class_names(["crocodile", "cra"], "coarse_label") == (["crocodile", "cra"], {})
    assert fix_class_names(["cra", "crab"], "fine_label") == (["cra", "crab"], {})  # never two classes "crab"


def test_dataset_json_names_crab_where_the_hub_card_says_cra(tmp_path, caplog):
    from cifar100_dvc.params import FetchParams, PrepareParams
    from cifar100_dvc.paths import ProjectPaths
    from stages import fetch, prepare

    assert hub_fine_names()[26] == "cra"  # the synthetic card carries the hub's typo
    splits = {"train": make_rows(200, 1), "test": make_rows(100, 2)}
    dataset = write_hub_dataset(tmp_path / "dataset", splits, class_names={"fine_label": hub_fine_names()})
    paths = ProjectPaths(tmp_path / "project")
    fetch.run(FetchParams(dataset=str(dataset)), paths)
    with caplog.at_level(logging.INFO, logger="stages.prepare"):
        prepare.run(PrepareParams(label="fine_label", val_fraction=0.5, examples_per_shard=1000), paths)
    written = json.loads((paths.prepared_dir / "dataset.json").read_text())
    assert written["class_names"] == FINE_NAMES[:26] + ["crab"] + FINE_NAMES[27:]
    assert written["renamed_classes"] == {"cra": "crab"}
    assert "class 'cra' of fine_label renamed 'crab'" in caplog.text


@pytest.mark.slow
def test_two_prepare_processes_write_the_same_bytes(tmp_path, hub_dataset):
    # Each process orders a record's protobuf map its own way unless asked: same pixels, other bytes,
    # another DVC hash, and every later stage would run again for nothing.
    from cifar100_dvc.scratch import TINY_PARAMS, make_project, run_stage

    shards = []
    for name in ("first", "second"):
        root = make_project(tmp_path / name, hub_dataset, **TINY_PARAMS)
        for stage in ("fetch", "prepare"):
            assert run_stage(root, stage).returncode == 0
        prepared = root / "data" / "prepared"
        shards.append({path.name: path.read_bytes() for path in sorted(prepared.iterdir())})
    assert shards[0] == shards[1]


SERIALIZE = "import sys; import numpy as np; from cifar100_dvc.records import serialize_example; " + (
    "sys.stdout.write(serialize_example(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 7).hex())"
)


@pytest.mark.slow
def test_a_record_is_the_same_bytes_in_every_process():
    import subprocess
    import sys

    from cifar100_dvc.paths import REPO_ROOT

    seen = {
        subprocess.run([sys.executable, "-c", SERIALIZE], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(6)
    }
    assert len(seen) == 1  # without deterministic serialization, two orders came up in three processes
