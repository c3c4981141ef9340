"""One recipe over several seeds: queue the runs as DVC experiments, then report mean and spread.

    python -m tools.seeds queue NAME --seeds 0 1 2 [--recipe RECIPE] [-S key=value ...] [--force] [--start] [--wait]
    python -m tools.seeds show [NAME ...] [--test] [--json]

``queue`` adds one DVC experiment per seed, named ``NAME-s<seed>``, with ``-S train.seed=<seed>``,
the overrides of a named recipe (``--recipe``, cifar100_dvc/recipes.py) and the given overrides,
later ones winning (``dvc exp run --queue``; a relative ``fetch.dataset`` directory is made
absolute, since queued runs start in a temporary copy of the repository); ``--force`` runs every
stage again even where DVC's run cache holds a run with the same params and code (without it, a
repeat restores the old outputs in seconds, old ``train_seconds`` included: re-time a recipe on
another host with it); ``--start`` starts one
queue worker (one run at a time, so each run's training time is its own), ``--wait`` blocks until they are done and
exits 1 if one failed. ``show`` groups the finished experiments that ``dvc exp show --all-commits``
lists (on any commit: compare recipes only across code you trust to be equivalent) by ``NAME``
and prints, for each, the seeds and the mean ± sample standard deviation of the val metrics
(``metrics/metrics.json``; the test's only with ``--test``: recipes are chosen on val and the
test is read once a recipe is final), the training seconds and the epochs done (dvclive). A
single seed shows its value with no spread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cifar100_dvc.common import StageError
from cifar100_dvc.paths import local_directory
from cifar100_dvc.recipes import RECIPES, set_options

SEED_SUFFIX = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")
# (column, file, key path): what a recipe's row reports, val first (recipes are chosen on val).
COLUMNS = (
    ("val accuracy", "metrics/metrics.json", ("val", "accuracy")),
    ("val one view", "metrics/metrics.json", ("val", "single_view_accuracy")),
    ("test accuracy", "metrics/metrics.json", ("accuracy",)),
    ("test one view", "metrics/metrics.json", ("single_view_accuracy",)),
    ("test top-5", "metrics/metrics.json", ("top5_accuracy",)),
    ("train seconds", "dvclive/metrics.json", ("train_seconds",)),
    ("epochs done", "dvclive/metrics.json", ("epochs_done",)),
)
TEST_COLUMNS = {"test accuracy", "test one view", "test top-5"}  # shown with --test only: choose on val
PERCENT_COLUMNS = {"val accuracy", "val one view", "test accuracy", "test one view", "test top-5"}
ACTIVE = ("Queued", "Running")


class SeedsError(Exception):
    """A dvc command failed or an experiment of the group failed; the message says which."""


def dvc(root: Path, *args: str) -> str:
    """stdout of ``dvc ARGS`` run in ``root`` by this interpreter (the stages then find the same Python)."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise SeedsError(f"dvc {' '.join(args)} failed: {message[-1] if message else f'exit status {result.returncode}'}")
    return result.stdout


# ---------------------------------------------------------------- pure pieces


@dataclass(frozen=True)
class Run:
    recipe: str
    seed: int
    metrics: dict  # metrics file -> its data, as `dvc exp show --json` gives it


def runs_of(exp_show: list) -> list[Run]:
    """Every experiment named ``<recipe>-s<seed>`` in the JSON of ``dvc exp show --json``, once each."""
    runs: dict[str, Run] = {}

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data") if isinstance(node.get("data"), dict) else {}
            name = node.get("name") or data.get("name") or ""
            match = SEED_SUFFIX.match(name)
            files = {path: (found or {}).get("data") or {} for path, found in (data.get("metrics") or {}).items()}
            if match and files.get("metrics/metrics.json"):  # finished: queued and running ones have none yet
                runs[name] = Run(match["recipe"], int(match["seed"]), files)
            for value in node.values():
                walk(value)

    walk(exp_show)
    return sorted(runs.values(), key=lambda run: (run.recipe, run.seed))


