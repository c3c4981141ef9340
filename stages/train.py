"""DVC stage ``train``: fit the chosen network on data/prepared and write models/model.keras.

Per-epoch train/val loss, accuracy and top-5 accuracy go to dvclive (``dvc plots show``,
``dvc exp show``) and to models/history.json (for evaluate's plots). After every epoch the
full training state is checkpointed under checkpoints/ (train's own folder, not a DVC output), so a run
that is killed or interrupted continues from its last completed epoch when run again with
the same params and data, and ends exactly where an uninterrupted run would. With
``train.ensemble`` above 1 the networks are trained one after another, each checkpointed in
its own folder (checkpoints/member-K) and kept there once finished, and the saved model
averages their logits (``network.ensemble_of``).

The schedule, loss, optimizer and device settings are library code (cifar100_dvc.training);
this module holds what only the stage needs: the clock, the checkpoints and ``run``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from cifar100_dvc import hardware
from cifar100_dvc.common import StageError, atomic_output, raise_if_interrupted, remove_path, run_main
from cifar100_dvc.inference import load_model
from cifar100_dvc.network import ensemble_of, float32_model
from cifar100_dvc.params import TrainParams, load_params, to_dict
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.records import DatasetInfo, read_split
from cifar100_dvc.training import (
    AirbenchSGD,
    DetachFrozenWhiteningBias,
    augmenter,
    build_training_model,
    compile_model,
    device_settings_here,
    input_spec,
    make_strategy,
    process_settings,
    trained_network,
    whitening_kernel,
)

log = logging.getLogger(__name__)

_STATE_FILE = "state.json"
_MEMBER_MODEL, _MEMBER_STATE = "member.keras", "member.json"  # a finished ensemble member, kept until the run ends
_MEMBER_OUTCOME = ("time_budget_minutes", "epochs_done", "images_seen", "stop_reason", "train_seconds")  # history.json
_NOT_LIVE_METRICS = ("member", "epoch", "epoch_fraction", "seconds")  # history keys that are not metrics


# ---------------------------------------------------------------- clock, checkpoints and their fingerprint


def fingerprint(params: TrainParams, prepared_dir: Path) -> str:
    """Hash of the train params and the bytes of the prepared data: a checkpoint resumes only on a match."""
    digest = hashlib.sha256(json.dumps(to_dict(params), sort_keys=True).encode())
    for path in sorted(prepared_dir.iterdir()):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha1").digest())
    return digest.hexdigest()


class TrainingClock(keras.callbacks.Callback):
    """Training's wall clock and step count; with a budget, it tells the learning-rate schedule
    the share spent (before every step) and stops training at the first step after it is spent."""

    def __init__(self, started: float, budget_minutes: float | None, budget_spent=None):
        super().__init__()
        self.started = started
        self.budget_seconds = budget_minutes * 60.0 if budget_minutes else None
        self.budget_spent = budget_spent  # the schedule's variable, or None without a budget
        self.steps_in_epoch = 0
        self.exhausted = False

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def on_epoch_begin(self, epoch, logs=None):
        self.steps_in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.budget_spent is not None:
            self.budget_spent.assign(min(1.0, self.seconds() / self.budget_seconds))

    def on_train_batch_end(self, batch, logs=None):
        raise_if_interrupted()  # a Ctrl-C whose exception a finalizer swallowed still stops training here
        self.steps_in_epoch = batch + 1  # `batch` is the last step of the call (steps_per_execution)
        if self.budget_seconds is not None and self.seconds() >= self.budget_seconds:
            self.exhausted = True
            self.model.stop_training = True


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: record its history row, save the model with its optimizer state, then a state
    file naming them (atomic order: the state file is replaced last)."""

    def __init__(
        self,
        directory: Path,
        run_fingerprint: str,
        history: list[dict],
        clock: TrainingClock,
        steps_per_epoch: int,
        member: int | None = None,
    ):
        super().__init__()
        self.directory, self.run_fingerprint, self.history = directory, run_fingerprint, history
        self.clock, self.steps_per_epoch = clock, steps_per_epoch
        self.member = member  # which network of an ensemble (from 1), recorded in each row; None: no ensemble

    def on_epoch_end(self, epoch: int, logs=None):
        row = {} if self.member is None else {"member": self.member}
        row |= {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()}}
        # An epoch cut short by the time budget counts for the share of its steps that ran.
        row["epoch_fraction"] = round(self.clock.steps_in_epoch / self.steps_per_epoch, 6)
        row["seconds"] = round(self.clock.seconds(), 3)
        self.history.append(row)
        # The whole model as a .keras archive (written through Python's zipfile, so a full disk is an
        # OSError, not a crash inside HDF5 as with .weights.h5); a resumed run loads only its
        # weights and optimizer state into a freshly compiled model.
        weights_name = f"epoch-{epoch + 1:04d}.keras"
        with atomic_output(self.directory / weights_name) as staged_weights:  # a failed save leaves no truncated file
            self.model.save(staged_weights)
        state = {"fingerprint": self.run_fingerprint, "epoch": epoch + 1, "weights": weights_name, "history": self.history}
        staged = self.directory / f".{_STATE_FILE}.tmp"
        staged.write_text(json.dumps(state, indent=1))
        os.replace(staged, self.directory / _STATE_FILE)
        for old in self.directory.glob("epoch-*"):
            if old.name != weights_name:
                old.unlink()


