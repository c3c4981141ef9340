"""Measure the pipeline against the notebook; the input and training ratios in one process, so they are fair.

    python -m tools.benchmark --dataset ../shared/datasets/cifar10-dev --label label
    python -m tools.benchmark --dataset synthetic            # no download, no ../shared

Writes benchmarks/results.json and benchmarks/results.md, measured in this order:
1. ``prepare`` throughput on the dataset (images/s), the stage run as DVC runs it
   (``python -m stages.prepare`` in a scratch copy of the project, process start-up included);
2. input throughput (images/s): the notebook's pipeline (``from_generator`` over the
   ``datasets`` object, ``map``, batch 32) against the project's TFRecord reader, without and
   with augmentation;
3. the machine's practical ceiling: the rate of a large dense matrix multiply (FLOP/s) at each
   precision the rows train in;
4. training throughput (images/s) of ``baseline`` at the notebook's settings and at the
   project's, and of the ``resnet`` and ``airbench`` recipes, each end to end and compute-only
   (one batch held in memory), giving the share of time lost to input, with each network's
   floating-point operations per training image (``training_flops_per_image``), the FLOP/s they
   make and that as a share of the ceiling; then where the baseline's speed-up comes from, one
   change at a time (compute only), and airbench's from Keras' stock BatchNorm and GELU; and where
   airbench's step goes: each pass of its convolutions timed alone, against the whole step;
5. wall time of a no-op ``dvc repro``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar100_dvc import hardware, scratch
from cifar100_dvc.common import StageError, one_line, run_main
from cifar100_dvc.params import Params, TrainParams, load_params
from cifar100_dvc.paths import REPO_ROOT, ProjectPaths
from cifar100_dvc.recipes import recipe

if TYPE_CHECKING:  # TensorFlow-backed modules, imported where used: `--help` and argument errors stay fast
    from cifar100_dvc.records import DatasetInfo
    from cifar100_dvc.training import DeviceSettings

log = logging.getLogger(__name__)


def timed_images(batches, num_images: int) -> float:
    """Images/s of pulling at least ``num_images`` images out of an iterable of (images, labels)."""
    seen, started = 0, time.perf_counter()
    for images, _ in batches:
        seen += int(images.shape[0])
        if seen >= num_images:
            break
    return seen / (time.perf_counter() - started)


def notebook_input(
    hf_split, image_column: str, label_column: str, batch_size: int = 32, scale: bool = True, image_size: int = 32
):
    """The notebook's input pipeline: a Python generator over the ``datasets`` rows, map, batch."""
    import tensorflow as tf

    def rows():
        for example in hf_split:
            image = example[image_column].convert("RGB")
            if image.size != (image_size, image_size):  # CIFAR never needs this; other datasets may
                image = image.resize((image_size, image_size))
            yield np.asarray(image), example[label_column]

    dataset = tf.data.Dataset.from_generator(
        rows, output_signature=(tf.TensorSpec((image_size, image_size, 3), tf.uint8), tf.TensorSpec((), tf.int64))
    )
    if scale:  # the notebook scaled to [0, 1] in its map
        return dataset.map(lambda image, label: (tf.cast(image, tf.float32) / 255.0, label)).batch(batch_size)
    return dataset.map(lambda image, label: (image, label)).batch(batch_size)


