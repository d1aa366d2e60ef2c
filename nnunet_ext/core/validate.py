"""Argument validation, in one place: every check raises ``ValueError`` naming the argument.

The library functions call these with their parameter names; the CLI calls them with the option names
(``--spacing``), so a user sees the option they typed.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

DATASET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_CASES = 10000
MAX_SHAPE = 1024
MAX_VOXELS = 512 ** 3
MAX_RATERS = 32
MAX_WORKERS = 256


def dataset_name(name: str, what: str = "name") -> str:
    """A dataset name for ``Dataset<ID>_<name>``: letters, digits, ``_`` and ``-`` only (no path parts)."""
    if not isinstance(name, str) or not DATASET_NAME.match(name) or len(name) > 200:
        raise ValueError(f"{what} must match [A-Za-z0-9_-]+ (at most 200 characters), got {name!r}")
    return name


def dataset_id(value, what: str = "dataset id") -> int:
    """An nnU-Net dataset id, 1..999."""
    v = integer(value, what)
    if not 1 <= v <= 999:
        raise ValueError(f"{what} must be in 1..999, got {value!r}")
    return v


def integer(value, what: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (int, integral float or digit string) within ``[low, high]``."""
    if isinstance(value, bool):
        v = None
    elif isinstance(value, int):
        v = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        v = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        v = int(value)
    else:
        v = None
    if v is None:
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


def finite(value, what: str, low: float | None = None, high: float | None = None, *,
           positive: bool = False) -> float:
    """A finite float, optionally > 0 and within ``[low, high]``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be > 0, got {v:g}")
    if (low is not None and v < low) or (high is not None and v > high):
        if high is None:
            raise ValueError(f"{what} must be >= {low:g}, got {v:g}")
        if low is None:
            raise ValueError(f"{what} must be <= {high:g}, got {v:g}")
        raise ValueError(f"{what} must be in [{low:g}, {high:g}], got {v:g}")
    return v


def probability(value, what: str) -> float:
    return finite(value, what, 0.0, 1.0)


def spacing(values: Sequence, what: str = "spacing", n: int = 3, high: float = 100.0) -> tuple[float, ...]:
    """``n`` finite spacings in (0, ``high``] mm."""
    values = tuple(values)
    if len(values) != n:
        raise ValueError(f"{what} needs {n} values, got {len(values)}")
    return tuple(finite(v, what, high=high, positive=True) for v in values)


def shape(values: Sequence, what: str = "shape", low: int = 16, high: int = MAX_SHAPE,
          max_voxels: int = MAX_VOXELS) -> tuple[int, ...]:
    """Three sizes in ``low..high`` with at most ``max_voxels`` voxels in all (memory bound)."""
    values = tuple(values)
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values, got {len(values)}")
    out = tuple(integer(v, what, low, high) for v in values)
    if math.prod(out) > max_voxels:
        raise ValueError(f"{what} {out} has {math.prod(out)} voxels, more than the limit {max_voxels}")
    return out


def count(value, what: str, low: int = 1, high: int = MAX_CASES) -> int:
    return integer(value, what, low, high)


def workers(value, what: str = "--num-processes") -> int:
    return integer(value, what, 1, MAX_WORKERS)


# ---------------------------------------------------------------------------------------------- datasets


def dataset_ref(value, what: str = "-d/--dataset") -> str:
    """A dataset as nnU-Net's ``-d`` takes it: an id 1..999 or ``Dataset<ID>_<name>``."""
    s = str(value)
    if s.isdigit():
        dataset_id(int(s), what)
        return s
    m = re.fullmatch(r"Dataset(\d{3})_([A-Za-z0-9_-]+)", s)
    if not m:
        raise ValueError(f"{what} must be a dataset id (1-999) or a name Dataset<ID>_<name>, got {value!r}")
    dataset_id(int(m.group(1)), what)
    return s


def options_of(cls, options, fields: dict, what: str):
    """``options`` (an instance of the dataclass ``cls``, or None for its defaults) with ``fields`` (its field
    names as keywords) replaced: a function that takes a parameter object also takes its fields as keywords.
    An unknown keyword is a TypeError naming ``what``, as Python's own."""
    from dataclasses import fields as dataclass_fields, replace

    known = {f.name for f in dataclass_fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {unknown}")
    return replace(options if options is not None else cls(), **fields)
