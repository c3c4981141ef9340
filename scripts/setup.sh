#!/usr/bin/env bash
# Create .venv/ at the repository root (Python 3.11) and install the project with the pinned
# versions of every dependency (requirements.lock). Safe to run again: it only fills gaps.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "error: setup: need Python 3.11 (got $("$python_bin" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