def timed_fit(model, batches, num_steps: int, batch_size: int, skip_steps: int = 3) -> float:
    """Steady-state images/s of one ``model.fit`` over ``num_steps`` batches (the step is already traced).

    The clock starts at batch ``skip_steps``: a new iterator first fills the reader's shuffle
    buffer (a fraction of a second for 50,000 records), which a training run pays once, not
    once per few thousand images as a short timed run would.
    """
    import keras

    class SteadyStateClock(keras.callbacks.Callback):
        started = ended = None
        first = last = 0

        def on_train_batch_begin(self, batch, logs=None):
            if self.started is None and batch >= skip_steps:
                self.started, self.first = time.perf_counter(), batch

        def on_train_batch_end(self, batch, logs=None):
            self.ended, self.last = time.perf_counter(), batch

    clock = SteadyStateClock()
    model.fit(batches, steps_per_epoch=num_steps, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
    return (clock.last + 1 - clock.first) * batch_size / (clock.ended - clock.started)


def in_memory(batch):
    """Compute only: one batch, held in memory and repeated."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(batch).repeat()


def measure_training(name, model_factory, real_batches, images_per_run: int, repeats: int) -> dict:
    """End-to-end and compute-only images/s, timed alternately ``repeats`` times; the best of each.

    Alternating and keeping the best run makes the ratio robust to the noise of a shared machine.
    The models and iterators are dropped and collected before returning, so nothing of this row
    (a prefetching iterator, say) still runs while the next row is timed.
    """
    compute_batch = next(iter(real_batches))
    batch_size = int(compute_batch[0].shape[0])
    steps = max(10, images_per_run // batch_size)
    sources = {"end_to_end": real_batches, "compute_only": in_memory(compute_batch)}
    models = {kind: model_factory() for kind in sources}
    for kind, batches in sources.items():  # trace the train step and fill caches
        models[kind].fit(batches, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)
    best = {kind: 0.0 for kind in sources}
    for _ in range(repeats):
        for kind, batches in sources.items():
            best[kind] = max(best[kind], timed_fit(models[kind], batches, steps, batch_size))
    del models, sources, compute_batch
    settle()
    row = {
        "name": name,
        "batch_size": batch_size,
        "images_per_s": round(best["end_to_end"], 1),
        "compute_only_images_per_s": round(best["compute_only"], 1),
        "end_to_end_fraction_of_compute": round(best["end_to_end"] / best["compute_only"], 3),
    }
    log.info("train %s", row)
    return row


def measure_compute_only(name, model_factory, batch, images_per_run: int, repeats: int) -> dict:
    """Compute-only images/s of a model on one in-memory batch, the best of ``repeats`` runs."""
    batch_size = int(batch[0].shape[0])
    steps = max(10, images_per_run // batch_size)
    model, batches = model_factory(), in_memory(batch)
    model.fit(batches, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)
    best = max(timed_fit(model, batches, steps, batch_size) for _ in range(repeats))
    del model, batches
    settle()
    row = {"name": name, "batch_size": batch_size, "compute_only_images_per_s": round(best, 1)}
    log.info("compute %s", row)
    return row


def settle() -> None:
    """Free what the previous measurement left: Python objects, Keras' graph state."""
    import keras

    gc.collect()
    keras.backend.clear_session()
    gc.collect()


@dataclass(frozen=True)
class Workload:
    """What the measurements read: the prepared scratch project, the raw train split (for the
    notebook's pipeline) and the train settings and device settings measured."""

    paths: ProjectPaths
    info: DatasetInfo
    raw_train: Any  # datasets.Dataset
    image_column: str
    label: str
    train_params: TrainParams
    device: DeviceSettings

    @property
    def num_train(self) -> int:
        return self.info.splits["train"].num_examples


@dataclass(frozen=True)
class ModelRecipe:
    """One measured model: its train settings (network included) and dtype policy; with
    ``stock_batch_norm``, Keras' BatchNormalization (and, for the notebook's baseline, its graph: one step
    per call, no XLA); with ``stock_gelu`` (airbench), Keras' own GELU instead of the fused one; with
    ``detached_whitening_bias`` (airbench), its steps after the whitening bias's epochs, the bias's gradient
    no longer computed (``training.DetachFrozenWhiteningBias``)."""

    settings: TrainParams
    policy: str
    stock_batch_norm: bool = False
    stock_gelu: bool = False
    detached_whitening_bias: bool = False


def resolve_dataset(dataset: str, label: str | None, work: Path) -> tuple[str, str | None]:
    """(dataset to fetch, label column): ``synthetic`` is written under ``work`` (label fine_label unless
    given); a local path is made absolute, since the stages run in a scratch copy of the project."""
    if dataset == "synthetic":
        from cifar100_dvc.synthetic import make_rows, write_hub_dataset

        splits = {"train": make_rows(6000, 0), "test": make_rows(1000, 1)}
        return str(write_hub_dataset(work / "synthetic", splits)), label or "fine_label"
    return (str(Path(dataset).resolve()) if Path(dataset).exists() else dataset), label


def prepare_dataset(dataset: str, label: str, root: Path) -> tuple[ProjectPaths, DatasetInfo, dict]:
    """Fetch and prepare ``dataset`` in a scratch copy of the project at ``root``, as DVC runs the stages:
    (its paths, the prepared data's info, prepare's throughput row)."""
    from cifar100_dvc.records import DatasetInfo

    paths = ProjectPaths(scratch.make_project(root, dataset, **{"prepare.label": label}))
    run_stage(paths.root, "fetch")
    seconds = run_stage(paths.root, "prepare")
    info = DatasetInfo.read(paths.prepared_dir)
    total = sum(split.num_examples for split in info.splits.values())
    row = {"images": total, "seconds": round(seconds, 2), "images_per_s": round(total / seconds, 1)}
    log.info("prepare %s", row)
    return paths, info, row


def load_workload(paths: ProjectPaths, info: DatasetInfo, label: str, train_params: TrainParams) -> Workload:
    """The prepared project with its raw train split and the device settings `auto` picks here."""
    import datasets

    from cifar100_dvc import training
    from cifar100_dvc.images import find_image_column

    raw_train = datasets.load_from_disk(str(paths.raw_dir))["train"]
    device = training.device_settings_here(train_params)
    return Workload(paths, info, raw_train, find_image_column(raw_train.features), label, train_params, device)


def train_reader(work: Workload, settings: TrainParams, augment: bool):
    """The project's reader over the train split for ``settings``: shuffled (seed 0), repeated, whole
    batches, optionally with the recipe's augmentation."""
    from cifar100_dvc import training
    from cifar100_dvc.records import read_split

    return read_split(
        work.paths.prepared_dir,
        "train",
        settings.batch_size,
        shuffle_seed=0,
        shuffle_buffer=settings.shuffle_buffer,
        repeat=True,
        drop_remainder=True,
        batch_transform=training.augmenter(settings, work.info) if augment else None,
    )


def make_model(work: Workload, recipe: ModelRecipe):
    """A fresh compiled model of ``recipe``, built and compiled under its dtype policy (restored afterwards)."""
    import keras

    from cifar100_dvc import training
    from cifar100_dvc.network import (
        GELU,
        WHITENING_BIAS_LAYER,
        FusedBatchNormalization,
        build_airbench,
        build_baseline,
        build_network,
        keras_gelu,
    )

    spec = training.input_spec(work.info)
    settings = recipe.settings
    steps_per_epoch = work.num_train // settings.batch_size
    kernel = training.whitening_kernel(settings, work.info, work.paths.prepared_dir)
    jit_compile, steps_per_execution = work.device.jit_compile, work.device.steps_per_execution
    with training.dtype_policy(recipe.policy):
        if recipe.stock_batch_norm and settings.arch == "baseline":
            model = build_baseline(spec, batch_norm=keras.layers.BatchNormalization)
            jit_compile, steps_per_execution = False, 1
        elif settings.arch == "airbench":
            batch_norm = keras.layers.BatchNormalization if recipe.stock_batch_norm else FusedBatchNormalization
            model = build_airbench(spec, settings.airbench, kernel, batch_norm, keras_gelu if recipe.stock_gelu else GELU)
        else:
            model = build_network(settings, spec, kernel)
        training.compile_model(model, settings, steps_per_epoch, jit_compile, steps_per_execution)
    if recipe.detached_whitening_bias:
        model.get_layer(WHITENING_BIAS_LAYER).trainable = False  # what the callback does once the bias is frozen
    return model


def compute_dtype(policy: str) -> str:
    """The precision a Keras mixed-precision ``policy`` computes in: ``bfloat16`` or ``float32``."""
    return "bfloat16" if policy == "mixed_bfloat16" else "float32"


def time_best(function, repeats: int) -> float:
    """The best of ``repeats`` timed calls of ``function`` (after one untimed call that traces and warms it)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_flops_per_s(dtype: str, size: int = 4096, repeats: int = 5) -> float:
    """The best FLOP/s of ``size`` x ``size`` matrix products in ``dtype``: the dense rate that bounds
    what a training step of convolutions (matrix products underneath) can reach on this machine."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.normal(size=(size, size)), dtype) for _ in range(2))
    product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    return 2.0 * size**3 / time_best(lambda: product().numpy(), repeats)


def measure_ceiling(policies: list[str], repeats: int) -> dict:
    """The dense matrix-multiply rate (GFLOP/s) at each compute precision of ``policies``."""
    dtypes = sorted({compute_dtype(policy) for policy in policies})
    ceiling = {dtype: round(matmul_flops_per_s(dtype, repeats=max(3, repeats)) / 1e9, 1) for dtype in dtypes}
    log.info("matmul GFLOP/s %s", ceiling)
    return ceiling


def measure_inputs(work: Workload, input_images: int) -> dict:
    """Images/s of the notebook's input pipeline and of the project's reader, without and with augmentation."""
    warm = train_reader(work, work.train_params, augment=False)
    timed_images(warm, work.num_train)  # first pass fills the in-memory cache
    size = work.info.image_shape[0]
    notebook_rate = timed_images(notebook_input(work.raw_train, work.image_column, work.label, image_size=size), input_images)
    rates = {
        "notebook_images_per_s": round(notebook_rate, 1),
        "reader_images_per_s": round(timed_images(warm, 4 * work.num_train), 1),
        "reader_augment_images_per_s": round(
            timed_images(train_reader(work, work.train_params, augment=True), 4 * work.num_train), 1
        ),
    }
    rates["speedup"] = round(rates["reader_images_per_s"] / notebook_rate, 1)
    rates["speedup_with_augment"] = round(rates["reader_augment_images_per_s"] / notebook_rate, 1)
    log.info("input %s", rates)
    return rates


def compute_settings(work: Workload, machine_report: dict) -> dict:
    """What the project's rows run with (the notebook's rows: float32, Keras BatchNorm)."""
    return {
        "onednn": machine_report["onednn"],
        "policy": work.device.mixed_precision_policy,
        "bfloat16": work.device.mixed_precision_policy == "mixed_bfloat16",
        "fused_batch_norm": True,
        "xla": work.device.jit_compile,
    }


def project_recipes(params: Params, num_train: int) -> dict[str, TrainParams]:
    """The recipes the training rows measure: the notebook's, the baseline at the resnet recipe's settings,
    the resnet recipe and airbench (params.yaml's default). A batch larger than the ``num_train`` train
    images (a small dataset) is cut to them; the rows name the batch they ran."""
    resnet = recipe(params, "resnet").train
    recipes = {
        "notebook": recipe(params, "notebook").train,
        "baseline": dataclasses.replace(resnet, arch="baseline"),
        "resnet": resnet,
        "airbench": params.train if params.train.arch == "airbench" else dataclasses.replace(params.train, arch="airbench"),
    }
    return {
        name: dataclasses.replace(settings, batch_size=min(settings.batch_size, num_train)) for name, settings in recipes.items()
    }


def recipe_label(settings: TrainParams) -> str:
    if settings.arch == "airbench":
        depth = "" if settings.airbench.depth == 2 else f", depth {settings.airbench.depth}"
        return f"airbench {list(settings.airbench.widths)}{depth}"
    return f"resnet {list(settings.widths)}" if settings.arch == "resnet" else settings.arch


def measure_training_rows(work: Workload, params: Params, ceiling: dict, images_per_run: int, repeats: int) -> list[dict]:
    """End-to-end and compute-only rows: baseline at the notebook's settings (its generator input) and at the
    project's (the reader), then the resnet and airbench recipes; each with its FLOPs and share of ``ceiling``."""
    policy = work.device.mixed_precision_policy
    recipes = project_recipes(params, work.num_train)
    size = work.info.image_shape[0]
    notebook_batches = notebook_input(work.raw_train, work.image_column, work.label, 32, scale=False, image_size=size).repeat()
    rows = [
        (
            "baseline, notebook settings (generator input, batch 32, Adam, float32, Keras BatchNorm)",
            ModelRecipe(recipes["notebook"], "float32", stock_batch_norm=True),
            notebook_batches,
        )
    ]
    for name in ("baseline", "resnet", "airbench"):
        settings = recipes[name]
        default = " (the default)" if settings.arch == params.train.arch else ""
        title = f"{recipe_label(settings)}{default}, batch {settings.batch_size}, reader + augmentation, {policy}"
        if name == "baseline":
            title = f"baseline, project settings (reader, batch {settings.batch_size}, augment, {policy}, fused BatchNorm)"
        rows.append((title, ModelRecipe(settings, policy), None))
    measured = []
    for title, model_recipe, batches in rows:
        # Each reader is made when its row is measured, after the previous row's models and iterators are freed.
        batches = batches if batches is not None else train_reader(work, model_recipe.settings, augment=True)
        row = measure_training(title, functools.partial(make_model, work, model_recipe), batches, images_per_run, repeats)
        measured.append({**row, **flops_columns(work, model_recipe, row, ceiling)})
    return measured


def flops_columns(work: Workload, model_recipe: ModelRecipe, row: dict, ceiling: dict) -> dict:
    """The row's network's training FLOPs per image, the GFLOP/s it made end to end and compute-only, and
    those as shares of the matrix-multiply ceiling at its precision."""
    from cifar100_dvc.network import training_flops_per_image

    flops = training_flops_per_image(make_model(work, model_recipe))
    settle()
    peak = ceiling[compute_dtype(model_recipe.policy)]
    end_to_end, compute_only = flops * row["images_per_s"] / 1e9, flops * row["compute_only_images_per_s"] / 1e9
    return {
        "training_flops_per_image": flops,
        "gflops_per_s": round(end_to_end, 1),
        "compute_only_gflops_per_s": round(compute_only, 1),
        "share_of_matmul_peak": round(end_to_end / peak, 3),
        "compute_only_share_of_matmul_peak": round(compute_only / peak, 3),
    }


def baseline_breakdown(work: Workload, params: Params, train_rows: list[dict], images_per_run: int, repeats: int) -> list[dict]:
    """Where the baseline's speed-up comes from: one change at a time from the notebook's settings, compute only
    (the first and last steps are the notebook and project rows of ``train_rows``)."""
    policy = work.device.mixed_precision_policy
    project_baseline = project_recipes(params, work.num_train)["baseline"]
    project_batch = next(iter(train_reader(work, project_baseline, augment=True)))
    notebook_row, project_row = train_rows[0], train_rows[1]
    batch = project_baseline.batch_size
    # On a CPU without bfloat16 the project computes in float32 too: its last step changes nothing but the input.
    project_step = f"+ {policy} compute (the project settings)"
    if policy == "float32":
        project_step = "the project settings (float32 compute too: no bfloat16 on this CPU)"
    return [
        {**notebook_row, "name": "notebook settings (batch 32, float32, Keras BatchNorm)"},
        measure_compute_only(
            f"+ project optimizer and batch {batch}",
            functools.partial(make_model, work, ModelRecipe(project_baseline, "float32", stock_batch_norm=True)),
            project_batch,
            images_per_run,
            repeats,
        ),
        measure_compute_only(
            "+ fused BatchNorm",
            functools.partial(make_model, work, ModelRecipe(project_baseline, "float32")),
            project_batch,
            images_per_run,
            repeats,
        ),
        {**project_row, "name": project_step},
    ]


def airbench_breakdown(work: Workload, params: Params, train_rows: list[dict], images_per_run: int, repeats: int) -> list[dict]:
    """Where airbench's training rate comes from in TensorFlow, one change at a time from Keras' stock
    layers, compute only (the third step is the airbench row of ``train_rows``), and its steps once the
    whitening bias is frozen and detached (the rest of a run after ``whiten_bias_epochs``)."""
    settings = project_recipes(params, work.num_train)["airbench"]
    policy = work.device.mixed_precision_policy
    batch = next(iter(train_reader(work, settings, augment=True)))
    steps = [("Keras' BatchNormalization and gelu", True, True), ("+ fused BatchNorm (no scale through the kernel)", False, True)]
    rows = [
        measure_compute_only(
            name,
            functools.partial(make_model, work, ModelRecipe(settings, policy, stock_batch_norm=stock_bn, stock_gelu=stock_gelu)),
            batch,
            images_per_run,
            repeats,
        )
        for name, stock_bn, stock_gelu in steps
    ]
    detached = measure_compute_only(
        "+ whitening bias detached (the steps after its epochs)",
        functools.partial(make_model, work, ModelRecipe(settings, policy, detached_whitening_bias=True)),
        batch,
        images_per_run,
        repeats,
    )
    return [*rows, {**train_rows[-1], "name": "+ fused GELU (the project's airbench)"}, detached]


def convolution_pass(kind: str, images, kernel, upstream, strides: list[int], padding: str):
    """One pass of a convolution as a traced TensorFlow function: ``forward`` (images * kernel),
    ``input gradient`` or ``kernel gradient`` (from ``upstream``, the gradient of its output). It
    returns one value of the result, so that timing it times the convolution, not a copy of its
    output to NumPy."""
    import tensorflow as tf

    from cifar100_dvc.network import FORWARD, INPUT_GRADIENT

    def compute():
        if kind == FORWARD:
            return tf.nn.conv2d(images, kernel, strides, padding)
        if kind == INPUT_GRADIENT:
            return tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(images), filter=kernel, out_backprop=upstream, strides=strides, padding=padding
            )
        return tf.raw_ops.Conv2DBackpropFilter(
            input=images, filter_sizes=tf.shape(kernel), out_backprop=upstream, strides=strides, padding=padding
        )

    return tf.function(lambda: tf.reshape(compute(), [-1])[0])


