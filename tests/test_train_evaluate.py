"""train and evaluate on the synthetic data: the model learns, outputs are whole and atomic."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from cifar100_dvc import hardware, training
from cifar100_dvc.common import StageError
from cifar100_dvc.inference import load_model, predict_probabilities
from cifar100_dvc.params import EvaluateParams, TrainParams
from cifar100_dvc.paths import REPO_ROOT, ProjectPaths
from cifar100_dvc.records import DatasetInfo, read_arrays
from cifar100_dvc.scratch import TINY_AIRBENCH
from cifar100_dvc.synthetic import COARSE_NAMES
from stages import evaluate, train


@pytest.fixture
def prepared(project_with) -> ProjectPaths:
    """A project copy holding only the session's prepared data: ready for train.run."""
    return ProjectPaths(project_with("prepared_dir"))


@pytest.mark.slow
def test_chain_learns_far_above_chance_and_writes_everything(project_with):
    # The session's model: the tiny recipe, 6 epochs (conftest.trained_paths).
    paths = ProjectPaths(project_with("prepared_dir", "model_file", "history_file", "live_dir", "checkpoint_dir"))
    summary = json.loads(paths.history_file.read_text())
    assert summary["epochs_completed"] == 6 and not summary["stopped_by_time_budget"]
    assert [row["epoch"] for row in summary["epochs"]] == [1, 2, 3, 4, 5, 6]
    metrics = evaluate.run(EvaluateParams(batch_size=64, tta_flip=True, tta_translate=1, sample_images=9), paths)
    assert metrics["num_examples"] == 200
    assert metrics["accuracy"] > 0.3  # 20 classes: chance is 0.05 (0.5 seen with these settings)
    split_keys = {"accuracy", "top5_accuracy", "cross_entropy", "num_examples", "single_view_accuracy"}
    assert set(metrics) == split_keys | {"val"}
    assert set(metrics["val"]) == split_keys and metrics["val"]["num_examples"] == 60  # recipes are chosen here
    assert metrics["single_view_accuracy"] > 0.3
    assert json.loads(paths.metrics_file.read_text()) == metrics
    per_class = json.loads(paths.class_accuracy_file.read_text())
    assert [row["class"] for row in per_class] == COARSE_NAMES
    for name in ("training_curves.png", "confusion_matrix.png", "class_accuracy.png", "samples.png", "confusion.csv"):
        assert (paths.plots_dir / name).stat().st_size > 0, name
    assert len((paths.plots_dir / "confusion.csv").read_text().splitlines()) == 201
    assert (paths.live_dir / "plots" / "metrics" / "eval" / "accuracy.tsv").is_file()
    assert [path.name for path in paths.checkpoint_dir.iterdir()] == ["README.txt"]  # finished: nothing to resume


# How the README tells a user to load the model: plain load_model, only the project's layers imported.
USER_LOAD_SCRIPT = """
import json, sys
import keras, numpy as np
import cifar100_dvc.network
model = keras.models.load_model(sys.argv[1])
logits = model.predict(np.load(sys.argv[2]), verbose=0)
print("RESULT" + json.dumps({"class_names": cifar100_dvc.network.class_names_of(model), "logits": logits.tolist()}))
"""


