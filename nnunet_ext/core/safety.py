"""Writing outputs safely: never over an input, atomically, one writer at a time.

* :func:`check_output_not_input` -- refuse an output that is, lies inside, or contains an input.
* :func:`output_lock` -- an exclusive ``flock`` on ``.<name>.lock`` beside an output; a second run on the
  same output fails at once with :class:`OutputLocked` naming the holder (the lock dies with its process,
  also on SIGKILL, so there is nothing to clean up by hand).
* :func:`staged_folder` -- build a folder under a hidden staging name beside the target and move it into
  place at the end (an atomic exchange where the kernel supports ``renameat2``); a non-empty target is
  refused unless ``overwrite``, with ``overwrite`` the old content is removed as a whole (no stale files);
  on any exception, Ctrl-C or SIGTERM the staging folder is removed and the target is untouched; staging
  folders left by a SIGKILL are removed by the next run (under the lock).
* :func:`atomic_output` -- the one atomic writer: a unique temporary sibling (``.tmp_<pid>_<random>_<name>``,
  the file ending kept) to write to, renamed over the target when the block ends, removed otherwise;
  :func:`atomic_write_text`, :func:`atomic_write_bytes` and :func:`atomic_copy` are built on it, and
  :func:`parse_temporary` recognises its names (a killed run's leftovers).
* :func:`worker_pool` -- a process pool whose workers die with their parent and ignore Ctrl-C (the parent
  handles it and terminates them).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Iterable


class OutputLocked(RuntimeError):
    """Another process is writing the same output."""


def _resolved(p) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(p))))


def check_output_not_input(output, inputs: Iterable, *, allow_inside: bool = False, allow_containing: bool = False,
                           what: str = "output") -> None:
    """ValueError unless ``output`` is disjoint from every path in ``inputs`` (symlinks resolved).

    Refused: the output equals an input, lies inside an input folder (unless ``allow_inside``), or contains
    an input (replacing the output would delete it; ``allow_containing`` for commands that only add files to
    their output folder, never remove it). ``None`` entries of ``inputs`` are skipped."""
    out = _resolved(output)
    for i in inputs:
        if i is None:
            continue
        inp = _resolved(i)
        if out == inp:
            raise ValueError(f"{what} {output} is also an input ({i}); choose another {what} path")
        if inp in out.parents and not allow_inside:
            raise ValueError(f"{what} {output} lies inside the input {i}; choose a path outside the inputs")
        if out in inp.parents and not allow_containing:
            raise ValueError(f"{what} {output} contains the input {i}; writing it could destroy the input, "
                             f"choose another {what} path")


TMP_PREFIX = ".tmp_"
_TMP_NAME = re.compile(r"^\.tmp_(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?_(?:[0-9a-f]{8,12}_)?(?P<name>.+)$")


def host_tag() -> str:
    """This machine's name as it appears in host-tagged temporary names (letters, digits, ``-``)."""
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def unique_name(path, tag: str = "tmp", host: bool = False) -> Path:
    """A per-process, per-call temporary sibling of ``path`` that keeps its name (and so its file ending):
    ``.<tag>_<pid>[@<host>]_<random>_<name>`` (``host``: for files several machines may write at once)."""
    path = Path(path)
    who = f"{os.getpid()}@{host_tag()}" if host else str(os.getpid())
    return path.with_name(f".{tag}_{who}_{uuid.uuid4().hex[:12]}_{path.name}")


def parse_temporary(name: str) -> dict | None:
    """``{"pid", "host", "name"}`` of a temporary name of :func:`unique_name` (also the older
    ``.tmp_<pid>_<name>`` form; ``host`` None when it names none); None for any other name."""
    m = _TMP_NAME.match(name)
    return None if m is None else {"pid": int(m["pid"]), "host": m["host"], "name": m["name"]}


