"""How the command line ends: one line per expected error, exit codes, Ctrl-C and SIGTERM.

* an expected error (bad input or argument, missing or damaged file, unwritable output, ITK, archive or
  checkpoint error, another run holding the output's lock) -> ``nnunet-ext: error: <file>: <what> ...``
  on one line, exit status 2;
* ``--debug`` (anywhere on the command line) or ``NNUNET_EXT_DEBUG=1`` -> the full traceback as well;
* Ctrl-C -> ``nnunet-ext: interrupted``, exit status 130, no traceback; SIGTERM / SIGHUP -> exit status
  128 + signal. Both unwind normally, so staging folders and temporary files are removed;
* any other exception is a bug: one line saying so, exit status 1 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

EXIT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def _expected_types() -> tuple[type, ...]:
    import pickle
    import zipfile

    types = [ValueError, OSError, RuntimeError, NotImplementedError, EOFError, zipfile.BadZipFile,
             pickle.UnpicklingError, MemoryError]
    try:
        import tarfile

        types.append(tarfile.TarError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def format_error(e: BaseException) -> str:
    """One line naming the file (when known) and what to do."""
    import pickle
    import zipfile

    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        f = e.filename
        if isinstance(e, PermissionError):
            return f"{f}: permission denied; make it writable (or readable) or choose another path"
        if isinstance(e, IsADirectoryError):
            return f"{f} is a folder; give a file path"
        if isinstance(e, NotADirectoryError):
            return f"{f}: a part of this path is a file, not a folder; choose another path"
        if isinstance(e, FileExistsError):  # mkdir over a file: a file given where a folder is expected
            if os.path.lexists(f) and not os.path.isdir(f):
                return f"{f} is a file, not a folder; give a folder path there (or move the file away)"
            return f"{f} exists already; choose another path or remove it"
        if getattr(e, "errno", None) == 28:
            return f"{f}: no space left on the device; free some space and run again"
        if getattr(e, "errno", None) == 30:
            return f"{f}: read-only file system; choose a writable output path"
        return f"{f}: {e.strerror or e}"
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        return f"{e.filename} not found"
    if isinstance(e, zipfile.BadZipFile):
        return f"damaged zip archive ({_one_line(e)}); re-create or download it again"
    if isinstance(e, pickle.UnpicklingError) or (isinstance(e, EOFError) and "pickle" in traceback.format_exc()):
        return f"damaged checkpoint or pickle file ({_one_line(e) or type(e).__name__}); re-create it (train or copy again)"
    if isinstance(e, MemoryError):
        return "out of memory; use smaller shapes / fewer cases or a machine with more memory"
    if isinstance(e, RuntimeError) and ("itk::" in str(e) or "ITK" in str(e)):
        from nnunet_ext.core.io import _itk_message

        return f"ITK: {_itk_message(e)}"
    msg = _one_line(e)
    return msg or type(e).__name__


def _warning_line(message, category, filename, lineno, line=None):
    return f"nnunet-ext: warning: {_one_line(message)}\n"


def run_cli(run, argv: list[str], console: bool = False) -> int:
    """Run ``run(argv)`` with the error contract above; returns the exit status. ``console``: this process is
    the ``nnunet-ext`` command itself; when it is interrupted, the processes it started are ended first
    (:func:`nnunet_ext.core.safety.kill_descendants`). Not for in-process callers, whose other children are theirs."""
    from nnunet_ext.core.safety import Terminated, install_termination_handlers, kill_descendants

    debug = "--debug" in argv or os.environ.get("NNUNET_EXT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    install_termination_handlers(console=console)
    saved_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _warning_line
    try:
        if console and getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_interrupted_early":
            from nnunet_ext.core.safety import interrupted_handler

            signal.signal(signal.SIGINT, interrupted_handler)  # nnunet_ext.cli._console's, until here
        rc = run(argv)
        return 0 if rc is None else int(rc)
    except KeyboardInterrupt:
        if console:
            kill_descendants()
        if debug:
            traceback.print_exc()
        print("nnunet-ext: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as t:
        if console:
            kill_descendants()
        if debug:
            traceback.print_exc()
        print(f"nnunet-ext: terminated by signal {t.signum}", file=sys.stderr)
        return 128 + t.signum
    except _expected_types() as e:
        if debug:
            traceback.print_exc()
        print(f"nnunet-ext: error: {format_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug
        if debug:
            traceback.print_exc()
        print(f"nnunet-ext: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              f"traceback and report it)", file=sys.stderr)
        return EXIT_BUG
    finally:
        warnings.formatwarning = saved_format
        sys.stdout.flush()