def test_saved_model_classifies_raw_uint8_and_carries_class_names(project_with, tmp_path):
    import subprocess
    import sys
    import zipfile

    paths = ProjectPaths(project_with("prepared_dir", "model_file"))  # saved by train.run (conftest.trained_paths)
    model = load_model(paths.model_file)
    assert keras.saving.get_registered_name(type(model.get_layer("class_names"))) == "cifar100_dvc>ClassNames"
    info = DatasetInfo.read(paths.prepared_dir)
    assert model.get_layer("class_names").class_names == info.class_names
    images_uint8, _ = read_arrays(paths.prepared_dir, "test")
    probabilities = predict_probabilities(model, images_uint8[:10], batch_size=5, tta_flip=False)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    # Saved for inference: no optimizer, schedule or loss that a user's load would have to resolve.
    config = json.loads(zipfile.ZipFile(paths.model_file).read("config.json"))
    assert not config.get("compile_config")  # Keras writes {} for a model never compiled
    # A fresh Python session, as a user loads it (compile left at its default, train not imported).
    np.save(tmp_path / "images.npy", images_uint8[:10])
    loaded = subprocess.run(
        [sys.executable, "-c", USER_LOAD_SCRIPT, str(paths.model_file), str(tmp_path / "images.npy")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.split("RESULT", 1)[1])
    assert result["class_names"] == info.class_names
    assert np.array(result["logits"]).shape == (10, len(info.class_names))
    np.testing.assert_allclose(result["logits"], model.predict(images_uint8[:10], verbose=0), rtol=1e-4, atol=1e-4)


def test_time_budget_stops_training_early(prepared, tiny_train):
    paths = prepared
    summary = train.run(dataclasses.replace(tiny_train, epochs=50, time_budget_minutes=0.001), paths)
    assert summary["stopped_by_time_budget"] and summary["stop_reason"] == "time_budget"
    assert len(summary["epochs"]) == 1 and summary["epochs_completed"] == 0  # cut short in its first epoch
    assert 0 < summary["epochs"][0]["epoch_fraction"] < 1
    assert summary["images_seen"] == round(summary["epochs_done"] * 16 * tiny_train.batch_size)
    assert paths.model_file.is_file()


def test_validation_freq_scores_val_every_nth_epoch_and_the_last(prepared, tiny_train):
    assert train.validation_epochs(1, 4) == [1, 2, 3, 4]
    assert train.validation_epochs(3, 7) == [3, 6, 7]
    assert train.validation_epochs(20, 10) == [10]  # more than the epochs: the last only
    summary = train.run(dataclasses.replace(tiny_train, epochs=3, validation_freq=2), prepared)
    assert ["val_accuracy" in row for row in summary["epochs"]] == [False, True, True]
    live = json.loads(prepared.live_metrics_file.read_text())
    assert live["eval"]["accuracy"] == summary["epochs"][-1]["val_accuracy"]  # the curve ends on the saved model


class StepClock(train.TrainingClock):
    """A clock that advances one second each time it is read: budgets in steps, not wall time."""

    def seconds(self) -> float:
        self.reads = getattr(self, "reads", 0) + 1
        return float(self.reads)


def test_time_budget_compresses_the_schedule_so_the_rate_ends_decayed(prepared, tiny_train, monkeypatch):
    monkeypatch.setattr(train, "TrainingClock", StepClock)
    paths = prepared
    # 6 epochs of 16 steps planned; the clock is read twice a step, so 60 s last about 30 steps.
    summary = train.run(dataclasses.replace(tiny_train, epochs=6, time_budget_minutes=1.0), paths)
    assert summary["stop_reason"] == "time_budget" and 1 < summary["epochs_done"] < 3
    assert [row["epoch_fraction"] for row in summary["epochs"][:-1]] == [1.0] * (len(summary["epochs"]) - 1)
    # Without the budget, the rate would still be near its peak after a third of the planned steps.
    assert summary["final_learning_rate"] < 0.05 * tiny_train.learning_rate
    live = json.loads(paths.live_metrics_file.read_text())
    assert (live["epochs_done"], live["images_seen"], live["stopped_by_time_budget"]) == (
        summary["epochs_done"],
        summary["images_seen"],
        1,
    )


def test_schedule_follows_the_share_of_the_budget_spent_when_it_is_further_along():
    import keras

    spent = keras.Variable(0.0, trainable=False)
    schedule = training.WarmupSchedule(peak=1.0, warmup_steps=10, total_steps=110, decay="linear", budget_spent=spent)
    assert float(schedule(60)) == pytest.approx(0.5)  # the steps lead: the plain schedule
    spent.assign(0.75)
    assert float(schedule(60)) == pytest.approx(float(schedule(0.75 * 110)))  # the clock leads
    spent.assign(1.0)
    assert float(schedule(5)) == pytest.approx(0.0)


@pytest.mark.parametrize(("cpu_flags", "policy"), [("avx2 fma", "float32"), ("avx2 fma avx512f avx512_bf16", "mixed_bfloat16")])
def test_both_cpu_compute_paths_train_reproducibly_with_onednn(project_with, tiny_train, monkeypatch, cpu_flags, policy):
    import keras

    monkeypatch.setenv(hardware.CPU_FLAGS_ENV, cpu_flags)
    assert hardware.onednn_enabled()  # cifar100_dvc/__init__.py asks for it on every CPU
    runs = []
    for attempt in ("first", "second"):
        summary = train.run(tiny_train, ProjectPaths(project_with("prepared_dir", name=attempt)))
        runs.append([{k: v for k, v in row.items() if k != "seconds"} for row in summary["epochs"]])
        assert summary["device"]["mixed_precision_policy"] == policy
        assert keras.mixed_precision.global_policy().name == "float32"  # the run's policy did not leak
    assert runs[0] == runs[1]  # same params, seed and machine: the same training, to the last bit


def test_dtype_policy_holds_inside_the_block_and_is_restored_even_after_an_error():
    before = keras.mixed_precision.global_policy().name
    with pytest.raises(RuntimeError, match="inside"), training.dtype_policy("mixed_bfloat16"):
        assert keras.layers.Dense(2).dtype_policy.name == "mixed_bfloat16"  # a layer built inside takes it
        raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == before


def test_batch_larger_than_the_train_split_is_refused(prepared, tiny_train):
    from cifar100_dvc.common import StageError

    paths = prepared
    with pytest.raises(StageError, match="train.batch_size=4096 exceeds the 540 train examples"):
        train.run(dataclasses.replace(tiny_train, batch_size=4096), paths)
    assert not paths.model_file.exists()


def test_reflected_crop_padding_as_large_as_the_image_is_refused_before_training(prepared, tiny_train):
    paths = prepared
    image_size = DatasetInfo.read(paths.prepared_dir).image_shape[0]
    with pytest.raises(StageError, match=f"train.crop_padding={image_size} with train.crop_fill=reflect must be below"):
        train.run(dataclasses.replace(tiny_train, crop_fill="reflect", crop_padding=image_size), paths)
    assert not paths.model_file.exists()


def test_a_cutout_larger_than_the_image_is_refused_before_training(prepared):
    paths = prepared
    image_size = DatasetInfo.read(paths.prepared_dir).image_shape[0]
    params = dataclasses.replace(TINY_AIRBENCH, airbench=dataclasses.replace(TINY_AIRBENCH.airbench, cutout=image_size + 1))
    expected = f"train.airbench.cutout={image_size + 1} must be at most the {image_size}x{image_size} images"
    with pytest.raises(StageError, match=expected):
        train.run(params, paths)
    assert not paths.model_file.exists()


@pytest.mark.parametrize(
    ("optimizer", "weight_decay", "expected_class", "expected_decay"),
    [
        ("sgd", 5e-4, training.BiasScaledSGD, 5e-4),
        ("sgd", 0.0, training.BiasScaledSGD, None),
        ("adamw", 5e-4, keras.optimizers.AdamW, 5e-4),
        ("adam", 0.0, keras.optimizers.Adam, None),
    ],
)
def test_each_optimizer_choice_is_its_own_optimizer(optimizer, weight_decay, expected_class, expected_decay):
    params = TrainParams(arch="resnet", optimizer=optimizer, weight_decay=weight_decay)
    made = training.make_optimizer(params, steps_per_epoch=10)
    assert type(made) is expected_class  # exact: AdamW subclasses Adam
    assert made.weight_decay == (pytest.approx(expected_decay) if expected_decay else None)
    if optimizer == "sgd":
        assert made.bias_lr_scale == params.bn_bias_lr_scale and made.nesterov


def test_adam_with_weight_decay_is_refused_even_when_params_were_not_parsed():
    with pytest.raises(StageError, match="'train.optimizer: adam' is plain Adam with no weight decay"):
        training.make_optimizer(TrainParams(arch="resnet", optimizer="adam", weight_decay=5e-4), steps_per_epoch=10)


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    schedule = training.WarmupSchedule(peak=0.4, warmup_steps=10, total_steps=110, decay="linear")
    values = [float(schedule(step)) for step in (0, 4, 9, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.04, 0.2, 0.4, 0.4, 0.2, 0.0], atol=1e-6)
    cosine = training.WarmupSchedule(peak=1.0, warmup_steps=0, total_steps=100, decay="cosine")
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 50, 100)], [1.0, 0.5, 0.0], atol=1e-6)
    constant = training.WarmupSchedule(peak=0.3, warmup_steps=0, total_steps=100, decay="constant")
    assert float(constant(99)) == pytest.approx(0.3)


