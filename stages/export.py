"""DVC stage ``export``: models/model.keras -> models/export, the trained model for serving.

Writes models/export/saved_model (a TensorFlow SavedModel with a ``serve`` endpoint taking
uint8 [N, 32, 32, 3] images and returning logits, for TF Serving or any TF runtime) and,
when ``export.tflite`` is on and the conversion succeeds, models/export/model.tflite.
"""

from __future__ import annotations

import logging

from cifar100_dvc.common import atomic_output, one_line, run_main
from cifar100_dvc.inference import load_model
from cifar100_dvc.params import ExportParams, load_params
from cifar100_dvc.paths import ProjectPaths

log = logging.getLogger(__name__)


def run(params: ExportParams, paths: ProjectPaths) -> list[str]:
    """Export models/model.keras; return the names written under models/export."""
    import tensorflow as tf

    from cifar100_dvc.network import class_names_of

    model = load_model(paths.model_file)
    written = []
    with atomic_output(paths.export_dir) as staged:
        staged.mkdir()
        model.export(str(staged / "saved_model"), format="tf_saved_model", verbose=False)
        written.append("saved_model")
        if params.tflite:
            try:
                converter = tf.lite.TFLiteConverter.from_saved_model(str(staged / "saved_model"))
                (staged / "model.tflite").write_bytes(converter.convert())
                written.append("model.tflite")
            except Exception as error:  # conversion support varies by op; the SavedModel still serves
                log.warning("TFLite conversion failed, SavedModel only: %s", one_line(error)[:300])
        (staged / "class_names.txt").write_text("\n".join(class_names_of(model)) + "\n")
        written.append("class_names.txt")
    log.info("exported %s to %s", written, paths.export_dir)
    return written


def main() -> None:
    paths = ProjectPaths()
    run_main("export", lambda: run(load_params(paths.params_file).export, paths))


if __name__ == "__main__":
    main()
