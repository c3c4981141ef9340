"""The networks, defined apart from any I/O: each builder returns an uncompiled Keras model.

Every model takes raw RGB ``uint8`` images of shape (32, 32, 3), normalizes them inside the
graph with the train split's per-channel statistics, and returns float32 logits. The class
names ride along in the last layer's config, so a saved model is self-describing.

``airbench`` is KellerJordan/cifar10-airbench's airbench93 network; ``resnet`` a small
ResNet-9; ``baseline`` the notebook's CNN, layer for layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from cifar100_dvc.params import AirbenchParams, TrainParams

ARCHITECTURES = ("airbench", "baseline", "resnet")


@dataclass(frozen=True)
class InputSpec:
    """What the data says a network must accept and produce."""

    image_shape: tuple[int, int, int]  # (height, width, channels), uint8 pixels
    class_names: tuple[str, ...]
    mean_rgb: tuple[float, float, float]  # train-split pixel mean, 0..255 units
    std_rgb: tuple[float, float, float]  # train-split pixel standard deviation, 0..255 units

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class ClassNames(layers.Layer):
    """Identity on the logits whose config carries the class names, in label order."""

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def call(self, logits):
        return logits

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step runs TensorFlow's fused kernel.

    Keras 3 normalizes a training batch with separate moments, cast and arithmetic ops
    (keras-team/keras-core#225); one FusedBatchNormV3 kernel (oneDNN on a CPU, cuDNN on a GPU)
    does the same in one pass over memory. In the README's benchmark (baseline, batch 256,
    float32, compute-only, one change at a time, 2-core CPU) it raised training from 583 and
    554 to 738 and 739 images/s in two runs: 1.29x the notebook's settings. Same weights, same
    output, same moving-average update (with the biased batch variance, as Keras); without a
    learned scale (``scale=False``, airbench's BatchNorm) the kernel gets a constant 1. Inference
    and every case the kernel does not cover (masks, renorm, synchronized statistics, non-NHWC
    axes, other backends) fall back to the Keras layer.
    """

    def _fusable(self, inputs, training, mask) -> bool:
        return (
            bool(training)
            and self.trainable
            and mask is None
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.center
            and not self.renorm
            and not self.synchronized  # statistics over all replicas need Keras' all-reduced moments
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        gamma = self.gamma if self.scale else tf.ones_like(self.beta)
        outputs, batch_mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, self.beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        # The kernel returns the Bessel-corrected variance; Keras tracks the biased one.
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
        batch_variance = unbiased_variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + batch_mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + batch_variance * (1.0 - self.momentum))
        return keras.ops.cast(outputs, self.compute_dtype)


_SQRT_HALF = math.sqrt(0.5)
_INVERSE_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@tf.function(jit_compile=True)
def _gelu_forward(x):
    x32 = tf.cast(x, tf.float32)
    return tf.cast(0.5 * x32 * (1.0 + tf.math.erf(x32 * _SQRT_HALF)), x.dtype)


@tf.function(jit_compile=True)
def _gelu_backward(x, upstream):
    x32 = tf.cast(x, tf.float32)
    slope = 0.5 * (1.0 + tf.math.erf(x32 * _SQRT_HALF)) + x32 * tf.exp(-0.5 * x32 * x32) * _INVERSE_SQRT_2PI
    return tf.cast(tf.cast(upstream, tf.float32) * slope, upstream.dtype)


@tf.custom_gradient
def _fused_gelu(x):
    return _gelu_forward(x), lambda upstream: _gelu_backward(x, upstream)


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class GELU(layers.Layer):
    """Exact GELU, x * Phi(x) (PyTorch's ``nn.GELU()``, airbench's activation), whose training step
    is one pass over memory each way.

    TensorFlow composes it from separate elementwise ops (multiply, erf, add, ...) and its
    gradient from more, each a pass over memory, in bfloat16 through conversions: 4.5x the time
    of a ReLU on airbench's whitened stem, over a quarter of its training step (measured in a
    probe here). In training, the forward pass and its gradient (Phi(x) + x * phi(x)) are each
    compiled by XLA into one loop, in float32 inside; in inference Keras' own exact gelu runs,
    so a saved or exported model holds no XLA. The same function either way, to rounding.
    """

    def call(self, inputs, training=None):
        if training and keras.backend.backend() == "tensorflow":
            return _fused_gelu(inputs)
        return keras.activations.gelu(inputs, approximate=False)

    def compute_output_shape(self, input_shape):
        return input_shape


