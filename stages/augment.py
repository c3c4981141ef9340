"""Pure, stateless batch augmentations in TensorFlow (random crop from a padded image, flip).

They work on whole uint8 batches with one gather per axis, so augmentation costs a few
percent of a training step, and they draw randomness from an explicit ``seed`` tensor of
shape [2], so the same seed gives the same batch: resumed runs see the same augmentations.
"""

from __future__ import annotations

import tensorflow as tf


def random_crop(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Each image of [B, H, W, C] cropped back to H x W from a copy zero-padded by ``padding``."""
    if padding == 0:
        return images
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], seed=seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[None, :]  # [B, W]
    cropped_rows = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, H, W + 2p, C]
    return tf.gather(cropped_rows, cols, axis=2, batch_dims=1)  # [B, H, W, C]


def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each image of [B, H, W, C] mirrored left-right with probability 1/2."""
    flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed=seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def crop_and_flip(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Random crop then random flip, with independent randomness derived from ``seed``."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    return random_flip(random_crop(images, crop_seed, padding), flip_seed)
