"""Bad input gives a one-line error naming what and where, exit status 1, and no output."""

from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cifar100_dvc.scratch import TINY_PARAMS, make_project, run_stage, set_params
from cifar100_dvc.synthetic import make_rows, write_hub_dataset


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def dataset_with(tmp_path, train_rows, test_rows=None, **kwargs):
    return write_hub_dataset(tmp_path / "dataset", {"train": train_rows, "test": test_rows or make_rows(20, 9)}, **kwargs)


def fetched_project(tmp_path, dataset):
    root = make_project(tmp_path / "project", dataset, **TINY_PARAMS)
    result = run_stage(root, "fetch")
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_unreachable_hub_dataset_says_how_to_work_offline(tmp_path, hub_dataset):
    root = make_project(tmp_path / "project", hub_dataset, **TINY_PARAMS, **{"fetch.dataset": "no-such-user/no-such-dataset"})
    result = run_stage(root, "fetch")
    assert_one_line_error(
        result,
        "cannot load dataset 'no-such-user/no-such-dataset' from the hub (no such directory under the project root)",
        "point fetch.dataset at a local copy",
    )
    assert not (root / "data" / "raw").exists()


def test_missing_local_directory_is_named(tmp_path, hub_dataset):
    root = make_project(tmp_path / "project", hub_dataset, **TINY_PARAMS, **{"fetch.dataset": str(tmp_path / "nowhere")})
    assert_one_line_error(run_stage(root, "fetch"), f"fetch.dataset '{tmp_path / 'nowhere'}': no such directory")
    assert not (root / "data" / "raw").exists()