def convolution_times(work: Workload, params: Params, train_rows: list[dict], repeats: int) -> dict:
    """Where airbench's compute-only training step goes: each pass of each of its convolutions that a
    training step makes (``training_passes``: forward, input gradient, kernel gradient) timed alone with
    TensorFlow's own ops at the row's batch and precision, summed per kind, against the whole step
    (batch / the compute-only rate of the airbench row of ``train_rows``); the rest is BatchNorm, GELU,
    pooling, the loss, the optimizer update and lookahead."""
    import keras
    import tensorflow as tf

    from cifar100_dvc.network import FORWARD, INPUT_GRADIENT, KERNEL_GRADIENT, training_passes

    settings = project_recipes(params, work.num_train)["airbench"]
    policy = work.device.mixed_precision_policy
    dtype = tf.as_dtype(compute_dtype(policy))
    batch = settings.batch_size
    rng = tf.random.Generator.from_seed(0)
    totals = {kind: {"seconds": 0.0, "flops": 0} for kind in (FORWARD, INPUT_GRADIENT, KERNEL_GRADIENT)}
    for layer, forward_flops, passes in training_passes(make_model(work, ModelRecipe(settings, policy))):
        if not isinstance(layer, keras.layers.Conv2D):
            continue  # the dense head: a few hundred kFLOPs
        images = tf.cast(rng.normal([batch, *layer.input.shape[1:]]), dtype)
        kernel = tf.cast(rng.normal(layer.kernel.shape), dtype)
        upstream = tf.cast(rng.normal([batch, *layer.output.shape[1:]]), dtype)
        for kind in passes:
            compiled = convolution_pass(kind, images, kernel, upstream, [1, *layer.strides, 1], layer.padding.upper())
            totals[kind]["seconds"] += time_best(lambda compiled=compiled: compiled().numpy(), repeats)
            totals[kind]["flops"] += forward_flops * batch
    settle()
    step_seconds = batch / train_rows[-1]["compute_only_images_per_s"]
    convolutions = sum(total["seconds"] for total in totals.values())
    result = {
        "batch_size": batch,
        "dtype": dtype.name,
        "step_seconds": round(step_seconds, 4),
        "passes": {
            kind: {
                "seconds": round(total["seconds"], 4),
                "gflops_per_s": round(total["flops"] / total["seconds"] / 1e9, 1),
                "share_of_step": round(total["seconds"] / step_seconds, 3),
            }
            for kind, total in totals.items()
        },
        "convolutions_share_of_step": round(convolutions / step_seconds, 3),
    }
    log.info("airbench convolutions %s", result)
    return result