def _float32_policies(config):
    """``config`` (a model's, as get_config gives it) with every layer's dtype policy made float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(item) for item in config]
    return config


def float32_model(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled, every layer computing in float32.

    Mixed precision is a choice of training, not part of the model: a model saved with
    ``mixed_bfloat16`` layers would compute in bfloat16 wherever it is loaded, which TFLite cannot
    convert and a CPU without bfloat16 instructions only emulates. Rebuilt from its config (not
    cloned: ``clone_model`` compiles the clone of a compiled model, and a saved compile config would
    make a plain ``keras.models.load_model`` need the training code); the variables are float32
    under either policy, so the weights carry over as they are.
    """
    clean = keras.Model.from_config(_float32_policies(model.get_config()))
    clean.set_weights(model.get_weights())
    return clean


FORWARD, INPUT_GRADIENT, KERNEL_GRADIENT = "forward", "input gradient", "kernel gradient"


def training_passes(model: keras.Model) -> list[tuple[layers.Layer, int, tuple[str, ...]]]:
    """(layer, forward FLOPs per image, the passes a training step makes) of ``model``'s convolutions and
    dense layers, in order.

    Counted from the layers (a multiply-add is 2 FLOPs): a Conv2D's forward pass is
    2 x output height x width x filters x (kernel height x width x input channels), a Dense's
    2 x inputs x units; each backward pass costs the same. The gradient of a layer's input is
    computed unless no trainable weight lies before it (nothing upstream needs it), that of its
    kernel when the layer trains.
    """
    passes, upstream_trainable = [], False
    for layer in model.layers:  # a functional model's layers are in topological order
        if isinstance(layer, layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width, channels_in, _ = layer.kernel.shape
            forward = 2 * height * width * filters * kernel_height * kernel_width * channels_in
        elif isinstance(layer, layers.Dense):
            forward = 2 * math.prod(layer.kernel.shape)
        else:
            forward = 0
        trainable = bool(layer.trainable_weights)
        if forward:
            backward = (INPUT_GRADIENT,) * upstream_trainable + (KERNEL_GRADIENT,) * trainable
            passes.append((layer, int(forward), (FORWARD, *backward)))
        upstream_trainable = upstream_trainable or trainable
    return passes


def training_flops_per_image(model: keras.Model) -> int:
    """Floating-point operations of one training image through ``model``'s convolutions and dense layers
    (``training_passes``: forward, and the input's and kernel's gradients where training needs them).

    Normalization, activations, pooling and the optimizer are left out: they are a few operations
    per value, bound by memory, not by arithmetic. This is the work a training step cannot avoid;
    time spent elsewhere shows up as a lower share of the machine's matrix-multiply rate.
    """
    return sum(forward * len(passes) for _, forward, passes in training_passes(model))


def class_names_of(model: keras.Model) -> list[str]:
    """The class names a model built here carries, in label order."""
    return list(model.get_layer("class_names").class_names)


def _normalized_input(spec: InputSpec) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """uint8 image input and its normalized float view: (x - mean) / std per channel."""
    images_uint8 = keras.Input(shape=spec.image_shape, dtype="uint8", name="images_uint8")
    x = layers.Normalization(
        mean=list(spec.mean_rgb),
        variance=[s * s for s in spec.std_rgb],
        name="normalize_rgb",
    )(layers.Identity(dtype="float32", name="to_float")(images_uint8))
    return images_uint8, x


def _logits_head(x, spec: InputSpec) -> keras.KerasTensor:
    # float32 logits even under a mixed-precision policy: softmax/loss need the range.
    logits = layers.Dense(spec.num_classes, dtype="float32", name="logits")(x)
    return ClassNames(spec.class_names, dtype="float32", name="class_names")(logits)


def build_baseline(spec: InputSpec, batch_norm: type[layers.BatchNormalization] = FusedBatchNormalization) -> keras.Model:
    """The notebook's CNN, layer for layer: 3 x (2 x Conv3x3+ReLU+BN, MaxPool, Dropout), Dense 512.

    For 100 classes: 1,388,292 trainable parameters (1,389,188 with BatchNorm's moving stats).
    ``batch_norm=keras.layers.BatchNormalization`` gives the notebook's stock layer (same math,
    slower training step), which the benchmark times as the notebook's settings.
    """
    images_uint8, x = _normalized_input(spec)
    for filters, dropout_rate in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = batch_norm()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return keras.Model(images_uint8, _logits_head(x, spec), name="baseline")


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class DiracInitializer(keras.initializers.Initializer):
    """Conv kernel [kh, kw, in, out] drawn by ``base`` (Glorot-uniform, or PyTorch's default with
    ``base="torch_uniform"``) whose first min(in, out) filters are the identity instead (airbench's
    dirac initialization): each such filter starts by passing one input channel through, so a
    deep stack starts close to the identity map and trains faster."""

    def __init__(self, seed=None, base: str = "glorot_uniform"):
        self.seed, self.base = seed, base

    def __call__(self, shape, dtype=None):
        kernel = base_initializer(self.base, self.seed)(shape, dtype)
        height, width, channels_in, channels_out = shape
        passed = min(channels_in, channels_out)
        identity = np.zeros(shape, np.float32)
        identity[height // 2, width // 2, np.arange(passed), np.arange(passed)] = 1.0
        is_identity_filter = np.arange(channels_out) < passed
        return keras.ops.where(is_identity_filter, keras.ops.cast(identity, kernel.dtype), kernel)

    def get_config(self):
        return {"seed": self.seed, "base": self.base}


def base_initializer(name: str, seed=None) -> keras.initializers.Initializer:
    """``glorot_uniform`` (Keras' default), or ``torch_uniform``: PyTorch's default for Conv2d and
    Linear weights (kaiming-uniform with a = sqrt(5), i.e. uniform within +-1/sqrt(fan_in)),
    which airbench's published recipe starts from."""
    if name == "torch_uniform":
        return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)
    if name == "glorot_uniform":
        return keras.initializers.GlorotUniform(seed)
    raise ValueError(f"unknown base initializer {name!r}: glorot_uniform or torch_uniform")


def _conv_bn_relu(x, filters: int, name: str, pool: bool = False, dirac: bool = False):
    """Conv3x3 -> (MaxPool2) -> BN -> ReLU. Pooling before BN/ReLU, as airbench does, runs
    them at a quarter of the pixels: the same function class, less memory traffic."""
    initializer = DiracInitializer() if dirac else "glorot_uniform"
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=initializer, name=f"{name}_conv")(x)
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


