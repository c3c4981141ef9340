"""Training's building blocks, shared by the train stage, the benchmark and the tests.

The learning-rate schedule and the loss (registered with Keras under ``cifar100_dvc``), the
optimizer and ``compile_model``, what ``auto`` resolves to on this machine (dtype policy, XLA,
steps per call, distribution strategy), the batch augmenter, and the scopes of process-wide
state: ``dtype_policy`` (Keras' global dtype policy) and ``process_settings`` (seed, dtype
policy, op determinism), each restoring what it changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cifar100_dvc import hardware
from cifar100_dvc.augment import alternating_flips, crop_and_flip, crop_and_mirror, cutout
from cifar100_dvc.network import WHITENING_BIAS_LAYER, InputSpec, build_airbench, build_network, patch_whitening_kernel
from cifar100_dvc.params import AirbenchParams, TrainParams, check_optimizer
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


def is_whitening_bias(variable) -> bool:
    """Whether ``variable`` is the whitening stem's learned bias (airbench trains it for the first epochs only)."""
    return WHITENING_BIAS_LAYER in getattr(variable, "path", variable.name)


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


def run_progress(step, total_steps: int, budget_spent=None):
    """Share of the run done at ``step`` (0..1): of the planned steps, or of the time budget when that
    is further along (``budget_spent``: a variable holding the share spent, or None without a budget)."""
    progress = keras.ops.cast(step, "float32") / max(1, total_steps)
    if budget_spent is not None:
        progress = keras.ops.maximum(progress, keras.ops.cast(budget_spent, "float32"))
    return keras.ops.clip(progress, 0.0, 1.0)


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class TriangleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's triangle: ``peak`` times a multiplier that runs linearly from ``start`` at the
    first step to 1 at ``peak_at`` of the steps, then to ``end`` at the last (``triangle`` in
    airbench's utils.py: the peak on a whole step, as there). With ``budget_spent`` it follows
    ``run_progress``: where the planned steps do not fit the budget, the whole triangle is
    compressed into it and training ends with the multiplier at ``end``."""

    def __init__(self, peak: float, total_steps: int, start: float, peak_at: float, end: float, budget_spent=None):
        self.peak, self.total_steps, self.start, self.peak_at, self.end = peak, total_steps, start, peak_at, end
        self.budget_spent = budget_spent  # run state, not config: never serialized

    def progress(self, step):
        return run_progress(step, self.total_steps, self.budget_spent)

    def __call__(self, step):
        progress = self.progress(step)
        turn = int(self.peak_at * self.total_steps) / max(1, self.total_steps)  # airbench: int(peak * steps)
        rising = self.start + (1.0 - self.start) * progress / max(turn, 1e-12)
        falling = 1.0 + (self.end - 1.0) * (progress - turn) / max(1.0 - turn, 1e-12)
        return self.peak * keras.ops.where(progress < turn, rising, falling)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "start": self.start,
            "peak_at": self.peak_at,
            "end": self.end,
        }


def airbench_rates(config: AirbenchParams, batch_size: int) -> tuple[float, float]:
    """(SGD learning rate on the mean loss, L2 coefficient) of airbench's decoupled hyperparameters.

    airbench steps by ``lr / (1024 (1 + 1 / (1 - momentum)))`` on the loss summed over the batch,
    with PyTorch's weight decay ``wd * batch / lr``; on the mean loss (``batch`` times smaller
    gradients) the same steps take ``batch`` times that rate and an L2 of ``wd / lr``.
    """
    kilostep_scale = 1024 * (1 + 1 / (1 - config.momentum))
    learning_rate = config.learning_rate * batch_size / kilostep_scale
    return learning_rate, config.weight_decay / config.learning_rate


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class AirbenchSGD(keras.optimizers.Optimizer):
    """airbench's optimizer step, in Keras: PyTorch's Nesterov SGD with the L2 weight decay in the
    gradient, BatchNorm biases at ``bias_lr_scale`` times the rate (their decay unchanged), the
    whitening stem's bias frozen once ``whiten_bias_until`` of the run is done, and lookahead.

    Per variable p with gradient g (PyTorch's ``torch.optim.SGD(nesterov=True)``):
    ``d = g + l2 / s * p; buf = momentum * buf + d; p -= lr * s * (d + momentum * buf)``, s the
    variable's rate scale. Keras' own SGD keeps ``lr * buf`` instead, which differs once the rate
    moves, and decays the weights outside the momentum.

    Lookahead (airbench's LookaheadState), over every float weight of the model, BatchNorm's
    running statistics included (``track_lookahead``): from ``lookahead_from`` of the run on, every
    ``lookahead_every`` steps the slow copy moves toward the weights,
    ``slow += (1 - rho) (weights - slow)`` with ``rho = lookahead_decay * progress^3``, and the
    weights become the slow copy; the first such step only takes the copy. At every epoch's end
    the weights become the slow copy again. Keras' optimizer EMA (``use_ema``) averages every step
    with a fixed momentum and only the trainable weights, so it is not this. The slow copy is an
    optimizer variable: it is saved with the optimizer and a resumed run continues it exactly.
    """

    def __init__(
        self,
        learning_rate,
        momentum: float = 0.85,
        l2: float = 0.0,
        bias_lr_scale: float = 1.0,
        whiten_bias_until: float = 1.0,
        lookahead: bool = False,
        lookahead_every: int = 5,
        lookahead_decay: float = 0.95**5,
        lookahead_from: float = 0.0,
        steps_per_epoch: int = 1,
        name: str = "airbench_sgd",
        **kwargs,
    ):
        if not isinstance(learning_rate, TriangleSchedule):  # its progress sets the freeze, lookahead's start and rho
            raise TypeError(f"AirbenchSGD takes a TriangleSchedule, got {type(learning_rate).__name__}")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.l2, self.bias_lr_scale = momentum, l2, bias_lr_scale
        self.whiten_bias_until = whiten_bias_until
        self.lookahead, self.lookahead_every, self.lookahead_decay = lookahead, lookahead_every, lookahead_decay
        self.lookahead_from, self.steps_per_epoch = lookahead_from, steps_per_epoch
        self._lookahead_targets = None  # the model's weights, set by track_lookahead before build

    def track_lookahead(self, model_weights) -> None:
        """Average these (the model's float weights, trainable or not) in lookahead; call before build."""
        self._lookahead_targets = [w for w in model_weights if "float" in str(w.dtype)]

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        if self.lookahead:
            targets = self._lookahead_targets if self._lookahead_targets is not None else list(variables)
            self._lookahead_pairs = [(w, self.add_variable_from_reference(w, "slow")) for w in targets]
            self.lookahead_started = self.add_variable((), initializer="zeros", dtype="float32", name="lookahead_started")

    def _progress(self, step):
        return self._learning_rate.progress(step)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        scale = self.bias_lr_scale if is_batch_norm_bias(variable) else 1.0
        rate = keras.ops.cast(learning_rate, dtype) * scale
        if is_whitening_bias(variable):
            rate = rate * keras.ops.cast(self._whitening_bias_trains(), dtype)  # frozen: never moves again
        self._sgd_step(gradient, variable, rate, scale)

    def _sgd_step(self, gradient, variable, rate, scale: float) -> None:
        """PyTorch's Nesterov SGD step at ``rate``, its L2 divided by the variable's rate ``scale``."""
        direction = keras.ops.cast(gradient, variable.dtype) + (self.l2 / scale) * variable
        buffer = self.momentums[self._get_variable_index(variable)]
        self.assign(buffer, self.momentum * buffer + direction)
        self.assign_sub(variable, rate * (direction + self.momentum * buffer))

    def _backend_apply_gradients(self, grads, trainable_variables):
        super()._backend_apply_gradients(grads, trainable_variables)
        if self.lookahead:
            tf.__internal__.distribute.interim.maybe_merge_call(self._lookahead_step, self._distribution_strategy)

    def _lookahead_step(self, distribution):
        step = self.iterations + 1  # this step, counted from 1 as airbench counts it
        due = tf.equal(step % self.lookahead_every, 0) & (self._progress(self.iterations) >= self.lookahead_from)
        started = self.lookahead_started > 0.5
        rho = self.lookahead_decay * self._progress(step) ** 3
        epoch_end = tf.equal(step % self.steps_per_epoch, 0)

        def update(pairs, mix, copy_back: bool):
            for weights, slow in pairs:
                distribution.extended.update(slow.value, _move_toward, args=(weights.value, mix), group=False)
                if copy_back:
                    distribution.extended.update(weights.value, lambda w, s: w.assign(s), args=(slow.value,), group=False)

        pairs = self._lookahead_pairs
        # The first due step takes the copy; later due steps move it and copy it back; an epoch's end copies it back.
        tf.cond(due & ~started, lambda: update(pairs, 1.0, copy_back=False), lambda: None)
        tf.cond(due & started, lambda: update(pairs, 1.0 - rho, copy_back=True), lambda: None)
        tf.cond(epoch_end & (due | started), lambda: update(pairs, 0.0, copy_back=True), lambda: None)
        distribution.extended.update(self.lookahead_started.value, _raise_flag, args=(due,), group=False)

    def _whitening_bias_trains(self):
        """Whether this step is inside the whitening bias's share of the run (a boolean tensor); once
        it is not, it never is again: the run's progress only grows."""
        return self._progress(self.iterations) < self.whiten_bias_until

    def whitening_bias_frozen(self) -> bool:
        """Whether the whitening bias will never move again (``update_step`` holds it still from then on)."""
        return not bool(self._whitening_bias_trains())

    def finish_lookahead(self) -> None:
        """Make the weights the slow copy, if lookahead has started: what every epoch's end does, for a
        run that stops inside an epoch (a time budget)."""
        if self.lookahead and self.built and float(self.lookahead_started.numpy()) > 0.5:
            for weights, slow in self._lookahead_pairs:
                weights.assign(slow)

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "l2": self.l2,
            "bias_lr_scale": self.bias_lr_scale,
            "whiten_bias_until": self.whiten_bias_until,
            "lookahead": self.lookahead,
            "lookahead_every": self.lookahead_every,
            "lookahead_decay": self.lookahead_decay,
            "lookahead_from": self.lookahead_from,
            "steps_per_epoch": self.steps_per_epoch,
        }


NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # airbench94_muon's quintic: the steepest slope at zero


def newton_schulz_orthogonalize(matrix, steps: int, dtype: str = "bfloat16"):
    """``matrix`` [rows, cols] with its singular values pushed toward 1: airbench94_muon's
    ``zeropower_via_newtonschulz5`` (U S' V^T of its SVD U S V^T, S' roughly 0.5-1.5 rather than
    exactly 1, which trains as well), computed in ``dtype`` as published and returned in float32.

    The matrix is first divided by its Frobenius norm (so every singular value is at most 1), then
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, on its wide orientation (fewer rows than columns).
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = keras.ops.cast(matrix, dtype)
    norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(keras.ops.cast(x, "float32"))))
    x = x / keras.ops.cast(norm + 1e-7, dtype)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = keras.ops.transpose(x)
    for _ in range(steps):
        gram = keras.ops.matmul(x, keras.ops.transpose(x))
        x = a * x + keras.ops.matmul(b * gram + c * keras.ops.matmul(gram, gram), x)
    if tall:
        x = keras.ops.transpose(x)
    return keras.ops.cast(x, "float32")


def is_convolution_kernel(variable) -> bool:
    """Whether ``variable`` is a trainable convolution kernel [kh, kw, in, out], the weights Muon steps."""
    return len(variable.shape) == 4


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class AirbenchMuon(AirbenchSGD):
    """airbench94_muon's optimizer step, in Keras: Muon on the convolution kernels, and on every other
    weight AirbenchSGD's Nesterov SGD (the head at the schedule's rate, the BatchNorm and whitening
    biases at ``bias_lr_scale`` times it, with its L2), lookahead as there.

    Muon, per kernel p [kh, kw, in, out] with gradient g (airbench94_muon's ``Muon.step``):
    ``buf = muon_momentum * buf + g; u = g + muon_momentum * buf`` (Nesterov); p is rescaled to
    Frobenius norm sqrt(out); then ``p -= muon_learning_rate * m * O(u)``, m the schedule's multiplier
    (its rate over its peak) and O the Newton-Schulz orthogonalization of u as an [out, kh kw in]
    matrix (``newton_schulz_orthogonalize``, in ``newton_schulz_dtype``). The rescaling takes the place of weight decay on the
    kernels; O's result has the same size whatever the gradient's scale, so the rate needs no batch factor.

    The whitening bias does not follow the schedule here: its rate falls linearly from the biases' to 0
    over ``whiten_bias_until`` of the run, then it stays frozen.

    Keras' own ``keras.optimizers.Muon`` is a different recipe: it steps only 2-D weights with Muon
    (convolution kernels go to its AdamW), scales updates after Moonlight, and neither rescales
    weights nor has the SGD groups airbench's recipe pairs it with.
    """

    def __init__(
        self,
        learning_rate,
        muon_learning_rate: float = 0.24,
        muon_momentum: float = 0.6,
        newton_schulz_steps: int = 3,
        newton_schulz_dtype: str = "bfloat16",
        name: str = "airbench_muon",
        **kwargs,
    ):
        super().__init__(learning_rate, name=name, **kwargs)
        self.muon_learning_rate, self.muon_momentum = muon_learning_rate, muon_momentum
        self.newton_schulz_steps, self.newton_schulz_dtype = newton_schulz_steps, newton_schulz_dtype

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if is_convolution_kernel(variable):
            multiplier = keras.ops.cast(learning_rate, dtype) / self._learning_rate.peak
            self._muon_step(gradient, variable, self.muon_learning_rate * multiplier)
        elif is_whitening_bias(variable):
            share_left = keras.ops.relu(1.0 - self._progress(self.iterations) / max(self.whiten_bias_until, 1e-12))
            rate = self._learning_rate.peak * self.bias_lr_scale * keras.ops.cast(share_left, dtype)
            self._sgd_step(gradient, variable, rate, self.bias_lr_scale)
        else:
            super().update_step(gradient, variable, learning_rate)

    def _muon_step(self, gradient, variable, rate) -> None:
        gradient = keras.ops.cast(gradient, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        self.assign(buffer, self.muon_momentum * buffer + gradient)
        update = gradient + self.muon_momentum * buffer
        filters = variable.shape[-1]
        # [kh, kw, in, out] -> [out, kh kw in]: PyTorch's [out, in, kh, kw] flattened, up to a column order
        # that the orthogonalization carries back unchanged.
        matrix = keras.ops.transpose(keras.ops.reshape(update, (-1, filters)))
        orthogonal = newton_schulz_orthogonalize(matrix, self.newton_schulz_steps, self.newton_schulz_dtype)
        update = keras.ops.reshape(keras.ops.transpose(orthogonal), variable.shape)
        norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(variable)))
        self.assign(variable, variable * (math.sqrt(filters) / norm))
        self.assign_sub(variable, rate * update)

    def get_config(self):
        return {
            **super().get_config(),
            "muon_learning_rate": self.muon_learning_rate,
            "muon_momentum": self.muon_momentum,
            "newton_schulz_steps": self.newton_schulz_steps,
            "newton_schulz_dtype": self.newton_schulz_dtype,
        }


class DetachFrozenWhiteningBias(keras.callbacks.Callback):
    """airbench's ``whiten_bias_grad=False``: once the optimizer holds the whitening stem's bias still
    (``AirbenchSGD.whitening_bias_frozen``), its gradient is no longer asked for, so backpropagation
    ends at block 1's first convolution instead of computing that convolution's input gradient (on
    the largest feature map, with the stem's GELU behind it) for a bias that cannot move. airbench's
    PyTorch code gets this by detaching the bias; here the bias layer turns untrainable at the first
    epoch start after its share of the run, and the training step is retraced once without it.

    Nothing trained changes, only the time (the other gradients are the same operations; what it
    saves, measured: docs/benchmark.md). The layer is trainable again when training ends, so the
    saved model and its parameter count are those of the network.
    """

    def __init__(self):
        super().__init__()
        self._detached = None  # the bias layer while detached

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        if self._detached is not None or not isinstance(optimizer, AirbenchSGD) or not optimizer.whitening_bias_frozen():
            return
        layers = trained_network(self.model).layers  # not the proxy's: frozen from the start
        bias_layer = next((layer for layer in layers if layer.name == WHITENING_BIAS_LAYER), None)
        if bias_layer is None or not bias_layer.trainable:
            return
        bias_layer.trainable = False
        self._detached = bias_layer
        self.model.make_train_function(force=True)  # fit calls model.train_function afresh at every step
        log.info("whitening bias frozen: its gradient is no longer computed from epoch %d on", epoch + 1)

    def on_train_end(self, logs=None):
        if self._detached is not None:
            self._detached.trainable = True
            self._detached = None
            self.model.make_train_function(force=True)


def _move_toward(slow, weights, mix):
    """slow += mix * (weights - slow), as torch's lerp_: exact when the two are equal."""
    return slow.assign_add(tf.cast(mix, slow.dtype) * (weights - slow))


def _raise_flag(flag, condition):
    return flag.assign(tf.maximum(flag, tf.cast(condition, flag.dtype)))


def muon_rates(config: AirbenchParams, batch_size: int) -> tuple[float, float, float]:
    """(the head's SGD rate on the mean loss, the biases' scale of it, L2 coefficient) of airbench94_muon's
    per-example rates on the summed loss: PyTorch's SGD with ``weight_decay = wd / lr``, wd = decay x batch."""
    muon = config.muon
    head_rate = muon.head_learning_rate * batch_size
    return head_rate, muon.bias_learning_rate / muon.head_learning_rate, muon.weight_decay / muon.head_learning_rate


def make_airbench_optimizer(params: TrainParams, steps_per_epoch: int, budget_spent=None) -> AirbenchSGD:
    """airbench's optimizer (AirbenchSGD, or AirbenchMuon with ``optimizer: muon``) and triangle schedule
    for ``params.airbench``; the whitening bias's and lookahead's epochs become shares of the run, so a
    time budget compresses them too."""
    config = params.airbench
    if config.optimizer == "muon":
        learning_rate, bias_lr_scale, l2 = muon_rates(config, params.batch_size)
    else:
        (learning_rate, l2), bias_lr_scale = airbench_rates(config, params.batch_size), config.bias_lr_scale
    total_steps = params.epochs * steps_per_epoch
    schedule = TriangleSchedule(
        learning_rate, total_steps, config.schedule_start, config.schedule_peak, config.schedule_end, budget_spent
    )
    shared = {
        "momentum": config.momentum,
        "l2": l2,
        "bias_lr_scale": bias_lr_scale,
        "whiten_bias_until": config.whiten_bias_epochs / params.epochs,
        "lookahead": config.lookahead,
        "lookahead_every": config.lookahead_every,
        "lookahead_decay": config.lookahead_decay,
        "lookahead_from": config.lookahead_start_epoch / params.epochs,
        "steps_per_epoch": steps_per_epoch,
    }
    if config.optimizer == "muon":
        muon = config.muon
        return AirbenchMuon(schedule, muon.learning_rate, muon.momentum, muon.newton_schulz_steps, **shared)
    return AirbenchSGD(schedule, **shared)


PROXY_LABEL_SMOOTHING = 0.2  # airbench96_faster's proxy: its loss, and the loss that ranks the examples
PROXY_MOMENTUM, PROXY_BIAS_LR_SCALE = 0.85, 64.0  # its Nesterov SGD, as airbench93's
PROXY_SCHEDULE = (0.2, 0.1, 0.0)  # its rate: 0.2 at the start, 1 at a tenth of the run, 0 at the end


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class ProxyFiltered(keras.Model):
    """airbench96_faster's data filtering around ``network``: at every step ``proxy`` (a small airbench)
    scores the batch, and ``network`` trains only on the ``keep`` examples with the highest proxy loss.
    The proxy trains alongside, on the same batches, every ``step_every``-th step on its own ``keep``
    hardest. airbench96_faster trains its proxy through the whole run first, recording a mask per
    batch, then the network on the same batch stream with those masks; each mask there comes from
    the proxy as it stood at that step, so training the two in lockstep selects the same examples.

    Losses are summed over the examples kept and divided by the whole batch, so every kept example
    steps the weights as far as in a run without filtering (airbench96_faster's rates are per 1024
    examples on the summed loss). Inference is ``network`` alone (``trained_network``); the proxy and
    its optimizer (``proxy_optimizer``, set by ``compile_model``) live only in training checkpoints.
    """

    def __init__(self, network: keras.Model, proxy: keras.Model, keep: int, step_every: int, **kwargs):
        super().__init__(**kwargs)
        self.network, self.proxy, self.keep, self.step_every = network, proxy, keep, step_every
        self.proxy_optimizer = None
        self.built = True  # both networks are functional: built already, so a checkpoint loads into it at once

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def hardest(self, images, labels):
        """Indices of the ``keep`` examples of the batch with the highest proxy loss; on every
        ``step_every``-th step (of the network's optimizer) the proxy also steps on them."""
        batch = keras.ops.cast(keras.ops.shape(labels)[0], "float32")

        def ranked(logits):
            losses = smoothed_sparse_crossentropy(labels, logits, PROXY_LABEL_SMOOTHING)
            return losses, tf.math.top_k(losses, self.keep).indices

        def score_and_step():
            variables = self.proxy.trainable_variables
            with tf.GradientTape() as tape:
                losses, hard = ranked(self.proxy(images, training=True))
                loss = keras.ops.sum(keras.ops.take(losses, hard)) / batch
            self.proxy_optimizer.apply(tape.gradient(self.proxy_optimizer.scale_loss(loss), variables), variables)
            return hard

        def score():
            return ranked(self.proxy(images, training=True))[1]  # training mode: batch statistics, as airbench's

        return tf.cond(self.optimizer.iterations % self.step_every == 0, score_and_step, score)

    def train_step(self, data):
        images, labels = data[:2]  # (images, labels[, sample weights]): the reader gives none
        hard = self.hardest(images, labels)
        batch = keras.ops.cast(keras.ops.shape(labels)[0], "float32")
        images, labels = tf.gather(images, hard), tf.gather(labels, hard)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)
            loss = self.compute_loss(x=images, y=labels, y_pred=logits, training=True)  # the mean over the kept
            scaled = self.optimizer.scale_loss(loss * (self.keep / batch))
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
        return self.compute_metrics(images, labels, logits, sample_weight=None)

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "proxy": keras.saving.serialize_keras_object(self.proxy),
            "keep": self.keep,
            "step_every": self.step_every,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        proxy = keras.saving.deserialize_keras_object(config.pop("proxy"))
        return cls(network, proxy, **config)


def trained_network(model: keras.Model) -> keras.Model:
    """The network ``model`` trains: itself, or the one a ``ProxyFiltered`` filters the data for."""
    return model.network if isinstance(model, ProxyFiltered) else model


def proxy_config(config: AirbenchParams) -> AirbenchParams:
    """airbench96_faster's proxy network: airbench at ``config.proxy.widths``, depth 2, PyTorch's head
    init and logits / 9, BatchNorm at PyTorch's default momentum (0.1: Keras' 0.9)."""
    return dataclasses.replace(
        config, widths=config.proxy.widths, depth=2, head_init_std=None, output_scale=1 / 9, batchnorm_momentum=0.9
    )


def build_training_model(params: TrainParams, spec: InputSpec, kernel: np.ndarray | None) -> keras.Model:
    """What ``fit`` trains: the network of ``params``, inside a ``ProxyFiltered`` when
    ``train.airbench.proxy.keep`` is below 1."""
    network = build_network(params, spec, kernel)
    proxy = params.airbench.proxy
    if params.arch != "airbench" or proxy.keep >= 1.0:
        return network
    proxy_network = build_airbench(spec, proxy_config(params.airbench), kernel, name="proxy")
    proxy_network.get_layer(WHITENING_BIAS_LAYER).trainable = False  # airbench96_faster: frozen in the proxy
    return ProxyFiltered(network, proxy_network, kept_per_batch(params), proxy.step_every, name="proxy_filtered")


def kept_per_batch(params: TrainParams) -> int:
    """Examples per batch the network trains on under data filtering (at least one)."""
    return max(1, round(params.airbench.proxy.keep * params.batch_size))


def make_proxy_optimizer(params: TrainParams, steps_per_epoch: int, budget_spent=None) -> AirbenchSGD:
    """The proxy's optimizer: airbench's Nesterov SGD at ``train.airbench.proxy``'s rates, on the
    schedule ``PROXY_SCHEDULE`` over the proxy's own steps (one every ``step_every``), compressed by
    a time budget as the network's."""
    proxy = params.airbench.proxy
    rates = dataclasses.replace(
        params.airbench, learning_rate=proxy.learning_rate, weight_decay=proxy.weight_decay, momentum=PROXY_MOMENTUM
    )
    learning_rate, l2 = airbench_rates(rates, params.batch_size)
    total_steps = math.ceil(params.epochs * steps_per_epoch / proxy.step_every)
    schedule = TriangleSchedule(learning_rate, total_steps, *PROXY_SCHEDULE, budget_spent)
    return AirbenchSGD(
        schedule,
        momentum=PROXY_MOMENTUM,
        l2=l2,
        bias_lr_scale=PROXY_BIAS_LR_SCALE,
        steps_per_epoch=steps_per_epoch,
        name="proxy_sgd",
    )


def make_optimizer(params: TrainParams, steps_per_epoch: int, budget_spent=None) -> keras.optimizers.Optimizer:
    """The optimizer of ``params`` with its warm-up + decay learning-rate schedule (see WarmupSchedule).

    sgd and adamw decay the weights decoupled from the gradient (by weight_decay times the rate,
    each step); adam is plain Adam, with no decay at all (params refuse it with weight_decay > 0).
    sgd steps BatchNorm biases ``bn_bias_lr_scale`` times further (BiasScaledSGD); Adam's steps do
    not depend on a gradient's scale, so adam and adamw take no such factor. ``airbench`` has its
    own optimizer and schedule (``make_airbench_optimizer``).
    """
    if params.arch == "airbench":
        return make_airbench_optimizer(params, steps_per_epoch, budget_spent)
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
    optimizer = make_optimizer(params, steps_per_epoch, budget_spent)
    network = trained_network(model)
    if isinstance(optimizer, AirbenchSGD):
        optimizer.track_lookahead(network.weights)  # BatchNorm's running statistics are averaged too
    model.compile(
        optimizer=optimizer,
        loss=SmoothedSparseCrossentropy(params.label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"),
        ],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    if isinstance(model, ProxyFiltered):
        model.proxy_optimizer = make_proxy_optimizer(params, steps_per_epoch, budget_spent)
        model.proxy_optimizer.build(model.proxy.trainable_variables)  # before tracing: no variables made inside tf.cond
        optimizer.build(network.trainable_variables)  # fit would build it on the proxy's weights too


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


def augmenter(params: TrainParams, info: DatasetInfo):
    """The batch augmentation of ``params`` for the train split ``info`` describes, seeded by
    (train.seed, the batch's position in the stream): ``transform(images, position, example_ids)``
    for ``read_split``.

    resnet and baseline: crop from a padded image (``crop_padding``, ``crop_fill``) and a coin flip.
    airbench: translation by up to ``translate`` pixels, the edge reflected, and its ``flip``:
    ``alternating`` (``alternating_flips``; the base orientations drawn once from the seed, for all
    the split's examples) or ``random``; then, where ``cutout`` is set, a square of the split's mean
    colour (its randomness folded in apart, so that the other draws stay those of a run without it).
    """
    if params.arch != "airbench":

        def augment(images: tf.Tensor, position: tf.Tensor, example_ids: tf.Tensor) -> tf.Tensor:
            seed = tf.stack([tf.constant(params.seed, tf.int64), position])
            return crop_and_flip(images, seed, params.crop_padding, params.crop_fill)

        return augment

    config = params.airbench
    num_train = info.splits["train"].num_examples
    base_flips = tf.random.stateless_uniform([num_train], seed=[params.seed, 1]) < 0.5
    mean_colour = tf.constant(np.round(info.mean_rgb), tf.uint8)

    def augment_airbench(images: tf.Tensor, position: tf.Tensor, example_ids: tf.Tensor) -> tf.Tensor:
        batch_seed = tf.stack([tf.constant(params.seed, tf.int64), position])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(batch_seed, num=2))
        if config.flip == "alternating":  # whole batches (drop_remainder): image j is example position * batch + j
            stream_positions = position * params.batch_size + tf.range(tf.shape(images)[0], dtype=tf.int64)
            mirrored = alternating_flips(example_ids, stream_positions, base_flips, num_train)
        else:
            mirrored = tf.random.stateless_uniform([tf.shape(images)[0]], seed=flip_seed) < 0.5
        images = crop_and_mirror(images, crop_seed, config.translate, mirrored, fill="reflect")
        if config.cutout:
            images = cutout(images, tf.random.experimental.stateless_fold_in(batch_seed, 3), config.cutout, mean_colour)
        return images

    return augment_airbench


def input_spec(info: DatasetInfo) -> InputSpec:
    """What the prepared data says a network must accept and produce."""
    return InputSpec(tuple(info.image_shape), tuple(info.class_names), tuple(info.mean_rgb), tuple(info.std_rgb))


WHITENING_IMAGES = 5000  # train images whose patch covariance sets the whitening stem: plenty for a 12x12 matrix


def whitening_kernel(params: TrainParams, info: DatasetInfo, prepared_dir: Path) -> np.ndarray | None:
    """The whitening stem's kernel from the first train images (stored order: the same for every
    seed), or None when ``params`` has no whitening stem. airbench's is of the patches' second
    moment about zero, as its code computes it; resnet's of their covariance."""
    if not (params.arch == "airbench" or (params.whiten_stem and params.arch == "resnet")):
        return None
    images_uint8, _ = read_arrays(prepared_dir, "train", limit=WHITENING_IMAGES)
    return patch_whitening_kernel(images_uint8, input_spec(info), centered=params.arch != "airbench")


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
