"""Every artifact path of the pipeline, declared once and anchored to the repository root.

``dvc.yaml`` names the same paths; ``tests/test_dvc_yaml.py`` checks that the two agree.
``local_directory`` says whether ``fetch.dataset`` names a local directory (fetch and the seeds
tool both decide it here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cifar100_dvc.common import StageError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ProjectPaths:
    """Where each stage reads and writes, relative to one root (the repo, or a test's tmp dir)."""

    root: Path = REPO_ROOT

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw_dir(self) -> Path:  # fetch -> prepare: the dataset as `datasets.save_to_disk` wrote it
        return self.root / "data" / "raw"

    @property
    def prepared_dir(self) -> Path:  # prepare -> train/evaluate: TFRecord shards + dataset.json
        return self.root / "data" / "prepared"

    @property
    def model_file(self) -> Path:  # train -> evaluate/predict/export
        return self.root / "models" / "model.keras"

    @property
    def history_file(self) -> Path:  # train -> evaluate: per-epoch losses and accuracies
        return self.root / "models" / "history.json"

    @property
    def checkpoint_dir(self) -> Path:  # train's own resume state: not a DVC output (see NOT_OUTPUTS)
        return self.root / "checkpoints"

    @property
    def live_dir(self) -> Path:  # dvclive's directory: per-epoch metrics and plots of train
        return self.root / "dvclive"

    @property
    def live_metrics_file(self) -> Path:  # dvclive: last epoch's metrics
        return self.live_dir / "metrics.json"

    @property
    def live_plots_dir(self) -> Path:  # dvclive: one TSV per metric, a row per epoch
        return self.live_dir / "plots"

    @property
    def metrics_file(self) -> Path:  # evaluate: test metrics
        return self.root / "metrics" / "metrics.json"

    @property
    def class_accuracy_file(self) -> Path:  # evaluate: per-class test accuracy
        return self.root / "metrics" / "class_accuracy.json"

    @property
    def plots_dir(self) -> Path:  # evaluate: PNGs and the confusion data
        return self.root / "plots"

    @property
    def export_dir(self) -> Path:  # export: SavedModel and TFLite for serving
        return self.root / "models" / "export"

    def relative(self, path: Path) -> str:
        """``path`` as written in dvc.yaml: POSIX, relative to the root."""
        return path.relative_to(self.root).as_posix()


# Each DVC stage's outputs (outs, metrics and plots) and data inputs, as ProjectPaths
# attribute names; dvc.yaml must declare exactly these (tests/test_dvc_yaml.py). Code
# dependencies are derived from each stage module's imports.
STAGE_OUTPUTS = {
    "fetch": ("raw_dir",),
    "prepare": ("prepared_dir",),
    "train": ("model_file", "history_file", "live_metrics_file", "live_plots_dir"),
    "evaluate": ("plots_dir", "metrics_file", "class_accuracy_file"),
    "export": ("export_dir",),
}
# Written by a stage but not declared to DVC: train's resume state is scratch space, not an artifact.
# Declared (even as persist, uncached), a fresh clone would miss it and `dvc status` would ask to run
# train again after a `dvc pull` restored everything else; undeclared, DVC leaves it alone, so a
# `dvc repro` after an interruption still finds it (git ignores it: .gitignore).
NOT_OUTPUTS = {"train": ("checkpoint_dir",)}
STAGE_INPUTS = {
    "fetch": (),
    "prepare": ("raw_dir",),
    "train": ("prepared_dir",),
    "evaluate": ("model_file", "history_file", "prepared_dir"),
    "export": ("model_file",),
}


_QUEUED_COPY = "/.dvc/tmp/exps/"  # where `dvc exp run --queue` runs a copy of the repository


def local_directory(dataset: str, root: Path) -> Path | None:
    """The local directory ``dataset`` names (a relative one taken from ``root``), or None for a hub id.

    What exists under ``root`` is local. What does not is a hub id if shaped like one (``name`` or
    ``owner/name``); anything else (``./``, ``../``, ``/``, ``~``, a trailing ``/``, a second ``/``)
    was meant as a directory, and is refused as missing rather than sent to the hub.
    """
    given = Path(dataset).expanduser()
    path = root / given  # an absolute path stays itself
    rule = "a relative path is taken from the project root"
    if _QUEUED_COPY in root.as_posix():
        rule += ", which for a queued experiment is a temporary copy: give an absolute path"
    where = "" if given.is_absolute() else f" (looked for {path}: {rule})"
    if path.is_dir():
        return path
    if path.exists():
        raise StageError(f"fetch.dataset {dataset!r} is a file{where}; give a hub id or a directory")
    if dataset.startswith(("/", "./", "../", "~")) or dataset.endswith("/") or dataset.count("/") > 1:
        raise StageError(f"fetch.dataset {dataset!r}: no such directory{where}")
    return None
