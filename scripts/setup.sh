#!/usr/bin/env bash
# Set-up of this checkout: .venv (Python >= 3.10, 3.11 preferred) with nnU-Net, PyTorch and nnunet-ext
# (editable).
#   bash scripts/setup.sh          what the demo needs: nothing else is installed
#   bash scripts/setup.sh --test   also the test tools (pytest, build, twine) and, as root with apt, Slurm
#                                  (slurm-wlm, munge) for the launcher's tests
# Quiet unless something fails (pip's output goes to .venv/setup.log and is shown when pip fails).
# Idempotent: installs again only when pyproject.toml changed or --test asks for more than is there.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=demo
case "${1:-}" in
  "") ;;
  --test) mode=test ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
log=.venv/setup.log
say() { if [ -t 2 ]; then echo "$1" >&2; fi; }  # a note on a terminal only; logs stay empty unless it fails
fail() {  # what failed, the end of pip's output, and where the rest is
  echo "scripts/setup.sh: $1 failed; the last lines of $log:" >&2
  tail -n 40 "$log" >&2 || true
  exit 1
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "scripts/setup.sh: could not create .venv with $PY (set PYTHON=...)" >&2; exit 1; }
fi
stamp=.venv/.nnunet_ext_installed
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
# a test installation covers the demo's
if [ "$have" != "$hash $mode" ] && [ "$have" != "$hash test" ]; then
  extras=""; [ "$mode" = test ] && extras="[test]"
  say "installing nnU-Net, PyTorch and nnunet-ext into .venv (the first time takes a few minutes)"
  : > "$log"
  .venv/bin/python -m pip install --upgrade pip "setuptools>=77" >>"$log" 2>&1 || fail "pip install (pip, setuptools)"
  .venv/bin/python -m pip install -e ".$extras" >>"$log" 2>&1 || fail "pip install -e .$extras"
  .venv/bin/python -c "import nnunetv2, nnunet_ext, cc3d" >>"$log" 2>&1 || fail "importing the installed packages"
  echo "$hash $mode" > "$stamp"
fi
[ "$mode" = test ] || exit 0
# Slurm for the launcher's tests (tests/cluster/test_slurm.py start a private single-node cluster): slurm-wlm and
# munge from apt when running as root with apt; quiet, idempotent, and never a reason to fail the set-up
# (without them those tests are skipped with the reason).
have_slurm() { for p in sbatch squeue slurmctld slurmd munged; do command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || return 1; done; }
if ! have_slurm && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing slurm-wlm and munge (Slurm tests)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }; } ||
    echo "note: apt could not install slurm-wlm/munge; the Slurm tests will be skipped" >&2
fi
