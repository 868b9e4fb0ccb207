#!/usr/bin/env bash
# Set up (as scripts/setup.sh), lint with ruff and run the whole test suite. pytest's exit code 5
# ("no tests collected") counts as a failure here: an empty suite checks nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Lint first (pyflakes, import order, bugbear, complexity; settings in pyproject.toml): seconds, not minutes.
.venv/bin/ruff check src tests benchmarks || { echo "ruff found problems: fix them (ruff check --fix fixes many)" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treat as failure" >&2
  exit 1
fi
exit "$status"
