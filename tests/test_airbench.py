"""airbench, element by element: airbench93's published network, its optimizer step, schedule, lookahead,
whitening-bias freeze and alternating flips, and airbench94_muon's optimizer, each against airbench's own
definition; then the stage."""

from __future__ import annotations

import dataclasses
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar100_dvc import training
from cifar100_dvc.augment import alternating_flips
from cifar100_dvc.inference import load_model, predict_probabilities
from cifar100_dvc.network import (
    GELU,
    WHITENING_BIAS_LAYER,
    ChannelBias,
    FusedBatchNormalization,
    InputSpec,
    build_network,
    patch_whitening_kernel,
    training_flops_per_image,
)
from cifar100_dvc.params import AirbenchParams, TrainParams
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.records import DatasetInfo, read_arrays, read_split
from cifar100_dvc.scratch import AIRBENCH93_TRAIN, TINY_AIRBENCH, TINY_MUON
from stages import train


def spec(num_classes: int) -> InputSpec:
    return InputSpec((32, 32, 3), tuple(f"class_{i}" for i in range(num_classes)), (120.0, 115.0, 100.0), (60.0, 58.0, 62.0))


def airbench_model(num_classes: int = 10, **overrides) -> keras.Model:
    """airbench93's network (PyTorch's head init, logits / 9) with ``overrides`` of train.airbench."""
    return build_network(
        TrainParams(arch="airbench", airbench=dataclasses.replace(AIRBENCH93_TRAIN.airbench, **overrides)), spec(num_classes)
    )


# ---------------------------------------------------------------- the network


def test_airbench_is_make_net93_layer_for_layer():
    model = airbench_model(10)
    # PyTorch's count for make_net93 (10 classes): whitening bias 24; convs 24*64*9 + 64*64*9 + 64*128*9 +
    # 128*128*9 + 2 * 128*128*9; BatchNorm biases 2*64 + 4*128; the bias-free linear layer 128*10.
    convolutions = 24 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9 + 2 * 128 * 128 * 9
    assert sum(math.prod(w.shape) for w in model.trainable_weights) == 24 + convolutions + (2 * 64 + 4 * 128) + 128 * 10
    kinds = [type(layer).__name__ for layer in model.layers if not layer.name.startswith(("images", "to_float", "normalize"))]
    block = ["Conv2D", "MaxPooling2D", "FusedBatchNormalization", "GELU", "Conv2D", "FusedBatchNormalization", "GELU"]
    head = ["GlobalMaxPooling2D", "Dense", "Rescaling", "ClassNames"]
    assert kinds == ["Conv2D", "ChannelBias", "GELU", *block * 3, *head]
    stem = model.get_layer("stem_whiten")
    assert (stem.kernel_size, stem.padding, stem.filters, stem.use_bias, stem.trainable) == ((2, 2), "valid", 24, False, False)
    assert model.get_layer(WHITENING_BIAS_LAYER).trainable  # the stem's bias learns (for its first epochs)
    batch_norms = [layer for layer in model.layers if isinstance(layer, FusedBatchNormalization)]
    assert all(not bn.scale and bn.center and bn.momentum == 0.6 and bn.epsilon == 1e-12 for bn in batch_norms)
    assert not any(w.path.endswith("gamma") for w in model.weights)  # no BatchNorm scale at all
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.trainable]
    assert all(not conv.use_bias and conv.padding == "same" for conv in convs)
    assert not model.get_layer("logits").use_bias and model.get_layer("logit_scale").scale == pytest.approx(1 / 9)
    assert model.output.shape == (None, 10) and model.get_layer("global_pool").output.shape == (None, 128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_gelu_is_the_exact_gelu_and_its_gradient(dtype):
    # Training runs the XLA-fused pass; inference Keras' own exact gelu: the same function and slope.
    x = tf.cast(tf.linspace(-6.0, 6.0, 2001), dtype)
    layer = GELU()
    results = {}
    for training_mode in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training_mode)
        results[training_mode] = (np.asarray(tf.cast(y, tf.float32)), np.asarray(tf.cast(tape.gradient(y, x), tf.float32)))
    x64 = np.asarray(tf.cast(x, tf.float64))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    slope = cdf + x64 * np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    for values, gradients in results.values():
        np.testing.assert_allclose(values, x64 * cdf, atol=tolerance * 6)
        np.testing.assert_allclose(gradients, slope, atol=tolerance)