def run_benchmark(dataset: str, label: str | None, out_dir: Path, images_per_run: int, input_images: int, repeats: int) -> dict:
    """Every measurement, in the order of the module's list; written to ``out_dir`` (results.json, results.md)."""
    params = load_params(REPO_ROOT / "params.yaml")
    scratch_dir = Path(tempfile.mkdtemp(prefix="cifar100-dvc-benchmark-"))
    try:
        dataset, label = resolve_dataset(dataset, label, scratch_dir)
        paths, info, prepare_row = prepare_dataset(dataset, label, scratch_dir / "project")
        report = hardware.machine_report()
        machine_report = dataclasses.asdict(report)
        results = {
            "machine": machine_description(report),
            "machine_report": machine_report,
            "dataset": dataset,
            "prepare": prepare_row,
        }
        work = load_workload(paths, info, label, params.train)
        results["input"] = measure_inputs(work, input_images)
        results["compute"] = compute_settings(work, machine_report)
        results["matmul_gflops_per_s"] = measure_ceiling(["float32", work.device.mixed_precision_policy], repeats)
        results["train"] = measure_training_rows(work, params, results["matmul_gflops_per_s"], images_per_run, repeats)
        notebook_row, project_row = results["train"][0], results["train"][1]
        results["baseline_speedup"] = round(project_row["images_per_s"] / notebook_row["images_per_s"], 2)
        results["baseline_steps"] = baseline_breakdown(work, params, results["train"], images_per_run, repeats)
        results["airbench_steps"] = airbench_breakdown(work, params, results["train"], images_per_run, repeats)
        results["airbench_convolutions"] = convolution_times(work, params, results["train"], repeats)
        results["noop_dvc_repro_seconds"] = noop_repro_seconds(dataset, label, scratch_dir / "repo")
        log.info("no-op dvc repro: %.2f s", results["noop_dvc_repro_seconds"])
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(to_markdown(results))
    return results


