"""tools.seeds: grouping experiments by recipe and their mean and spread, on `dvc exp show --json`'s shape."""

from __future__ import annotations

import json
import statistics

import pytest

from tools import seeds
from tools.seeds import anchored, format_table, queue_progress, runs_of, summarize, without_test


def experiment(name: str, accuracy: float | None, val_accuracy: float = 0.8, seconds: float = 100.0) -> dict:
    metrics = {"metrics/metrics.json": {"data": {}}, "dvclive/metrics.json": {"data": {}}}
    if accuracy is not None:  # a queued or running experiment has no metrics yet
        metrics["metrics/metrics.json"]["data"] = {
            "accuracy": accuracy,
            "single_view_accuracy": accuracy - 0.01,
            "top5_accuracy": 0.99,
            "val": {"accuracy": val_accuracy, "single_view_accuracy": val_accuracy - 0.01},
        }
        metrics["dvclive/metrics.json"]["data"] = {"train_seconds": seconds, "epochs_done": 18.0}
    return {"name": name, "revs": [{"name": name, "rev": "0" * 40, "data": {"rev": "0" * 40, "metrics": metrics}}]}


def exp_show(*experiments: dict) -> list:
    # `dvc exp show --all-commits --json`: the workspace, then commits, each with its experiments.
    workspace = {"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None}
    return [workspace, {"rev": "1" * 40, "name": "main", "data": {"metrics": {}}, "experiments": list(experiments)}]


def test_runs_are_grouped_by_recipe_and_unfinished_or_unsuffixed_ones_left_out():
    shown = exp_show(
        experiment("whiten-s0", 0.90),
        experiment("whiten-s2", 0.88),
        experiment("whiten-s1", None),  # still queued
        experiment("one-epoch", 0.5),  # no seed suffix
        experiment("tta-off-s0", 0.87),
    )
    runs = runs_of(shown)
    assert [(run.recipe, run.seed) for run in runs] == [("tta-off", 0), ("whiten", 0), ("whiten", 2)]


def test_summary_is_the_mean_and_sample_spread_per_recipe():
    shown = exp_show(
        experiment("a-s0", 0.90, val_accuracy=0.80, seconds=300),
        experiment("a-s1", 0.86, val_accuracy=0.84, seconds=310),
        experiment("b-s5", 0.70),
    )
    summary = summarize(runs_of(shown))
    assert summary["a"]["seeds"] == [0, 1]
    assert summary["a"]["test accuracy"]["mean"] == pytest.approx(0.88)
    assert summary["a"]["test accuracy"]["std"] == pytest.approx(statistics.stdev([0.90, 0.86]))
    assert summary["a"]["val accuracy"]["mean"] == pytest.approx(0.82)
    assert summary["a"]["train seconds"] == {"mean": 305.0, "std": pytest.approx(statistics.stdev([300, 310])), "n": 2}
    assert summary["b"]["test accuracy"] == {"mean": 0.70, "std": None, "n": 1}  # one seed: no spread


def test_table_shows_val_unless_the_test_is_asked_for():
    summary = summarize(runs_of(exp_show(experiment("a-s0", 0.90, 0.80), experiment("a-s1", 0.86, 0.84))))
    val_only = format_table(summary)
    assert "| a | 0, 1 | 82.00% ± 2.83 |" in val_only
    assert "test" not in val_only
    with_test = format_table(summary, with_test=True)
    assert "88.00% ± 2.83" in with_test and "test accuracy" in with_test
    single = format_table(summarize(runs_of(exp_show(experiment("c-s3", 0.9, 0.75)))))
    assert "| c | 3 | 75.00% |" in single
    hidden = without_test(summary)  # what `show --json` prints without --test
    assert set(summary["a"]) - set(hidden["a"]) == {"test accuracy", "test one view", "test top-5"}


def test_show_as_json_holds_the_test_only_when_asked_for(monkeypatch, capsys):
    summary = summarize(runs_of(exp_show(experiment("a-s0", 0.90, 0.80))))
    monkeypatch.setattr(seeds, "show", lambda root, names: summary)
    for argv, has_test in ((["show", "--json"], False), (["show", "--json", "--test"], True)):
        assert seeds.main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["a"]["val accuracy"]["mean"] == pytest.approx(0.80)
        assert ("test accuracy" in printed["a"]) is has_test


def test_a_relative_dataset_directory_is_made_absolute_for_the_queue_and_hub_ids_are_left_alone(tmp_path):
    # Queued runs start in .dvc/tmp/exps/<copy>: "../datasets/x" would point elsewhere there.
    root = tmp_path / "project"
    (root / "data" / "copy").mkdir(parents=True)
    overrides = [
        "fetch.dataset=../datasets/cifar10",
        "train.epochs=3",
        "prepare.label=label",
    ]
    assert anchored(overrides, root) == [
        f"fetch.dataset={tmp_path / 'datasets' / 'cifar10'}",
        "train.epochs=3",
        "prepare.label=label",
    ]
    assert anchored(["fetch.dataset=data/copy"], root) == [f"fetch.dataset={root / 'data' / 'copy'}"]
    assert anchored(["fetch.dataset=uoft-cs/cifar10", "fetch.dataset=/abs/copy"], root) == [
        "fetch.dataset=uoft-cs/cifar10",
        "fetch.dataset=/abs/copy",
    ]


STATUS = """\
Task     Name      Created    Status
97de1d6  ab-s2     01:03 AM   {rerun}
7d4ad52  ab-s2     12:09 AM   Failed
31ff469  ab-s1     12:05 AM   Success
e0e0e0e  other-s0  12:01 AM   Running

Worker status: 1 active, 0 idle
"""


def test_a_name_queued_again_after_a_failure_is_waited_for_and_judged_by_its_rerun():
    assert queue_progress(STATUS.format(rerun="Running"), ["ab-s1", "ab-s2"]) == (True, [])  # the re-run counts
    assert queue_progress(STATUS.format(rerun="Success"), ["ab-s1", "ab-s2"]) == (False, [])  # the old failure does not
    assert queue_progress(STATUS.format(rerun="Failed"), ["ab-s1", "ab-s2"]) == (False, ["ab-s2"])
    assert queue_progress(STATUS.format(rerun="Success"), ["ab-s1"]) == (False, [])  # others' runs are not waited for