def load_checkpoint(directory: Path, run_fingerprint: str) -> dict | None:
    """The saved state if it belongs to this run (same params and data), else None (and clear it)."""
    state_path = directory / _STATE_FILE
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
    except ValueError:
        state = {}
    if state.get("fingerprint") != run_fingerprint or not (directory / str(state.get("weights"))).is_file():
        log.info("checkpoint in %s is from other params or data: starting afresh", directory)
        clear_checkpoints(directory)
        return None
    return state


_CHECKPOINT_README = "train's resume state: the last completed epoch of an unfinished run. Empty after a run completes.\n"


def clear_checkpoints(directory: Path) -> None:
    """Remove all resume state; leave a README saying what the folder is for."""
    for path in directory.iterdir():
        remove_path(path)
    (directory / "README.txt").write_text(_CHECKPOINT_README)


# ---------------------------------------------------------------- the stage


def run(params: TrainParams, paths: ProjectPaths) -> dict:
    """Train (every network of ``train.ensemble``, one after another), write the model and history
    atomically, and return the history summary."""
    info = DatasetInfo.read(paths.prepared_dir)
    steps_per_epoch = _steps_per_epoch(params, info, paths)
    _check_augmentation(params, info, paths)
    settings = device_settings_here(params)
    machine = hardware.machine_report()
    log.info("machine: %s", machine.describe())
    log.info(
        "device settings: %d GPU(s); policy %s; XLA %s; %d step(s) per execution",
        settings.num_gpus,
        settings.mixed_precision_policy,
        settings.jit_compile,
        settings.steps_per_execution,
    )
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    members: list[keras.Model] = []
    summaries: list[dict] = []
    for index in range(params.ensemble):
        member_params = ensemble_member(params, index)
        if params.ensemble > 1:
            log.info("ensemble member %d of %d: seed %d", index + 1, params.ensemble, member_params.seed)
        model, summary = _train_member(member_params, index, info, settings, machine, steps_per_epoch, paths, summaries)
        members.append(model)
        summaries.append(summary)
    summary = summaries[0] if params.ensemble == 1 else _ensemble_summary(params, summaries)
    inference_model = ensemble_of(members)
    with atomic_output(paths.model_file) as staged:
        inference_model.save(staged)
    with atomic_output(paths.history_file) as staged:
        staged.write_text(json.dumps(summary, indent=2) + "\n")
    clear_checkpoints(paths.checkpoint_dir)  # done: a later run starts afresh
    log.info(
        "wrote %s after %.2f epochs (%d images) in %.0f s; stopped by %s",
        paths.model_file,
        summary["epochs_done"],
        summary["images_seen"],
        summary["train_seconds"],
        summary["stop_reason"],
    )
    return summary


