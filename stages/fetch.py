"""DVC stage ``fetch``: download the dataset from the Hugging Face hub (or a local copy) to data/raw.

``fetch.dataset`` is a hub id (``uoft-cs/cifar100``) or a local directory laid out like the
hub repository (parquet files and a README.md dataset card declaring the features); both go
through ``datasets.load_dataset``, which never runs code from a dataset repository. A relative
directory is taken from the project root, wherever the stage is started from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cifar100_dvc.common import StageError, atomic_output, is_write_failure, one_line, run_main
from cifar100_dvc.images import SOURCE_FILE_COLUMN
from cifar100_dvc.params import FetchParams, load_params
from cifar100_dvc.paths import ProjectPaths, local_directory

log = logging.getLogger(__name__)

KEPT_SPLITS = ("train", "test")  # train is required; without test, prepare carves one from train
_MAX_SHARD_SIZE = "500MB"  # CIFAR-100 fits one file per split: DVC hashes a handful of files


def offline_hint(dataset: str) -> str:
    return (
        "to work offline, point fetch.dataset at a local copy laid out like the hub repository "
        "(parquet files + README.md card): set it in params.yaml, or "
        f"dvc exp run -S fetch.dataset=/path/to/{dataset.split('/')[-1]}"
    )


def check_dataset(dataset_dict, dataset: str) -> None:
    """Raise StageError unless there is a train split and every kept split has an image column and class labels."""
    from datasets import ClassLabel, Image

    if "train" not in dataset_dict:
        raise StageError(f"dataset {dataset!r} has no train split (has {sorted(dataset_dict)})")
    for split in (split for split in KEPT_SPLITS if split in dataset_dict):
        features = dataset_dict[split].features
        if not any(isinstance(feature, Image) for feature in features.values()):
            raise StageError(f"dataset {dataset!r}, split {split!r}: no image column (columns: {list(features)})")
        labels = [name for name in features if "label" in name]
        class_labels = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
        if not class_labels:
            raise StageError(f"dataset {dataset!r}, split {split!r}: no class-label column (columns: {list(features)})")
        not_class = [name for name in labels if name not in class_labels]
        if not_class:
            raise StageError(
                f"dataset {dataset!r}, split {split!r}: label column(s) {not_class} are not class labels "
                f"(the dataset card must declare them as class_label with names)"
            )
        if dataset_dict[split].num_rows == 0:
            raise StageError(f"dataset {dataset!r}, split {split!r} is empty")
        for name in class_labels:
            if features[name].num_classes < 2:
                raise StageError(
                    f"dataset {dataset!r}, column {name!r} has {features[name].num_classes} class "
                    f"({features[name].names}): a classifier needs two or more"
                )


def load(params: FetchParams, local: Path | None, local_cache_dir: Path):
    """The dataset as a ``datasets.DatasetDict`` of its train and test splits, from the directory
    ``local`` (see local_directory) or, when it is None, from the hub.

    A local directory is converted through ``local_cache_dir`` (fresh each run), never the
    shared Hugging Face cache: that cache keys local files by name and time stamp, and could
    hand back an older copy of a directory edited in place.
    """
    import datasets

    # datasets and huggingface_hub give their loggers a stderr handler of their own and also
    # propagate to the root logger, so each hub warning printed twice: keep only the root's.
    for library in ("huggingface_hub", "datasets"):
        logging.getLogger(library).handlers.clear()

    source = params.dataset
    if local is not None and not visible_files(local):
        raise StageError(f"fetch.dataset {source!r} is empty: {_LOCAL_LAYOUT}")
    try:
        if local is not None and is_image_folder(local):
            log.info("loading image folder %s: one class per sub-folder", local)
            return image_folder(local, local_cache_dir)
        if local is not None:
            log.info("loading local dataset directory %s", local)
            return datasets.load_dataset(str(local), cache_dir=str(local_cache_dir))
        log.info("downloading %s (revision %s) from the Hugging Face hub", source, params.revision or "latest")
        return datasets.load_dataset(source, revision=params.revision)
    except StageError:
        raise
    except Exception as error:  # the library raises many types; all mean "could not load"
        if is_write_failure(error):  # the conversion cache is written into the output's staging folder
            raise
        # The offline hint is for the hub; a local directory needs its layout described instead.
        # A hub id shaped `owner/name` may have been meant as a relative directory: say it is none.
        where, hint = (
            ("", _LOCAL_LAYOUT)
            if local is not None
            else (" from the hub (no such directory under the project root)", offline_hint(source))
        )
        raise StageError(
            f"cannot load dataset {source!r}{where}: {type(error).__name__}: {one_line(error)[:300]}; {hint}"
        ) from None


_LOCAL_LAYOUT = (
    "a local dataset is laid out like the hub repository (parquet files plus a README.md dataset card), or is a "
    "folder of images with one sub-folder per class (optionally under train/ and test/)"
)


def is_image_folder(directory: Path) -> bool:
    """Whether ``directory`` is a folder of images rather than a hub-layout copy: no README.md dataset card,
    and image files in its sub-folders."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if (directory / "README.md").is_file():
        return False
    suffixes = {suffix.lower() for suffix in ImageFolder.EXTENSIONS}
    return any(path.suffix.lower() in suffixes for path in visible_files(directory) if path.parent != directory)