def run_stage(root: Path, stage: str) -> float:
    """Run ``python -m stages.<stage>`` in the project copy ``root``, as DVC runs it; its wall time in
    seconds, start-up included. A failed stage raises StageError with its error line."""
    started = time.perf_counter()
    result = scratch.run_stage(root, stage, timeout=3600, offline=False)  # fetch may download from the hub
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        raise StageError(errors[-1] if errors else f"{stage} failed ({result.returncode}): {one_line(result.stderr[-1000:])}")
    return seconds


def noop_repro_seconds(dataset: str, label: str, repo: Path) -> float:
    """Seconds of ``dvc repro`` when nothing changed, in a scratch copy of the project (the tiny
    training recipe for one epoch, no TFLite: what is timed is DVC deciding that nothing needs to run)."""
    tiny = {key: value for key, value in scratch.TINY_PARAMS.items() if key.startswith(("train.", "export."))}
    scratch.init_repo(scratch.make_project(repo, dataset, **{**tiny, "train.epochs": 1, "prepare.label": label}))
    scratch.dvc(repo, "repro", "-q")
    started = time.perf_counter()
    scratch.dvc(repo, "repro", "-q")
    return round(time.perf_counter() - started, 2)


def machine_description(report: hardware.MachineReport) -> str:
    """The CPU, its training-relevant flags, oneDNN, GPUs and TensorFlow's version, on one line."""
    import tensorflow as tf

    return f"{report.describe()}; TensorFlow {tf.__version__}"