def ensemble_member(params: TrainParams, index: int) -> TrainParams:
    """The params network ``index`` (from 0) of the ensemble trains with: its own seed (seed x ensemble
    + index: the members of runs on seeds 0, 1, 2 are all different networks) and an equal share of
    the time budget. With ``train.ensemble: 1`` that is ``params`` itself."""
    budget = params.time_budget_minutes / params.ensemble if params.time_budget_minutes else None
    return dataclasses.replace(params, seed=params.seed * params.ensemble + index, time_budget_minutes=budget)


def _train_member(params, index, info, settings, machine, steps_per_epoch, paths, earlier) -> tuple[keras.Model, dict]:
    """(inference model, summary) of one network: trained, resumed from its checkpoint, or, for an ensemble
    member finished before an interruption, loaded. ``earlier``: the summaries of the members before it."""
    ensemble = params.ensemble > 1
    directory = paths.checkpoint_dir / f"member-{index + 1}" if ensemble else paths.checkpoint_dir
    run_fingerprint = fingerprint(params, paths.prepared_dir)
    finished = _finished_member(directory, run_fingerprint)
    if finished:
        log.info("ensemble member %d was finished before: loaded from %s", index + 1, directory)
        return finished
    directory.mkdir(exist_ok=True)
    with process_settings(params.seed, settings.mixed_precision_policy, deterministic=settings.num_gpus == 0):
        state = load_checkpoint(directory, run_fingerprint)
        history: list[dict] = list(state["history"]) if state else []
        strategy = make_strategy(params.distribute)
        model, budget_spent = _build_or_resume(params, info, settings, strategy, steps_per_epoch, paths, directory, state)
        seconds_before = history[-1]["seconds"] if history else 0.0  # a resumed run's budget counts earlier epochs
        clock = TrainingClock(time.perf_counter() - seconds_before, params.time_budget_minutes, budget_spent)
        member = index + 1 if ensemble else None
        _fit(model, params, info, paths, directory, steps_per_epoch, history, clock, run_fingerprint, member, earlier)
        summary = _summary(params, model, settings, machine, steps_per_epoch, history, clock)
        inference_model = _inference_model(model, strategy)
    if ensemble:  # kept, so that an interruption in a later member does not train this one again
        with atomic_output(directory / _MEMBER_MODEL) as staged:
            inference_model.save(staged)
        with atomic_output(directory / _MEMBER_STATE) as staged:
            staged.write_text(json.dumps({"fingerprint": run_fingerprint, "summary": summary}))
    return inference_model, summary


