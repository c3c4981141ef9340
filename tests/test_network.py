"""The networks: parameter counts, logits shapes, safe save/load, sane initial loss, learning."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar100_dvc.augment import crop_and_flip, cutout, random_crop, random_flip
from cifar100_dvc.network import (
    ARCHITECTURES,
    FusedBatchNormalization,
    InputSpec,
    build_baseline,
    build_network,
    class_names_of,
    patch_whitening_kernel,
)
from cifar100_dvc.params import TrainParams
from cifar100_dvc.scratch import AIRBENCH93_TRAIN
from cifar100_dvc.training import SmoothedSparseCrossentropy

SMALL = {  # each architecture at a small width, for the tests that train or save it
    "baseline": TrainParams(arch="baseline"),
    "resnet": TrainParams(arch="resnet", widths=(8, 8, 16, 16)),
    # airbench93's head (logits / 9): the default's logits / 256 suit Muon's unit-std head, not Adam's small steps.
    "airbench": TrainParams(arch="airbench", airbench=dataclasses.replace(AIRBENCH93_TRAIN.airbench, widths=(16, 32, 32))),
}


def spec(num_classes: int) -> InputSpec:
    return InputSpec((32, 32, 3), tuple(f"class_{i}" for i in range(num_classes)), (120.0, 115.0, 100.0), (60.0, 58.0, 62.0))


def count(weights) -> int:
    return sum(math.prod(weight.shape) for weight in weights)


def test_baseline_is_the_notebooks_cnn():
    model = build_baseline(spec(100))
    assert count(model.trainable_weights) == 1_388_292
    assert count(model.weights) == 1_389_188  # with BatchNorm's moving statistics, as the notebook's summary
    conv_filters = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert conv_filters == [32, 32, 64, 64, 128, 128]
    dropout_rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropout_rates == [0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras_batch_norm(policy):
    """Same outputs, gradients and moving statistics as the Keras layer it speeds up."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(2.0, 3.0, (8, 5, 5, 4)), tf.float32)
    keras.mixed_precision.set_global_policy(policy)
    try:
        stock, fused = keras.layers.BatchNormalization(momentum=0.5), FusedBatchNormalization(momentum=0.5)
        for layer in (stock, fused):
            layer.build(images.shape)
            layer.gamma.assign(rng.normal(1.0, 0.2, 4).astype("float32") if layer is stock else stock.gamma)
            layer.beta.assign(rng.normal(0.0, 0.2, 4).astype("float32") if layer is stock else stock.beta)
        weights = tf.range(1.0, 5.0)  # a loss that weights the channels differently
        results = {}
        for layer in (stock, fused):
            with tf.GradientTape() as tape:
                tape.watch(images)
                outputs = tf.cast(layer(images, training=True), tf.float32)
                loss = tf.reduce_sum(outputs**2 * weights)
            gradients = tape.gradient(loss, [images, layer.gamma, layer.beta])
            results[layer] = [outputs, *gradients, layer.moving_mean, layer.moving_variance, layer(images, training=False)]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    tolerance = 1e-5 if policy == "float32" else 2e-2
    assert fused.compute_dtype == stock.compute_dtype
    for stock_value, fused_value in zip(results[stock], results[fused], strict=True):
        expected = np.asarray(stock_value, np.float32)
        actual = np.asarray(fused_value, np.float32)
        np.testing.assert_allclose(actual, expected, atol=tolerance * max(1.0, np.abs(expected).max()))
    assert not np.allclose(np.asarray(fused.moving_variance), 1.0)  # the moving statistics did move


def test_fused_batch_norm_falls_back_where_the_kernel_does_not_apply():
    vectors = tf.constant(np.random.default_rng(1).normal(size=(6, 3)), tf.float32)
    stock, fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    np.testing.assert_allclose(fused(vectors, training=True), stock(vectors, training=True), atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance, stock.moving_variance, atol=1e-6)


def test_default_resnet_size_is_pinned():
    model = build_network(TrainParams(arch="resnet", widths=(16, 32, 64, 128)), spec(100))
    assert count(model.trainable_weights) == 424_564


