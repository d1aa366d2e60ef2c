"""The ``nnunet-ext`` console script's entry point: as little as possible runs before Ctrl-C is handled.

Until :func:`nnunet_ext.cli.main.main` has taken over (its imports take a moment), Ctrl-C ends the command with
``nnunet-ext: interrupted`` and exit status 130 instead of a KeyboardInterrupt traceback from inside an
import. Processes that ``multiprocessing`` spawns from the command re-import this module (the console
script is their ``__mp_main__``); in them, Ctrl-C is left to the command, which ends its workers itself
(nnunet_ext.core.errors.run_cli), and they die with it (also when it is SIGKILLed).
"""
import _signal  # the C module: ``signal`` itself builds enums first, a window in which Ctrl-C would escape
import os
import sys


def _interrupted_early(signum, frame):  # pragma: no cover - timing-dependent, tested through a subprocess
    sys.stderr.write("nnunet-ext: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # first, before any slower import
    _signal.signal(_signal.SIGINT, _interrupted_early)

import signal  # noqa: E402

import multiprocessing  # noqa: E402

if multiprocessing.current_process().name != "MainProcess":
    # a worker spawned by the command (nnU-Net's preprocessing and export workers): a terminal's Ctrl-C
    # reaches the whole process group; without this each worker would print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from nnunet_ext.core.safety import die_with_parent

    die_with_parent()


def main() -> None:
    from nnunet_ext.cli.main import main as cli_main

    cli_main()  # errors.run_cli puts Python's KeyboardInterrupt back once it can report it (exit status 130)
