"""The submission container, built and run for real.

A tiny phantom model (2d, 1 epoch of 2 iterations, CPU) is packaged with `nnunet-ext submission build`; its
image is built on a local Debian base (no registry needed: scripts/submission_docker_env.sh makes it with
debootstrap and `docker import`), pip installing the pinned requirements.txt from a local wheelhouse served
over 127.0.0.1 (`pip wheel` fills it from PyPI once; later runs reuse it). The container then runs with
`--network none`, a read-only root file system, the input mounted read-only and its non-root user, and its
output must equal `nnunet-ext submission test`'s, voxel for voxel and in geometry.

Skipped, with the reason, where Docker or the base image cannot be set up (not root, no apt-get, no
network for the first wheelhouse fill). Timings are printed (docs/submission.md has the measured ones).
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.core.paths import nnunet_command, nnunet_env
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
BASE = os.environ.get("NNUNET_EXT_BASE_IMAGE", "nnunet-ext-base:bookworm")
WHEELHOUSE = Path(os.environ.get("NNUNET_EXT_WHEELHOUSE", "/var/tmp/nnunet_ext_wheelhouse"))
TRAINER = "ExtBaselineTrainer"


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def _sh(cmd, timeout, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _tail(r, n=3000):
    return (r.stdout + r.stderr)[-n:]


@pytest.fixture(scope="module")
def docker_ready():
    try:
        r = _sh(["bash", REPO / "scripts" / "submission_docker_env.sh", BASE], timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("setting up Docker and the base image took more than 15 minutes")
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"Docker not available here: {reason}")
    return r.stdout.strip()


@pytest.fixture
def wheel_server():
    """An HTTP server on 127.0.0.1 serving the wheelhouse folder (pip --find-links reads its listing)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(WHEELHOUSE),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _report(capsys, timings):
    with capsys.disabled():
        print("\n[submission docker] " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)


def test_container_output_equals_submission_test(docker_ready, wheel_server, tmp_path, capsys):
    timings = {}
    t_all = t = time.monotonic()
    env = nnunet_env(tmp_path, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1"})
    root = write_phantom_dataset(env["nnUNet_raw"], 523, 5, PhantomConfig(shape=(32, 32, 32), timepoints=2, seed=8),
                                 n_test=1, progress=False)
    for cmd in ([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", "523", "-c", "2d", "-np", "2"],
                [nnunet_command("nnUNetv2_train"), "523", "2d", "0", "-tr", TRAINER, "-device", "cpu"]):
        r = _sh(cmd, timeout=1800, env=env)
        assert r.returncode == 0, _tail(r)
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    sub = tmp_path / "sub"
    r = _sh([nnunet_command("nnunet-ext"), "submission", "build", "-d", "523", "-c", "2d", "-tr", TRAINER, "-f", "0",
             "--challenge", "generic", "-o", sub], timeout=600, env=env)
    assert r.returncode == 0, _tail(r)
    timings["submission build"] = time.monotonic() - t

    t = time.monotonic()  # the wheelhouse: every pinned requirement as a wheel (downloaded once, then reused)
    r = _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-r", sub / "requirements.txt",
             "--find-links", WHEELHOUSE, "-w", WHEELHOUSE], timeout=1800)
    if r.returncode != 0:
        pytest.skip(f"cannot fill the wheelhouse {WHEELHOUSE} from PyPI: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    timings["wheelhouse"] = time.monotonic() - t

    image = f"nnunet-ext-subtest:{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        t = time.monotonic()
        r = _sh(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}",
                 "--build-arg", f"PIP_ARGS=--no-index --find-links {wheel_server}", "-t", image, sub], timeout=3600)
        assert r.returncode == 0, _tail(r)
        timings["docker build"] = time.monotonic() - t
        info = json.loads(_sh(["docker", "image", "inspect", image], timeout=60).stdout)[0]
        assert info["Config"]["User"] == "submitter"

        inp = tmp_path / "in"  # the generic layout: nnU-Net's imagesTs naming
        inp.mkdir()
        for k in (0, 1):
            name = f"phantom_005_{k:04d}.nii.gz"
            (inp / name).write_bytes((root / "imagesTs" / name).read_bytes())
        for p in [inp, *inp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        before = _digest(inp)
        out = tmp_path / "out"
        out.mkdir()
        os.chmod(out, 0o777)  # the container's user (uid 1000) writes here

        t = time.monotonic()
        r = _sh(["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
                 "-v", f"{inp}:/input:ro", "-v", f"{out}:/output", image], timeout=1800)
        assert r.returncode == 0, _tail(r)
        timings["docker run"] = time.monotonic() - t
        result = out / "phantom_005.nii.gz"
        assert result.is_file(), _tail(r)
        assert result.stat().st_uid != 0  # written by the non-root user
        assert _digest(inp) == before

        r = _sh(["docker", "run", "--rm", "--network", "none", "-v", f"{inp}:/input:ro", "--entrypoint",
                 "/opt/venv/bin/python", image, "-c",
                 "import os; print(os.getuid(), os.access('/input', os.W_OK), "
                 "os.access('/opt/submission/results', os.W_OK), os.access('/opt/submission/model.zip', os.W_OK))"],
                timeout=300)
        assert r.stdout.split() == ["1000", "False", "False", "False"], _tail(r)
    finally:
        _sh(["docker", "rmi", "-f", image], timeout=300)

    t = time.monotonic()
    work = tmp_path / "w"
    r = _sh([nnunet_command("nnunet-ext"), "submission", "test", sub, "--input", inp, "--work", work], timeout=1800,
            env=env)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "PASS", _tail(r)
    timings["submission test"] = time.monotonic() - t
    local = work / "run_001" / "output" / "phantom_005.nii.gz"
    a, b = sitk.ReadImage(str(result)), sitk.ReadImage(str(local))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(a, get)() == getattr(b, get)(), get
    assert _digest(inp) == before
    timings["total"] = time.monotonic() - t_all
    _report(capsys, timings)
