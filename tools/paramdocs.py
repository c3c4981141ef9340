"""Write docs/parameters.md from the params dataclasses: ``python -m tools.paramdocs [--check]``.

Every key of ``params.yaml`` with its default (read from ``params.yaml``, which the tests hold equal
to the dataclasses' defaults), its allowed values and its meaning (the field's doc in
``cifar100_dvc/params.py``). ``--check`` exits 1 if the page is not what it would write, so the
page and the code cannot drift (``tests/test_readme.py`` runs the same comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from cifar100_dvc.params import Params
from cifar100_dvc.paths import REPO_ROOT
from cifar100_dvc.recipes import RECIPES, set_options, yaml_value

PAGE = REPO_ROOT / "docs" / "parameters.md"

INTRO = """# Parameters

What every key of `params.yaml` means, its default and what it accepts. This page is generated
from `cifar100_dvc/params.py` by `python -m tools.paramdocs` (a test fails when the two differ).

`params.yaml` has one section per stage and is loaded into frozen dataclasses. An unknown or
missing key, a wrong type or a value out of range stops the stage with one line naming the key,
e.g. `error: train: params.yaml: unknown key 'train.epoch' (did you mean 'train.epochs'?)`.
Change a key for one run with `dvc exp run -S train.epochs=12`, a nested one with
`-S train.airbench.widths=[64,256,256]`; edit `params.yaml` to change the default.
"""

SECTION_NOTES = {
    "train": "Keys shared by every network come first; `train.arch` chooses the network and its recipe.",
    "train.airbench": "airbench's network and optimizers (KellerJordan/cifar10-airbench), used when `train.arch: "
    "airbench`. The defaults are airbench93's network trained by airbench94_muon's optimizer and schedule, each "
    "default published in one of the two (the pair won on val at 1x: results.md); the `airbench93` recipe below "
    "restores airbench93's own SGD recipe.",
    "train.airbench.muon": "airbench94_muon's optimizer (its `airbench94_muon.py`), used when `train.airbench.optimizer: "
    "muon` (the default); every default is that recipe's. The `muon` recipe below is airbench94_muon whole.",
}


def _accepted(hint: Any, metadata: dict) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        text = " \\| ".join(f"`{arg}`" for arg in args)
    elif origin is tuple:
        text = "list of integers >= 1"
    else:
        text = {bool: "true \\| false", int: "integer", float: "number", str: "string"}[hint]
        bounds = [
            f"{symbol} {metadata[key]}"
            for key, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if key in metadata
        ]
        if bounds:
            text += ", " + " and ".join(bounds)
    return text + (" or `null`" if optional else "")


def _rows(cls: type, values: dict, prefix: str, sections: list) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            sections.append((f"{prefix}{spec.name}", hint, values[spec.name]))
            continue
        default = yaml_value(values[spec.name])
        rows.append(f"| `{prefix}{spec.name}` | `{default}` | {_accepted(hint, spec.metadata)} | {spec.metadata['doc']} |")
    return rows


def render(params_yaml: Path = REPO_ROOT / "params.yaml") -> str:
    """The whole page, from the dataclasses' docs and ``params_yaml``'s values."""
    values = yaml.safe_load(params_yaml.read_text())
    lines = [INTRO]
    sections = [(spec.name, typing.get_type_hints(Params)[spec.name], values[spec.name]) for spec in dataclasses.fields(Params)]
    while sections:
        name, cls, section_values = sections.pop(0)
        nested: list = []
        rows = _rows(cls, section_values, f"{name}.", nested)
        lines += [f"## `{name}`", ""]
        if name in SECTION_NOTES:
            lines += [SECTION_NOTES[name], ""]
        lines += ["| key | default | accepts | meaning |", "| --- | --- | --- | --- |", *rows, ""]
        sections = nested + sections
    lines += [
        "## Recipes",
        "",
        "The default recipe is `params.yaml` itself. The others are named sets of overrides (`cifar100_dvc/recipes.py`;",
        "`python -m tools.seeds queue NAME --recipe RECIPE` queues one over seeds):",
        "",
    ]
    for name, (meaning, overrides) in RECIPES.items():
        lines += [f"- `{name}`: {meaning}:", f"  `dvc exp run {' '.join(set_options(overrides))}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.paramdocs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/parameters.md is out of date")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print(f"error: paramdocs: {PAGE} is out of date: run python -m tools.paramdocs", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
