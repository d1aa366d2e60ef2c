"""Progress of the long commands (phantom, convert, fuse, preprocess-soft, evaluate, operating-points, predict,
compare, ...): a tqdm bar when standard output is a terminal, plain lines when it is not (a log file, a pipe,
a Slurm job's output), nothing with ``--quiet``.

* default: on a terminal one bar per loop; elsewhere one line ``<label>: <done>/<total> <unit>`` at the first
  item, at every tenth of the loop and at the last item (at most 12 lines per loop);
* ``--verbose``: one plain line per item, with the item's name when the loop gives it (also on a terminal);
* ``--quiet``: no progress output (results and errors are still printed).

The level lives in the environment variable ``NNUNET_EXT_VERBOSITY`` (0 quiet, 1 default, 2 verbose), so that
the processes a command starts follow it. Progress goes to standard output, where it always went; standard
error stays for warnings and the one-line error of a failed command.
"""
from __future__ import annotations

import os
import sys

QUIET, NORMAL, VERBOSE = 0, 1, 2
ENV = "NNUNET_EXT_VERBOSITY"


def verbosity() -> int:
    """The current level: ``NNUNET_EXT_VERBOSITY`` (0, 1 or 2), 1 when unset or not one of those."""
    v = os.environ.get(ENV, "").strip()
    return int(v) if v in ("0", "1", "2") else NORMAL


def set_verbosity(level: int) -> None:
    if level not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"verbosity must be 0 (quiet), 1 or 2 (verbose), got {level!r}")
    os.environ[ENV] = str(level)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress:
    """``with Progress("evaluate", total=n) as bar: ... bar.update(item=case)``; see the module docstring.

    ``enabled=False`` (a caller's ``progress=False``) silences it like ``--quiet``."""

    def __init__(self, label: str, total: int, unit: str = "cases", enabled: bool = True, stream=None):
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = stream if stream is not None else sys.stdout
        self.level = verbosity() if enabled else QUIET
        self.done = 0
        self._bar = None
        self._next_line = 1
        if self.level == NORMAL and self.total > 0 and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=" " + unit, file=self.stream, leave=True,
                             dynamic_ncols=True)

    def _line(self, item) -> None:
        name = f" ({item})" if item is not None and self.level == VERBOSE else ""
        self.stream.write(f"{self.label}: {self.done}/{self.total} {self.unit}{name}\n")
        self.stream.flush()

    def update(self, n: int = 1, item=None) -> None:
        """``n`` more items are done (``item``: the last one's name, shown with ``--verbose``)."""
        self.done += n
        if self.level == QUIET:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.level == VERBOSE or self.done >= self._next_line or self.done >= self.total:
            self._line(item)
            step = max(1, -(-self.total // 10))  # ceil(total / 10)
            self._next_line = (self.done // step + 1) * step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, label: str, total: int | None = None, unit: str = "cases", enabled: bool = True):
    """Iterate over ``iterable`` with a :class:`Progress` (``total`` defaults to ``len(iterable)``)."""
    if total is None:
        total = len(iterable)
    with Progress(label, total, unit, enabled) as bar:
        for x in iterable:
            yield x
            bar.update(item=x if isinstance(x, (str, os.PathLike)) else None)


_CURRENT: list = []  # the loop that step() is reporting on: [label, Progress]


def step(label: str, done: int, total: int, enabled: bool = True, item=None, unit: str = "cases",
         stream=None) -> None:
    """For a loop that counts ``done`` = 1, 2, ..., ``total``: report that ``done`` items are finished.

    The first call of a loop (``done`` of 1, or a new ``label``) starts its :class:`Progress` (on ``stream``,
    default standard output); the call with ``done == total`` ends it."""
    if not _CURRENT or _CURRENT[0] != label or done <= _CURRENT[1].done:
        end()
        _CURRENT[:] = [label, Progress(label, total, unit, enabled, stream)]
    bar = _CURRENT[1]
    bar.update(done - bar.done, item=item)
    if done >= total:
        end()


def end(label: str | None = None) -> None:
    """End the loop that :func:`step` reports on (a no-op when it has ended; ``label``: only that loop)."""
    if _CURRENT and (label is None or _CURRENT[0] == label):
        _CURRENT[1].close()
        _CURRENT.clear()
