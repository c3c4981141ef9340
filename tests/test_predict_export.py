"""Using the trained model: the predict command and the serving export."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from cifar100_dvc.inference import load_model
from cifar100_dvc.params import ExportParams
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.scratch import run_module
from cifar100_dvc.synthetic import COARSE_NAMES, make_image
from stages import export
from tools import predict


@pytest.fixture
def trained(project_with) -> ProjectPaths:
    """A project copy with the session's tiny trained model (conftest.trained_paths)."""
    return ProjectPaths(project_with("model_file"))


@pytest.fixture
def image_dir(tmp_path):
    """Images of 3 coarse classes in different modes and sizes, a broken one and a text file."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "images"
    directory.mkdir()
    Image.fromarray(make_image(0, rng)).save(directory / "a_rgb.png")
    Image.fromarray(make_image(5 * 7, rng, size=48)).convert("L").save(directory / "b_gray_big.jpg")
    Image.fromarray(make_image(5 * 12 + 3, rng)).convert("RGBA").save(directory / "c_rgba.png")
    (directory / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (directory / "notes.txt").write_text("not an image")
    return directory


def test_predictions_match_the_model_in_memory(trained, image_dir):
    model = load_model(trained.model_file)
    files = predict.expand_inputs([image_dir])
    assert [path.name for path in files] == ["a_rgb.png", "b_gray_big.jpg", "c_rgba.png", "d_broken.png"]
    results = predict.predict_files(model, files, k=3)
    assert results[3].error and "not a readable image" in results[3].error
    images = np.stack([predict.to_rgb_uint8(predict.decode_image(path.read_bytes()))[0] for path in files[:3]])
    expected = model.predict(images, verbose=0).argmax(axis=1)
    for result, label in zip(results[:3], expected):
        assert result.error is None and len(result.top_k) == 3
        assert result.top_k[0][0] == COARSE_NAMES[label]
        probabilities = [p for _, p in result.top_k]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return run_module("tools.predict", *args, timeout=300)


def test_command_prints_json_reports_bad_files_and_exits_1(trained, image_dir):
    result = run_predict("--model", str(trained.model_file), "--json", "--top-k", "2", str(image_dir))
    assert result.returncode == 1
    payload = json.loads(result.stdout)
    assert [entry["file"].rsplit("/", 1)[-1] for entry in payload] == [
        "a_rgb.png",
        "b_gray_big.jpg",
        "c_rgba.png",
        "d_broken.png",
    ]
    assert all(len(entry["predictions"]) == 2 for entry in payload[:3])
    assert "error" in payload[3]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "d_broken.png" in errors[0]


def test_command_exits_0_when_every_file_reads(trained, image_dir):
    result = run_predict("--model", str(trained.model_file), str(image_dir / "a_rgb.png"), str(image_dir / "c_rgba.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(image_dir / "a_rgb.png") + ": ")


def test_missing_model_is_one_line_error():
    result = run_predict("--model", "/nonexistent/model.keras", "x.png")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: predict: ")


@pytest.mark.parametrize("cpu_flags", ["avx2 fma", "avx2 fma avx512f avx512_bf16"], ids=["float32-path", "bfloat16-path"])
def test_a_model_trained_on_either_path_computes_in_float32_and_exports_to_tflite(project_with, monkeypatch, cpu_flags):
    import keras
    import tensorflow as tf

    from cifar100_dvc import hardware
    from cifar100_dvc.scratch import TINY_TRAIN
    from stages import train

    monkeypatch.setenv(hardware.CPU_FLAGS_ENV, cpu_flags)  # bfloat16 compute on any machine, or float32
    paths = ProjectPaths(project_with("prepared_dir"))
    summary = train.run(TINY_TRAIN, paths)
    trained_policy = "mixed_bfloat16" if "bf16" in cpu_flags else "float32"
    assert summary["device"]["mixed_precision_policy"] == trained_policy
    model = load_model(paths.model_file)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}  # mixed precision stayed in training

    written = export.run(ExportParams(tflite=True), paths)
    assert written == ["saved_model", "model.tflite", "class_names.txt"]
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = model.predict(images, verbose=0)
    saved_model = tf.saved_model.load(str(paths.export_dir / "saved_model"))  # keep a reference: it owns the variables
    np.testing.assert_allclose(saved_model.serve(tf.constant(images)).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (paths.export_dir / "class_names.txt").read_text().split() == COARSE_NAMES
    interpreter = tf.lite.Interpreter(model_path=str(paths.export_dir / "model.tflite"))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), expected, atol=1e-4)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_export_converts_a_model_saved_in_bfloat16_by_an_older_version(project_with):
    import keras

    from cifar100_dvc import training
    from cifar100_dvc.network import build_network
    from cifar100_dvc.records import DatasetInfo
    from cifar100_dvc.scratch import TINY_TRAIN

    paths = ProjectPaths(project_with("prepared_dir"))
    with training.dtype_policy("mixed_bfloat16"):  # what train wrote before models were saved in float32
        model = build_network(TINY_TRAIN, training.input_spec(DatasetInfo.read(paths.prepared_dir)))
    paths.model_file.parent.mkdir(parents=True, exist_ok=True)
    model.save(paths.model_file)
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in keras.models.load_model(paths.model_file).layers}
    assert "model.tflite" in export.run(ExportParams(tflite=True), paths)


def test_a_failed_tflite_conversion_is_one_error_and_leaves_no_export(trained, monkeypatch):
    import tensorflow as tf

    from cifar100_dvc.common import StageError

    class Refusing:
        def convert(self):
            raise RuntimeError("'tf.Conv2D' op is neither a custom op nor a flex op")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", staticmethod(lambda path: Refusing()))
    with pytest.raises(StageError, match="TFLite conversion of .* failed .*set export.tflite: false"):
        export.run(ExportParams(tflite=True), trained)
    assert not trained.export_dir.exists()
