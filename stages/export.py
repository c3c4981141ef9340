"""DVC stage ``export``: models/model.keras -> models/export, the trained model for serving.

Writes models/export/saved_model (a TensorFlow SavedModel with a ``serve`` endpoint taking
uint8 [N, 32, 32, 3] images and returning logits, for TF Serving or any TF runtime) and, with
``export.tflite``, models/export/model.tflite. Both compute in float32 whatever machine trained
the model (``float32_model``: a model saved by an older version in bfloat16 is converted), so
TFLite takes every op and any CPU runs them natively.
"""

from __future__ import annotations

import logging

from cifar100_dvc.common import StageError, atomic_output, one_line, run_main
from cifar100_dvc.inference import load_model
from cifar100_dvc.params import ExportParams, load_params
from cifar100_dvc.paths import ProjectPaths

log = logging.getLogger(__name__)


def run(params: ExportParams, paths: ProjectPaths) -> list[str]:
    """Export models/model.keras; return the names written under models/export."""
    import tensorflow as tf

    from cifar100_dvc.network import class_names_of, float32_model

    model = float32_model(load_model(paths.model_file))
    written = []
    with atomic_output(paths.export_dir) as staged:
        staged.mkdir()
        model.export(str(staged / "saved_model"), format="tf_saved_model", verbose=False)
        written.append("saved_model")
        if params.tflite:
            try:
                converter = tf.lite.TFLiteConverter.from_saved_model(str(staged / "saved_model"))
                (staged / "model.tflite").write_bytes(converter.convert())
            except Exception as error:  # the converter raises its own types; nothing is left half-written
                raise StageError(
                    f"TFLite conversion of {paths.model_file} failed ({type(error).__name__}: {one_line(error)[:200]}); "
                    "set export.tflite: false to export the SavedModel alone"
                ) from None
            written.append("model.tflite")
        (staged / "class_names.txt").write_text("\n".join(class_names_of(model)) + "\n")
        written.append("class_names.txt")
    log.info("exported %s to %s", written, paths.export_dir)
    return written


def main() -> None:
    paths = ProjectPaths()
    run_main("export", lambda: run(load_params(paths.params_file).export, paths))


if __name__ == "__main__":
    main()
