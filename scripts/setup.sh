#!/usr/bin/env bash
# Create .venv/ at the repository root with a supported Python (3.11, 3.12 or 3.13) and install
# the project with the pinned versions of every dependency (requirements.lock, one lock that
# resolves on all three). Safe to run again: it only fills gaps. PYTHON=/path/to/python picks
# the interpreter; otherwise the first supported one found on PATH (python3.11, 3.12, 3.13,
# python3) or under pyenv is used.
set -euo pipefail
cd "$(dirname "$0")/.."
supported='import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'

if [ -x .venv/bin/python ]; then
  .venv/bin/python -c "$supported" \
    || { echo "error: setup: .venv/ was made with an unsupported $(.venv/bin/python --version 2>&1); remove it and run again" >&2; exit 1; }
else
  python_bin=""
  for candidate in ${PYTHON:-} python3.11 python3.12 python3.13 python3 \
    "$HOME"/.pyenv/versions/3.11*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3 "$HOME"/.pyenv/versions/3.13*/bin/python3; do
    # A pyenv shim exists on PATH even when it cannot run that version, so try each one.
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$supported" 2>/dev/null; then
      python_bin=$candidate
      break
    fi
  done
  if [ -z "$python_bin" ]; then
    echo "error: setup: need Python 3.11, 3.12 or 3.13 (found ${PYTHON:-none on PATH}); set PYTHON=/path/to/python3.x" >&2
    exit 1
  fi
  if [ -n "${PYTHON:-}" ] && [ "$python_bin" != "$PYTHON" ]; then
    echo "error: setup: PYTHON=$PYTHON is not Python 3.11-3.13" >&2
    exit 1
  fi
  echo "setup: creating .venv/ with $("$python_bin" --version 2>&1) ($(command -v "$python_bin"))"
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