def test_a_queued_experiment_is_told_to_give_an_absolute_dataset_path(tmp_path, hub_dataset):
    # `dvc exp run --queue` runs in .dvc/tmp/exps/<copy>, where "../" points somewhere else.
    root = make_project(tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpq1", hub_dataset, **{"fetch.dataset": "../copy"})
    assert_one_line_error(
        run_stage(root, "fetch"),
        f"fetch.dataset '../copy': no such directory (looked for {root / '..' / 'copy'}: a relative path is taken from "
        "the project root, which for a queued experiment is a temporary copy: give an absolute path)",
    )


def test_missing_relative_directory_is_named_where_it_was_looked_for(tmp_path, hub_dataset):
    root = make_project(tmp_path / "project", hub_dataset, **{"fetch.dataset": "./data/copy"})
    assert_one_line_error(
        run_stage(root, "fetch"),
        f"fetch.dataset './data/copy': no such directory (looked for {root / 'data' / 'copy'}: "
        "a relative path is taken from the project root)",
    )
    assert not (root / "data" / "raw").exists()


def test_relative_local_directory_is_taken_from_the_project_root_not_the_working_directory(tmp_path, hub_dataset, monkeypatch):
    import shutil

    from cifar100_dvc.params import FetchParams
    from cifar100_dvc.paths import ProjectPaths
    from stages import fetch

    paths = ProjectPaths(tmp_path / "project")
    shutil.copytree(hub_dataset, paths.root / "datasets" / "mine")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    fetch.run(FetchParams(dataset="datasets/mine"), paths)
    assert (paths.raw_dir / "train").is_dir() and (paths.raw_dir / "test").is_dir()


@pytest.mark.parametrize("dataset", ["./data/copy", "../copy", "data/copy/", "data/sets/copy", "~/no-such-dataset-dir"])
def test_a_missing_path_is_never_taken_for_a_hub_id(tmp_path, dataset):
    from cifar100_dvc.common import StageError
    from cifar100_dvc.paths import local_directory

    with pytest.raises(StageError, match=f"^fetch.dataset '{re.escape(dataset)}': no such directory"):
        local_directory(dataset, tmp_path)


@pytest.mark.parametrize("dataset", ["cifar100", "uoft-cs/cifar100", "data/copy"])
def test_a_hub_shaped_name_is_local_only_if_it_exists_under_the_root(tmp_path, dataset):
    from cifar100_dvc.paths import local_directory

    assert local_directory(dataset, tmp_path) is None
    (tmp_path / dataset).mkdir(parents=True)
    assert local_directory(dataset, tmp_path) == tmp_path / dataset


def test_empty_local_directory_is_named(tmp_path, hub_dataset):
    (tmp_path / "empty" / ".git").mkdir(parents=True)  # a failed clone: nothing but git's folder
    root = make_project(tmp_path / "project", hub_dataset, **TINY_PARAMS, **{"fetch.dataset": str(tmp_path / "empty")})
    result = run_stage(root, "fetch")
    assert_one_line_error(result, f"fetch.dataset '{tmp_path / 'empty'}' is empty", "parquet files plus a README.md")
    assert "offline" not in result.stderr and not (root / "data" / "raw").exists()


def test_local_directory_without_dataset_card_is_told_what_it_lacks(tmp_path):
    dataset = dataset_with(tmp_path, make_rows(20, 1))
    (dataset / "README.md").unlink()  # plain parquet files: no image feature, no class names
    root = make_project(tmp_path / "project", dataset, **TINY_PARAMS)
    assert_one_line_error(
        run_stage(root, "fetch"), f"fetch.dataset '{dataset}' has no README.md dataset card declaring the features"
    )
    assert not (root / "data" / "raw").exists()


def test_dataset_without_train_split_is_refused(tmp_path):
    dataset = write_hub_dataset(tmp_path / "dataset", {"test": make_rows(20, 1)})
    root = make_project(tmp_path / "project", dataset, **TINY_PARAMS)
    assert_one_line_error(run_stage(root, "fetch"), "has no train split (has ['test'])")
    assert not (root / "data" / "raw").exists()


def test_label_that_is_not_a_class_label_is_refused(tmp_path):
    dataset = dataset_with(tmp_path, make_rows(20, 1), plain_int_columns=("coarse_label",))
    root = make_project(tmp_path / "project", dataset, **TINY_PARAMS)
    assert_one_line_error(run_stage(root, "fetch"), "label column(s) ['coarse_label'] are not class labels")
    assert not (root / "data" / "raw").exists()


def png_bomb() -> bytes:
    """48 KB of PNG that decodes to 400 million pixels."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("encoded", "message"),
    [(b"\x89PNG\r\n\x1a\n garbage", "img is not a readable image"), (png_bomb(), "img is too large to decode")],
    ids=["corrupt", "oversized"],
)
def test_bad_image_names_split_and_row(tmp_path, encoded, message):
    rows = make_rows(30, 1)
    rows[17] = type(rows[17])(encoded, rows[17].fine_label, rows[17].coarse_label)
    root = fetched_project(tmp_path, dataset_with(tmp_path, rows))
    result = run_stage(root, "prepare")
    assert_one_line_error(result, "split 'train', row 17", message)
    assert "Traceback" not in result.stderr
    assert not (root / "data" / "prepared").exists()


def test_label_out_of_range_names_split_and_row(tmp_path):
    dataset = dataset_with(tmp_path, make_rows(30, 1))
    path = dataset / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(path)
    coarse = table.column("coarse_label").to_pylist()
    coarse[4] = 20  # 20 classes: 0..19
    pq.write_table(
        table.set_column(table.schema.get_field_index("coarse_label"), "coarse_label", pa.array(coarse, pa.int64())), path
    )
    root = fetched_project(tmp_path, dataset)  # datasets 5.2 stores a label outside its ClassLabel's names as it is
    assert_one_line_error(run_stage(root, "prepare"), "split 'test', row 4", "label 20 out of range 0..19")
    assert not (root / "data" / "prepared").exists()


def test_empty_split_is_refused_by_fetch(tmp_path):
    dataset = write_hub_dataset(tmp_path / "dataset", {"train": make_rows(20, 1), "test": []})
    root = make_project(tmp_path / "project", dataset, **TINY_PARAMS)
    result = run_stage(root, "fetch")
    assert result.returncode == 1
    assert "test" in result.stderr.splitlines()[-1] and result.stderr.splitlines()[-1].startswith("error: fetch: ")
    assert not (root / "data" / "raw").exists()


def test_empty_split_is_refused_by_prepare(tmp_path, monkeypatch):
    import datasets

    from cifar100_dvc.common import StageError
    from cifar100_dvc.params import PrepareParams
    from cifar100_dvc.paths import ProjectPaths
    from stages import prepare

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"img": [{"bytes": row.encoded, "path": None} for row in make_rows(4, 1)], "label": [0, 1, 0, 1]}
    splits = {"train": datasets.Dataset.from_dict(rows, features=features)}
    splits["test"] = datasets.Dataset.from_dict({"img": [], "label": []}, features=features)
    paths = ProjectPaths(tmp_path)
    paths.raw_dir.mkdir(parents=True)
    # fetch refuses an empty split, and datasets cannot even load one saved: a raw directory from elsewhere.
    monkeypatch.setattr(datasets, "load_from_disk", lambda path: datasets.DatasetDict(splits))
    with pytest.raises(StageError, match="split 'test' is empty"):
        prepare.run(PrepareParams(label="label"), paths)
    assert not paths.prepared_dir.exists()


def test_missing_upstream_artifacts_say_which_stage_to_run(project):
    assert_one_line_error(run_stage(project, "prepare"), "data/raw not found", "dvc repro fetch")
    assert_one_line_error(run_stage(project, "train"), "dataset.json not found", "dvc repro prepare")
    assert_one_line_error(run_stage(project, "evaluate"), "dataset.json not found")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"train.epoch": 3}, "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ({"prepare.val_fraction": 1.5}, "'prepare.val_fraction' must be < 1.0"),
        ({"prepare.label": "fine_labels"}, "prepare.label 'fine_labels' is not a column"),
    ],
)
def test_bad_params_stop_the_stage_with_the_key_named(tmp_path, hub_dataset, edit, message):
    root = fetched_project(tmp_path, hub_dataset)
    set_params(root, **edit)  # adds the key when params.yaml has none of that name
    assert_one_line_error(run_stage(root, "prepare"), message)
    assert not (root / "data" / "prepared").exists()


# ---------------------------------------------------------------- a folder of images


def test_an_image_folder_with_a_single_class_is_refused(tmp_path):
    from cifar100_dvc.synthetic import write_image_folder

    photos = write_image_folder(tmp_path / "photos", {"": 4}, ["cat"])
    root = make_project(tmp_path / "project", photos, **{**TINY_PARAMS, "prepare.label": "label"})
    assert_one_line_error(run_stage(root, "fetch"), "an image folder needs one sub-folder per class and two classes or more")
    assert not (root / "data" / "raw").exists()


def test_an_unreadable_file_in_an_image_folder_is_named_by_its_path(tmp_path):
    from cifar100_dvc.synthetic import write_image_folder

    photos = write_image_folder(tmp_path / "photos", {"train": 4, "test": 2}, ["cat", "dog"])
    (photos / "train" / "dog" / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (photos / "train" / "cat" / "notes.txt").write_text("not an image, and not used")
    root = make_project(tmp_path / "project", photos, **{**TINY_PARAMS, "prepare.label": "label"})
    fetched = run_stage(root, "fetch")
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert "not images (by their extension), not used: train/cat/notes.txt" in fetched.stderr
    assert_one_line_error(run_stage(root, "prepare"), "(train/dog/002.jpg): image is not a readable image")
    assert not (root / "data" / "prepared").exists()


def test_an_image_folder_without_images_is_refused(tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "cat" / "list.csv").write_text("a,b\n")
    root = make_project(tmp_path / "project", tmp_path / "photos", **TINY_PARAMS)
    result = run_stage(root, "fetch")
    assert_one_line_error(result, "cannot load dataset", "one sub-folder per class")
    assert not (root / "data" / "raw").exists()
