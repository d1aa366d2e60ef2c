"""Which systems run which commands.

nnunet-ext is developed and tested on Linux. Its commands that start and stop processes (nnU-Net training and
prediction workers, local and Slurm launchers, Docker) rely on POSIX: ``fork``, process groups, signals such as
SIGHUP and SIGKILL, ``flock`` and Linux's ``/proc``. The commands that only read and write files also run
elsewhere (Windows included) with one process (``-np 1``); the others stop there with one line that says so.
"""
from __future__ import annotations

import os
import sys

# commands that read and write files only (one process each; -np above 1 needs fork)
FILE_COMMANDS = ("trainers-path", "phantom", "convert", "fuse", "split", "preprocess-soft", "evaluate",
                 "operating-points", "lesion-metrics", "select")


def is_posix() -> bool:
    """Whether this is a POSIX system with ``fork`` (Linux, and other Unix-like systems)."""
    from nnunet_ext.core.safety import can_fork

    return can_fork()


def check_command(command: str, num_processes: int | None = None) -> None:
    """NotImplementedError (one line) when ``command`` (with ``num_processes`` worker processes) needs POSIX
    and this system is not; checked before any work starts."""
    if is_posix():
        return
    if command in FILE_COMMANDS:
        if num_processes is not None and num_processes > 1:
            raise NotImplementedError(f"-np {num_processes}: worker processes need Linux (POSIX fork); on "
                                      f"{sys.platform} use -np 1")
        return
    raise NotImplementedError(
        f"`nnunet-ext {command}` needs Linux (POSIX processes, signals and file locks); this system is "
        f"{sys.platform} ({os.name}). Run it under Linux or WSL2; here these commands work: "
        f"{', '.join(FILE_COMMANDS)}")
