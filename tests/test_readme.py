"""The README stays true: every parameter documented, CI runs the README's test command."""

from __future__ import annotations

import yaml

from cifar100_dvc.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
TEST_COMMAND = "./scripts/setup.sh && . .venv/bin/activate && ruff check . && ruff format --check . && pytest"


def flat_keys(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_parameters_page_is_generated_from_the_code_and_lists_every_key_with_its_default():
    from tools import paramdocs

    page = (REPO_ROOT / "docs" / "parameters.md").read_text()
    assert page == paramdocs.render(), "docs/parameters.md is out of date: run python -m tools.paramdocs"
    for key, default in flat_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())).items():
        shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("\n...\n").strip()
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` | `{shown}` |")), None)
        assert row is not None, f"{key} (default {shown}) missing from docs/parameters.md"


def test_ci_runs_exactly_the_readme_test_command():
    assert TEST_COMMAND in README
    assert "./scripts/setup.sh && . .venv/bin/activate && dvc repro" in README
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == TEST_COMMAND