WHITENING_PATCH = 2  # pixels per side of the patches the whitening stem decorrelates


def patch_whitening_kernel(images_uint8: np.ndarray, spec: InputSpec, epsilon: float = 5e-4, centered: bool = True) -> np.ndarray:
    """Conv kernel [2, 2, C, 2 * 4C] that whitens the 2x2 patches of normalized images (airbench).

    Its filters are the eigenvectors of the patches' covariance, each divided by the square
    root of its eigenvalue (plus ``epsilon``), so on these images every output channel has
    unit variance and no two are correlated; each filter comes twice, as w and -w, so the ReLU
    after it keeps both signs. ``centered=False`` takes the patches' second moment about zero
    instead of about their mean, as airbench's code does (the normalized patches' mean is close
    to zero anyway). Pass a few thousand training images.
    """
    pixels = (images_uint8.astype(np.float64) - np.array(spec.mean_rgb)) / np.array(spec.std_rgb)
    size, channels = WHITENING_PATCH, images_uint8.shape[-1]
    height, width = pixels.shape[1:3]
    patches = np.stack(
        [pixels[:, i : height - size + 1 + i, j : width - size + 1 + j] for i in range(size) for j in range(size)], axis=3
    ).reshape(-1, size * size * channels)  # [patches, (row, column, channel)]: the kernel's order
    covariance = np.cov(patches, rowvar=False) if centered else patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = (eigenvectors / np.sqrt(eigenvalues + epsilon)).T.reshape(-1, size, size, channels)
    kernel = np.concatenate([filters, -filters]).transpose(1, 2, 3, 0)
    return kernel.astype(np.float32)


def _whitening_stem(x, kernel: np.ndarray | None):
    """Frozen 2x2 patch-whitening conv, then ReLU. ``kernel`` None: zeros, for a model whose
    weights are loaded afterwards (a checkpoint, a saved model)."""
    size, _, channels, filters = (WHITENING_PATCH, WHITENING_PATCH, 3, 24) if kernel is None else kernel.shape
    conv = layers.Conv2D(filters, size, padding="same", use_bias=False, trainable=False, name="stem_whiten")
    x = conv(x)
    if kernel is not None:
        conv.kernel.assign(kernel)
    return layers.ReLU(name="stem_relu")(x)