def _finished_member(directory: Path, run_fingerprint: str) -> tuple[keras.Model, dict] | None:
    """(model, summary) of an ensemble member this run finished before it was interrupted, else None."""
    try:
        state = json.loads((directory / _MEMBER_STATE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != run_fingerprint or not (directory / _MEMBER_MODEL).is_file():
        return None
    return load_model(directory / _MEMBER_MODEL), state["summary"]  # evaluate's loader: safe mode, checked


def _ensemble_summary(params: TrainParams, members: list[dict]) -> dict:
    """models/history.json of an ensemble: the work of all its networks added up, each network's own
    outcome under ``members``, and every network's epochs, in training order, under ``epochs``."""
    stopped = any(member["stopped_by_time_budget"] for member in members)
    return {
        "arch": params.arch,
        "ensemble": params.ensemble,
        "epochs_planned": params.epochs,  # per network
        "epochs_completed": sum(member["epochs_completed"] for member in members),
        "epochs_done": round(sum(member["epochs_done"] for member in members), 4),
        "images_seen": sum(member["images_seen"] for member in members),
        "stop_reason": "time_budget" if stopped else "epochs",
        "stopped_by_time_budget": stopped,
        "time_budget_minutes": params.time_budget_minutes,
        "train_seconds": round(sum(member["train_seconds"] for member in members), 3),
        "final_learning_rate": members[-1]["final_learning_rate"],
        "trainable_parameters": sum(member["trainable_parameters"] for member in members),
        "device": members[0]["device"],
        "machine": members[0]["machine"],
        "members": [
            {
                "seed": ensemble_member(params, index).seed,
                **{key: member[key] for key in _MEMBER_OUTCOME},
            }
            for index, member in enumerate(members)
        ],
        "epochs": [row for member in members for row in member["epochs"]],
    }


def _steps_per_epoch(params: TrainParams, info: DatasetInfo, paths: ProjectPaths) -> int:
    num_train = info.splits["train"].num_examples
    if num_train < params.batch_size:
        raise StageError(f"train.batch_size={params.batch_size} exceeds the {num_train} train examples in {paths.prepared_dir}")
    return num_train // params.batch_size


def _check_augmentation(params: TrainParams, info: DatasetInfo, paths: ProjectPaths) -> None:
    """Refuse, before any training, what params alone cannot know is too large for the images: a
    reflected border must come from inside the image (TensorFlow's reflect would fail mid-run), and
    a cutout square must fit inside it."""
    height, width = info.image_shape[:2]
    if not params.augment:
        return
    if params.arch == "airbench" and params.airbench.cutout > min(height, width):
        raise StageError(
            f"train.airbench.cutout={params.airbench.cutout} must be at most the {height}x{width} images in {paths.prepared_dir}"
        )
    if params.arch == "airbench":
        key, padding = "train.airbench.translate", params.airbench.translate
    elif params.crop_fill == "reflect":
        key, padding = "train.crop_padding", params.crop_padding
    else:
        return
    if padding >= min(height, width):
        fill = "" if params.arch == "airbench" else " with train.crop_fill=reflect"
        raise StageError(f"{key}={padding}{fill} must be below the {height}x{width} images in {paths.prepared_dir}")


def _build_or_resume(params, info, settings, strategy, steps_per_epoch, paths, directory, state):
    """(compiled model, the schedule's budget variable or None): fresh, or with the checkpoint's
    weights and optimizer state loaded into it when resuming."""
    with strategy.scope():
        budget_spent = keras.Variable(0.0, trainable=False, name="budget_spent") if params.time_budget_minutes else None
        model = build_training_model(params, input_spec(info), whitening_kernel(params, info, paths.prepared_dir))
        compile_model(model, params, steps_per_epoch, settings.jit_compile, settings.steps_per_execution, budget_spent)
        if state:
            log.info("resuming from %s after epoch %d of %d", directory, state["epoch"], params.epochs)
            model.optimizer.build(trained_network(model).trainable_variables)  # its slots must exist to be loaded into
            model.load_weights(directory / state["weights"])
    return model, budget_spent


def _fit(model, params, info, paths, directory, steps_per_epoch, history, clock, run_fingerprint, member, earlier) -> None:
    """Fit from the epoch after the last one in ``history``, logging to dvclive and checkpointing in
    ``directory``; ``earlier``: the summaries of the ensemble's networks trained before this one."""
    initial_epoch = len(history)
    train_batches = read_split(
        paths.prepared_dir,
        "train",
        params.batch_size,
        shuffle_seed=params.seed,
        shuffle_buffer=params.shuffle_buffer,
        repeat=True,
        drop_remainder=True,
        skip_batches=initial_epoch * steps_per_epoch,
        batch_transform=augmenter(params, info) if params.augment else None,
    )
    val_batches = read_split(paths.prepared_dir, "val", params.batch_size) if info.splits["val"].num_examples else None

    from dvclive import Live
    from dvclive.keras import DVCLiveCallback
    from dvclive.utils import standardize_metric_name

    live = Live(dir=str(paths.live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    earlier_rows = [row for summary in earlier for row in summary["epochs"]]
    for row in earlier_rows + history:  # a resumed run (or a later member) replays earlier epochs: whole curves
        for key, value in row.items():
            if key not in _NOT_LIVE_METRICS:
                live.log_metric(standardize_metric_name(key, "dvclive.keras"), value)
        live.next_step()
    checkpoint = EpochCheckpoint(directory, run_fingerprint, history, clock, steps_per_epoch, member)
    if initial_epoch < params.epochs:
        model.fit(
            train_batches,
            epochs=params.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_batches,
            validation_freq=validation_epochs(params.validation_freq, params.epochs),
            callbacks=[clock, DetachFrozenWhiteningBias(), checkpoint, DVCLiveCallback(live=live)],
            verbose=1 if sys.stdout.isatty() else 2,
            shuffle=False,  # the reader already shuffles, seeded
        )
        if isinstance(model.optimizer, AirbenchSGD):
            model.optimizer.finish_lookahead()  # a run stopped inside an epoch ends on the slow weights too
    # What was actually done, beside the last epoch's metrics (`dvc exp show`, `dvc metrics diff`).
    # An ensemble's: of all its networks so far (the last member's summary is the whole run's).
    images_per_epoch = steps_per_epoch * params.batch_size
    live.summary["epochs_done"], live.summary["images_seen"] = _work_done(earlier_rows + history, images_per_epoch)
    live.summary["stopped_by_time_budget"] = int(clock.exhausted or any(s["stopped_by_time_budget"] for s in earlier))
    seconds = sum(summary["train_seconds"] for summary in earlier) + (history[-1]["seconds"] if history else 0.0)
    live.summary["train_seconds"] = round(seconds, 1)
    live.make_summary()
    live.end()


def validation_epochs(every: int, epochs: int) -> list[int]:
    """The epochs (counted from 1) after which training scores val: every ``every``-th, and the last,
    so that the curve always ends on the model that is saved."""
    return sorted({*range(every, epochs + 1, every), epochs})


def _work_done(history: list[dict], images_per_epoch: int) -> tuple[float, int]:
    """(epochs done, counting a cut-short epoch by the share of its steps that ran; images seen)."""
    epochs_done = sum(row.get("epoch_fraction", 1.0) for row in history)
    return round(epochs_done, 4), int(round(epochs_done * images_per_epoch))


def _summary(params, model, settings, machine, steps_per_epoch, history, clock) -> dict:
    """What models/history.json records: the run's outcome and every epoch's row."""
    epochs_done, images_seen = _work_done(history, steps_per_epoch * params.batch_size)
    return {
        "arch": params.arch,
        "epochs_planned": params.epochs,
        "epochs_completed": sum(1 for row in history if row.get("epoch_fraction", 1.0) >= 1.0),
        "epochs_done": epochs_done,
        "images_seen": images_seen,
        "stop_reason": "time_budget" if clock.exhausted else "epochs",
        "stopped_by_time_budget": clock.exhausted,
        "time_budget_minutes": params.time_budget_minutes,
        "train_seconds": history[-1]["seconds"] if history else 0.0,
        "final_learning_rate": float(model.optimizer.learning_rate),
        "trainable_parameters": int(sum(math.prod(w.shape) for w in trained_network(model).trainable_weights)),
        "device": settings.__dict__,
        "machine": machine.__dict__,
        "epochs": history,
    }


def _inference_model(model: keras.Model, strategy: tf.distribute.Strategy) -> keras.Model:
    """What is saved: the trained network for inference, small (no optimizer) and in float32 (``float32_model``)."""
    with strategy.scope():
        return float32_model(trained_network(model))


def main() -> None:
    paths = ProjectPaths()
    run_main("train", lambda: run(load_params(paths.params_file).train, paths))


if __name__ == "__main__":
    main()