@contextlib.contextmanager
def atomic_output(path, host: bool = False):
    """Yield a temporary sibling of ``path`` (:func:`unique_name`) to write; it replaces ``path`` when the
    block ends without an exception and is removed otherwise, so ``path`` is never half-written."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_name(path, host=host)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path, data: bytes, host: bool = False) -> None:
    with atomic_output(path, host) as tmp:
        tmp.write_bytes(data)


def atomic_copy(src, dst, link: bool = False) -> None:
    """Copy ``src`` to ``dst`` (or, with ``link``, a symlink to ``src``'s resolved path) atomically."""
    with atomic_output(dst) as tmp:
        if link:
            os.symlink(Path(src).resolve(), tmp)
        else:
            shutil.copy2(src, tmp)


def check_output_file(path, what: str = "output") -> None:
    """ValueError naming ``path`` when it cannot become a file: it is a folder, or one of its parents is a
    file. (Called before the work starts, so a wrong path costs nothing.)"""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path (e.g. {path / 'results.json'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
            break


def atomic_write_text(path, text: str, host: bool = False) -> None:
    """Write ``text`` to ``path`` through a unique temporary sibling and ``os.replace``."""
    with atomic_output(path, host) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def lock_path_for(target) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(lock_file, what=None):
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the block; OutputLocked when another
    process holds it. ``flock`` on POSIX; elsewhere (Windows) ``msvcrt.locking`` of the file's first byte."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() if hasattr(os, "pread") else "?"
            except OSError:
                holder = "?"
            raise OutputLocked(f"{what or lock_file} is being written by another nnunet-ext run (pid {holder or '?'}, "
                               f"lock {lock_file}); wait for it to finish or choose another output") from None
        if hasattr(os, "pwrite"):  # the holder's pid, for the message of a second run (POSIX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_exclusive(fd: int) -> None:
    """A non-blocking exclusive lock on ``fd`` that ends with the process; BlockingIOError when taken."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError(fd) from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not Linux (TypeError: Windows has no CDLL(None))
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def check_target(target, overwrite: bool, what: str = "output") -> None:
    """The rule for a folder a command creates: absent or empty, or ``overwrite``."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{what} {target} exists and is not a folder; choose another path")
    if target.is_dir() and not _is_empty_dir(target) and not overwrite:
        raise ValueError(f"{what} {target} already exists and is not empty; pass --overwrite to replace it "
                         f"(its whole content is removed) or choose another path")


def clean_stale(target) -> None:
    """Remove staging / retired folders of ``target`` left by killed runs (call under the target's lock)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target, *, overwrite: bool = False, lock: bool = True, lock_file=None, inputs: Iterable = (),
                  what: str = "output"):
    """Yield a fresh staging folder; on success it becomes ``target`` (see module docstring).

    ``inputs`` are checked with :func:`check_output_not_input` first."""
    target = Path(target)
    check_output_not_input(target, inputs, what=what)
    check_target(target, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    cm = output_lock(lock_file or lock_path_for(target), what=f"{what} {target}") if lock else contextlib.nullcontext()
    with cm:
        check_target(target, overwrite, what)  # again, under the lock
        clean_stale(target)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = target.parent / f".{target.name}.staging-{tag}"
        staging.mkdir()
        try:
            yield staging
            if target.exists():
                old = target.parent / f".{target.name}.old-{tag}"
                if _exchange(staging, target):
                    staging.rename(old)  # the exchanged old content now sits under the staging name
                else:
                    target.rename(old)
                    staging.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent ends (Linux PR_SET_PDEATHSIG; nothing elsewhere); exits at
    once when the parent has already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError, TypeError):  # not Linux
        pass
    if os.name == "posix" and os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init() -> None:
    """Pool worker: die with the parent (Linux PR_SET_PDEATHSIG), leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


@contextlib.contextmanager
def worker_pool(n: int):
    """A ``multiprocessing`` pool of ``n`` workers that end with their parent; terminated (not joined) when
    the block raises, Ctrl-C and SIGTERM included."""
    import multiprocessing as mp

    if not can_fork():
        raise ValueError(f"{n} worker processes need a POSIX system (Linux); on this system use 1 "
                         f"(-np 1 / --num-processes 1)")
    pool = mp.get_context("fork").Pool(n, initializer=_worker_init)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    else:
        pool.close()
        pool.join()


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM / SIGHUP so that cleanup (``finally``) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminated_handler(signum, frame):
    _stop_guarded_children()
    raise Terminated(signum)


def interrupted_handler(signum, frame):
    """Ctrl-C in the ``nnunet-ext`` command: its guarded children end first (threads waiting for them return at
    once, so unwinding never waits for a training to finish), then KeyboardInterrupt as usual."""
    _stop_guarded_children()
    raise KeyboardInterrupt


def _stop_guarded_children() -> None:
    """End the process groups of this process's guarded children (:mod:`nnunet_ext.core.guard`)."""
    import sys

    guard = sys.modules.get("nnunet_ext.core.guard")  # none started when it was never imported
    if guard is not None:
        guard.stop_all()


def _default_termination_in_forked_child() -> None:
    """In a process forked from one of ours (nnU-Net's fork pools among them), SIGTERM / SIGHUP end the
    process again: a pool's ``terminate()`` must end a worker blocked on the pool's queue lock, and a
    worker that unwinds a :class:`Terminated` instead was seen to stay blocked there, so that ``terminate``
    then waited for it forever."""
    for s in _termination_signals():
        try:
            if signal.getsignal(s) is _terminated_handler:
                signal.signal(s, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
    if _CONSOLE:  # helpers forked by the console command (pool workers, multiprocessing managers) end with it
        die_with_parent()
    _restore_mask_after_fork()


def _block_termination_before_fork() -> None:
    """While a process forks, SIGTERM / SIGHUP wait (blocked, not lost): in the child they are delivered
    only once :func:`_default_termination_in_forked_child` has put the default action back. One arriving in
    between (a pool's ``terminate()`` right after the pool started, on a loaded machine) reached the Python
    handler instead and was lost: the worker stayed blocked on the pool's queue lock and ``terminate()``
    waited for it forever."""
    if hasattr(signal, "pthread_sigmask"):
        _FORK_MASK.old = signal.pthread_sigmask(signal.SIG_BLOCK, _termination_signals())


def _restore_mask_after_fork() -> None:
    """The signal mask the forking thread had before :func:`_block_termination_before_fork` (parent and child)."""
    old = getattr(_FORK_MASK, "old", None)
    if old is not None:
        _FORK_MASK.old = None
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_FORK_MASK = threading.local()
_AT_FORK = []
_CONSOLE = []


def can_fork() -> bool:
    """Whether this system forks processes (POSIX); nnunet-ext's worker pools and launchers need it."""
    import multiprocessing as mp

    return os.name == "posix" and hasattr(os, "fork") and "fork" in mp.get_all_start_methods()


def _termination_signals() -> tuple:
    """SIGTERM, and SIGHUP where it exists (not on Windows)."""
    return tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def install_termination_handlers(console: bool = False) -> None:
    """SIGTERM / SIGHUP -> :class:`Terminated` (exit status 128 + signal in the CLI), in this process only:
    forked children get the default action back. ``console``: this process is the ``nnunet-ext`` command;
    the processes it forks from now on also die with it (SIGKILL included), so none is left orphaned."""
    if console and not _CONSOLE:
        _CONSOLE.append(True)
    if not _AT_FORK and hasattr(os, "register_at_fork"):  # POSIX only; nothing forks elsewhere
        os.register_at_fork(before=_block_termination_before_fork, after_in_parent=_restore_mask_after_fork,
                            after_in_child=_default_termination_in_forked_child)
        _AT_FORK.append(True)
    for s in _termination_signals():
        try:
            signal.signal(s, _terminated_handler)
        except (ValueError, OSError):  # not the main thread
            pass


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), children first (Linux ``/proc``; [] elsewhere)."""
    pid = os.getpid() if pid is None else pid
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def kill_descendants() -> None:
    """SIGKILL every process this one started (nnU-Net's preprocessing and export workers, their manager):
    the console command does this when it is interrupted, before those workers notice their parent going
    and print tracebacks of their own. Every file they write is atomic, so nothing half-written is left."""
    for k in descendants():
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"resource_tracker" in f.read():  # multiprocessing's / loky's: it cleans up after us
                    continue
            os.kill(k, signal.SIGKILL)
        except OSError:  # gone already, or not ours to kill
            pass