def image_folder(directory: Path, cache_dir: Path):
    """The folder of class sub-folders as a DatasetDict (``imagefolder``: ``train``, and ``test`` when it has a
    ``test/`` sub-folder; class names from the folder names), each row with its file's path relative to
    ``directory`` (SOURCE_FILE_COLUMN), so that prepare can name a file it cannot read."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    loaded = datasets.load_dataset("imagefolder", data_dir=str(directory), cache_dir=str(cache_dir))
    suffixes = {suffix.lower() for suffix in ImageFolder.EXTENSIONS}
    skipped = [path.relative_to(directory) for path in visible_files(directory) if path.suffix.lower() not in suffixes]
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("not images (by their extension), not used: %s", shown)
    features = loaded["train"].features
    if not any(isinstance(feature, datasets.ClassLabel) for feature in features.values()):
        folders = sorted({path.parent.name for path in visible_files(directory) if path.suffix.lower() in suffixes})
        raise StageError(
            f"fetch.dataset {str(directory)!r}: an image folder needs one sub-folder per class and two classes or more "
            f"(found images in {folders})"
        )
    column = next(name for name, feature in features.items() if isinstance(feature, datasets.Image))

    def with_file(split):
        paths = split.cast_column(column, datasets.Image(decode=False))[column]
        return split.add_column(SOURCE_FILE_COLUMN, [Path(item["path"]).relative_to(directory).as_posix() for item in paths])

    return datasets.DatasetDict({name: with_file(split) for name, split in loaded.items()})


def visible_files(directory: Path) -> list[Path]:
    """Files under ``directory``, leaving out hidden ones (a bare ``.git`` is not a dataset)."""
    return [
        path
        for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    ]


def blame_missing_card(dataset: str, local: Path | None, problem: StageError) -> StageError:
    """``problem`` found in the local directory ``local``, blamed on its missing dataset card when it has none."""
    if local is None or (local / "README.md").is_file() or is_image_folder(local):
        return problem
    return StageError(
        f"fetch.dataset {dataset!r} has no README.md dataset card declaring the features (the image column, the "
        f"class-label columns with their names), and its data files do not declare them either: {problem}"
    )


def run(params: FetchParams, paths: ProjectPaths) -> None:
    """Load and check the dataset, then save its train (and test) splits to ``paths.raw_dir``."""
    import datasets

    local = local_directory(params.dataset, paths.root)
    with atomic_output(paths.raw_dir) as staged:
        local_cache_dir = staged.parent / "cache"
        dataset_dict = load(params, local, local_cache_dir)
        try:
            check_dataset(dataset_dict, params.dataset)
        except StageError as problem:
            raise blame_missing_card(params.dataset, local, problem) from None
        unused = sorted(set(dataset_dict) - set(KEPT_SPLITS))
        if unused:
            log.warning("splits %s not used: the pipeline takes train and test (and carves val, and test if missing)", unused)
        if "test" not in dataset_dict:
            log.info("no test split: prepare will hold out prepare.test_fraction of each class of train as test")
        splits = datasets.DatasetDict({split: dataset_dict[split] for split in KEPT_SPLITS if split in dataset_dict})
        splits.save_to_disk(str(staged), max_shard_size=_MAX_SHARD_SIZE)
    log.info("wrote %s: %s", paths.raw_dir, {split: splits[split].num_rows for split in splits})


def main() -> None:
    paths = ProjectPaths()
    run_main("fetch", lambda: run(load_params(paths.params_file).fetch, paths))


if __name__ == "__main__":
    main()
