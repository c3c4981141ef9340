"""The DVC promises, each proven with real ``dvc`` commands in a temporary git repository."""

from __future__ import annotations

import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cifar100_dvc.scratch import commit, dvc, environment, run_module, set_params, sh

pytestmark = pytest.mark.slow
ALL_STAGES = {"fetch", "prepare", "train", "evaluate", "export"}


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", result.stdout + result.stderr))


def metrics(root: Path) -> dict:
    return json.loads((root / "metrics" / "metrics.json").read_text())


def test_repro_runs_everything_once_then_only_what_changed(reproduced_repo, repo):
    assert stages_run(reproduced_repo.first_repro) == ALL_STAGES
    second = dvc(repo, "repro")
    assert stages_run(second) == set()
    assert "up to date" in second.stdout
    set_params(repo, **{"train.epochs": 1})
    assert stages_run(dvc(repo, "repro")) == {"train", "evaluate", "export"}
    set_params(repo, **{"prepare.val_fraction": 0.2})
    assert stages_run(dvc(repo, "repro")) == {"prepare", "train", "evaluate", "export"}
    set_params(repo, **{"export.tflite": True})
    assert stages_run(dvc(repo, "repro")) == {"export"}

    # Editing a shared module makes exactly the stages that import it out of date.
    for module, importers in {
        "cifar100_dvc/images.py": {"fetch", "prepare"},
        "cifar100_dvc/hardware.py": {"train"},
        "cifar100_dvc/records.py": {"prepare", "train", "evaluate"},
        "cifar100_dvc/network.py": {"train", "evaluate", "export"},
        "cifar100_dvc/augment.py": {"train"},
        "cifar100_dvc/training.py": {"train"},
        "cifar100_dvc/inference.py": {"train", "evaluate", "export"},
        "stages/export.py": {"export"},
        "stages/evaluate.py": {"evaluate"},
        "cifar100_dvc/common.py": ALL_STAGES,
        "cifar100_dvc/__init__.py": ALL_STAGES,
        "stages/__init__.py": ALL_STAGES,
    }.items():
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        changed = json.loads(dvc(repo, "status", "--json").stdout)
        path.write_text(original)
        assert set(changed) == importers, module
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_metrics_and_params_diff_between_commits(repo):
    sh(repo, "git", "checkout", "-qb", "one-epoch")
    set_params(repo, **{"train.epochs": 1, "train.learning_rate": 0.05})
    dvc(repo, "repro")
    commit(repo, "one epoch")
    metrics_diff = json.loads(dvc(repo, "metrics", "diff", "main", "one-epoch", "--all", "--json").stdout)
    changed = metrics_diff["metrics/metrics.json"]
    assert {"accuracy", "top5_accuracy", "cross_entropy", "num_examples"} <= set(changed)
    assert changed["cross_entropy"]["old"] != changed["cross_entropy"]["new"]
    params_diff = json.loads(dvc(repo, "params", "diff", "main", "one-epoch", "--json").stdout)["params.yaml"]
    assert (params_diff["train.epochs"]["old"], params_diff["train.epochs"]["new"]) == (2, 1)
    assert (params_diff["train.learning_rate"]["old"], params_diff["train.learning_rate"]["new"]) == (0.1, 0.05)


def exp_rows(root: Path) -> list[dict]:
    """(params, metrics) of every experiment and commit that ``dvc exp show --json`` lists."""
    rows = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data:
                params = data["params"].get("params.yaml", {}).get("data", {})
                found = data.get("metrics", {}).get("metrics/metrics.json", {}).get("data", {})
                rows.append({"name": node.get("name") or data.get("name"), "params": params, "metrics": found})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(dvc(root, "exp", "show", "--json").stdout))
    return rows


