"""The README stays true: every parameter documented, CI runs the README's test command."""

from __future__ import annotations

import yaml

from cifar100_dvc.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
TEST_COMMAND = "./scripts/setup.sh && . .venv/bin/activate && ruff check . && ruff format --check . && pytest"


def test_every_parameter_is_documented_with_its_default():
    for section, values in yaml.safe_load((REPO_ROOT / "params.yaml").read_text()).items():
        for key, default in values.items():
            shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("\n...\n").strip()
            row = next((line for line in README.splitlines() if line.startswith(f"| `{section}.{key}` |")), None)
            assert row is not None, f"{section}.{key} missing from the README's parameter table"
            assert shown.replace("'", "") in row.replace("`", ""), (section, key, shown, row)


def test_ci_runs_exactly_the_readme_test_command():
    assert TEST_COMMAND in README
    assert "./scripts/setup.sh && . .venv/bin/activate && dvc repro" in README
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == TEST_COMMAND
