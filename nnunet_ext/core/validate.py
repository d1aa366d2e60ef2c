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


# ---------------------------------------------------------------------------------------------- CLI


def _dataset_ref(value, what: str) -> str:
    """``-d`` of commands that take an existing dataset: an id 1..999 or ``Dataset<ID>_<name>``."""
    s = str(value)
    if s.isdigit():
        dataset_id(int(s), what)
        return s
    m = re.fullmatch(r"Dataset(\d{3})_([A-Za-z0-9_-]+)", s)
    if not m:
        raise ValueError(f"{what} must be a dataset id (1-999) or a name Dataset<ID>_<name>, got {value!r}")
    dataset_id(int(m.group(1)), what)
    return s


def check_cli_args(args) -> None:
    """Validate the parsed options of the commands that write datasets (phantom, fuse, convert,
    preprocess-soft, consensus split-raters) and results (evaluate, operating-points, compare, consensus
    predict / evaluate: never into or onto an input), naming the option. Options that a chosen variant would
    ignore are errors (``NotImplementedError``) instead of being dropped without a word."""
    cmd = getattr(args, "command", None)
    for t in getattr(args, "thresholds", None) or ():  # operating-points, compare, select
        probability(t, "--thresholds")
        if not 0 < t < 1:
            raise ValueError(f"--thresholds must lie strictly between 0 and 1, got {t}")
    if cmd == "evaluate" and getattr(args, "soft_ref", None) is not None and getattr(args, "prob", None) is None:
        raise NotImplementedError("--soft-ref without --prob: the soft reference is compared with predicted "
                                  "probabilities; add --prob FOLDER (or drop --soft-ref)")
    device = getattr(args, "device", None)
    if device is not None and cmd in ("predict", "pseudolabel", "compare", "consensus", "submission"):
        import re

        if not re.fullmatch(r"(cpu|mps|cuda(:\d+)?)", str(device)):
            raise ValueError(f"-device must be cpu, cuda (or cuda:N) or mps, got {device!r}")
    if cmd == "predict":
        if args.threshold is not None:
            finite(args.threshold, "--threshold")
            if not 0 < args.threshold < 1:
                raise ValueError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
        if args.min_lesion_mm3 is not None:
            finite(args.min_lesion_mm3, "--min-lesion-mm3", low=0.0)
        workers(args.num_processes, "-np/--num-processes")
        for opt in ("npp", "nps"):
            if getattr(args, opt) is not None:
                workers(getattr(args, opt), f"-{opt}")
    if cmd == "phantom":
        dataset_id(args.dataset_id, "-d/--dataset-id")
        dataset_name(args.name, "--name")
        count(args.cases, "--cases", 1, MAX_CASES)
        count(args.test_cases, "--test-cases", 0, MAX_CASES)
        if args.cases + args.test_cases > MAX_CASES:
            raise ValueError(f"--cases + --test-cases must be at most {MAX_CASES}, got {args.cases + args.test_cases}")
        shape(args.shape, "--shape", max_voxels=256 ** 3)
        spacing(args.spacing, "--spacing")
        for s in args.site_spacing or ():
            spacing(s, "--site-spacing")
        integer(args.raters, "--raters", 0, MAX_RATERS)
        integer(args.seed, "--seed", 0, 2 ** 32 - 1)
        workers(args.num_processes, "-np/--num-processes")
    elif cmd == "fuse":
        probability(args.gamma, "--gamma")
        finite(args.radius_mm, "--radius-mm", high=20.0, positive=True)
        integer(args.channel, "--channel", 0, 9999)
        rim = args.method in ("soft_rim", "inter_soft_union_rim")
        if rim and args.images is None:
            raise ValueError(f"--method {args.method} needs --images (the FLAIR its rim is gated by)")
        if not rim and args.images is not None:
            raise NotImplementedError(f"--images is only used by --method soft_rim / inter_soft_union_rim, "
                                      f"not by {args.method}")
        if not rim and args.channel != 0:
            raise NotImplementedError(f"--channel is only used by the rim methods, not by {args.method}")
        if not rim and args.radius_mm != 1.0:
            raise NotImplementedError(f"--radius-mm is only used by the rim methods, not by {args.method}")
        if args.method not in ("inter_soft_union", "soft_rim", "inter_soft_union_rim") and args.gamma != 0.5:
            raise NotImplementedError(f"--gamma is not used by --method {args.method}")
        from nnunet_ext.core.safety import check_output_not_input

        check_output_not_input(args.output, list(args.raters) + [args.images], what="-o/--output")
    elif cmd == "convert":
        dataset_id(args.dataset_id, "-d/--dataset-id")
        if args.name is not None:
            dataset_name(args.name, "--name")
        if args.label is not None and args.challenge != "isbi2015":
            raise NotImplementedError(f"--label only applies to isbi2015 (two raters); {args.challenge} labels are "
                                      f"fixed (see `nnunet-ext convert --help`)")
        if getattr(args, "subtraction", False) and args.challenge != "msseg2":
            raise NotImplementedError(f"--subtraction (follow-up minus baseline) needs two time points: it applies to "
                                      f"msseg2, not {args.challenge}")
        if args.test_input is not None and args.challenge not in ("wmh2017", "msseg2"):
            raise NotImplementedError(f"--test-input is supported for wmh2017 and msseg2, not {args.challenge} "
                                      f"(its test release has no masks; convert it as a separate dataset)")
        from nnunet_ext.core.safety import check_output_not_input

        for src in (args.input, args.test_input):
            if src is not None and args.raw is not None:
                check_output_not_input(args.raw, [src], what="--raw")
    elif cmd == "split":
        _dataset_ref(args.dataset, "-d")
        if args.check:
            given = [f for f, v in (("-nfolds", args.n_folds), ("--seed", args.seed), ("--overwrite", args.overwrite))
                     if v not in (None, False)]
            if given:
                raise NotImplementedError(f"--check validates the existing split and writes nothing; "
                                          f"drop {' '.join(given)}")
        if args.n_folds is not None:
            integer(args.n_folds, "-nfolds", 2, 100)
        if args.seed is not None:
            integer(args.seed, "--seed", 0, 2 ** 32 - 1)
    elif cmd == "preprocess-soft":
        _dataset_ref(args.dataset, "-d/--dataset")
        if args.raters and args.soft_dir != "softlabelsTr":
            raise NotImplementedError("--soft-dir and --raters exclude each other (--raters reads ratersTr/<rater>/)")
        if ".." in args.soft_dir.split("/") or args.soft_dir.startswith("/"):
            raise ValueError(f"--soft-dir must be a folder inside the raw dataset, got {args.soft_dir!r}")
    elif cmd in ("evaluate", "operating-points"):
        from pathlib import Path

        from nnunet_ext.core.safety import check_output_not_input

        out = Path(args.output)
        if cmd == "evaluate":
            inputs = [args.ref, args.pred, args.prob, args.soft_ref]
            written = [out, out.with_suffix(".csv")] + ([out.with_suffix(".reliability.png")] if args.prob else [])
        else:
            inputs = [args.ref, args.prob]
            written = [out, Path(args.png) if args.png else out.with_suffix(".png")]
        from nnunet_ext.core.safety import check_output_file

        for w in written:  # a file path; never into an input folder, never onto an input
            what = "-o/--output" if w == out else f"-o/--output's {w.name}"
            check_output_file(w, what)
            check_output_not_input(w, inputs, what=what)
    elif cmd == "compare" and args.output is not None:
        from nnunet_ext.core.safety import check_output_not_input

        check_output_not_input(args.output, [args.test_images, args.test_labels], what="-o/--output")
    elif cmd == "consensus" and getattr(args, "consensus_command", None) in ("predict", "evaluate"):
        from nnunet_ext.core.safety import check_output_not_input

        if args.consensus_command == "predict":
            check_output_not_input(args.output, [args.input], what="-o")
        elif args.output is not None:
            check_output_not_input(args.output, [args.pred, args.ref, args.raters], what="-o/--output")
    elif cmd == "consensus" and getattr(args, "consensus_command", None) == "split-raters":
        _dataset_ref(args.dataset, "-d")
        integer(args.folds, "--folds", 2, 100)
        if args.first_id is not None:
            dataset_id(args.first_id, "--first-id")