def test_every_architecture_is_tested():
    assert set(SMALL) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_logits_shape_from_raw_uint8(arch, num_classes):
    model = build_network(SMALL[arch], spec(num_classes))
    images_uint8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    logits = model.predict(images_uint8, verbose=0)
    assert logits.shape == (3, num_classes) and logits.dtype == np.float32


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_then_load_in_safe_mode_gives_identical_predictions(arch, tmp_path):
    model = build_network(SMALL[arch], spec(20))
    images_uint8 = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_array_equal(model.predict(images_uint8, verbose=0), loaded.predict(images_uint8, verbose=0))
    assert class_names_of(loaded) == [f"class_{i}" for i in range(20)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_initial_loss_is_near_log_num_classes(arch):
    keras.utils.set_random_seed(0)
    model = build_network(SMALL[arch], spec(100))
    rng = np.random.default_rng(2)
    images_uint8 = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 64)
    loss = float(SmoothedSparseCrossentropy()(labels, model(images_uint8, training=False)))
    assert abs(loss - math.log(100)) < 0.5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_model_overfits_a_small_batch(arch):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    images_uint8 = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    # airbench's frozen stem sees the images only through its whitening kernel, computed from them.
    kernel = patch_whitening_kernel(images_uint8, spec(10), centered=False) if arch == "airbench" else None
    model = build_network(SMALL[arch], spec(10), kernel)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=SmoothedSparseCrossentropy(), metrics=["accuracy"])
    labels = np.arange(32) % 10
    # 150 steps on the same batch, in 10 epochs of 15 (150 one-step epochs mostly timed Keras' epoch loop).
    batches = tf.data.Dataset.from_tensors((images_uint8, labels)).repeat()
    history = model.fit(batches, epochs=10, steps_per_epoch=15, shuffle=False, verbose=0).history
    assert history["loss"][-1] < 0.1 * math.log(10)  # memorized (random pixels: nothing to generalize)
    assert history["accuracy"][-1] >= 0.99  # over the last 15 steps, dropout on: at most a few misses of 480


def test_augmentation_keeps_shape_and_dtype_and_is_seeded():
    images = tf.constant(np.random.default_rng(4).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    seed = tf.constant([7, 0], tf.int64)
    augmented = crop_and_flip(images, seed, padding=4)
    assert augmented.shape == images.shape and augmented.dtype == tf.uint8
    np.testing.assert_array_equal(augmented, crop_and_flip(images, seed, padding=4))
    assert not np.array_equal(augmented, crop_and_flip(images, tf.constant([7, 1], tf.int64), padding=4))


def test_flip_really_mirrors_left_right():
    images = tf.constant(np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3))
    flipped = random_flip(images, tf.constant([0, 0], tf.int64)).numpy()
    for image, result in zip(images.numpy(), flipped):
        assert np.array_equal(result, image) or np.array_equal(result, image[:, ::-1])
    flips = [random_flip(images, tf.constant([0, s], tf.int64)).numpy() for s in range(20)]
    assert any(np.array_equal(result[0], images.numpy()[0][:, ::-1]) for result in flips)