def build_resnet(
    spec: InputSpec,
    widths: Sequence[int],
    whiten_stem: bool = False,
    whitening_kernel: np.ndarray | None = None,
    dirac_init: bool = False,
) -> keras.Model:
    """A ResNet-9-style network (Page's DAWNBench design), scaled by ``widths``.

    widths = (stem, stage1, stage2, stage3). With ``whiten_stem``, the stem is instead a frozen
    2x2 conv that whitens pixel patches (``patch_whitening_kernel``, 24 channels for RGB), as in
    airbench: the first layer starts decorrelated instead of learning it. With ``dirac_init``, the
    stages' convolutions start as identities on their first filters (DiracInitializer). Each
    stage is a conv that doubles the channels and halves the resolution by max pooling and, in
    stages 1 and 3, a residual pair of conv-BN-ReLU. Global max pooling
    and a linear head follow; the logits are scaled by 1/8, which keeps the initial loss
    near ln(num_classes) and lets a large learning rate stay stable.
    """
    if len(widths) != 4:
        raise ValueError(f"resnet needs 4 widths (stem, stage1, stage2, stage3), got {widths}")
    images_uint8, x = _normalized_input(spec)
    x = _whitening_stem(x, whitening_kernel) if whiten_stem else _conv_bn_relu(x, widths[0], "stem")
    for stage, filters in enumerate(widths[1:], start=1):
        x = _conv_bn_relu(x, filters, f"stage{stage}", pool=True, dirac=dirac_init)
        if stage != 2:  # residual pairs at 16x16 and 4x4, as in ResNet-9
            shortcut = x
            x = _conv_bn_relu(x, filters, f"stage{stage}_res1", dirac=dirac_init)
            x = _conv_bn_relu(x, filters, f"stage{stage}_res2", dirac=dirac_init)
            x = layers.Add(name=f"stage{stage}_add")([shortcut, x])
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    x = layers.Rescaling(0.125, name="logit_scale")(x)
    return keras.Model(images_uint8, _logits_head(x, spec), name="resnet")