def test_device_settings_auto_resolve_by_hardware():
    cpu = training.resolve_device_settings(TrainParams(), num_gpus=0)
    assert (cpu.mixed_precision_policy, cpu.jit_compile, cpu.steps_per_execution) == ("float32", False, 1)
    forced = training.resolve_device_settings(
        TrainParams(mixed_precision="on", jit_compile="on", steps_per_execution=4), num_gpus=0
    )
    assert (forced.mixed_precision_policy, forced.jit_compile, forced.steps_per_execution) == ("mixed_bfloat16", True, 4)
    bf16_cpu = training.resolve_device_settings(TrainParams(), num_gpus=0, cpu_has_bfloat16=True)
    assert (bf16_cpu.mixed_precision_policy, bf16_cpu.jit_compile, bf16_cpu.steps_per_execution) == ("mixed_bfloat16", False, 1)
    switched_off = training.resolve_device_settings(TrainParams(mixed_precision="off"), num_gpus=0, cpu_has_bfloat16=True)
    assert switched_off.mixed_precision_policy == "float32"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse amx_tile amx_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),
        ("Features\t: fp asimd\n", False),
    ],
)
def test_cpu_bfloat16_detection_reads_the_flags(tmp_path, cpuinfo, expected):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert hardware.cpu_has_bfloat16(hardware.cpu_flags(tmp_path / "cpuinfo", environ={})) is expected
    assert hardware.cpu_flags(tmp_path / "missing", environ={}) == frozenset()


