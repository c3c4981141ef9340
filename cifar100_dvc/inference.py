"""The trained model for inference: loading it safely and checked, and class probabilities.

One home for what the evaluate and export stages and the predict tool share: ``load_model``
(Keras' safe mode; a file that is not this project's model is refused with one line saying why)
and ``predict_probabilities`` (softmax of the logits, optionally averaged with the mirror image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, one_line
from cifar100_dvc.images import IMAGE_SHAPE


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits [N, C], computed stably (the row maximum subtracted first)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def predict_probabilities(model, images_uint8: np.ndarray, batch_size: int, tta_flip: bool) -> np.ndarray:
    """Class probabilities [N, C]; with ``tta_flip``, the mean over each image and its mirror."""
    probabilities = softmax(model.predict(images_uint8, batch_size=batch_size, verbose=0).astype(np.float64))
    if tta_flip:
        mirrored = softmax(model.predict(images_uint8[:, :, ::-1], batch_size=batch_size, verbose=0).astype(np.float64))
        probabilities = (probabilities + mirrored) / 2.0
    return probabilities


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


def foreign_model_problem(model) -> str | None:
    """Why ``model`` is not one of this project's (uint8 images in, one logit per named class out); None if it is."""
    from cifar100_dvc.network import ClassNames

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return f"it has {len(model.inputs)} input(s) and {len(model.outputs)} output(s), not one of each"
    input_shape = tuple(model.inputs[0].shape)
    if input_shape != (None, *IMAGE_SHAPE):
        return f"it takes inputs of shape {input_shape}, not images of shape {(None, *IMAGE_SHAPE)}"
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
