"""Named recipes besides the default: each a set of ``params.yaml`` overrides, the ``-S`` of ``dvc exp run``.

``params.yaml`` holds the default recipe. The others are kept here, in one place, so that the
benchmark, the docs and the tests mean the same thing by a recipe's name; a user runs one with
``python -m tools.seeds queue NAME --recipe RECIPE`` or copies its overrides from
docs/parameters.md (generated from this module).
"""

from __future__ import annotations

from typing import Any

import yaml

from cifar100_dvc.params import Params, parse_params, to_dict

# airbench93's recipe (KellerJordan/cifar10-airbench) at the 10 epochs that were the default until
# airbench94_muon's optimizer replaced its SGD; the CIFAR-100 configuration builds on it.
AIRBENCH93 = {
    "train.airbench.optimizer": "sgd",
    "train.batch_size": 1024,
    "train.epochs": 10,
    "train.airbench.schedule_start": 0.2,
    "train.airbench.schedule_peak": 0.23,
    "train.airbench.schedule_end": 0.07,
    "train.airbench.lookahead": True,
    "train.airbench.head_init_std": None,
    "train.airbench.output_scale": 1 / 9,
}

# name -> (what it is, overrides of params.yaml's defaults as dotted keys)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "airbench93": (
        "the previous default: airbench93's recipe, Nesterov SGD at batch 1024, a triangular schedule 0.2 -> 1 -> 0.07, "
        "lookahead, 10 epochs",
        AIRBENCH93,
    ),
    "resnet": (
        "the default before airbench: the small ResNet, 18 epochs of batch 256, one-cycle SGD (train's flat keys)",
        {"train.arch": "resnet", "train.epochs": 18, "train.batch_size": 256},
    ),
    "cifar100": (
        "airbench configured for CIFAR-100's 100 classes, as published speedruns do: wider blocks, more label smoothing, "
        "more epochs (not measured on CIFAR-100: docs/scaling.md)",
        {**AIRBENCH93, "train.airbench.widths": [128, 384, 576], "train.label_smoothing": 0.3, "train.epochs": 20},
    ),
    "muon": (
        "airbench94_muon as published (94.01% on CIFAR-10 in 8 epochs against airbench94's 9.9): Muon on the "
        "kernels, batch 2000, airbench94's widths, a linear decay from the first step, no lookahead, the head at "
        "std 1 and the logits / 256",
        {
            "train.airbench.optimizer": "muon",
            "train.airbench.widths": [64, 256, 256],
            "train.batch_size": 2000,
            "train.epochs": 8,
            "train.airbench.schedule_start": 1.0,
            "train.airbench.schedule_peak": 0.0,
            "train.airbench.schedule_end": 0.0,
            "train.airbench.lookahead": False,
            "train.airbench.head_init_std": 1.0,
            "train.airbench.output_scale": 1 / 256,
        },
    ),
    "notebook": (
        "the notebook's: its CNN, Adam at 1e-3, batch 32, constant rate, no smoothing, augmentation or test-time views",
        {
            "train.arch": "baseline",
            "train.optimizer": "adam",
            "train.learning_rate": 0.001,
            "train.batch_size": 32,
            "train.schedule": "constant",
            "train.warmup_epochs": 0,
            "train.weight_decay": 0,
            "train.label_smoothing": 0,
            "train.augment": False,
            "train.epochs": 10,
            "evaluate.tta_flip": False,
            "evaluate.tta_translate": 0,
        },
    ),
}


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """``params`` with dotted-key ``overrides`` applied (``train.airbench.widths`` reaches a nested key), validated again."""
    raw = to_dict(params)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node[section]
        if key not in node:
            raise KeyError(f"unknown key {dotted!r}")
        node[key] = list(value) if isinstance(value, tuple) else value
    return parse_params(raw, source="recipe")


def recipe(params: Params, name: str) -> Params:
    """The recipe ``name`` of RECIPES on top of ``params``."""
    return with_overrides(params, RECIPES[name][1])


def yaml_value(value: Any) -> str:
    """``value`` as params.yaml spells it on one line: null, true, [1, 2]."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def set_options(overrides: dict[str, Any]) -> list[str]:
    """``overrides`` as ``dvc exp run`` options: ``["-S", "train.arch=resnet", ...]``."""
    options = []
    for key, value in overrides.items():
        # YAML's spelling, which dvc's override grammar reads back as the same value (None would be a string).
        options += ["-S", f"{key}={yaml_value(value).replace(' ', '')}"]
    return options
