"""Pure, stateless batch augmentations in TensorFlow: random crop from a padded image, flip, cutout.

The padding is black (zeros) or the image reflected at its edge (airbench's choice: no
artificial edge for the first layer, which matters most with the whitening stem).

They work on whole uint8 batches with one gather per axis (a mirrored image simply reads its
columns right to left), so augmentation costs about 1% of a training step on a CPU. They
draw randomness from an explicit ``seed`` tensor of shape [2], so the same seed gives the
same batch: a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import tensorflow as tf

FILLS = ("zeros", "reflect")  # what the padding around an image holds: black, or the image mirrored at its edge


def _window(images: tf.Tensor, padding: int, offsets: tf.Tensor, mirrored: tf.Tensor, fill: str = "zeros") -> tf.Tensor:
    """Each image of [B, H, W, C], padded by ``padding`` (``fill``: zeros or the reflected image),
    read from ``offsets`` [B, 2] (row, column) with its columns reversed where ``mirrored`` [B] is true."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    if padding:
        mode = "REFLECT" if fill == "reflect" else "CONSTANT"
        images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode=mode)
    rows = offsets[:, :1] + tf.range(height)[None, :]  # [B, H]
    forward = tf.range(width)[None, :]
    columns = offsets[:, 1:] + tf.where(mirrored[:, None], tf.reverse(forward, axis=[1]), forward)  # [B, W]
    picked_rows = tf.gather(images, rows, axis=1, batch_dims=1)  # [B, H, W + 2p, C]
    return tf.gather(picked_rows, columns, axis=2, batch_dims=1)  # [B, H, W, C]


def _offsets(batch: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    return tf.random.stateless_uniform([batch, 2], seed=seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32)


def _coin(batch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([batch], seed=seed) < 0.5


def random_crop(images: tf.Tensor, seed: tf.Tensor, padding: int, fill: str = "zeros") -> tf.Tensor:
    """Each image of [B, H, W, C] cropped back to H x W from a copy padded by ``padding`` (``fill``: see FILLS)."""
    batch = tf.shape(images)[0]
    return _window(images, padding, _offsets(batch, seed, padding), tf.zeros([batch], tf.bool), fill)


def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each image of [B, H, W, C] mirrored left-right with probability 1/2."""
    batch = tf.shape(images)[0]
    return _window(images, 0, tf.zeros([batch, 2], tf.int32), _coin(batch, seed))


def crop_and_flip(images: tf.Tensor, seed: tf.Tensor, padding: int, fill: str = "zeros") -> tf.Tensor:
    """Random crop and random flip in one pass, with independent randomness derived from ``seed``."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    batch = tf.shape(images)[0]
    return _window(images, padding, _offsets(batch, crop_seed, padding), _coin(batch, flip_seed), fill)


def crop_and_mirror(images: tf.Tensor, seed: tf.Tensor, padding: int, mirrored: tf.Tensor, fill: str = "reflect") -> tf.Tensor:
    """Random crop as ``random_crop``, each image mirrored where ``mirrored`` [B] says (see ``alternating_flips``)."""
    return _window(images, padding, _offsets(tf.shape(images)[0], seed, padding), mirrored, fill)


def cutout(images: tf.Tensor, seed: tf.Tensor, size: int, fill: tf.Tensor) -> tf.Tensor:
    """airbench96's cutout: in each image of [B, H, W, C], one ``size`` x ``size`` square, placed
    uniformly at random wholly inside the image, set to ``fill`` [C] (the train split's mean colour:
    what airbench's zeros on normalized images are before normalization). ``size`` 0: unchanged."""
    if size == 0:
        return images
    shape = tf.shape(images)
    row_seed, column_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))

    def covered(seed: tf.Tensor, length: tf.Tensor) -> tf.Tensor:  # [B, length]: inside each image's square
        start = tf.random.stateless_uniform([shape[0]], seed=seed, minval=0, maxval=length - size + 1, dtype=tf.int32)
        distance = tf.range(length)[None, :] - start[:, None]
        return (distance >= 0) & (distance < size)

    square = covered(row_seed, shape[1])[:, :, None, None] & covered(column_seed, shape[2])[:, None, :, None]
    return tf.where(square, tf.cast(fill, images.dtype), images)


def alternating_flips(example_ids: tf.Tensor, stream_positions: tf.Tensor, base_flips: tf.Tensor, num_examples: int) -> tf.Tensor:
    """airbench's alternating flip: whether each image is mirrored, [B] bool.

    Every example has one random orientation for the whole run (``base_flips`` [N], indexed by
    ``example_ids`` [B]), inverted on every other pass over the data: its pass is its position
    in the stream of examples (``stream_positions`` [B]) divided by ``num_examples``. So each
    pair of consecutive passes shows every image once as it is and once mirrored, which gives
    more variety than drawing a fresh coin every time.
    """
    odd_pass = tf.math.floormod(stream_positions // num_examples, 2) == 1
    return tf.not_equal(tf.gather(base_flips, example_ids), odd_pass)