def test_cpu_family_and_name_come_from_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 26\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 25\n")
    assert (hardware.cpu_family(cpuinfo), hardware.cpu_model_name(cpuinfo)) == ("26", "AMD EPYC")
    assert (hardware.cpu_family(tmp_path / "missing"), hardware.cpu_model_name(tmp_path / "missing")) == ("?", "unknown")


def test_cpu_flags_override_replaces_what_the_cpu_says(tmp_path):
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    environ = {hardware.CPU_FLAGS_ENV: "AVX2, fma"}
    assert hardware.cpu_flags(tmp_path / "cpuinfo", environ=environ) == {"avx2", "fma"}
    assert not hardware.cpu_has_bfloat16(hardware.cpu_flags(tmp_path / "cpuinfo", environ=environ))


TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

ONE_STEP_SCRIPT = (
    TWO_CPUS
    + """
import json, sys
import keras, numpy as np
from cifar100_dvc import training
from cifar100_dvc.network import InputSpec, build_resnet
from cifar100_dvc.params import TrainParams

spec = InputSpec((32, 32, 3), tuple("abcdefghij"), (120.0,) * 3, (60.0,) * 3)
rng = np.random.default_rng(0)
batch = tf.data.Dataset.from_tensors((rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 32)))
# resnet's flat SGD keys, or airbench's default optimizer (Muon) stepping the same network
arch = sys.argv[1]
params = TrainParams(arch=arch, widths=(8, 8, 16, 16), batch_size=32, learning_rate=0.4, warmup_epochs=0.0)
weights = {}
strategies = {"one device": tf.distribute.get_strategy(), "mirrored": tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])}
for name, strategy in strategies.items():
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_resnet(spec, params.widths)
        for layer in model.layers:  # BatchNorm over the global batch: the one thing replicas may differ in
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
        training.compile_model(model, params, steps_per_epoch=10, jit_compile=False, steps_per_execution=1)
        if arch == "airbench":  # bfloat16 Newton-Schulz would round the all-reduced gradient's last bits into sight
            assert isinstance(model.optimizer, training.AirbenchMuon)
            model.optimizer.newton_schulz_dtype = "float32"
    model.fit(batch, epochs=1, verbose=0)
    weights[name] = [np.asarray(w) for w in model.weights]
moved = [float(np.abs(a - b).max()) for a, b in zip(weights["one device"], weights["mirrored"])]
print("RESULT" + json.dumps(moved))
"""
)


def run_on_two_cpus(script: str, *args: str):
    import os
    import subprocess
    import sys

    from cifar100_dvc.paths import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("arch", ["resnet", "airbench"], ids=["sgd", "airbench-muon"])
