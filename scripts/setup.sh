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
# Slurm for the launcher's tests (tests/test_slurm.py start a private single-node cluster): slurm-wlm and
# munge from apt when running as root with apt; quiet, idempotent, and never a reason to fail the set-up
# (without them those tests are skipped with the reason).
have_slurm() { for p in sbatch squeue slurmctld slurmd munged; do command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || return 1; done; }
if ! have_slurm && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing slurm-wlm and munge (Slurm tests)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }; } ||
    echo "note: apt could not install slurm-wlm/munge; the Slurm tests will be skipped" >&2
fi