def to_markdown(results: dict) -> str:
    compute = results["compute"]
    lines = [
        f"Machine: {results['machine']}  ",
        f"Project rows: {'bfloat16' if compute['bfloat16'] else 'float32'} compute (policy {compute['policy']}), "
        f"oneDNN {'on' if compute['onednn'] else 'off'}, fused BatchNorm {'on' if compute['fused_batch_norm'] else 'off'}, "
        f"XLA {'on' if compute['xla'] else 'off'}; notebook rows: float32, Keras BatchNorm  ",
        f"Dataset: `{results['dataset']}`",
        "",
        "| measurement | images/s | compute-only images/s | end to end / compute-only |",
        "| --- | ---: | ---: | ---: |",
    ]
    source = results["input"]
    lines += [
        f"| input: notebook pipeline (from_generator, map, batch 32) | {source['notebook_images_per_s']:,.0f} | | |",
        f"| input: project reader | {source['reader_images_per_s']:,.0f} ({source['speedup']}x) | | |",
        f"| input: project reader + augmentation | {source['reader_augment_images_per_s']:,.0f} "
        f"({source['speedup_with_augment']}x) | | |",
    ]
    for row in results["train"]:
        lines.append(
            f"| train: {row['name']} | {row['images_per_s']:,.0f} | {row['compute_only_images_per_s']:,.0f} "
            f"| {row['end_to_end_fraction_of_compute']:.1%} |"
        )
    lines += [
        f"| prepare ({results['prepare']['images']:,} images, {results['prepare']['seconds']} s; "
        "the `python -m stages.prepare` process, start-up included) "
        f"| {results['prepare']['images_per_s']:,.0f} | | |",
        "",
        f"Baseline speed-up, project settings over notebook settings: {results['baseline_speedup']}x  ",
        f"No-op `dvc repro`: {results['noop_dvc_repro_seconds']} s",
        "",
        "Share of the machine's peak: each network's training FLOPs per image (its convolutions and dense layers, "
        "forward and backward, counted from the layers: `cifar100_dvc.network.training_flops_per_image`) times its "
        "images/s, against a large matrix multiply at the same precision, measured in this run ("
        + ", ".join(f"{dtype}: {rate:,.0f} GFLOP/s" for dtype, rate in results["matmul_gflops_per_s"].items())
        + "):",
        "",
        "| training | MFLOPs per image | GFLOP/s end to end | share of the matmul rate | compute-only share |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {row['name']} | {row['training_flops_per_image'] / 1e6:,.1f} | {row['gflops_per_s']:,.1f} "
            f"| {row['share_of_matmul_peak']:.1%} | {row['compute_only_share_of_matmul_peak']:.1%} |"
            for row in results["train"]
        ),
        "",
        "Where the baseline's speed-up comes from, one change at a time (compute only):",
        "",
        *_steps_table(results["baseline_steps"], "baseline", "over the notebook's settings"),
        "",
        "Where airbench's rate comes from in TensorFlow, one change at a time from Keras' stock layers (compute only):",
        "",
        *_steps_table(results["airbench_steps"], "airbench", "over Keras' layers"),
        "",
        *_convolutions_table(results["airbench_convolutions"]),
    ]
    return "\n".join([*lines, ""])


