"""The trained model for inference: loading it safely and checked, and class probabilities.

One home for what the evaluate and export stages and the predict tool share: ``load_model``
(Keras' safe mode; a file that is not this project's model is refused with one line saying why)
and ``predict_probabilities`` / ``predict_with_views`` (softmax of the logits, optionally averaged over mirrored
and shifted views).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, one_line


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits [N, C], computed stably (the row maximum subtracted first)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def shifted_views(images_uint8: np.ndarray, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Two copies of images [N, H, W, C], their content moved ``pixels`` down-right and ``pixels``
    up-left, the uncovered edge filled by reflection (airbench's translation views; training's
    random crop showed the network such shifts)."""
    p = pixels
    padded = np.pad(images_uint8, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    height, width = images_uint8.shape[1:3]
    return padded[:, :height, :width], padded[:, 2 * p : 2 * p + height, 2 * p : 2 * p + width]


def predict_with_views(
    model, images_uint8: np.ndarray, batch_size: int, tta_flip: bool, tta_translate: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [N, C] averaged over test-time views, those of the image as it is).

    ``tta_flip``: each image and its mirror, equally. ``tta_translate`` (pixels, 0: off): half
    the weight to the image as is, a quarter to each of two copies shifted diagonally by that
    many pixels (see ``shifted_views``), each of them also mirrored with ``tta_flip``, as in
    airbench's test-time augmentation.
    """

    def one_view(images: np.ndarray) -> np.ndarray:
        return softmax(model.predict(images, batch_size=batch_size, verbose=0).astype(np.float64))

    def with_mirror(images: np.ndarray, as_is: np.ndarray | None = None) -> np.ndarray:
        as_is = one_view(images) if as_is is None else as_is
        return (as_is + one_view(np.ascontiguousarray(images[:, :, ::-1]))) / 2.0 if tta_flip else as_is

    single = one_view(images_uint8)
    probabilities = with_mirror(images_uint8, single)
    if tta_translate:
        down_right, up_left = shifted_views(images_uint8, tta_translate)
        probabilities = 0.5 * probabilities + 0.25 * (with_mirror(down_right) + with_mirror(up_left))
    return probabilities, single


def predict_probabilities(model, images_uint8: np.ndarray, batch_size: int, tta_flip: bool, tta_translate: int = 0) -> np.ndarray:
    """Class probabilities [N, C], averaged over the test-time views of ``predict_with_views``."""
    return predict_with_views(model, images_uint8, batch_size, tta_flip, tta_translate)[0]


def load_model(model_file: Path):
    """The trained model, in Keras' safe mode (no code from the file is run), checked to be one of this project's."""
    import zipfile

    import keras

    import cifar100_dvc.network  # noqa: F401  (registers the ClassNames layer for deserialization)

    if not model_file.is_file():
        raise StageError(f"{model_file} not found: run the train stage first (dvc repro train)")
    # Keras reads a file that is not a zip archive as a legacy format and says "File not found".
    if not zipfile.is_zipfile(model_file):
        raise StageError(f"{model_file} is not a readable Keras model file (not a .keras zip archive)")
    try:
        model = keras.models.load_model(model_file, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged or foreign file
        raise StageError(
            f"{model_file} is not a readable Keras model file ({type(error).__name__}: {one_line(error)[:300]})"
        ) from None
    problem = foreign_model_problem(model)
    if problem:
        raise StageError(f"{model_file} is not a model of this project: {problem}")
    return model


def image_size_of(model) -> int:
    """The side of the square images ``model`` takes (prepare.image_size when it was trained)."""
    return int(model.inputs[0].shape[1])


def foreign_model_problem(model) -> str | None:
    """Why ``model`` is not one of this project's (square uint8 RGB images in, one logit per named class out); None if it is."""
    from cifar100_dvc.network import ClassNames

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return f"it has {len(model.inputs)} input(s) and {len(model.outputs)} output(s), not one of each"
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or input_shape[1] is None or input_shape[1] != input_shape[2] or input_shape[3] != 3:
        return f"it takes inputs of shape {input_shape}, not square RGB images (None, size, size, 3)"
    if model.inputs[0].dtype != "uint8":
        return f"it takes {model.inputs[0].dtype} inputs, not uint8 pixels"
    try:
        names_layer = model.get_layer("class_names")
    except ValueError:
        return "it has no class_names layer"
    if not isinstance(names_layer, ClassNames):
        return f"its class_names layer is a {type(names_layer).__name__}, not this project's ClassNames"
    num_outputs = model.outputs[0].shape[-1]
    if num_outputs != len(names_layer.class_names):
        return f"it has {num_outputs} outputs but {len(names_layer.class_names)} class names"
    return None