def _value(run: Run, file: str, keys: tuple[str, ...]) -> float | None:
    value = run.metrics.get(file, {})
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def summarize(runs: list[Run]) -> dict[str, dict]:
    """recipe -> {"seeds": [...], column: {"mean", "std" (None for one seed), "n"}} over its runs."""
    by_recipe: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_recipe[run.recipe].append(run)
    summary = {}
    for recipe, group in by_recipe.items():
        row: dict = {"seeds": [run.seed for run in group]}
        for column, file, keys in COLUMNS:
            values = [v for v in (_value(run, file, keys) for run in group) if v is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else None
                row[column] = {"mean": statistics.fmean(values), "std": spread, "n": len(values)}
        summary[recipe] = row
    return summary


def without_test(summary: dict[str, dict]) -> dict[str, dict]:
    """``summary`` without its test columns: what ``show`` prints, as a table or JSON, unless ``--test``."""
    return {recipe: {key: value for key, value in row.items() if key not in TEST_COLUMNS} for recipe, row in summary.items()}


def format_table(summary: dict[str, dict], with_test: bool = False) -> str:
    """A Markdown table: one row per recipe, each cell ``mean ± std`` (accuracies in %); the test
    columns only ``with_test``."""
    columns = [column for column, _, _ in COLUMNS if with_test or column not in TEST_COLUMNS]
    header = ["recipe", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for recipe, row in summary.items():
        cells = [recipe, ", ".join(map(str, row["seeds"]))]
        for column in columns:
            cell = row.get(column)
            if cell is None:
                cells.append("")
                continue
            scale, unit, digits = (100.0, "%", 2) if column in PERCENT_COLUMNS else (1.0, "", 1)
            text = f"{cell['mean'] * scale:.{digits}f}{unit}"
            if cell["std"] is not None:
                text += f" ± {cell['std'] * scale:.{digits}f}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def anchored(overrides: list[str], root: Path) -> list[str]:
    """``overrides`` with a relative local directory in ``fetch.dataset`` made absolute from ``root``.

    A queued experiment runs in a temporary copy of the repository (under .dvc/tmp/exps), where
    ``../shared/...`` no longer points at the same place. What counts as a local directory is
    fetch's own rule (``local_directory``); hub ids (``owner/name``) stay as given, and a path
    that names no directory is made absolute too, so the queued fetch names where it looked.
    """
    result = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if key == "fetch.dataset" and sep:
            try:
                directory = local_directory(value, root)
            except StageError:  # meant as a directory, but missing: fetch will say so, with the full path
                directory = root / Path(value).expanduser()
            value = str(directory.resolve()) if directory is not None else value
        result.append(f"{key}{sep}{value}")
    return result


def queue(root: Path, recipe: str, seeds: list[int], overrides: list[str], force: bool = False) -> list[str]:
    """Queue one experiment per seed (a relative dataset directory made absolute, see ``anchored``);
    ``force`` runs every stage even where the run cache could restore it. Return their names."""
    names = []
    settings = [arg for override in anchored(overrides, root) for arg in ("-S", override)]
    for seed in seeds:
        name = f"{recipe}-s{seed}"
        dvc(root, "exp", "run", "--queue", *(["--force"] if force else []), "-n", name, *settings, "-S", f"train.seed={seed}")
        names.append(name)
    return names


def queue_progress(status: str, names: list[str]) -> tuple[bool, list[str]]:
    """From ``dvc queue status``'s text: whether any of ``names`` is still queued or running, and those that failed.

    A name queued again after a failure has two entries: it is active while either is, and failed only when
    none of its entries succeeded or is still going, so an old failure does not end the wait for its re-run or fail it."""
    states: dict[str, set[str]] = {}
    for line in status.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in names:
            states.setdefault(fields[1], set()).add(fields[-1])
    active = any(seen & set(ACTIVE) for seen in states.values())
    failed = sorted(name for name, seen in states.items() if "Failed" in seen and not seen & {"Success", *ACTIVE})
    return active, failed


def wait(root: Path, names: list[str], poll_seconds: float = 10.0) -> None:
    """Block until none of ``names`` is queued or running; raise SeedsError naming any that failed."""
    while True:
        active, failed = queue_progress(dvc(root, "queue", "status"), names)
        if not active:
            if failed:
                raise SeedsError(f"experiments failed: {', '.join(failed)} (dvc queue logs NAME says why)")
            return
        time.sleep(poll_seconds)


def show(root: Path, recipes: list[str]) -> dict[str, dict]:
    runs = runs_of(json.loads(dvc(root, "exp", "show", "--all-commits", "--json")))  # experiments of any commit
    if recipes:
        runs = [run for run in runs if run.recipe in recipes]
        missing = sorted(set(recipes) - {run.recipe for run in runs})
        if missing:
            raise SeedsError(f"no finished experiments named {', '.join(m + '-s<seed>' for m in missing)} in {root}")
    return summarize(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the project's git repository (default: here)")
    commands = parser.add_subparsers(dest="command", required=True)
    queued = commands.add_parser("queue", help="queue NAME-s<seed> for each seed")
    queued.add_argument("name", help="the recipe's name: experiments are named NAME-s<seed>")
    queued.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    queued.add_argument("--recipe", choices=sorted(RECIPES), help="start from this named recipe's overrides (docs/parameters.md)")
    queued.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    queued.add_argument("--force", action="store_true", help="run every stage even if the run cache has it (to re-time a recipe)")
    queued.add_argument("--start", action="store_true", help="start one queue worker (runs one at a time)")
    queued.add_argument("--wait", action="store_true", help="wait until they are done (implies --start)")
    shown = commands.add_parser("show", help="mean ± std per recipe over its seeds")
    shown.add_argument("names", nargs="*", help="recipes to show (default: every NAME-s<seed> experiment)")
    shown.add_argument("--test", action="store_true", help="also the test columns (once a recipe is final)")
    shown.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table (the same columns)")
    args = parser.parse_args(argv)
    try:
        if args.command == "queue":
            if SEED_SUFFIX.match(args.name):
                parser.error(f"NAME {args.name!r} already ends in -s<seed>; the seed suffix is added per run")
            overrides = set_options(RECIPES[args.recipe][1])[1::2] if args.recipe else []
            names = queue(args.root, args.name, args.seeds, overrides + args.overrides, args.force)  # later -S win
            print(f"queued {', '.join(names)}")
            if args.start or args.wait:
                dvc(args.root, "queue", "start", "-j", "1")
            if args.wait:
                wait(args.root, names)
                print(format_table(show(args.root, [args.name])))  # val only: read the test once, when final
            return 0
        summary = show(args.root, args.names)
        # The test only with --test, in either form: a script's JSON is read as surely as a table.
        if not args.test:
            summary = without_test(summary)
        print(json.dumps(summary, indent=2) if args.json else format_table(summary, args.test))
        return 0
    except SeedsError as error:
        print(f"error: seeds: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
