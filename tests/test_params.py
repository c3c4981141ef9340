"""params.yaml loads into typed, frozen dataclasses; every bad key or value is named."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cifar100_dvc.common import StageError
from cifar100_dvc.params import Params, load_params, parse_params, to_dict
from cifar100_dvc.paths import REPO_ROOT
from cifar100_dvc.recipes import RECIPES


def repo_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_repo_params_load_and_are_frozen():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.fetch.dataset == "uoft-cs/cifar100"
    assert params.prepare.label == "fine_label"
    assert params.train.arch == "airbench"
    assert isinstance(params.train.widths, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3


def test_params_yaml_holds_exactly_the_documented_defaults():
    assert repo_params() == to_dict(Params())


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epoch", 3, "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("train", "epochs", 0, "'train.epochs' must be >= 1"),
        ("train", "epochs", 2.5, "'train.epochs' must be an integer"),
        ("train", "epochs", True, "'train.epochs' must be an integer"),
        ("train", "arch", "vgg", "'train.arch' must be one of airbench, resnet, baseline"),
        ("train", "learning_rate", 0, "'train.learning_rate' must be > 0"),
        ("train", "widths", [32, 0, 64, 64], "'train.widths[1]' must be >= 1"),
        ("train", "augment", "yes", "'train.augment' must be true or false"),
        ("prepare", "val_fraction", 1.0, "'prepare.val_fraction' must be < 1.0"),
        ("prepare", "limit", -5, "'prepare.limit' must be >= 1"),
        ("fetch", "dataset", "", "'fetch.dataset' must be a non-empty string"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    raw = repo_params()
    raw[section][key] = value
    with pytest.raises(StageError, match=re.escape(message)):
        parse_params(raw)


def test_adam_with_weight_decay_is_refused_naming_both_keys():
    # Keras 3's Adam would decouple the decay, i.e. be AdamW under another name.
    raw = repo_params()
    raw["train"]["optimizer"] = "adam"
    raw["train"]["weight_decay"] = 5e-4
    with pytest.raises(StageError) as raised:
        parse_params(raw, source="params.yaml")
    message = str(raised.value)
    assert message.startswith("params.yaml: 'train.optimizer: adam' is plain Adam with no weight decay")
    assert "'train.weight_decay' is 0.0005" in message and "use adamw" in message and "\n" not in message


@pytest.mark.parametrize(("optimizer", "weight_decay"), [("adam", 0.0), ("adamw", 5e-4), ("sgd", 5e-4), ("sgd", 0.0)])
def test_optimizer_and_weight_decay_that_mean_what_they_say_are_accepted(optimizer, weight_decay):
    raw = repo_params()
    raw["train"]["optimizer"], raw["train"]["weight_decay"] = optimizer, weight_decay
    params = parse_params(raw)
    assert (params.train.optimizer, params.train.weight_decay) == (optimizer, weight_decay)


def test_missing_key_is_named():
    raw = repo_params()
    del raw["prepare"]["seed"]
    with pytest.raises(StageError, match="missing key 'prepare.seed'"):
        parse_params(raw)


def test_unknown_section_is_named():
    raw = repo_params()
    raw["trian"] = {}
    with pytest.raises(StageError, match="unknown key 'trian' \\(did you mean 'train'\\?\\)"):
        parse_params(raw)


def test_optional_values_accept_null():
    raw = repo_params()
    raw["prepare"]["limit"] = None
    raw["train"]["time_budget_minutes"] = None
    params = parse_params(raw)
    assert params.prepare.limit is None and params.train.time_budget_minutes is None


def write_params(tmp_path, edit) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(edit((REPO_ROOT / "params.yaml").read_text()))
    return path


def test_params_are_read_as_dvc_reads_them(tmp_path):
    # YAML 1.2, as DVC's ruamel.yaml reads it: 1e-3 is a number (PyYAML's YAML 1.1 says a string).
    def edit(text: str) -> str:
        return text.replace("learning_rate: 0.2", "learning_rate: 1e-3")

    params = load_params(write_params(tmp_path, edit))
    assert params.train.learning_rate == 0.001


def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    def edit(text: str) -> str:
        return re.sub(r"\n  epochs: (\d+)\n", r"\n  epochs: \1\n  epochs: 2\n", text)

    path = write_params(tmp_path, edit)
    line = path.read_text().splitlines().index("  epochs: 2") + 1
    with pytest.raises(StageError) as raised:
        load_params(path)
    assert str(raised.value) == f"{path}, line {line}: duplicate key 'epochs'; give each key once"


def test_invalid_yaml_is_one_line(tmp_path):
    path = write_params(tmp_path, lambda text: text.replace("widths: [16, 32, 64, 128]", "widths: [16, 32"))
    with pytest.raises(StageError, match=f"^{re.escape(str(path))}: not valid YAML: ") as raised:
        load_params(path)
    assert "\n" not in str(raised.value)


def test_every_named_recipe_is_valid_and_resnet_is_the_previous_default():
    from cifar100_dvc.recipes import RECIPES, recipe

    params = load_params(REPO_ROOT / "params.yaml")
    for name in RECIPES:
        assert isinstance(recipe(params, name), Params), name
    resnet = recipe(params, "resnet").train
    assert (resnet.arch, resnet.widths, resnet.epochs, resnet.batch_size) == ("resnet", (16, 32, 64, 128), 18, 256)
    assert (resnet.optimizer, resnet.learning_rate, resnet.momentum, resnet.schedule, resnet.warmup_epochs) == (
        "sgd",
        0.2,
        0.9,
        "linear",
        3.0,
    )
    notebook = recipe(params, "notebook")
    assert (notebook.train.arch, notebook.train.optimizer, notebook.train.batch_size, notebook.evaluate.tta_flip) == (
        "baseline",
        "adam",
        32,
        False,
    )
    with pytest.raises(KeyError, match="train.epoch"):
        from cifar100_dvc.recipes import with_overrides

        with_overrides(params, {"train.epoch": 3})


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipes_dvc_options_give_the_recipe_through_dvcs_own_override_parser(tmp_path, name):
    # The -S options docs/parameters.md prints and tools.seeds queues, applied by dvc exp run's own code:
    # a null must stay null, not become the string "None".
    from dvc.utils.hydra import apply_overrides

    from cifar100_dvc.recipes import recipe, set_options

    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    apply_overrides(path, set_options(RECIPES[name][1])[1::2])
    assert load_params(path) == recipe(load_params(REPO_ROOT / "params.yaml"), name)


def test_airbench93_recipe_is_the_published_sgd_recipe_and_the_default_its_network_with_muon():
    from cifar100_dvc.recipes import recipe

    default = load_params(REPO_ROOT / "params.yaml").train
    sgd = recipe(Params(), "airbench93").train
    assert (sgd.batch_size, sgd.epochs, sgd.airbench.optimizer, sgd.airbench.lookahead, sgd.airbench.head_init_std) == (
        1024,
        10,
        "sgd",
        True,
        None,
    )
    triangle = (sgd.airbench.schedule_start, sgd.airbench.schedule_peak, sgd.airbench.schedule_end)
    assert triangle == (0.2, 0.23, 0.07) and sgd.airbench.output_scale == pytest.approx(1 / 9)
    assert default.airbench.widths == sgd.airbench.widths == (64, 128, 128)  # one network, two optimizers
    assert (default.airbench.optimizer, default.batch_size, default.epochs) == ("muon", 2000, 9)
