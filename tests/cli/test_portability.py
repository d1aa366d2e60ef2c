"""On a system without POSIX process calls (Windows) the package imports, the file commands work and the
others stop with one line. Simulated in a subprocess: no ``fcntl``, no ``os.fork`` / ``os.register_at_fork``
/ ``os.pread`` / ``os.pwrite``, no ``signal.SIGHUP``; ``msvcrt.locking`` stands in for the file lock (the
call nnunet-ext makes there)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import os, signal, subprocess, sys, fcntl as _posix_fcntl
    sys.modules["fcntl"] = None
    class _Msvcrt:  # an exclusive non-blocking lock that fails with OSError when taken, as msvcrt.locking
        LK_NBLCK = 2
        @staticmethod
        def locking(fd, mode, n):
            _posix_fcntl.flock(fd, _posix_fcntl.LOCK_EX | _posix_fcntl.LOCK_NB)
    sys.modules["msvcrt"] = _Msvcrt
    for name in ("fork", "register_at_fork", "pread", "pwrite"):
        delattr(os, name)
    del signal.SIGHUP
""")


def _nnunet_ext(tmp_path, *args, extra=""):
    code = PRELUDE + extra + "\nsys.argv = ['nnunet-ext'] + sys.argv[1:]\nfrom nnunet_ext.cli._console import main\nmain()\n"
    env = {k: v for k, v in os.environ.items() if k != "NNUNET_EXT_VERBOSITY"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # three commands in subprocesses (seconds, no nnU-Net training)
def test_file_commands_work_without_posix(tmp_path):
    r = _nnunet_ext(tmp_path, "trainers-path")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert os.path.isfile(os.path.join(r.stdout.strip(), "ext_baseline.py"))
    r = _nnunet_ext(tmp_path, "phantom", "-d", 7, "--cases", 2, "--shape", 24, 24, 24, "--raw", tmp_path / "raw")
    assert r.returncode == 0, r.stderr
    labels = tmp_path / "raw" / "Dataset007_MSPhantom" / "labelsTr"
    r = _nnunet_ext(tmp_path, "evaluate", "--ref", labels, "--pred", labels, "-o", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert [c["dice"] for c in res["per_case"].values()] == [1.0, 1.0]  # a mask against itself


@pytest.mark.slow
def test_lock_still_refuses_a_second_writer(tmp_path):
    """The stand-in lock is taken by this process first: the command's own lock on the same output fails,
    with the one-line message (no pid: there is no pread without POSIX)."""
    out = tmp_path / "raw" / "Dataset007_MSPhantom"
    hold = (f"\nfd = os.open({str(tmp_path / 'raw' / '.Dataset007.lock')!r}, os.O_RDWR | os.O_CREAT)"
            f"\n_posix_fcntl.flock(fd, _posix_fcntl.LOCK_EX)\n")
    (tmp_path / "raw").mkdir()
    r = _nnunet_ext(tmp_path, "phantom", "-d", 7, "--cases", 2, "--shape", 24, 24, 24, "--raw", tmp_path / "raw",
                    extra=hold)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "being written by another nnunet-ext run (pid ?" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["predict", "-i", "x", "-o", "y", "-d", "1", "-c", "2d"], "`nnunet-ext predict` needs Linux"),
    pytest.param(["demo"], "`nnunet-ext demo` needs Linux", marks=pytest.mark.slow),
    (["phantom", "-d", "7", "--cases", "2", "--shape", "24", "24", "24", "-np", "2", "--raw", "raw"],
     "-np 2: worker processes need Linux"),
])
def test_other_commands_stop_with_one_line(tmp_path, args, needle):
    r = _nnunet_ext(tmp_path, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nnunet-ext: error: ") and needle in lines[0], \
        r.stderr
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
