#!/usr/bin/env bash
# Creates .venv (Python >= 3.10, 3.11 preferred) and installs nnunet-ext with its test extras, editable.
# Idempotent: re-installs only when pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.nnunet_ext_installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing nnunet-ext and nnU-Net into .venv (first time: a few minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import nnunetv2, nnunet_ext, cc3d" # fails loudly if the install did not work
  echo "$want" > "$stamp"
fi
