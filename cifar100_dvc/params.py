"""Typed, frozen, validated parameters: one dataclass per ``params.yaml`` section.

Loading fails at once, with a one-line message naming the key, on an unknown or missing key,
a value of the wrong type or a value out of range. Every number that changes a result lives
in ``params.yaml``; the defaults here only document it and serve the tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError

from cifar100_dvc.common import StageError, one_line


def _param(default: Any, doc: str, **bounds: float) -> Any:
    """A field with its one-line meaning and optional bounds (ge, gt, le, lt)."""
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass(frozen=True)
class FetchParams:
    dataset: str = _param(
        "uoft-cs/cifar100",
        "Hugging Face hub id, or a local directory laid out like the hub repository (relative: to the project root)",
    )
    revision: str | None = _param(None, "hub revision (branch, tag or commit) to pin; null: latest; unused for a local directory")


@dataclass(frozen=True)
class PrepareParams:
    label: str = _param("fine_label", "class-label column to learn (coarse_label; label for CIFAR-10)")
    image_size: int = _param(
        32,
        "side, in pixels, of the square images the pipeline trains on: others are resized on their shorter side and "
        "centre-cropped (the networks halve it three times, so 16 or more)",
        ge=16,
        le=512,
    )
    val_fraction: float = _param(0.1, "share of each class of train held out as val", ge=0.0, lt=1.0)
    test_fraction: float = _param(
        0.1, "share of each class of train held out as test, only for a dataset without a test split", gt=0.0, lt=1.0
    )
    seed: int = _param(0, "seed of the stratified train/val (and train/test) split", ge=0)
    limit: int | None = _param(None, "keep the first N examples of each raw split (smoke runs)", ge=1)
    examples_per_shard: int = _param(10000, "examples per TFRecord shard (3 x image_size^2 bytes each: 3 KB at 32)", ge=1)


@dataclass(frozen=True)
class MuonParams:
    """airbench94_muon's optimizer (KellerJordan/cifar10-airbench), used when ``train.airbench.optimizer``
    is muon: Muon on the convolution kernels, Nesterov SGD with ``train.airbench.momentum`` on the rest.
    Rates are per example on the summed loss, as published (SGD steps by rate x batch on the mean loss)."""

    learning_rate: float = _param(
        0.24,
        "step of the convolution kernels: their update is orthogonalized (its size does not depend on the gradient's "
        "or the batch's) and they are rescaled to norm sqrt(filters) before each step",
        gt=0.0,
    )
    momentum: float = _param(0.6, "Nesterov momentum of the convolution kernels", ge=0.0, lt=1.0)
    newton_schulz_steps: int = _param(
        3, "Newton-Schulz iterations that orthogonalize each kernel's update (bfloat16, as published)", ge=1
    )
    head_learning_rate: float = _param(0.67, "SGD rate of the linear head, per example on the summed loss", gt=0.0)
    bias_learning_rate: float = _param(
        0.053,
        "SGD rate of the BatchNorm biases and the whitening bias (the latter falling linearly to 0 over "
        "train.airbench.whiten_bias_epochs), per example on the summed loss",
        gt=0.0,
    )
    weight_decay: float = _param(
        2e-6, "per example and step, decoupled from the rate, on the head and biases (kernels are rescaled instead)", ge=0.0
    )


@dataclass(frozen=True)
class ProxyParams:
    """airbench96_faster's data filtering (KellerJordan/cifar10-airbench): a small proxy network, trained
    alongside on the same batches, scores every example, and the network trains only on the ``keep`` share of
    each batch the proxy finds hardest (highest loss). The proxy's optimizer is airbench's Nesterov SGD (momentum
    0.85, BatchNorm biases 64x), label smoothing 0.2, its rate rising from 0.2 to 1 over the first tenth of the
    run then falling to 0, its whitening bias frozen; all as published."""

    keep: float = _param(
        1.0,
        "share of each batch the network trains on, the examples the proxy finds hardest (airbench96_faster: 0.5, "
        "from batches of 1,024); 1: no proxy, every example",
        gt=0.0,
        le=1.0,
    )
    widths: tuple[int, ...] = _param((32, 64, 64), "channels of the proxy's three conv blocks (airbench96_faster's)")
    step_every: int = _param(
        4, "the proxy takes an optimizer step (on its own hardest share) every this many steps; it scores every batch", ge=1
    )
    learning_rate: float = _param(
        9.0, "the proxy's SGD rate per 1024 examples, in airbench's decoupled form (train.airbench.learning_rate)", gt=0.0
    )
    weight_decay: float = _param(0.012, "the proxy's weight decay per 1024 examples (train.airbench.weight_decay)", ge=0.0)


@dataclass(frozen=True)
class AirbenchParams:
    """airbench's network and optimizers (KellerJordan/cifar10-airbench), used when ``train.arch`` is
    airbench. The defaults are airbench93's network trained by airbench94_muon's optimizer and schedule
    (each default published in one of the two; the pair won on val at 1x, docs/results.md); the
    ``airbench93`` recipe restores airbench93's SGD recipe. Shared with the other networks: ``train.epochs``,
    ``batch_size``, ``label_smoothing``, ``augment``, ``seed`` and the device and budget keys."""

    widths: tuple[int, ...] = _param(
        (64, 128, 128), "channels of the three conv blocks (airbench94: 64, 256, 256; CIFAR-100 speedruns go wider)"
    )
    depth: int = _param(
        2,
        "convolutions per block: 2 (airbench93-95), or 3 (airbench96: a third conv3x3 + BN whose output adds "
        "the block's first GELU output, a residual, before the last GELU)",
        ge=2,
        le=3,
    )
    whiten_bias_epochs: int = _param(
        3, "epochs the whitening stem's bias trains before it is frozen (its kernel is always frozen: it is computed)", ge=0
    )
    batchnorm_momentum: float = _param(
        0.6,
        "share of BatchNorm's running statistics kept at each step (PyTorch's momentum 0.4): short runs need fresh ones",
        ge=0.0,
        lt=1.0,
    )
    batchnorm_scale: bool = _param(False, "BatchNorm learns a scale; airbench: no, the next convolution rescales anyway")
    output_scale: float = _param(
        1 / 256,
        "logits times this: keeps the first loss near ln(classes), so the large learning rate stays stable "
        "(airbench94_muon: 1/256 with the head at std 1; airbench93: 1/9)",
        gt=0.0,
    )
    learning_rate: float = _param(
        11.5,
        "optimizer sgd: per 1024 examples, in airbench's decoupled form: SGD steps by this x (batch / 1024) / "
        "(1 + 1 / (1 - momentum)) on the mean loss (the same steps as airbench's rate on the summed loss), so batch and "
        "momentum can change alone",
        gt=0.0,
    )
    weight_decay: float = _param(
        0.0153,
        "optimizer sgd: per 1024 examples, decoupled from the learning rate: L2 of weight_decay / learning_rate on the mean loss",
        ge=0.0,
    )
    momentum: float = _param(0.85, "Nesterov momentum (muon: of the head and biases)", ge=0.0, lt=1.0)
    bias_lr_scale: float = _param(
        64.0,
        "optimizer sgd: BatchNorm biases step this many times further (their decay unchanged): the GELU thresholds settle early",
        gt=0.0,
    )
    schedule_start: float = _param(
        1.0, "learning-rate multiplier at the first step (a triangle: start, peak 1, end; airbench93: 0.2)", ge=0.0
    )
    schedule_peak: float = _param(
        0.0, "share of the steps at which the multiplier peaks at 1 (0: a linear decay; airbench93: 0.23)", ge=0.0, le=1.0
    )
    schedule_end: float = _param(
        0.0, "learning-rate multiplier at the last step (airbench93: 0.07, a rate still moving, averaged by lookahead)", ge=0.0
    )
    lookahead: bool = _param(
        False, "lookahead: every few steps, move slow weights toward the net, then copy them back (airbench93: on)"
    )
    lookahead_every: int = _param(5, "steps between lookahead updates", ge=1)
    lookahead_decay: float = _param(
        0.7737809375,
        "slow weights keep this x (t / T)^3 of themselves at step t of T (0.95^5: airbench's): free early, averaged late",
        ge=0.0,
        le=1.0,
    )
    lookahead_start_epoch: int = _param(3, "epochs before lookahead starts", ge=0)
    flip: Literal["alternating", "random"] = _param(
        "alternating",
        "alternating: every image flipped at random once, then all flipped every other epoch (each pair of epochs shows "
        "both); random: each image flipped with probability 1/2 every time",
    )
    translate: int = _param(2, "pixels of random translation, the uncovered edge reflected; 0: none", ge=0)
    cutout: int = _param(
        0,
        "side in pixels of one square per train image, at a random place inside it, set to the mean colour (airbench96: "
        "12, for its long runs); 0: none",
        ge=0,
    )
    head_init_std: float | None = _param(
        1.0,
        "the linear head's initial weights drawn uniformly with this standard deviation (airbench94_muon: 1, with "
        "output_scale 1 / the last width); null: PyTorch's default (within +-1/sqrt(fan_in))",
        gt=0.0,
    )
    optimizer: Literal["sgd", "muon"] = _param(
        "muon",
        "sgd: airbench93/94's Nesterov SGD (learning_rate, weight_decay, bias_lr_scale); muon: airbench94_muon's "
        "(train.airbench.muon); both follow the schedule_* triangle and lookahead's keys",
    )
    muon: MuonParams = field(default_factory=MuonParams)
    proxy: ProxyParams = field(default_factory=ProxyParams)


@dataclass(frozen=True)
class TrainParams:
    arch: Literal["airbench", "resnet", "baseline"] = _param(
        "airbench", "network and its recipe: airbench (train.airbench), resnet, or baseline (the notebook's CNN)"
    )
    widths: tuple[int, ...] = _param(
        (16, 32, 64, 128), "resnet channel widths: stem, stage 1, 2, 3 (baseline ignores them; airbench: train.airbench)"
    )
    whiten_stem: bool = _param(
        False,
        "resnet's stem is a frozen 2x2 conv whitening pixel patches, set from the train images (airbench), "
        "instead of a learned 3x3 conv of widths[0] channels (baseline ignores it; airbench always has one)",
    )
    dirac_init: bool = _param(
        False, "resnet's convolutions start as the identity on their first min(in, out) filters (airbench); baseline ignores it"
    )
    epochs: int = _param(9, "full passes over the train split", ge=1)
    batch_size: int = _param(2000, "images per optimizer step", ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = _param(
        "sgd",
        "resnet and baseline: sgd: Nesterov momentum SGD; adam: Adam, no weight decay; adamw: Adam with decoupled weight "
        "decay (airbench: its own, train.airbench)",
    )
    learning_rate: float = _param(0.2, "peak learning rate (resnet, baseline; airbench: train.airbench)", gt=0.0)
    momentum: float = _param(0.9, "SGD momentum (ignored by adam/adamw; airbench: train.airbench)", ge=0.0, lt=1.0)
    schedule: Literal["constant", "linear", "cosine"] = _param(
        "linear", "resnet, baseline: after warm-up, constant, linear decay to 0, or cosine decay to 0 (airbench: a triangle)"
    )
    warmup_epochs: float = _param(3.0, "epochs of linear warm-up from 0 to the peak rate (resnet, baseline)", ge=0.0)
    weight_decay: float = _param(
        5e-4, "decoupled weight decay per step, times the learning rate (sgd, adamw; adam takes none)", ge=0.0
    )
    bn_bias_lr_scale: float = _param(
        1.0,
        "learning-rate multiplier for BatchNorm biases (airbench: 64); sgd only: Adam's steps ignore a gradient's scale",
        gt=0.0,
    )
    label_smoothing: float = _param(0.2, "cross-entropy label smoothing", ge=0.0, lt=1.0)
    augment: bool = _param(
        True, "augment every batch: random crop and horizontal flip (airbench: translate and flip, train.airbench)"
    )
    crop_padding: int = _param(
        4, "pixels of padding around the image for the random crop (airbench: train.airbench.translate)", ge=0
    )
    crop_fill: Literal["zeros", "reflect"] = _param(
        "zeros", "what the crop's padding holds: black, or the image reflected at its edge (no artificial edge)"
    )
    seed: int = _param(0, "seed of weights, shuffling and augmentation", ge=0)
    ensemble: int = _param(
        1,
        "networks trained one after another (member k on seed seed x ensemble + k, each with an equal share of "
        "time_budget_minutes); the saved model averages their logits, so inference costs that many networks",
        ge=1,
        le=16,
    )
    validation_freq: int = _param(
        1,
        "epochs between val passes while training (Keras' validation_freq), the last epoch always one: 1 draws the val "
        "curve every epoch; more saves the pass's time (about 5% of airbench's epoch); evaluate scores val either way",
        ge=1,
    )
    shuffle_buffer: int = _param(50000, "shuffle buffer, in examples (>= train size: a full shuffle)", ge=1)
    time_budget_minutes: float | None = _param(
        None,
        "wall-clock minutes for training: the schedule is compressed to fit them if the epochs would not, and training "
        "stops at the first step after they are spent; null: no budget",
        gt=0.0,
    )
    mixed_precision: Literal["auto", "on", "off"] = _param("auto", "bfloat16/float16 compute; auto: on a GPU or a bfloat16 CPU")
    jit_compile: Literal["auto", "on", "off"] = _param("auto", "XLA compilation; auto: on a GPU only")
    steps_per_execution: int | None = _param(None, "batches per graph call; null: 16 on a GPU, 1 on a CPU", ge=1)
    distribute: Literal["auto", "off", "mirrored"] = _param(
        "auto", "auto: MirroredStrategy over all local GPUs when there are 2+; mirrored: always"
    )
    airbench: AirbenchParams = field(default_factory=AirbenchParams)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _param(1000, "images per inference batch", ge=1)
    tta_flip: bool = _param(True, "average the predictions of each image and its mirror")
    tta_translate: int = _param(
        1, "pixels of two extra views shifted diagonally (up-left, down-right), a quarter weight each; 0: off", ge=0, le=4
    )
    sample_images: int = _param(36, "test images shown in plots/samples.png", ge=1)


@dataclass(frozen=True)
class ExportParams:
    tflite: bool = _param(True, "also convert the model to TFLite")


@dataclass(frozen=True)
class Params:
    fetch: FetchParams = field(default_factory=FetchParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)


def read_yaml(text: str) -> Any:
    """``text`` read as DVC reads params.yaml: ruamel.yaml (DVC's own parser) in YAML 1.2, so a
    hand-typed ``1e-3`` is a number (PyYAML's YAML 1.1 reads a string) and ``yes`` or ``off`` is a
    string (PyYAML reads a bool); a key given twice raises DuplicateKeyError."""
    return YAML(typ="safe", pure=True).load(text)


def load_params(path: Path) -> Params:
    """Read ``params.yaml`` as DVC reads it (``read_yaml``) and validate it; raise StageError naming
    the first bad key. A key given twice is refused rather than the last one silently winning.
    """
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: params file not found") from None
    except DuplicateKeyError as error:
        found = re.search(r'duplicate key "([^"]*)"', str(error.problem))
        key = repr(found.group(1)) if found else "(see the file)"
        raise StageError(f"{path}, line {error.problem_mark.line + 1}: duplicate key {key}; give each key once") from None
    except YAMLError as error:
        raise StageError(f"{path}: not valid YAML: {one_line(error)}") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a nested dict (as read from YAML) into ``Params``, keys one by one, then across keys."""
    params = _parse_dataclass(Params, raw, prefix="", source=source)
    check_optimizer(params.train, source)
    check_widths(params.train, source)
    return params


WIDTHS_PER_ARCH = {
    "resnet": ("train.widths", 4, "stem, stage 1, 2, 3"),
    "airbench": ("train.airbench.widths", 3, "block 1, 2, 3"),
}


def check_widths(train: TrainParams, source: str = "params") -> None:
    """Refuse a widths list of the wrong length for the network that uses it."""
    if train.arch not in WIDTHS_PER_ARCH:
        return
    key, expected, meaning = WIDTHS_PER_ARCH[train.arch]
    widths = train.airbench.widths if train.arch == "airbench" else train.widths
    if len(widths) != expected:
        raise StageError(f"{source}: '{key}' must list {expected} widths for {train.arch} ({meaning}), got {list(widths)}")
    if train.arch == "airbench" and len(train.airbench.proxy.widths) != 3:
        raise StageError(
            f"{source}: 'train.airbench.proxy.widths' must list 3 widths (block 1, 2, 3), got {list(train.airbench.proxy.widths)}"
        )


def check_optimizer(train: TrainParams, source: str = "params") -> None:
    """Refuse ``adam`` with weight decay, which Keras 3 would silently turn into AdamW.

    Keras 3's Adam has no coupled (L2-in-the-gradient) decay: given ``weight_decay`` it decouples
    it, exactly as AdamW does, so the two names would mean one optimizer. ``adam`` is plain Adam.
    """
    if train.optimizer == "adam" and train.weight_decay > 0:
        raise StageError(
            f"{source}: 'train.optimizer: adam' is plain Adam with no weight decay, but 'train.weight_decay' is "
            f"{train.weight_decay}; use adamw for Adam with decoupled weight decay, or set it to 0"
        )


def to_dict(params: Any) -> dict:
    """A params dataclass as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(params))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _parse_dataclass(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise StageError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise StageError(f"{source}: unknown key '{prefix}{key}'{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            raise StageError(f"{source}: missing key '{key}'")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _parse_dataclass(hint, raw[name], f"{key}.", source)
        else:
            values[name] = _check_value(key, raw[name], hint, spec.metadata, source)
    return cls(**values)


def _check_value(key: str, value: Any, hint: Any, bounds: Any, source: str) -> Any:
    def fail(expected: str) -> StageError:
        return StageError(f"{source}: '{key}' must be {expected}, got {value!r}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`
        if value is None:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(map(str, args)))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise fail("a non-empty list of integers")
        return tuple(_check_value(f"{key}[{i}]", item, int, {"ge": 1}, source) for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str) or not value:
            raise fail("a non-empty string")
        return value
    for bound, holds in (
        ("ge", lambda v, b: v >= b),
        ("gt", lambda v, b: v > b),
        ("le", lambda v, b: v <= b),
        ("lt", lambda v, b: v < b),
    ):
        if bound in bounds and not holds(value, bounds[bound]):
            symbol = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
            raise fail(f"{symbol} {bounds[bound]}")
    return value