@keras.saving.register_keras_serializable(package="cifar100_dvc")
class ChannelBias(layers.Layer):
    """A learned offset per channel, added to its input: airbench's whitening stem is a frozen
    convolution with a bias that trains for the first epochs, and a separate layer lets the
    kernel stay frozen while the bias learns."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


AIRBENCH_BATCHNORM_EPSILON = 1e-12  # airbench's: the batch variance alone sets the scale
WHITENING_BIAS_LAYER = "stem_whiten_bias"  # the one layer whose variables airbench trains for only the first epochs


def keras_gelu(name: str) -> layers.Layer:
    """Keras' own exact GELU layer (TensorFlow's composite ops): what ``GELU`` replaces, for the benchmark."""
    return layers.Activation("gelu", name=name)


def _airbench_block(x, filters: int, name: str, batchnorm: dict, batch_norm: type, activation, depth: int = 2):
    """airbench's ConvGroup: conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU; convolutions
    without bias, PyTorch's default init with the identity on their first filters (dirac). Depth 3 is
    airbench96's: then -> conv3x3 -> BN, plus the first GELU's output (a residual), -> GELU."""
    shortcut = None
    for index in range(1, depth + 1):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=DiracInitializer(base="torch_uniform"),
            name=f"{name}_conv{index}",
        )(x)
        if index == 1:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = batch_norm(**batchnorm, name=f"{name}_bn{index}")(x)
        if index == 3:
            x = layers.Add(name=f"{name}_residual")([x, shortcut])
        x = activation(name=f"{name}_gelu{index}")(x)
        if index == 1:
            shortcut = x
    return x


def build_airbench(
    spec: InputSpec,
    config: AirbenchParams,
    whitening_kernel: np.ndarray | None = None,
    batch_norm: type[layers.BatchNormalization] = FusedBatchNormalization,
    activation=GELU,
    name: str = "airbench",
) -> keras.Model:
    """airbench93 (KellerJordan/cifar10-airbench, ``make_net93``), layer for layer, at ``config.widths``.

    A frozen 2x2 patch-whitening convolution (no padding, 2 * 4C channels, its kernel from
    ``patch_whitening_kernel``; None: zeros, for weights loaded afterwards) plus a learned
    per-channel bias, then GELU; three blocks (``_airbench_block``, ``config.depth`` convolutions each); a max over what is left
    of the image (airbench's MaxPool2d(3) at 32x32); a bias-free linear layer (``head_initializer``) and the logits
    times ``config.output_scale``. BatchNorm has no learned scale unless ``config.batchnorm_scale``.
    ``batch_norm=keras.layers.BatchNormalization`` and ``activation=keras_gelu`` give the same network
    with Keras' stock layers (slower training steps), which the benchmark times.
    """
    if len(config.widths) != 3:
        raise ValueError(f"airbench needs 3 widths (block 1, 2, 3), got {list(config.widths)}")
    images_uint8, x = _normalized_input(spec)
    channels = spec.image_shape[-1]
    stem = layers.Conv2D(
        2 * WHITENING_PATCH * WHITENING_PATCH * channels,
        WHITENING_PATCH,
        padding="valid",
        use_bias=False,
        trainable=False,
        name="stem_whiten",
    )
    x = stem(x)
    if whitening_kernel is not None:
        stem.kernel.assign(whitening_kernel)
    x = ChannelBias(name=WHITENING_BIAS_LAYER)(x)
    x = activation(name="stem_gelu")(x)
    batchnorm = {"momentum": config.batchnorm_momentum, "epsilon": AIRBENCH_BATCHNORM_EPSILON, "scale": config.batchnorm_scale}
    for block, filters in enumerate(config.widths, start=1):
        x = _airbench_block(x, filters, f"block{block}", batchnorm, batch_norm, activation, config.depth)
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    # float32 logits even under a mixed-precision policy: softmax/loss need the range.
    head = head_initializer(config.head_init_std)
    x = layers.Dense(spec.num_classes, use_bias=False, kernel_initializer=head, dtype="float32", name="logits")(x)
    x = layers.Rescaling(config.output_scale, dtype="float32", name="logit_scale")(x)
    return keras.Model(images_uint8, ClassNames(spec.class_names, dtype="float32", name="class_names")(x), name=name)


def head_initializer(std: float | None) -> keras.initializers.Initializer:
    """airbench's linear head: PyTorch's default (None), or uniform with standard deviation ``std``
    (airbench94_muon divides PyTorch's default by its standard deviation: std 1)."""
    if std is None:
        return base_initializer("torch_uniform")
    half_width = std * math.sqrt(3.0)  # a uniform on [-a, a] has standard deviation a / sqrt(3)
    return keras.initializers.RandomUniform(-half_width, half_width)


def build_network(params: TrainParams, spec: InputSpec, whitening_kernel: np.ndarray | None = None) -> keras.Model:
    """The network ``params.arch`` names (one of ARCHITECTURES), uncompiled, logits out.

    ``whitening_kernel``: the frozen stem's kernel of airbench, and of resnet with ``whiten_stem``
    (see ``patch_whitening_kernel``); None builds it with zeros, for weights loaded afterwards.
    """
    if params.arch == "baseline":
        return build_baseline(spec)  # the notebook's network: no option applies
    if params.arch == "resnet":
        return build_resnet(spec, params.widths, params.whiten_stem, whitening_kernel, params.dirac_init)
    if params.arch == "airbench":
        return build_airbench(spec, params.airbench, whitening_kernel)
    raise ValueError(f"unknown arch {params.arch!r}; expected one of {ARCHITECTURES}")


def ensemble_of(members: Sequence[keras.Model]) -> keras.Model:
    """One model whose logits are the mean of ``members``' logits: trained networks of this project
    (uint8 images in, logits for the same classes out), saved, evaluated and exported as one.

    Averaging logits, not probabilities, keeps every model's contract (logits out: evaluate and
    predict take their softmax, the SavedModel serves them); it is the normalized geometric mean
    of the members' probabilities. One member is returned as it is.
    """
    if len(members) == 1:
        return members[0]
    names = class_names_of(members[0])
    for member in members[1:]:
        if class_names_of(member) != names or member.inputs[0].shape != members[0].inputs[0].shape:
            raise ValueError("ensemble members must take the same images and name the same classes")
    images_uint8 = keras.Input(shape=members[0].inputs[0].shape[1:], dtype="uint8", name="images_uint8")
    logits = [
        keras.Model(member.inputs[0], member.outputs[0], name=f"member_{index + 1}")(images_uint8)
        for index, member in enumerate(members)
    ]
    mean_logits = layers.Average(dtype="float32", name="mean_logits")(logits)
    return keras.Model(images_uint8, ClassNames(names, dtype="float32", name="class_names")(mean_logits), name="ensemble")