def test_airbench_convolutions_start_as_identities_on_their_first_filters():
    model = airbench_model(10)
    for name, channels_in in (("block1_conv1", 24), ("block1_conv2", 64), ("block2_conv1", 64)):
        kernel = model.get_layer(name).kernel.numpy()
        identity = np.zeros((3, 3, channels_in, channels_in), np.float32)
        identity[1, 1, np.arange(channels_in), np.arange(channels_in)] = 1.0
        np.testing.assert_array_equal(kernel[..., :channels_in], identity)
        rest = kernel[..., channels_in:]
        if rest.size:  # PyTorch's default init elsewhere: uniform within 1 / sqrt(fan_in)
            assert 0 < np.abs(rest).max() <= 1 / math.sqrt(9 * channels_in)


def test_airbench_widths_and_output_scale_are_parameters_and_the_model_reloads(tmp_path):
    model = airbench_model(100, widths=(16, 32, 48), output_scale=0.25)
    assert model.get_layer("block3_conv2").filters == 48 and model.get_layer("logit_scale").scale == 0.25
    images_uint8 = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    model.save(tmp_path / "airbench.keras")
    loaded = keras.models.load_model(tmp_path / "airbench.keras")
    np.testing.assert_allclose(loaded.predict(images_uint8, verbose=0), model.predict(images_uint8, verbose=0), atol=1e-6)


def test_airbench_depth_3_is_airbench96_block_with_its_residual(tmp_path):
    widths = (16, 32, 48)
    two, three = airbench_model(10, widths=widths), airbench_model(10, widths=widths, depth=3)
    # airbench96's ConvGroup adds to each block conv3 (bias-free, f x f x 3 x 3) and norm3 (a bias of f).
    parameters = [sum(math.prod(w.shape) for w in model.trainable_weights) for model in (two, three)]
    assert parameters[1] - parameters[0] == sum(9 * f * f + f for f in widths)
    block = ["Conv2D", "MaxPooling2D", "FusedBatchNormalization", "GELU", "Conv2D", "FusedBatchNormalization", "GELU"]
    kinds = [type(layer).__name__ for layer in three.layers if layer.name.startswith("block2_")]
    assert kinds == [*block, "Conv2D", "FusedBatchNormalization", "Add", "GELU"]
    assert three.get_layer("block2_conv3").kernel.numpy()[1, 1, np.arange(32), np.arange(32)].tolist() == [1.0] * 32  # dirac
    # forward: the block ends in GELU(BN3(conv3(.)) + its first GELU's output)
    outputs = ("block2_gelu1", "block2_bn3", "block2_residual", "block2_gelu3")
    probe = keras.Model(three.input, [three.get_layer(name).output for name in outputs])
    images_uint8 = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    first, third, residual, block_output = (np.asarray(t) for t in probe(images_uint8, training=False))
    np.testing.assert_allclose(residual, first + third, atol=1e-5)
    np.testing.assert_allclose(block_output, np.asarray(GELU()(residual)), atol=1e-5)
    # the work: conv3's forward and both gradients, at each block's pooled size (15, 7, 3 from 31 x 31)
    extra = sum(3 * 2 * 9 * f * f * size * size for f, size in zip(widths, (15, 7, 3)))
    assert training_flops_per_image(three) - training_flops_per_image(two) == extra
    three.save(tmp_path / "airbench96.keras")
    loaded = keras.models.load_model(tmp_path / "airbench96.keras")
    np.testing.assert_allclose(loaded.predict(images_uint8, verbose=0), three.predict(images_uint8, verbose=0), atol=1e-6)


def test_airbench_head_starts_at_pytorch_default_or_at_the_given_std():
    default = airbench_model(10).get_layer("logits").kernel.numpy()
    assert 0 < np.abs(default).max() <= 1 / math.sqrt(128)  # PyTorch's Linear: within +-1/sqrt(fan_in)
    unit = airbench_model(10, widths=(16, 32, 256), head_init_std=1.0).get_layer("logits").kernel.numpy()
    assert unit.std() == pytest.approx(1.0, rel=0.05)  # airbench94_muon: divided by its std; 2,560 draws


def test_initial_loss_is_near_ln_classes():
    model = airbench_model(100)
    images_uint8 = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 100, 64)
    loss = float(training.SmoothedSparseCrossentropy(0.0)(labels, model(images_uint8)))
    assert abs(loss - math.log(100)) < 0.5


# ---------------------------------------------------------------- the optimizer step and its schedule