def test_a_mirrored_step_over_two_replicas_is_the_step_on_one_device(arch):
    """Loss scaling, learning rate, weight decay and BatchNorm statistics under the global batch:
    with BatchNorm synchronized, one step over two replicas moves every weight as one device does."""
    result = run_on_two_cpus(ONE_STEP_SCRIPT, arch)
    differences = json.loads(result.stdout.split("RESULT", 1)[1])
    assert max(differences) < 1e-4, differences


MIRRORED_TRAINING_SCRIPT = (
    TWO_CPUS
    + """
import dataclasses, json, logging, sys
from pathlib import Path
from stages import train
from cifar100_dvc.paths import ProjectPaths
from cifar100_dvc.params import parse_params, to_dict, Params
logging.basicConfig(level=logging.INFO)
params = parse_params({**to_dict(Params()), "train": json.loads(sys.argv[2])}).train
summary = train.run(dataclasses.replace(params, distribute="mirrored"), ProjectPaths(Path(sys.argv[1])))
print("SUMMARY" + json.dumps(summary["epochs"]))
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "airbench", "airbench-muon"])
def test_mirrored_training_over_two_logical_cpus_learns(prepared, tiny_train, arch):
    # airbench: its lookahead and whitening-bias freeze, and Muon's orthogonalized kernel steps, run in
    # the optimizer's cross-replica update.
    from cifar100_dvc.params import to_dict
    from cifar100_dvc.scratch import TINY_AIRBENCH, TINY_MUON

    paths = prepared
    resnet = dataclasses.replace(tiny_train, epochs=6, warmup_epochs=1.0)
    recipe = {"resnet": resnet, "airbench": TINY_AIRBENCH, "airbench-muon": TINY_MUON}[arch]
    result = run_on_two_cpus(MIRRORED_TRAINING_SCRIPT, str(paths.root), json.dumps(to_dict(recipe)))
    strategy_lines = [line for line in result.stderr.splitlines() if "MirroredStrategy over" in line]
    assert strategy_lines and "CPU:0" in strategy_lines[0] and "CPU:1" in strategy_lines[0], strategy_lines
    epochs = json.loads(result.stdout.split("SUMMARY", 1)[1])
    # Each replica normalizes its half batch with its own statistics, so the trajectory is not the
    # one-device one (and 60 val images are too few to compare two trajectories); it must learn.
    assert epochs[-1]["loss"] < 0.9 * epochs[0]["loss"]
    assert epochs[-1]["val_accuracy"] > 0.15  # 20 classes: chance is 0.05


def test_batch_norm_biases_step_scale_times_further_and_other_weights_as_usual():
    from cifar100_dvc.training import BiasScaledSGD, is_batch_norm_bias

    def one_step(scale: float) -> tuple[keras.Model, list[np.ndarray]]:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.BatchNormalization()(keras.layers.Dense(5)(inputs))))
        before = [w.numpy().copy() for w in model.trainable_weights]
        model.compile(optimizer=BiasScaledSGD(0.01, momentum=0.9, nesterov=True, bias_lr_scale=scale), loss="mse")
        model.train_on_batch(np.random.default_rng(0).normal(size=(8, 4)), np.ones((8, 3)))
        return model, [w.numpy() - b for w, b in zip(model.trainable_weights, before)]

    model, plain = one_step(1.0)
    _, scaled = one_step(64.0)
    flags = [is_batch_norm_bias(w) for w in model.trainable_weights]
    assert flags.count(True) == 1  # the one BatchNormalization's beta
    for is_bias, step, scaled_step in zip(flags, plain, scaled):
        np.testing.assert_allclose(scaled_step, 64.0 * step if is_bias else step, rtol=1e-4, atol=1e-7)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(BiasScaledSGD(0.1, bias_lr_scale=8.0))).bias_lr_scale == 8.0


def test_airbench_switches_train_end_to_end_and_the_model_reloads(prepared, tiny_train):
    # Whitened stem (its kernel from the prepared train images), dirac init, 64x BatchNorm-bias
    # steps and reflect-filled crops, all on: the stage trains, learns, and saves a model that
    # loads and predicts as the trained one did.
    recipe = dataclasses.replace(
        tiny_train, epochs=4, warmup_epochs=1.0, whiten_stem=True, dirac_init=True, bn_bias_lr_scale=64.0, crop_fill="reflect"
    )
    summary = train.run(recipe, prepared)
    assert summary["epochs"][-1]["val_accuracy"] > 0.3  # 20 classes: chance is 0.05 (0.8+ seen)
    model = load_model(prepared.model_file)
    stem = model.get_layer("stem_whiten")
    assert not stem.trainable and stem.kernel.shape == (2, 2, 3, 24) and np.abs(stem.kernel.numpy()).max() > 1.0
    images_uint8, labels = read_arrays(prepared.prepared_dir, "val")
    accuracy = float(np.mean(predict_probabilities(model, images_uint8, 64, tta_flip=False).argmax(axis=1) == labels))
    assert accuracy == pytest.approx(summary["epochs"][-1]["val_accuracy"], abs=0.02)


def test_ensemble_members_get_seeds_no_other_run_uses_and_equal_shares_of_the_budget(tiny_train):
    pair = dataclasses.replace(tiny_train, ensemble=2, time_budget_minutes=10.0)
    seeds = [train.ensemble_member(dataclasses.replace(pair, seed=seed), index).seed for seed in (0, 1, 2) for index in (0, 1)]
    assert seeds == [0, 1, 2, 3, 4, 5]  # runs on seeds 0, 1 and 2 share no network
    assert {train.ensemble_member(pair, index).time_budget_minutes for index in (0, 1)} == {5.0}
    assert train.ensemble_member(dataclasses.replace(pair, time_budget_minutes=None), 1).time_budget_minutes is None
    assert train.ensemble_member(tiny_train, 0) == tiny_train  # one network: the params as they are


class InterruptInSecondMember(train.EpochCheckpoint):
    """Stops the run with a Ctrl-C after the second network's first epoch is checkpointed."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.member == 2:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_an_ensemble_trains_its_networks_in_turn_resumes_where_it_stopped_and_saves_their_mean(
    project_with, tiny_train, monkeypatch
):
    recipe = dataclasses.replace(tiny_train, ensemble=2, seed=1)  # its networks: seeds 2 and 3
    paths = ProjectPaths(project_with("prepared_dir", name="ensemble"))
    with monkeypatch.context() as patch:
        patch.setattr(train, "EpochCheckpoint", InterruptInSecondMember)
        with pytest.raises(KeyboardInterrupt):
            train.run(recipe, paths)
    assert (paths.checkpoint_dir / "member-1" / "member.keras").is_file() and not paths.model_file.exists()
    trained = []  # the networks that train in the resumed run
    fit = train._fit
    monkeypatch.setattr(train, "_fit", lambda *args: trained.append(args[9]) or fit(*args))
    summary = train.run(recipe, paths)
    assert trained == [2]  # the first network was kept, the second continued from its checkpoint
    assert [member["seed"] for member in summary["members"]] == [2, 3]
    assert [(row["member"], row["epoch"]) for row in summary["epochs"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert summary["ensemble"] == 2 and summary["epochs_done"] == 4 and summary["stop_reason"] == "epochs"
    assert summary["train_seconds"] == pytest.approx(sum(member["train_seconds"] for member in summary["members"]))
    live = json.loads(paths.live_metrics_file.read_text())
    assert live["epochs_done"] == 4 and live["step"] == 3  # dvclive's curve holds both networks' epochs
    assert evaluate.epoch_positions(summary) == ([1.0, 2.0, 3.0, 4.0], False)
    assert [path.name for path in paths.checkpoint_dir.iterdir()] == ["README.txt"]  # finished: nothing to resume

    # Each network is the one its seed trains alone (resumed or not), and the saved model averages their logits.
    images_uint8, _ = read_arrays(paths.prepared_dir, "test")
    alone = []
    for seed in (2, 3):
        single = ProjectPaths(project_with("prepared_dir", name=f"seed-{seed}"))
        train.run(dataclasses.replace(tiny_train, seed=seed), single)
        alone.append(load_model(single.model_file).predict(images_uint8, verbose=0))
    assert not np.allclose(alone[0], alone[1])
    ensemble = load_model(paths.model_file)
    np.testing.assert_allclose(ensemble.predict(images_uint8, verbose=0), np.mean(alone, axis=0), rtol=1e-4, atol=1e-4)
    metrics = evaluate.run(EvaluateParams(batch_size=64, tta_flip=True, tta_translate=1, sample_images=4), paths)
    assert metrics["num_examples"] == 200 and (paths.plots_dir / "training_curves.png").stat().st_size > 0