def test_crop_and_flip_gives_a_window_of_the_padded_image_or_its_mirror():
    images = np.random.default_rng(6).integers(1, 256, (8, 8, 8, 1), dtype=np.uint8)
    result = crop_and_flip(tf.constant(images), tf.constant([3, 9], tf.int64), padding=2).numpy()
    for image, out in zip(images, result):
        padded = np.pad(image[:, :, 0], 2)
        windows = [padded[r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(np.array_equal(out[:, :, 0], w) or np.array_equal(out[:, :, 0], w[:, ::-1]) for w in windows)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    image = np.random.default_rng(5).integers(1, 256, (1, 8, 8, 1), dtype=np.uint8)
    padded = np.pad(image[0, :, :, 0], 2)
    for step in range(10):
        cropped = random_crop(tf.constant(image), tf.constant([step, 3], tf.int64), padding=2).numpy()[0, :, :, 0]
        windows = [padded[r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(np.array_equal(cropped, window) for window in windows)


def test_reflect_filled_crop_is_a_window_of_the_reflected_image():
    image = np.random.default_rng(5).integers(1, 256, (1, 8, 8, 1), dtype=np.uint8)
    padded = np.pad(image[0, :, :, 0], 2, mode="reflect")
    windows = [padded[r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
    seeds = [tf.constant([step, 3], tf.int64) for step in range(10)]
    crops = [random_crop(tf.constant(image), seed, 2, fill="reflect").numpy()[0, :, :, 0] for seed in seeds]
    assert all(any(np.array_equal(crop, window) for window in windows) for crop in crops)
    assert any(not np.array_equal(crop, image[0, :, :, 0]) for crop in crops)
    assert all((crop > 0).all() for crop in crops)  # no black border: every pixel comes from the image


def test_crop_without_padding_returns_the_images_unchanged():
    images = np.random.default_rng(7).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for step in range(5):
        cropped = random_crop(tf.constant(images), tf.constant([step, 3], tf.int64), padding=0).numpy()
        np.testing.assert_array_equal(cropped, images)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_cutout_sets_one_square_of_its_size_wholly_inside_each_image_to_the_fill(size):
    images = np.random.default_rng(3).integers(1, 200, (256, 8, 8, 3), dtype=np.uint8)  # never the fill's 250
    fill = tf.constant([250, 251, 252], tf.uint8)
    corners = set()
    for step in range(3):
        out = cutout(tf.constant(images), tf.constant([step, 5], tf.int64), size, fill).numpy()
        for image, result in zip(images, out):
            changed = np.argwhere((result != image).any(axis=-1))
            top, left = changed.min(axis=0)
            assert len(changed) == size * size and (changed.max(axis=0) - (top, left) == size - 1).all()  # one square
            square = result[top : top + size, left : left + size]
            np.testing.assert_array_equal(square, np.broadcast_to([250, 251, 252], (size, size, 3)))
            corners.add((top, left))
    assert corners == {(r, c) for r in range(9 - size) for c in range(9 - size)}  # every placement inside, none outside


def test_cutout_of_size_0_leaves_the_images_unchanged():
    images = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    out = cutout(tf.constant(images), tf.constant([0, 5], tf.int64), 0, tf.constant([0, 0, 0], tf.uint8)).numpy()
    np.testing.assert_array_equal(out, images)


def test_whitening_kernel_decorrelates_the_patches_it_was_computed_on():
    from cifar100_dvc.network import patch_whitening_kernel

    rng = np.random.default_rng(0)
    smooth = rng.normal(size=(64, 33, 33, 3)).cumsum(axis=1).cumsum(axis=2)  # neighbouring pixels correlate
    images_uint8 = np.clip(128 + 4 * smooth[:, :32, :32], 0, 255).astype(np.uint8)
    pixels = images_uint8.astype(np.float64)
    image_spec = InputSpec((32, 32, 3), ("a", "b"), tuple(pixels.mean(axis=(0, 1, 2))), tuple(pixels.std(axis=(0, 1, 2))))
    kernel = patch_whitening_kernel(images_uint8, image_spec, epsilon=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])  # w and -w: ReLU keeps both signs
    normalized = (pixels - image_spec.mean_rgb) / image_spec.std_rgb
    patches = np.stack([normalized[:, i : 31 + i, j : 31 + j] for i in range(2) for j in range(2)], axis=3)
    whitened = patches.reshape(-1, 12) @ kernel[..., :12].reshape(12, 12)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(12), atol=1e-3)


def test_whitened_stem_is_frozen_and_survives_save_and_load(tmp_path):
    from cifar100_dvc.network import patch_whitening_kernel

    images_uint8 = np.random.default_rng(1).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    kernel = patch_whitening_kernel(images_uint8, spec(10))
    model = build_network(TrainParams(arch="resnet", widths=(16, 32, 64, 128), whiten_stem=True), spec(10), kernel)
    stem = model.get_layer("stem_whiten")
    assert not stem.trainable and not stem.trainable_weights
    np.testing.assert_array_equal(stem.kernel.numpy(), kernel)
    # 412,954 trainable with the learned 16-channel stem; the whitened stem's 24 channels feed stage 1.
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 412_954 - (3 * 3 * 3 * 16 + 2 * 16) + 8 * 3 * 3 * 32
    model.save(tmp_path / "whitened.keras")
    loaded = keras.models.load_model(tmp_path / "whitened.keras")
    np.testing.assert_array_equal(loaded.get_layer("stem_whiten").kernel.numpy(), kernel)
    np.testing.assert_allclose(loaded.predict(images_uint8[:4], verbose=0), model.predict(images_uint8[:4], verbose=0), atol=1e-5)


def test_dirac_initializer_passes_the_first_channels_through_and_draws_the_rest():
    from cifar100_dvc.network import DiracInitializer

    kernel = np.asarray(DiracInitializer(seed=3)((3, 3, 4, 6)))
    images = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype(np.float32)
    outputs = tf.nn.conv2d(images, kernel, strides=1, padding="SAME").numpy()
    np.testing.assert_allclose(outputs[..., :4], images, atol=1e-6)  # filters 0-3: identity on channels 0-3
    assert np.abs(kernel[..., 4:]).sum() > 0 and not np.allclose(outputs[..., 4:], 0)  # filters 4-5: random
    config = keras.initializers.serialize(DiracInitializer(seed=3))
    np.testing.assert_array_equal(np.asarray(keras.initializers.deserialize(config)((3, 3, 4, 6))), kernel)


def test_training_flops_are_counted_from_the_layers():
    from cifar100_dvc.network import FORWARD, INPUT_GRADIENT, KERNEL_GRADIENT, training_flops_per_image, training_passes

    inputs = keras.Input((8, 8, 3))
    frozen = keras.layers.Conv2D(4, 3, padding="same", trainable=False)(inputs)  # forward only
    learned = keras.layers.Conv2D(6, 3, padding="valid")(frozen)  # 6x6 out; no input gradient: nothing trains before it
    pooled = keras.layers.GlobalMaxPooling2D()(learned)
    logits = keras.layers.Dense(5)(pooled)  # forward, input gradient and kernel gradient
    model = keras.Model(inputs, logits)
    frozen_forward = 2 * 8 * 8 * 4 * 3 * 3 * 3
    learned_forward = 2 * 6 * 6 * 6 * 3 * 3 * 4
    dense_forward = 2 * 6 * 5
    assert training_flops_per_image(model) == frozen_forward + 2 * learned_forward + 3 * dense_forward
    assert [(forward, passes) for _, forward, passes in training_passes(model)] == [
        (frozen_forward, (FORWARD,)),
        (learned_forward, (FORWARD, KERNEL_GRADIENT)),
        (dense_forward, (FORWARD, INPUT_GRADIENT, KERNEL_GRADIENT)),
    ]
    # airbench93 for 10 classes: 108.1 MFLOPs forward; training about 3x, less the frozen stem's backward.
    assert training_flops_per_image(build_network(TrainParams(arch="airbench"), spec(10))) == 324_236_352


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("size", [20, 64])
def test_every_network_takes_the_image_size_it_is_given(arch, size):
    image_spec = InputSpec((size, size, 3), tuple(f"class_{i}" for i in range(7)), (120.0,) * 3, (60.0,) * 3)
    images_uint8 = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    kernel = patch_whitening_kernel(images_uint8, image_spec, centered=False) if arch == "airbench" else None
    model = build_network(SMALL[arch], image_spec, kernel)
    assert model.input.shape == (None, size, size, 3)
    assert model.predict(images_uint8, verbose=0).shape == (3, 7)
    if arch == "baseline":  # the notebook's Flatten -> Dense 512 grows with the image: (size / 8)^2 x 128 inputs
        (hidden,) = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense) and layer.units == 512]
        assert hidden.kernel.shape == ((size // 8) ** 2 * 128, 512)


def test_an_ensemble_is_one_model_whose_logits_are_its_members_mean(tmp_path):
    from cifar100_dvc.inference import foreign_model_problem
    from cifar100_dvc.network import ensemble_of, float32_model

    keras.utils.set_random_seed(0)
    members = [build_network(SMALL["resnet"], spec(20)) for _ in range(3)]
    images_uint8 = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    each = [member.predict(images_uint8, verbose=0) for member in members]
    assert not np.allclose(each[0], each[1])  # different networks: the mean is not any one of them
    ensemble = ensemble_of(members)
    np.testing.assert_allclose(ensemble.predict(images_uint8, verbose=0), np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert foreign_model_problem(ensemble) is None and class_names_of(ensemble) == [f"class_{i}" for i in range(20)]
    ensemble.save(tmp_path / "ensemble.keras")  # what train writes, read back as evaluate and export read it
    loaded = float32_model(keras.models.load_model(tmp_path / "ensemble.keras", safe_mode=True, compile=False))
    np.testing.assert_allclose(loaded.predict(images_uint8, verbose=0), np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert ensemble_of(members[:1]) is members[0]  # one network is saved as it is
    with pytest.raises(ValueError, match="same classes"):
        ensemble_of([members[0], build_network(SMALL["resnet"], spec(10))])