def airbench_triangle(steps: int, start: float, end: float, peak: float) -> np.ndarray:
    """``triangle`` of airbench/utils.py, in NumPy: the multiplier at steps 0..steps."""
    xp = np.array([0, int(peak * steps), steps], np.float64)
    fp = np.array([start, 1.0, end])
    return np.interp(np.arange(steps + 1), xp, fp)


def test_schedule_is_airbench_triangle_through_its_three_points():
    schedule = training.TriangleSchedule(2.0, total_steps=390, start=0.2, peak_at=0.23, end=0.07)
    expected = 2.0 * airbench_triangle(390, 0.2, 0.07, 0.23)
    np.testing.assert_allclose([float(schedule(step)) for step in range(391)], expected, rtol=1e-5)
    assert float(schedule(0)) == pytest.approx(0.4)
    assert float(schedule(int(0.23 * 390))) == pytest.approx(2.0)
    assert float(schedule(390)) == pytest.approx(0.14)


def test_under_a_time_budget_the_whole_triangle_is_compressed_and_ends_at_its_final_value():
    spent = keras.Variable(0.0, trainable=False)
    schedule = training.TriangleSchedule(1.0, total_steps=1000, start=0.2, peak_at=0.23, end=0.07, budget_spent=spent)
    spent.assign(0.23)
    assert float(schedule(10)) == pytest.approx(1.0)  # the clock leads: at the peak after 1% of the steps
    spent.assign(1.0)
    assert float(schedule(100)) == pytest.approx(0.07)


def test_airbench_rates_are_its_decoupled_hyperparameters():
    config = AIRBENCH93_TRAIN.airbench
    learning_rate, l2 = training.airbench_rates(config, batch_size=1024)
    assert learning_rate == pytest.approx(11.5 / (1 + 1 / (1 - 0.85)))  # 1.5 on the mean loss at batch 1024
    assert l2 == pytest.approx(0.0153 / 11.5)
    assert training.airbench_rates(config, batch_size=512)[0] == pytest.approx(learning_rate / 2)


def torch_sgd_reference(weights, gradients_of_mean, batch_size, multipliers, is_bias, config=AIRBENCH93_TRAIN.airbench):
    """airbench's update in NumPy: PyTorch SGD(nesterov) on the loss summed over the batch, rate
    lr / kilostep, weight decay wd * batch / kilostep / lr, BatchNorm biases at 64x the rate and
    the weight decay divided by it (their decay unchanged), ``multipliers`` from the schedule."""
    kilostep = 1024 * (1 + 1 / (1 - config.momentum))
    lr = config.learning_rate / kilostep
    wd = config.weight_decay * batch_size / kilostep
    rate = lr * (config.bias_lr_scale if is_bias else 1.0)
    decay = wd / rate
    p, buffer = weights.astype(np.float64), None
    for gradient, multiplier in zip(gradients_of_mean, multipliers):
        d = batch_size * gradient + decay * p  # the summed loss's gradient is batch x the mean's
        buffer = d if buffer is None else config.momentum * buffer + d
        p = p - rate * multiplier * (d + config.momentum * buffer)
    return p


@pytest.mark.parametrize("is_bias", [False, True], ids=["weight", "batchnorm-bias"])
def test_optimizer_step_is_airbench_pytorch_sgd_on_the_summed_loss(is_bias):
    rng = np.random.default_rng(0)
    batch_size, steps = 256, 6
    start = rng.normal(size=(3, 4)).astype(np.float32)
    gradients = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(steps)]
    airbench = dataclasses.replace(AIRBENCH93_TRAIN.airbench, lookahead=False)
    params = TrainParams(arch="airbench", batch_size=batch_size, epochs=2, airbench=airbench)
    optimizer = training.make_airbench_optimizer(params, steps_per_epoch=5)
    variable = keras.Variable(start, name="beta" if is_bias else "kernel")
    for gradient in gradients:
        optimizer.apply([tf.constant(gradient)], [variable])
    multipliers = airbench_triangle(10, 0.2, 0.07, 0.23)[:steps]
    expected = torch_sgd_reference(start, gradients, batch_size, multipliers, is_bias)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=2e-5, atol=1e-6)


def lookahead_reference(start, gradients, rate, every, decay, start_step, steps_per_epoch, total_steps):
    """airbench's training loop around the optimizer, in NumPy: plain SGD steps (no momentum here),
    then LookaheadState as in utils.py; ``start_step``: the first 0-based step of its epoch 3."""
    weights, slow = start.astype(np.float64), None
    for index, gradient in enumerate(gradients):
        weights = weights - rate * gradient
        step = index + 1
        if index >= start_step and step % every == 0:
            if slow is None:
                slow = weights.copy()
            else:
                rho = decay * (step / total_steps) ** 3
                slow = slow + (1 - rho) * (weights - slow)
                weights = slow.copy()
        if step % steps_per_epoch == 0 and slow is not None:
            weights = slow.copy()
    return weights, slow


