"""Training's building blocks, shared by the train stage, the benchmark and the tests.

The learning-rate schedule and the loss (registered with Keras under ``cifar100_dvc``), the
optimizer and ``compile_model``, what ``auto`` resolves to on this machine (dtype policy, XLA,
steps per call, distribution strategy), the batch augmenter, and the scopes of process-wide
state: ``dtype_policy`` (Keras' global dtype policy) and ``process_settings`` (seed, dtype
policy, op determinism), each restoring what it changed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cifar100_dvc import hardware
from cifar100_dvc.augment import crop_and_flip
from cifar100_dvc.network import InputSpec, patch_whitening_kernel
from cifar100_dvc.params import TrainParams, check_optimizer
from cifar100_dvc.records import DatasetInfo, read_arrays

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then constant, linear or cosine decay to 0.

    With ``budget_spent`` (a variable holding the share of a time budget used, 0..1) the schedule
    runs at the pace of whichever is further along, the steps or the clock: on a machine too slow
    to finish ``total_steps`` in the budget, the whole schedule (warm-up and decay) is compressed
    into the budget, so training still ends with the rate decayed to 0 instead of at its peak.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str, budget_spent=None):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay
        self.budget_spent = budget_spent  # run state, not config: never serialized

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if self.budget_spent is not None:
            step = keras.ops.maximum(step, keras.ops.cast(self.budget_spent, "float32") * self.total_steps)
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


def is_batch_norm_bias(variable) -> bool:
    """Whether ``variable`` is a BatchNormalization layer's learned shift (``beta``)."""
    return getattr(variable, "path", variable.name).split("/")[-1].split(":")[0] == "beta"


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose BatchNorm biases step ``bias_lr_scale`` times further than the other weights (airbench: 64).

    Their gradients are multiplied by the scale before the update; for SGD, with or without
    momentum, that is the same as multiplying their learning rate (the decoupled weight decay,
    applied to the weights directly, stays the same for all). airbench found that the ReLU
    thresholds these shifts set settle in fewer epochs with the larger step.
    """

    def __init__(self, *args, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = bias_lr_scale

    def apply(self, grads, trainable_variables=None):
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        if self.bias_lr_scale != 1.0:
            grads = [
                grad * self.bias_lr_scale if grad is not None and is_batch_norm_bias(variable) else grad
                for grad, variable in zip(grads, variables)
            ]
        return super().apply(grads, trainable_variables)

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


def make_optimizer(params: TrainParams, steps_per_epoch: int, budget_spent=None) -> keras.optimizers.Optimizer:
    """The optimizer of ``params`` with its warm-up + decay learning-rate schedule (see WarmupSchedule).

    sgd and adamw decay the weights decoupled from the gradient (by weight_decay times the rate,
    each step); adam is plain Adam, with no decay at all (params refuse it with weight_decay > 0).
    sgd steps BatchNorm biases ``bn_bias_lr_scale`` times further (BiasScaledSGD); Adam's steps do
    not depend on a gradient's scale, so adam and adamw take no such factor.
    """
    schedule = WarmupSchedule(
        peak=params.learning_rate,
        warmup_steps=int(round(params.warmup_epochs * steps_per_epoch)),
        total_steps=params.epochs * steps_per_epoch,
        decay=params.schedule,
        budget_spent=budget_spent,
    )
    if params.optimizer == "sgd":
        return BiasScaledSGD(
            schedule,
            momentum=params.momentum,
            nesterov=True,
            weight_decay=params.weight_decay or None,
            bias_lr_scale=params.bn_bias_lr_scale,
        )
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=params.weight_decay)
    check_optimizer(params)  # adam with decay would be AdamW under another name (see check_optimizer)
    return keras.optimizers.Adam(schedule)


def compile_model(
    model: keras.Model,
    params: TrainParams,
    steps_per_epoch: int,
    jit_compile: bool,
    steps_per_execution: int,
    budget_spent=None,
) -> None:
    model.compile(
        optimizer=make_optimizer(params, steps_per_epoch, budget_spent),
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
    """``resolve_device_settings`` for the GPUs and CPU of this machine (see cifar100_dvc.hardware)."""
    return resolve_device_settings(
        params, len(tf.config.list_physical_devices("GPU")), hardware.cpu_has_bfloat16(hardware.cpu_flags())
    )


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


def augmenter(params: TrainParams):
    """Crop-and-flip of a batch, seeded by (train.seed, the batch's position in the stream)."""

    def augment(images: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
        seed = tf.stack([tf.constant(params.seed, tf.int64), position])
        return crop_and_flip(images, seed, params.crop_padding, params.crop_fill)

    return augment


def input_spec(info: DatasetInfo) -> InputSpec:
    """What the prepared data says a network must accept and produce."""
    return InputSpec(tuple(info.image_shape), tuple(info.class_names), tuple(info.mean_rgb), tuple(info.std_rgb))


WHITENING_IMAGES = 5000  # train images whose patch covariance sets the whitening stem: plenty for a 12x12 matrix


def whitening_kernel(params: TrainParams, info: DatasetInfo, prepared_dir: Path) -> np.ndarray | None:
    """The whitening stem's kernel from the first train images (stored order: the same for every
    seed), or None when ``params`` has no whitening stem."""
    if not (params.whiten_stem and params.arch == "resnet"):
        return None
    images_uint8, _ = read_arrays(prepared_dir, "train", limit=WHITENING_IMAGES)
    return patch_whitening_kernel(images_uint8, input_spec(info))


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``policy`` inside the block and restored after it: a layer
    takes the policy in force when it is built, so build (and compile) the model inside."""
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)


@contextlib.contextmanager
def process_settings(seed: int, policy: str, deterministic: bool) -> Iterator[None]:
    """Seed Keras/TF/NumPy, set the dtype policy and op determinism for one run; restore the
    policy and determinism afterwards, so a run in a long-lived process (a test session, a
    notebook) leaves the next one as it found it. Seeds are not restored: every run sets its own."""
    from tensorflow.python.framework import config as tf_config

    saved_determinism = tf_config.is_op_determinism_enabled()
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf_config.enable_op_determinism()
    try:
        with dtype_policy(policy):
            yield
    finally:
        if not saved_determinism:
            tf_config.disable_op_determinism()