def test_experiments_run_queue_and_show_over_seeds(repo):
    dvc(repo, "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")
    # The README's way to run a recipe over seeds: queued as DVC experiments, one worker, waited for.
    arguments = ["queue", "slow-rate", "--seeds", "0", "1", "-S", "train.learning_rate=0.05", "--wait"]
    queued = run_module("tools.seeds", *arguments, cwd=repo, timeout=900)
    assert queued.returncode == 0, queued.stderr[-3000:]
    assert "| slow-rate | 0, 1 |" in queued.stdout and "test accuracy" not in queued.stdout  # val only
    shown = run_module("tools.seeds", "show", "--json", "--test", cwd=repo)
    assert shown.returncode == 0, shown.stderr[-3000:]
    summary = json.loads(shown.stdout)
    assert set(summary) == {"slow-rate"}  # "one-epoch" has no seed suffix
    rows = {row["name"]: row for row in exp_rows(repo)}
    runs = [rows["slow-rate-s0"], rows["slow-rate-s1"]]
    assert [run["params"]["train"]["seed"] for run in runs] == [0, 1]
    assert all(run["params"]["train"]["learning_rate"] == 0.05 for run in runs)
    accuracies = [run["metrics"]["accuracy"] for run in runs]
    test_accuracy = summary["slow-rate"]["test accuracy"]
    assert test_accuracy["n"] == 2
    assert test_accuracy["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert test_accuracy["std"] == pytest.approx(statistics.stdev(accuracies))
    assert summary["slow-rate"]["train seconds"]["mean"] > 0
    assert rows["one-epoch"]["params"]["train"]["epochs"] == 1 and rows["one-epoch"]["metrics"].get("accuracy") is not None
    dvc(repo, "queue", "stop", check=False)


def test_a_repeated_recipe_comes_from_the_run_cache_unless_forced(repo):
    # Re-timing a recipe on another host: the same params and code are restored from DVC's run
    # cache in seconds, the old training time included, unless `queue --force` runs them again.
    seed = str(yaml.safe_load((repo / "params.yaml").read_text())["train"]["seed"])
    trained_seconds = json.loads((repo / "dvclive" / "metrics.json").read_text())["train_seconds"]
    seeds(repo, "queue", "again", "--seeds", seed, "--wait")
    seeds(repo, "queue", "forced", "--seeds", seed, "--force", "--wait")
    again = dvc(repo, "queue", "logs", f"again-s{seed}")
    forced = dvc(repo, "queue", "logs", f"forced-s{seed}")
    assert stages_run(again) == set()  # skipped as unchanged or restored as cached: no stage ran
    assert stages_run(forced) == ALL_STAGES
    summary = json.loads(seeds(repo, "show", "again", "forced", "--json", "--test").stdout)
    assert summary["again"]["train seconds"]["mean"] == trained_seconds  # the old run's, restored
    assert summary["forced"]["test accuracy"]["mean"] == metrics(repo)["accuracy"]  # same seed, same result
    dvc(repo, "queue", "stop", check=False)


def test_push_remove_pull_restores_everything(repo, tmp_path):
    dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    dvc(repo, "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    for output in ("data/raw", "data/prepared", "models/model.keras", "models/history.json", "models/export", "plots"):
        path = repo / output
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    dvc(repo, "pull")
    assert (repo / "models" / "model.keras").is_file()
    assert (repo / "models" / "export" / "saved_model").is_dir()
    assert (repo / "data" / "prepared" / "dataset.json").is_file()
    status = dvc(repo, "status")
    assert "up to date" in status.stdout, status.stdout


def test_same_params_and_seed_give_the_same_metrics(repo):
    first = (repo / "metrics" / "metrics.json").read_text()
    first_curves = (repo / "dvclive" / "plots" / "metrics" / "eval" / "loss.tsv").read_text()
    assert stages_run(dvc(repo, "repro", "-f", "train")) >= {"train"}
    assert (repo / "metrics" / "metrics.json").read_text() == first
    assert (repo / "dvclive" / "plots" / "metrics" / "eval" / "loss.tsv").read_text() == first_curves


def start_train(root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=root,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_after_first_epoch(process: subprocess.Popen, root: Path, sig: int) -> int:
    """Send ``sig`` once the first epoch is checkpointed; return the exit status."""
    state = root / "checkpoints" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(sig)
    process.communicate(timeout=120)
    return process.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "interrupted"])
def test_interrupted_train_resumes_to_the_same_result(repo, sig):
    set_params(repo, **{"train.epochs": 12})
    previous_model = (repo / "models" / "model.keras").read_bytes()
    status = stop_after_first_epoch(start_train(repo), repo, sig)
    assert status == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert (repo / "models" / "model.keras").read_bytes() == previous_model  # never half-replaced
    state = json.loads((repo / "checkpoints" / "state.json").read_text())
    assert 1 <= state["epoch"] < 12

    resumed = dvc(repo, "repro")
    assert f"resuming from {repo / 'checkpoints'} after epoch {state['epoch']} of 12" in resumed.stderr + resumed.stdout
    resumed_metrics = metrics(repo)
    resumed_history = json.loads((repo / "models" / "history.json").read_text())
    assert [row["epoch"] for row in resumed_history["epochs"]] == list(range(1, 13))

    uninterrupted = dvc(repo, "repro", "-f", "train")
    assert "resuming" not in uninterrupted.stderr + uninterrupted.stdout
    assert metrics(repo) == resumed_metrics


def test_changed_params_start_afresh(repo):
    set_params(repo, **{"train.epochs": 12})
    stop_after_first_epoch(start_train(repo), repo, signal.SIGKILL)
    set_params(repo, **{"train.learning_rate": 0.05})
    result = dvc(repo, "repro")
    output = result.stderr + result.stdout
    assert "from other params or data: starting afresh" in output and "resuming" not in output
    history = yaml.safe_load((repo / "models" / "history.json").read_text())
    assert history["epochs_completed"] == 12


def seeds(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    result = run_module("tools.seeds", *arguments, cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_machines_split_a_seed_sweep_and_share_it_through_git_and_dvc_remotes(repo, tmp_path):
    """docs/scaling.md's workflow: one bare git remote and one DVC remote (here local folders; S3 or
    SSH in practice), two clones each running part of the seeds and pushing its experiments; either
    clone pulls the other's and reports the whole sweep, and can check out any of its models."""
    git_remote, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(git_remote))
    dvc(repo, "remote", "add", "-d", "storage", str(storage))
    commit(repo, "a shared DVC remote")
    sh(repo, "git", "remote", "add", "origin", str(git_remote))
    sh(repo, "git", "push", "-q", "origin", "main")
    machines = {}
    for name in ("a", "b"):
        machines[name] = tmp_path / f"machine-{name}"
        sh(tmp_path, "git", "clone", "-q", str(git_remote), str(machines[name]))
    for name, seed in (("a", "0"), ("b", "1")):  # each machine its share of the sweep, then push it
        seeds(machines[name], "queue", "sweep", "--seeds", seed, "-S", "train.learning_rate=0.05", "--wait")
        dvc(machines[name], "exp", "push", "origin", f"sweep-s{seed}")
        dvc(machines[name], "queue", "stop", check=False)

    a = machines["a"]
    dvc(a, "exp", "pull", "origin", "sweep-s1")  # machine b's run, with its outputs from the DVC remote
    summary = json.loads(seeds(a, "show", "--json", "--test").stdout)
    assert summary["sweep"]["seeds"] == [0, 1]
    rows = {row["name"]: row for row in exp_rows(a)}
    accuracies = [rows[f"sweep-s{seed}"]["metrics"]["accuracy"] for seed in (0, 1)]
    assert summary["sweep"]["test accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert summary["sweep"]["test accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))

    # Machine b's model on machine a: apply the experiment, fetch its outputs, nothing left to run.
    dvc(a, "exp", "apply", "sweep-s1")
    dvc(a, "pull")
    assert (a / "models" / "model.keras").is_file() and (a / "models" / "export" / "saved_model").is_dir()
    assert metrics(a)["accuracy"] == accuracies[1]
    assert "up to date" in dvc(a, "status").stdout  # the outputs are exactly what machine b's run recorded