def test_lookahead_averages_every_few_steps_from_its_epoch_and_resets_at_epoch_ends():
    rng = np.random.default_rng(0)
    steps_per_epoch, epochs = 7, 4
    total = steps_per_epoch * epochs
    start = rng.normal(size=(5,)).astype(np.float32)
    gradients = [rng.normal(size=(5,)).astype(np.float32) for _ in range(total)]
    schedule = training.TriangleSchedule(0.1, total, start=1.0, peak_at=0.0, end=1.0)  # a constant rate
    optimizer = training.AirbenchSGD(
        schedule, momentum=0.0, lookahead=True, lookahead_every=3, lookahead_decay=0.9, lookahead_from=1 / epochs,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    variable = keras.Variable(start)
    running_statistic = keras.Variable(np.zeros(5, np.float32), trainable=False)  # as BatchNorm's: averaged too
    optimizer.track_lookahead([variable, running_statistic])
    statistics = []
    for gradient in gradients:
        statistic = rng.normal(size=(5,)).astype(np.float32)
        running_statistic.assign(statistic)  # what the forward pass would have written this step
        statistics.append(statistic)
        optimizer.apply([tf.constant(gradient)], [variable])
    expected, _ = lookahead_reference(start, gradients, 0.1, 3, 0.9, steps_per_epoch, steps_per_epoch, total)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(optimizer.lookahead_started.numpy()) == 1.0
    # The statistic was overwritten with its slow copy at the last step (an epoch's end).
    assert not np.allclose(running_statistic.numpy(), statistics[-1])
    slow = dict((id(w), s) for w, s in optimizer._lookahead_pairs)[id(running_statistic)]
    np.testing.assert_array_equal(running_statistic.numpy(), slow.numpy())


def test_whitening_bias_trains_for_its_epochs_then_stays_frozen():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(ChannelBias(name=WHITENING_BIAS_LAYER)(inputs)))
    airbench = dataclasses.replace(AIRBENCH93_TRAIN.airbench, whiten_bias_epochs=1, lookahead=False)
    params = TrainParams(arch="airbench", batch_size=8, epochs=4, airbench=airbench)
    model.compile(optimizer=training.make_airbench_optimizer(params, steps_per_epoch=3), loss="mse")
    bias = model.get_layer(WHITENING_BIAS_LAYER).bias
    x, y = np.random.default_rng(0).normal(size=(8, 4)), np.ones((8, 2))
    seen = [bias.numpy().copy()]
    for _ in range(12):
        model.train_on_batch(x, y)
        seen.append(bias.numpy().copy())
    moves = [not np.array_equal(a, b) for a, b in zip(seen, seen[1:])]
    assert moves == [True] * 3 + [False] * 9  # the first epoch's 3 steps, then never again


