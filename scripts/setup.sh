#!/usr/bin/env bash
# Set up everything camphive needs on a fresh Debian/Ubuntu machine with Python 3.10+:
# the Fashion-MNIST Debian package (when missing), a virtual environment in .venv and the package.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null; } \
    || echo "warning: could not install dataset-fashion-mnist; pass --data-root to a folder with the idx files" >&2
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch would pull gigabytes of CUDA wheels.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
