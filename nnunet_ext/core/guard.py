"""Child processes that end with the command that started them, however it ends (Ctrl-C, SIGTERM, SIGKILL).

    python -m nnunet_ext.core.guard PARENT_PID -- COMMAND [ARGS ...]

runs ``COMMAND`` as the child of a small guard process. :func:`popen` starts the guard as the leader of a
new process group, so the command and every process it starts (nnU-Net's training and its data-loader
workers, the predictor's pre-/post-processing workers, a launcher's stage script) share that group. The
guard checks four times a second whether ``PARENT_PID`` is still its parent; when the parent has gone
(even by SIGKILL, which no handler sees) it sends SIGTERM to the group, and SIGKILL after
:data:`GRACE_S` seconds. The parent's own way out (Ctrl-C, SIGTERM, an error) is :func:`stop`: the whole
group at once. The guard exits with the command's exit status (128 + signal when a signal ended it).

Nothing here works on Windows (no process groups there): :func:`popen` then starts the command directly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 2.0
POLL_S = 0.25


def guarded(argv: list[str], parent: int | None = None) -> list[str]:
    """``argv`` run under the guard, watching ``parent`` (default: this process)."""
    if os.name != "posix":
        return list(argv)
    return [sys.executable, "-m", "nnunet_ext.core.guard", str(os.getpid() if parent is None else parent), "--",
            *map(str, argv)]


_LIVE: set = set()  # guard processes started by this process and not reaped yet


def popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of ``argv`` under the guard, as the leader of a new process group (stop it, and
    everything it started, with :func:`stop`; :func:`stop_all` stops every one still running)."""
    if os.name != "posix":
        proc = subprocess.Popen(list(argv), **kwargs)
    else:
        proc = subprocess.Popen(guarded(argv), start_new_session=True, **kwargs)
    _LIVE.add(proc)
    return proc


def stop_all(sig: int = signal.SIGKILL) -> None:
    """:func:`stop` every :func:`popen` child of this process that is still running (the command line does
    this on Ctrl-C and SIGTERM, before it unwinds: threads waiting for those children then return at once)."""
    for proc in list(_LIVE):
        if proc.poll() is None:  # not reaped: its pid (and process group id) cannot belong to anyone else
            stop(proc, sig)
        else:
            _LIVE.discard(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """End the process group of a :func:`popen` child (the guard, its command and their children)."""
    if proc.returncode is not None:  # reaped already: its pid may belong to another process now
        _LIVE.discard(proc)
        return
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _end_group(grace: float = GRACE_S) -> None:
    """SIGTERM to every other process of this group, SIGKILL after ``grace`` seconds (this guard with them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace and _others_in_group():
        time.sleep(0.05)
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(137)


def _others_in_group() -> bool:
    """Whether a process of this group other than this one is still running (Linux ``/proc``; True where
    that cannot be told, so the grace period is waited out)."""
    me, group = os.getpid(), os.getpgrp()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: python -m nnunet_ext.core.guard PARENT_PID -- COMMAND [ARGS ...]\n")
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    if os.getpgrp() != os.getpid():  # started without a group of its own: make one
        try:
            os.setsid()
        except OSError:
            pass
    if os.getppid() != parent:  # the parent has gone before the guard started
        return 137
    # a terminal's Ctrl-C never reaches this group (a session of its own); SIGTERM / SIGHUP to the guard end
    # the group like the parent's death does
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda *_: _end_group())
    signal.signal(signal.SIGINT, lambda *_: _end_group())
    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        sys.stderr.write(f"nnunet-ext: error: {cmd[0]}: cannot run it ({e.strerror or e})\n")
        return 127
    while True:
        try:
            rc = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            _end_group()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