def gradient_ops(model: keras.Model, op_type: str) -> int:
    """How many ``op_type`` operations computing the gradient of ``model``'s loss w.r.t. its trainable
    weights needs: those its outputs depend on in the traced graph (TensorFlow runs no others)."""

    @tf.function
    def gradients(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = gradients.get_concrete_function(tf.TensorSpec((2, 32, 32, 3), tf.uint8)).graph
    needed, pending = set(), [tensor.op for tensor in graph.outputs]
    while pending:
        op = pending.pop()
        if op not in needed:
            needed.add(op)
            pending.extend([tensor.op for tensor in op.inputs] + list(op.control_inputs))
    return sum(op.type == op_type for op in needed)


def test_an_untrainable_whitening_bias_stops_backpropagation_at_block_1():
    # What DetachFrozenWhiteningBias saves: with the bias out of the gradient, block 1's first convolution
    # has no input gradient left to compute (every convolution keeps its kernel gradient).
    model = airbench_model(10, widths=(8, 8, 8))
    assert gradient_ops(model, "Conv2DBackpropInput") == 6 and gradient_ops(model, "Conv2DBackpropFilter") == 6
    model.get_layer(WHITENING_BIAS_LAYER).trainable = False
    assert gradient_ops(model, "Conv2DBackpropInput") == 5 and gradient_ops(model, "Conv2DBackpropFilter") == 6


class RecordingDetach(training.DetachFrozenWhiteningBias):
    """The stage's detaching callback, recording whether the bias is trained at each epoch's start."""

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        bias = self.model.get_layer(WHITENING_BIAS_LAYER).bias
        RecordingDetach.bias_trained.append(any(v is bias for v in self.model.trainable_variables))


class NoDetach(keras.callbacks.Callback):
    """The bias's gradient computed to the end, as before the detaching callback."""


@pytest.mark.slow
@pytest.mark.parametrize("tiny", [TINY_AIRBENCH, TINY_MUON], ids=["sgd", "muon"])
def test_detaching_the_frozen_whitening_bias_trains_the_same_model(project_with, monkeypatch, tiny):
    recipe = dataclasses.replace(tiny, epochs=3)  # the bias trains in epoch 1 of 3
    monkeypatch.setattr(train, "DetachFrozenWhiteningBias", RecordingDetach)
    RecordingDetach.bias_trained = []
    detached = ProjectPaths(project_with("prepared_dir", name="detached"))
    summary = train.run(recipe, detached)
    assert RecordingDetach.bias_trained == [True, False, False]
    monkeypatch.setattr(train, "DetachFrozenWhiteningBias", NoDetach)
    kept = ProjectPaths(project_with("prepared_dir", name="kept"))
    expected = train.run(recipe, kept)
    # The saved network is whole again (its bias trainable, the same parameter count) and its weights are
    # those of the run that computed the bias's gradient to the end.
    assert summary["trainable_parameters"] == expected["trainable_parameters"]
    model = load_model(detached.model_file)
    assert model.get_layer(WHITENING_BIAS_LAYER).trainable
    for a, b in zip(model.weights, load_model(kept.model_file).weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------- airbench94_muon


def newton_schulz_reference(matrix: np.ndarray, steps: int = 3) -> np.ndarray:
    """``zeropower_via_newtonschulz5`` of airbench94_muon.py in float64 NumPy (published: in bfloat16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (np.linalg.norm(matrix) + 1e-7)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(8, 27), (27, 8)], ids=["wide", "tall"])
def test_newton_schulz_is_airbench_iteration_and_pushes_singular_values_toward_one(shape):
    matrix = np.random.default_rng(0).normal(size=shape)
    exact = training.newton_schulz_orthogonalize(tf.constant(matrix, tf.float32), 3, "float32").numpy()
    np.testing.assert_allclose(exact, newton_schulz_reference(matrix), rtol=1e-4, atol=1e-5)
    published = training.newton_schulz_orthogonalize(tf.constant(matrix, tf.float32), 3).numpy()  # bfloat16
    assert published.dtype == np.float32
    np.testing.assert_allclose(published, exact, atol=0.05)
    before = np.linalg.svd(matrix / np.linalg.norm(matrix), compute_uv=False)
    after = np.linalg.svd(exact, compute_uv=False)
    # A spread of 2.5x becomes airbench's "S' ~ Uniform(0.5, 1.5)", not exactly 1 (which trains as well).
    assert before.max() / before.min() > 2.5 and after.min() > 0.5 and after.max() < 1.5, (before, after)


def muon_params(**overrides) -> TrainParams:
    """airbench with the muon recipe's optimizer keys (a linear decay from the first step, no lookahead)."""
    airbench = AirbenchParams(optimizer="muon", lookahead=False, schedule_start=1.0, schedule_peak=0.0, schedule_end=0.0)
    return TrainParams(arch="airbench", **{"batch_size": 100, "epochs": 2, "airbench": airbench, **overrides})


def test_muon_steps_kernels_as_airbench94_muon():
    # Keras' kernel [kh, kw, in, out] against the reference on PyTorch's [out, in, kh, kw]: the flattening
    # orders the columns differently, which the orthogonalization must carry through unchanged.
    rng = np.random.default_rng(0)
    steps_per_epoch, steps = 5, 7
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    gradients = [rng.normal(size=kernel.shape).astype(np.float32) for _ in range(steps)]
    optimizer = training.make_airbench_optimizer(muon_params(), steps_per_epoch)
    assert isinstance(optimizer, training.AirbenchMuon)
    optimizer.newton_schulz_dtype = "float32"  # exact, for the comparison; bfloat16 as published otherwise
    variable = keras.Variable(kernel, name="kernel")
    for gradient in gradients:
        optimizer.apply([tf.constant(gradient)], [variable])
    to_torch = (3, 2, 0, 1)
    p, buffer = kernel.transpose(to_torch).astype(np.float64), 0.0
    config = AirbenchParams().muon
    for step, gradient in enumerate(gradients):
        g = gradient.transpose(to_torch)
        buffer = config.momentum * buffer + g
        update = g + config.momentum * buffer
        p = p * (len(p) ** 0.5 / np.linalg.norm(p))
        multiplier = 1 - step / (2 * steps_per_epoch)  # airbench94_muon: lr x (1 - step / total_steps)
        p = p - config.learning_rate * multiplier * newton_schulz_reference(update.reshape(len(update), -1)).reshape(p.shape)
    np.testing.assert_allclose(variable.numpy(), p.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(variable.numpy()) == pytest.approx(6**0.5, rel=0.2)  # rescaled, then one step


@pytest.mark.parametrize("kind", ["head", "batchnorm-bias", "whitening-bias"])
def test_muon_recipe_steps_head_and_biases_with_published_sgd(kind):
    # airbench94_muon: SGD(nesterov, momentum 0.85) on the summed loss; head lr 0.67, biases 0.053, each
    # with weight_decay = 2e-6 x batch / lr; the whitening bias's lr falls linearly to 0 over its 3 epochs.
    rng = np.random.default_rng(1)
    batch_size, steps_per_epoch, epochs = 100, 2, 4
    start = rng.normal(size=(3, 4) if kind == "head" else (4,)).astype(np.float32)
    gradients = [rng.normal(size=start.shape).astype(np.float32) for _ in range(steps_per_epoch * epochs)]
    optimizer = training.make_airbench_optimizer(muon_params(batch_size=batch_size, epochs=epochs), steps_per_epoch)
    name = {"head": "kernel", "batchnorm-bias": "beta", "whitening-bias": WHITENING_BIAS_LAYER}[kind]
    variable = keras.Variable(start, name=name)
    for gradient in gradients:
        optimizer.apply([tf.constant(gradient)], [variable])
    config = AirbenchParams()
    lr = config.muon.head_learning_rate if kind == "head" else config.muon.bias_learning_rate
    decay = config.muon.weight_decay * batch_size / lr
    total, whiten_steps = steps_per_epoch * epochs, steps_per_epoch * config.whiten_bias_epochs
    p, buffer = start.astype(np.float64), 0.0
    for step, gradient in enumerate(gradients):
        if kind == "whitening-bias" and step >= whiten_steps:
            break  # detached from the graph: no gradient, no step
        schedule = 1 - step / (whiten_steps if kind == "whitening-bias" else total)
        d = batch_size * gradient + decay * p
        buffer = config.momentum * buffer + d
        p = p - lr * schedule * (d + config.momentum * buffer)
    np.testing.assert_allclose(variable.numpy(), p, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- airbench96_faster's data filtering


def filtered_step_setup(keep: float, step_every: int = 4):
    """(ProxyFiltered compiled as the stage compiles it, its params, a batch of 32 images and labels, the
    whitening kernel). The SGD recipe: Muon's bfloat16 orthogonalization would round the two steps apart."""
    proxy = dataclasses.replace(TINY_AIRBENCH.airbench.proxy, keep=keep, widths=(8, 8, 8), step_every=step_every)
    params = dataclasses.replace(TINY_AIRBENCH, airbench=dataclasses.replace(TINY_AIRBENCH.airbench, proxy=proxy))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=32).astype(np.int64)
    kernel = patch_whitening_kernel(images, spec(10), centered=False)  # zeros would leave the proxy blind: ties
    model = training.build_training_model(params, spec(10), kernel)
    training.compile_model(model, params, steps_per_epoch=4, jit_compile=False, steps_per_execution=1)
    return model, params, images, labels, kernel


def test_filtering_trains_the_network_on_the_proxys_hardest_examples_as_a_run_on_them_alone():
    keras.utils.set_random_seed(0)
    model, params, images, labels, kernel = filtered_step_setup(keep=0.5)
    assert isinstance(model, training.ProxyFiltered) and model.keep == 16
    # The examples the proxy ranks hardest before its step (its label-smoothed loss, batch statistics).
    proxy_losses = training.smoothed_sparse_crossentropy(labels, model.proxy(images, training=True), 0.2).numpy()
    hardest = np.sort(np.argsort(proxy_losses)[-16:])
    assert np.sort(proxy_losses)[-16] > np.sort(proxy_losses)[-17]  # no tie at the cut
    # A plain network with the same weights, trained on those 16 alone at batch 16: per kept example the
    # same rates (airbench96_faster's summed loss), so the same step.
    unfiltered = dataclasses.replace(params.airbench, proxy=TINY_AIRBENCH.airbench.proxy)
    alone = dataclasses.replace(params, batch_size=16, airbench=unfiltered)
    reference = build_network(alone, spec(10), kernel)
    reference.set_weights(model.network.get_weights())
    training.compile_model(reference, alone, steps_per_epoch=4, jit_compile=False, steps_per_execution=1)
    model.train_on_batch(images, labels)
    reference.train_on_batch(images[hardest], labels[hardest])
    for trained, expected in zip(model.network.weights, reference.weights, strict=True):
        np.testing.assert_allclose(trained.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=trained.path)
    assert not any("proxy" in w.path for w in model.network.weights)  # the saved network holds no proxy


def test_the_proxy_steps_every_few_steps_and_scores_every_batch():
    keras.utils.set_random_seed(0)
    model, _, images, labels, _ = filtered_step_setup(keep=0.25, step_every=4)
    kernels = [w for w in model.proxy.trainable_weights if "kernel" in w.path]
    history = []
    for _ in range(6):
        before = [w.numpy().copy() for w in kernels]
        model.train_on_batch(images, labels)
        history.append(any(not np.array_equal(b, w.numpy()) for b, w in zip(before, kernels)))
    assert history == [True, False, False, False, True, False]  # steps 0 and 4 of the network's
    assert int(model.proxy_optimizer.iterations.numpy()) == 2 and int(model.optimizer.iterations.numpy()) == 6
    assert WHITENING_BIAS_LAYER not in " ".join(w.path for w in model.proxy.trainable_weights)  # frozen, as published


# ---------------------------------------------------------------- alternating flips


def test_alternating_flips_show_each_image_both_ways_over_two_passes():
    base = tf.constant([True, False, False, True, True])
    ids = tf.constant([0, 1, 2, 3, 4] * 2, tf.int64)
    positions = tf.range(10, dtype=tf.int64)  # pass 0, then pass 1
    flips = alternating_flips(ids, positions, base, num_examples=5).numpy()
    np.testing.assert_array_equal(flips[:5], base.numpy())
    np.testing.assert_array_equal(flips[5:], ~base.numpy())


def test_the_airbench_reader_mirrors_every_train_image_once_in_two_epochs(prepared_paths):
    # translate 0: the only change is the flip, so each augmented image is its stored self or its mirror.
    params = dataclasses.replace(TINY_AIRBENCH, batch_size=30, airbench=dataclasses.replace(TINY_AIRBENCH.airbench, translate=0))
    info = DatasetInfo.read(prepared_paths.prepared_dir)
    num_train = info.splits["train"].num_examples  # 540: 18 batches a pass
    stored, _ = read_arrays(prepared_paths.prepared_dir, "train")
    index = {image.tobytes(): i for i, image in enumerate(stored)}
    batches = read_split(
        prepared_paths.prepared_dir,
        "train",
        30,
        shuffle_seed=0,
        repeat=True,
        drop_remainder=True,
        batch_transform=training.augmenter(params, info),
    )
    orientations: dict[int, list[bool]] = {}
    for images, _ in batches.take(2 * num_train // 30):
        for image in images.numpy():
            if image.tobytes() in index:
                orientations.setdefault(index[image.tobytes()], []).append(False)
            else:
                orientations.setdefault(index[image[:, ::-1].tobytes()], []).append(True)
    assert len(orientations) == num_train
    assert all(sorted(seen) == [False, True] for seen in orientations.values())
    assert 0.3 < np.mean([seen[0] for seen in orientations.values()]) < 0.7  # the first orientation is a coin


def test_the_airbench_augmenter_cuts_one_square_of_the_mean_colour_and_keeps_its_other_draws(prepared_paths):
    info = DatasetInfo.read(prepared_paths.prepared_dir)
    images, _ = read_arrays(prepared_paths.prepared_dir, "train", limit=60)
    images = np.where(images == np.round(info.mean_rgb).astype(np.uint8), images + 1, images)  # no pixel already the fill
    ids = tf.range(60, dtype=tf.int64)
    without = training.augmenter(TINY_AIRBENCH, info)(tf.constant(images), tf.constant(4, tf.int64), ids).numpy()
    params = dataclasses.replace(TINY_AIRBENCH, airbench=dataclasses.replace(TINY_AIRBENCH.airbench, cutout=5))
    with_cutout = training.augmenter(params, info)(tf.constant(images), tf.constant(4, tf.int64), ids).numpy()
    for plain, cut in zip(without, with_cutout):
        changed = np.argwhere((plain != cut).any(axis=-1))
        top, left = changed.min(axis=0)
        assert len(changed) == 25 and (changed.max(axis=0) - (top, left) == 4).all()  # translation and flip unchanged
        np.testing.assert_array_equal(cut[top : top + 5, left : left + 5], np.broadcast_to(np.round(info.mean_rgb), (5, 5, 3)))


# ---------------------------------------------------------------- the train stage


@pytest.fixture
def prepared(project_with) -> ProjectPaths:
    return ProjectPaths(project_with("prepared_dir"))


# TINY_MUON with airbench96_faster's data filtering: the network trains on the proxy's hardest half.
TINY_FILTERED = dataclasses.replace(
    TINY_MUON, airbench=dataclasses.replace(TINY_MUON.airbench, proxy=dataclasses.replace(TINY_MUON.airbench.proxy, keep=0.5))
)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [TINY_AIRBENCH, TINY_MUON, TINY_FILTERED], ids=["sgd", "muon", "filtered"])
def test_airbench_trains_end_to_end_and_the_model_reloads(prepared, recipe):
    summary = train.run(recipe, prepared)
    assert summary["arch"] == "airbench" and summary["epochs_completed"] == recipe.epochs
    assert summary["epochs"][-1]["val_accuracy"] > 0.3  # 20 classes: chance is 0.05
    model = load_model(prepared.model_file)
    kernel = model.get_layer("stem_whiten").kernel.numpy()
    assert kernel.shape == (2, 2, 3, 24) and np.abs(kernel).max() > 1.0  # the whitening kernel, from the train images
    images_uint8, labels = read_arrays(prepared.prepared_dir, "val")
    accuracy = float(np.mean(predict_probabilities(model, images_uint8, 64, tta_flip=False).argmax(axis=1) == labels))
    assert accuracy == pytest.approx(summary["epochs"][-1]["val_accuracy"], abs=0.02)


class InterruptAfter(train.EpochCheckpoint):
    """The checkpoint callback, raising Ctrl-C's exception once epoch ``STOP`` is saved."""

    STOP = 2

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch + 1 == self.STOP:
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("tiny", [TINY_AIRBENCH, TINY_MUON, TINY_FILTERED], ids=["sgd", "muon", "filtered"])
def test_interrupted_airbench_run_resumes_to_the_same_model(project_with, monkeypatch, tiny):
    # Interrupted after epoch 2, with lookahead running since epoch 1 (sgd) and the whitening bias frozen
    # after it: the resumed run must end on exactly the weights of an uninterrupted one.
    recipe = dataclasses.replace(tiny, epochs=4)
    uninterrupted = ProjectPaths(project_with("prepared_dir", name="uninterrupted"))
    expected = train.run(recipe, uninterrupted)
    paths = ProjectPaths(project_with("prepared_dir", name="interrupted"))
    with monkeypatch.context() as patch:
        patch.setattr(train, "EpochCheckpoint", InterruptAfter)
        with pytest.raises(KeyboardInterrupt):
            train.run(recipe, paths)
    assert json.loads((paths.checkpoint_dir / "state.json").read_text())["epoch"] == 2
    resumed = train.run(recipe, paths)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in expected["epochs"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed["epochs"]] == strip
    for a, b in zip(load_model(paths.model_file).weights, load_model(uninterrupted.model_file).weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


class StepClock(train.TrainingClock):
    """A clock that advances one second each time it is read: budgets in steps, not wall time."""

    def seconds(self) -> float:
        self.reads = getattr(self, "reads", 0) + 1
        return float(self.reads)


def test_a_time_budget_compresses_airbench_whole_schedule_to_its_final_rate(prepared, monkeypatch):
    monkeypatch.setattr(train, "TrainingClock", StepClock)
    # 8 epochs of 16 steps planned; the clock is read twice a step, so 60 s last about 30 steps.
    recipe = dataclasses.replace(TINY_AIRBENCH, epochs=8, time_budget_minutes=1.0)
    summary = train.run(recipe, prepared)
    assert summary["stop_reason"] == "time_budget" and 1 < summary["epochs_done"] < 3
    peak, _ = training.airbench_rates(recipe.airbench, recipe.batch_size)
    # Compressed: the triangle ran to its end (0.07 of the peak); without the budget it would still be
    # on its way down, at about 0.8 of the peak after a quarter of the steps.
    assert summary["final_learning_rate"] == pytest.approx(recipe.airbench.schedule_end * peak, rel=0.02)
    assert load_model(prepared.model_file).predict(read_arrays(prepared.prepared_dir, "val")[0][:4], verbose=0).shape == (4, 20)
