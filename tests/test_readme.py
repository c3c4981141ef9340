"""The README and docs/ stay true: the parameters page is the code's, CI runs the README's test command,
the README fits a first visit, and every command on any page still runs as written."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from cifar100_dvc.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
PAGES = {"README.md": README, **{f"docs/{path.name}": path.read_text() for path in sorted((REPO_ROOT / "docs").glob("*.md"))}}
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

    page = PAGES["docs/parameters.md"]
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


def test_readme_is_a_front_door_and_links_every_docs_page():
    assert len(README.splitlines()) <= 200
    for page in PAGES:
        if page.startswith("docs/"):
            assert f"({page})" in README, f"README.md does not link {page}"
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#[\w-]+)?\)", text):
            base = "" if page == "README.md" or target.startswith("docs/") else "docs/"
            assert (REPO_ROOT / base / target).is_file(), f"{page} links {target}, which does not exist"


# ---------------------------------------------------------------- the commands of every page


def shell_commands(text: str) -> list[list[str]]:
    """Each simple command of the pages' ```bash blocks, as words: continuations joined, comments,
    environment assignments and the shell's own keywords dropped, pipelines and lists split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", "|", ";", "do", "done") or word.endswith(";"):
                    if word.endswith(";") and word not in (";",):
                        command.append(word[:-1])
                    if command:
                        commands.append(command)
                    command = []
                elif not command and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word) or word in ("for", "in", ".", "source")):
                    continue
                else:
                    command.append(word)
    return [command for command in commands if command[0] in ("python", "dvc")]


DOC_COMMANDS = sorted(
    {(page, shlex.join(command)) for page, text in PAGES.items() for command in shell_commands(text)}, key=lambda item: item
)


def settings(command: list[str]) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command[:-1]) if word in ("-S", "--set-param")]


@pytest.mark.parametrize(("page", "line"), DOC_COMMANDS)
def test_every_set_param_names_a_real_key_with_an_accepted_value(page, line):
    """A command's settings are checked together, on top of its --recipe when it names one: each
    alone may be refused where the set is consistent (optimizer=adam with weight_decay=0)."""
    from cifar100_dvc.params import load_params, read_yaml, to_dict
    from cifar100_dvc.recipes import RECIPES, with_overrides

    defaults = load_params(REPO_ROOT / "params.yaml")
    words = shlex.split(line)
    overrides = dict(RECIPES[words[words.index("--recipe") + 1]][1]) if "--recipe" in words else {}
    for setting in settings(words):
        key, _, value = setting.partition("=")
        if "$" in value:  # a shell variable: only the key can be checked
            overrides[key] = flat_keys(to_dict(defaults))[key]
        else:
            overrides[key] = read_yaml(value)  # as the stages read what dvc writes into params.yaml
    with_overrides(defaults, overrides)  # raises on an unknown key or a bad value


@functools.cache
def help_text(*program: str) -> str:
    result = subprocess.run([*program, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(program)} --help failed: {result.stderr[-500:]}"
    return result.stdout


def program_of(command: list[str]) -> tuple[list[str], list[str]]:
    """(the program and its subcommands, as `--help` takes them; the rest of the words)."""
    if command[0] == "python":
        assert command[1] == "-m", command
        spec = importlib.util.find_spec(command[2])
        assert spec is not None, f"no module {command[2]}"
        program, rest = [sys.executable, "-m", command[2]], command[3:]
        if command[2] == "tools.seeds":
            program, rest = [*program, rest[0]], rest[1:]  # queue / show
        return program, rest
    words = command[1:]
    subcommands = []
    while words and re.fullmatch(r"[a-z]+", words[0]) and words[0] not in ("main",):
        subcommands.append(words.pop(0))
        if subcommands[0] not in ("exp", "queue", "remote", "plots", "metrics", "params"):
            break
    if subcommands[:1] in (["exp"], ["queue"], ["remote"], ["plots"], ["metrics"], ["params"]):
        subcommands = subcommands[:2]
    return [sys.executable, "-m", "dvc", *subcommands], words


@pytest.mark.slow
@pytest.mark.parametrize(("page", "line"), DOC_COMMANDS)
def test_every_command_runs_a_real_program_with_options_it_takes(page, line):
    program, rest = program_of(shlex.split(line))
    text = help_text(*program)
    for word in rest:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in ("-", "--"):
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}([\s,=\]]|$)", text, flags=re.M), (
                f"{page}: `{line}`: {' '.join(program[2:])} takes no option {option}"
            )
