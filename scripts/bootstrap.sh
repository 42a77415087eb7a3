#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv with topkd and its
# test/train extras from the package registries, and Debian's Fashion-MNIST when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import topkd, torchvision, timm, pytest" >/dev/null 2>&1; then
  echo "[bootstrap] installing topkd[test] into .venv (about a minute)..."
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[test]'
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "[bootstrap] installing Debian package dataset-fashion-mnist..."
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "[bootstrap] warning: could not install dataset-fashion-mnist; tests that need it will be skipped" >&2
  fi
fi
