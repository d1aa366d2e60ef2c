#!/usr/bin/env bash
# What the container test (tests/workflows/test_submission_docker.py) needs, set up idempotently:
#   1. a running Docker daemon (as root: Debian's docker.io is installed with apt-get if missing, and dockerd
#      is started in the background when there is no init system to do it);
#   2. a local base image with Python 3.11 (registries may be unreachable): Debian bookworm made with
#      debootstrap (minbase + python3, python3-venv, python3-pip) and `docker import`, about 40-80 s.
# Usage: bash scripts/submission_docker_env.sh [BASE_TAG]   (default nnunet-ext-base:bookworm)
# Prints "ready: ..." and exits 0, or prints the reason on stderr and exits 1 (the test then skips with it).
set -uo pipefail
TAG=${1:-nnunet-ext-base:bookworm}
LOGDIR=${NNUNET_EXT_DOCKER_LOGS:-/var/tmp}
fail() { echo "submission-docker: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  command -v apt-get >/dev/null || fail "$1 is missing and there is no apt-get to install it"
  is_root || fail "$1 is missing and installing it needs root"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$LOGDIR/nnunet_ext_apt.log" 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$LOGDIR/nnunet_ext_apt.log" 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>"$LOGDIR/nnunet_ext_apt.log" 2>&1; } \
    || fail "apt-get install $* failed (see $LOGDIR/nnunet_ext_apt.log)"
}

if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || apt_install docker.io
  command -v docker >/dev/null || fail "docker client missing after installing docker.io"
  is_root || fail "the Docker daemon is not reachable and starting one needs root"
  if ! pgrep -x dockerd >/dev/null; then
    nohup dockerd >"$LOGDIR/nnunet_ext_dockerd.log" 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not start (see $LOGDIR/nnunet_ext_dockerd.log)"
fi

if ! docker image inspect "$TAG" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || apt_install debootstrap
  is_root || fail "base image $TAG is missing and debootstrap needs root"
  ROOTFS=$(mktemp -d /var/tmp/nnunet_ext_rootfs.XXXXXX)
  trap 'rm -rf "$ROOTFS"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$ROOTFS" \
      http://deb.debian.org/debian >"$LOGDIR/nnunet_ext_debootstrap.log" 2>&1 \
    || fail "debootstrap of Debian bookworm failed (see $LOGDIR/nnunet_ext_debootstrap.log)"
  tar -C "$ROOTFS" -c . | docker import - "$TAG" >/dev/null || fail "docker import of the base image failed"
fi
docker run --rm --network none "$TAG" python3 -c "import venv, sys; assert sys.version_info[:2] == (3, 11)" \
  || fail "base image $TAG has no Python 3.11 with venv"
echo "ready: docker server $(docker version --format '{{.Server.Version}}'), base image $TAG"
