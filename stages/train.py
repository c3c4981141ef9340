"""DVC stage ``train``: fit the chosen network on data/prepared and write models/model.keras.

Per-epoch train/val loss, accuracy and top-5 accuracy go to dvclive (``dvc plots show``,
``dvc exp show``) and to models/history.json (for evaluate's plots). After every epoch the
full training state is checkpointed under checkpoints/ (a DVC ``persist`` output), so a run
that is killed or interrupted continues from its last completed epoch when run again with
the same params and data, and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from stages.augment import crop_and_flip
from stages.common import StageError, atomic_output, remove_path, run_main
from stages.network import InputSpec, build_network
from stages.params import TrainParams, load_params, to_dict
from stages.paths import ProjectPaths
from stages.records import DatasetInfo, read_split

log = logging.getLogger(__name__)

_STATE_FILE = "state.json"
_METRIC_NAMES = ("loss", "accuracy", "top5_accuracy")


# ---------------------------------------------------------------- pure pieces


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then constant, linear or cosine decay to 0."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        progress = keras.ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        if self.decay == "linear":
            factor = 1.0 - progress
        elif self.decay == "cosine":
            factor = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        else:
            factor = keras.ops.ones_like(progress)
        return self.peak * warmup * factor

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps, "decay": self.decay}


@keras.saving.register_keras_serializable(package="cifar100_dvc")
def smoothed_sparse_crossentropy(labels, logits, label_smoothing: float = 0.0):
    """Cross-entropy of integer labels against logits, with label smoothing."""
    num_classes = keras.ops.shape(logits)[-1]
    one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(labels, [-1]), "int32"), num_classes)
    return keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True, label_smoothing=label_smoothing)


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """``smoothed_sparse_crossentropy`` as a serializable Keras loss."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, labels, logits):
        return smoothed_sparse_crossentropy(labels, logits, self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer of ``params`` with its warm-up + decay learning-rate schedule."""
    schedule = WarmupSchedule(
        peak=params.learning_rate,
        warmup_steps=int(round(params.warmup_epochs * steps_per_epoch)),
        total_steps=params.epochs * steps_per_epoch,
        decay=params.schedule,
    )
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=params.momentum, nesterov=True, weight_decay=params.weight_decay or None)
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=params.weight_decay)
    return keras.optimizers.Adam(schedule, weight_decay=params.weight_decay or None)


def compile_model(
    model: keras.Model, params: TrainParams, steps_per_epoch: int, jit_compile: bool, steps_per_execution: int
) -> None:
    model.compile(
        optimizer=make_optimizer(params, steps_per_epoch),
        loss=SmoothedSparseCrossentropy(params.label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"),
        ],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


@dataclass(frozen=True)
class DeviceSettings:
    """What ``auto`` resolves to on the machine at hand."""

    num_gpus: int
    mixed_precision_policy: str  # keras dtype policy name
    jit_compile: bool
    steps_per_execution: int


def resolve_device_settings(params: TrainParams, num_gpus: int, cpu_has_bfloat16: bool = False) -> DeviceSettings:
    """What ``auto`` means here.

    GPU: bfloat16 (float16 before Ampere) compute, XLA and 16 steps per graph call.
    CPU: one step per call and no XLA (slower than oneDNN's kernels on a CPU); bfloat16 compute
    where the CPU has native bfloat16 dot products (AVX512_BF16/AMX), where oneDNN runs the
    convolutions 1.4-1.7x faster than in float32 (measured here), else float32.
    """
    on_gpu = num_gpus > 0
    mixed = params.mixed_precision == "on" or (params.mixed_precision == "auto" and (on_gpu or cpu_has_bfloat16))
    policy = "float32"
    if mixed:
        policy = "mixed_bfloat16" if (not on_gpu or _gpus_support_bfloat16()) else "mixed_float16"
    jit = params.jit_compile == "on" or (params.jit_compile == "auto" and on_gpu)
    steps = params.steps_per_execution or (16 if on_gpu else 1)
    return DeviceSettings(num_gpus, policy, jit, steps)


def device_settings_here(params: TrainParams) -> DeviceSettings:
    """``resolve_device_settings`` for the GPUs and CPU of this machine."""
    return resolve_device_settings(params, len(tf.config.list_physical_devices("GPU")), cpu_has_bfloat16())


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this (Linux, x86) CPU has native bfloat16 instructions; False where that can't be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _gpus_support_bfloat16() -> bool:
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if capability < (8, 0):  # bfloat16 tensor cores start with Ampere
            return False
    return True


def make_strategy(distribute: str) -> tf.distribute.Strategy:
    """MirroredStrategy over all local GPUs (or logical CPUs when there is no GPU) or the default."""
    gpus = tf.config.list_logical_devices("GPU")
    if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
        devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
        log.info("MirroredStrategy over %s", devices)
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def fingerprint(params: TrainParams, prepared_dir: Path) -> str:
    """Hash of the train params and the bytes of the prepared data: a checkpoint resumes only on a match."""
    digest = hashlib.sha256(json.dumps(to_dict(params), sort_keys=True).encode())
    for path in sorted(prepared_dir.iterdir()):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha1").digest())
    return digest.hexdigest()


def augmenter(params: TrainParams):
    """Crop-and-flip of a batch, seeded by (train.seed, the batch's position in the stream)."""

    def augment(images: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
        return crop_and_flip(images, tf.stack([tf.constant(params.seed, tf.int64), position]), params.crop_padding)

    return augment


def input_spec(info: DatasetInfo) -> InputSpec:
    return InputSpec(tuple(info.image_shape), tuple(info.class_names), tuple(info.mean_rgb), tuple(info.std_rgb))


# ---------------------------------------------------------------- checkpoints


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: save the whole compiled model, then a state file naming it (atomic order)."""

    def __init__(self, directory: Path, run_fingerprint: str, history: list[dict], started: float):
        super().__init__()
        self.directory, self.run_fingerprint, self.history, self.started = directory, run_fingerprint, history, started

    def on_epoch_end(self, epoch: int, logs=None):
        row = {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()}}
        row["seconds"] = round(time.perf_counter() - self.started, 3)
        self.history.append(row)
        model_name = f"epoch-{epoch + 1:04d}.keras"
        with atomic_output(self.directory / model_name) as staged_model:  # a failed save leaves no truncated file
            self.model.save(staged_model)
        state = {"fingerprint": self.run_fingerprint, "epoch": epoch + 1, "model": model_name, "history": self.history}
        staged = self.directory / f".{_STATE_FILE}.tmp"
        staged.write_text(json.dumps(state, indent=1))
        os.replace(staged, self.directory / _STATE_FILE)
        for old in self.directory.glob("epoch-*.keras"):
            if old.name != model_name:
                old.unlink()


class TimeBudget(keras.callbacks.Callback):
    """Stop training at the first step after ``minutes`` of wall-clock training time."""

    def __init__(self, minutes: float, started: float):
        super().__init__()
        self.seconds, self.started = minutes * 60.0, started
        self.exhausted = False

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.started >= self.seconds:
            self.exhausted = True
            self.model.stop_training = True


def load_checkpoint(directory: Path, run_fingerprint: str) -> dict | None:
    """The saved state if it belongs to this run (same params and data), else None (and clear it)."""
    state_path = directory / _STATE_FILE
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
    except ValueError:
        state = {}
    if state.get("fingerprint") != run_fingerprint or not (directory / str(state.get("model"))).is_file():
        log.info("checkpoint in %s is from other params or data: starting afresh", directory)
        clear_checkpoints(directory)
        return None
    return state


_CHECKPOINT_README = "train's resume state: the last completed epoch of an unfinished run. Empty after a run completes.\n"


def clear_checkpoints(directory: Path) -> None:
    """Remove all resume state; leave a README so the (persisted) DVC output is never an empty folder."""
    for path in directory.iterdir():
        remove_path(path)
    (directory / "README.txt").write_text(_CHECKPOINT_README)


# ---------------------------------------------------------------- the stage


def run(params: TrainParams, paths: ProjectPaths) -> dict:
    """Train, write the model and history atomically, and return the history summary."""
    info = DatasetInfo.read(paths.prepared_dir)
    num_train = info.splits["train"].num_examples
    steps_per_epoch = num_train // params.batch_size
    if steps_per_epoch == 0:
        raise StageError(f"train.batch_size={params.batch_size} exceeds the {num_train} train examples in {paths.prepared_dir}")

    settings = device_settings_here(params)
    keras.utils.set_random_seed(params.seed)
    if settings.num_gpus == 0:
        tf.config.experimental.enable_op_determinism()  # same params + seed -> same model on CPU
    keras.mixed_precision.set_global_policy(settings.mixed_precision_policy)
    log.info(
        "device: %d GPU(s); policy %s; XLA %s; %d step(s) per execution",
        settings.num_gpus,
        settings.mixed_precision_policy,
        settings.jit_compile,
        settings.steps_per_execution,
    )

    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run_fingerprint = fingerprint(params, paths.prepared_dir)
    state = load_checkpoint(paths.checkpoint_dir, run_fingerprint)
    history: list[dict] = list(state["history"]) if state else []
    initial_epoch = state["epoch"] if state else 0

    strategy = make_strategy(params.distribute)
    with strategy.scope():
        if state:
            log.info("resuming from %s after epoch %d of %d", paths.checkpoint_dir, initial_epoch, params.epochs)
            model = keras.models.load_model(paths.checkpoint_dir / state["model"])
        else:
            model = build_network(params.arch, input_spec(info), params.widths)
            compile_model(model, params, steps_per_epoch, settings.jit_compile, settings.steps_per_execution)

    train_batches = read_split(
        paths.prepared_dir,
        "train",
        params.batch_size,
        shuffle_seed=params.seed,
        shuffle_buffer=params.shuffle_buffer,
        repeat=True,
        drop_remainder=True,
        skip_batches=initial_epoch * steps_per_epoch,
        batch_transform=augmenter(params) if params.augment else None,
    )
    val_batches = read_split(paths.prepared_dir, "val", params.batch_size) if info.splits["val"].num_examples else None

    from dvclive import Live
    from dvclive.keras import DVCLiveCallback
    from dvclive.utils import standardize_metric_name

    live = Live(dir=str(paths.live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    for row in history:  # a resumed run replays its earlier epochs so the curves are whole
        for key, value in row.items():
            if key not in ("epoch", "seconds"):
                live.log_metric(standardize_metric_name(key, "dvclive.keras"), value)
        live.next_step()

    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    callbacks = [EpochCheckpoint(paths.checkpoint_dir, run_fingerprint, history, started), DVCLiveCallback(live=live)]
    budget = TimeBudget(params.time_budget_minutes, started) if params.time_budget_minutes else None
    if budget:
        callbacks.append(budget)
    if initial_epoch < params.epochs:
        model.fit(
            train_batches,
            epochs=params.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_batches,
            callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
            shuffle=False,  # the reader already shuffles, seeded
        )
    else:
        live.end()

    summary = {
        "arch": params.arch,
        "epochs_completed": len(history),
        "stopped_by_time_budget": bool(budget and budget.exhausted),
        "train_seconds": history[-1]["seconds"] if history else 0.0,
        "trainable_parameters": int(sum(math.prod(w.shape) for w in model.trainable_weights)),
        "device": settings.__dict__,
        "epochs": history,
    }
    inference_model = _without_optimizer(model, strategy)
    with atomic_output(paths.model_file) as staged:
        inference_model.save(staged)
    with atomic_output(paths.history_file) as staged:
        staged.write_text(json.dumps(summary, indent=2) + "\n")
    clear_checkpoints(paths.checkpoint_dir)  # done: a later run starts afresh
    log.info("wrote %s after %d epochs in %.0f s", paths.model_file, summary["epochs_completed"], summary["train_seconds"])
    return summary


def _without_optimizer(model: keras.Model, strategy: tf.distribute.Strategy) -> keras.Model:
    """The same network and weights, uncompiled: the saved model is for inference, and small."""
    with strategy.scope():
        clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    return clean


def main() -> None:
    paths = ProjectPaths()
    run_main("train", lambda: run(load_params(paths.params_file).train, paths))


if __name__ == "__main__":
    main()