def _convolutions_table(convolutions: dict) -> list[str]:
    """Where airbench's step goes: its convolutions' passes, each timed alone, and the rest of the step."""
    step_ms = convolutions["step_seconds"] * 1e3
    rows = [
        f"Where airbench's compute-only training step goes (batch {convolutions['batch_size']}, {convolutions['dtype']}, "
        f"{step_ms:,.0f} ms): its convolutions' passes, each timed alone with TensorFlow's own ops:",
        "",
        "| part of the step | ms per batch | GFLOP/s | share of the step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, timed in convolutions["passes"].items():
        milliseconds, rate, share = timed["seconds"] * 1e3, timed["gflops_per_s"], timed["share_of_step"]
        rows.append(f"| convolutions, {kind} | {milliseconds:,.0f} | {rate:,.1f} | {share:.1%} |")
    rest = 1.0 - convolutions["convolutions_share_of_step"]
    rows.append(f"| the rest: BatchNorm, GELU, pooling, loss, optimizer, lookahead | {rest * step_ms:,.0f} | | {rest:.1%} |")
    return rows


def _steps_table(steps: list[dict], network: str, against: str) -> list[str]:
    """A one-change-at-a-time table: each step's compute-only rate and its ratio to the first step's."""
    reference = steps[0]["compute_only_images_per_s"]
    rows = [f"| {network} | compute-only images/s | {against} |", "| --- | ---: | ---: |"]
    for step in steps:
        rate = step["compute_only_images_per_s"]
        rows.append(f"| {step['name']} | {rate:,.0f} | {rate / reference:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description="measure the pipeline against the notebook")
    parser.add_argument("--dataset", default="synthetic", help="hub id, local hub-layout directory, or 'synthetic'")
    parser.add_argument("--label", default="", help="class-label column (default: prepare.label, or fine_label for synthetic)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks", help="where results.json/.md go")
    parser.add_argument("--train-images", type=int, default=6000, help="images per timed training run")
    parser.add_argument("--input-images", type=int, default=5000, help="images pulled from the notebook pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per training measurement; the best counts")
    args = parser.parse_args()

    def body() -> None:
        label = args.label or (None if args.dataset == "synthetic" else load_params(REPO_ROOT / "params.yaml").prepare.label)
        results = run_benchmark(args.dataset, label, args.out, args.train_images, args.input_images, args.repeats)
        print(to_markdown(results))

    run_main("benchmark", body)


if __name__ == "__main__":
    main()
