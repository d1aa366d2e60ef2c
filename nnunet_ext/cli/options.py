"""The options that several commands share, each declared once here; every verb module adds them with these
helpers, so every command spells, types and defaults them the same way.

The convention (``nnunet-ext COMMAND --help`` shows it per command):

* ``-d/--dataset``: an nnU-Net dataset id (1-999) or name ``DatasetXXX_Name``, for every command; the commands
  that write a new dataset (``phantom``, ``convert``, ``demo``) take its id from either form.
* ``-f/--folds``: folds as integers or ``all``. Default: every fold; for a command that uses trained models,
  every trained fold (those with the checkpoint; ``nnUNetv2_predict``'s default is 0 1 2 3 4), for a command
  that trains, every fold of the split (0 1 2 3 4 with nnU-Net's 5-fold split). The demo is a fixed recipe
  (fold 0).
* ``-o/--output``: a folder, except for the commands whose result is one JSON file (``evaluate``,
  ``operating-points``, ``select``, ``consensus evaluate``): there ``-o`` is that file, and what comes with it
  (a CSV, a PNG) is written beside it under the same name.
* ``-i/--input``, ``-c/--configuration``, ``-p/--plans``, ``-tr/--trainer`` (``--trainers`` where a command
  takes several), ``-chk``, ``-device`` and ``-npp``/``-nps`` as ``nnUNetv2_predict`` spells and defaults them
  (``-device cuda``, ``-npp 3``, ``-nps 3`` or ``$nnUNet_npp``/``$nnUNet_nps``); ``-np/--num-processes``: the
  command's own worker processes; ``--overwrite``; ``--quiet``/``--verbose``/``--debug`` anywhere on the line.
* an older spelling stays accepted as a hidden alias that prints one warning line (:func:`deprecated`).

Checks that need more than argparse are declared with the option (:data:`CHECKS`, by destination) and run by
:func:`check` after parsing, before the command's own ``check``.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings

from nnunet_ext.core import validate
from nnunet_ext.core.paths import CHECKPOINT  # noqa: F401 (the one definition; commands import it from here)

NNUNET_FOLDS = (0, 1, 2, 3, 4)

# -f's default, in the words of each kind of command
FOLDS_TRAINED = "every trained fold (those with the checkpoint; nnUNetv2_predict's default is 0 1 2 3 4)"
FOLDS_SPLIT = "every fold of the split (0 1 2 3 4 with nnU-Net's 5-fold split)"

# the commands whose -o is one JSON file (the others: a folder)
FILE_OUTPUT = ("evaluate", "operating-points", "select", "consensus evaluate")


# ---------------------------------------------------------------------------------------------- parsers


def verb(sub, name: str, help: str, examples: str | list[str] = (), note: str = "") -> argparse.ArgumentParser:
    """A command's parser with its one-line help and an ``example(s):`` epilog."""
    lines = [examples] if isinstance(examples, str) else list(examples)
    epilog = ("example:\n" if len(lines) == 1 else "examples:\n") + "".join(f"  {e}\n" for e in lines) if lines else ""
    return sub.add_parser(name, help=help, description=help, epilog=(epilog + note).rstrip() or None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


class _Warns:
    """Mixed into an option's action by :func:`deprecated`: warns when an older spelling was used."""

    deprecated: dict

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            warnings.warn(f"{option_string} is deprecated; use {self.deprecated[option_string]}", FutureWarning,
                          stacklevel=2)
        super().__call__(parser, namespace, values, option_string)


def deprecated(p: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Accept ``old`` as a hidden spelling of the option ``new`` (the same action: destination, type, arity,
    required) that prints ``nnunet-ext: warning: OLD is deprecated; use NEW``."""
    if old in p._option_string_actions:
        raise ValueError(f"{old} is an option of its own here")
    p._option_string_actions[old] = new
    if not isinstance(new, _Warns):
        new.__class__ = type(f"Deprecating{type(new).__name__}", (_Warns, type(new)), {})
        new.deprecated = {}
    new.deprecated[old] = "/".join(new.option_strings)


def _alias(p, action, old):
    for o in ([old] if isinstance(old, str) else old):
        deprecated(p, o, action)
    return action


def add_global_options(parser: argparse.ArgumentParser) -> None:
    from nnunet_ext import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output, only results and errors (also accepted after the command)")
    parser.add_argument("--verbose", action="store_true",
                        help="one progress line per case, and nnU-Net's own per-case output during prediction "
                             "(also accepted after the command)")


# ---------------------------------------------------------------------------------------------- types


def fold(text: str):
    """nnU-Net's fold argument: an integer >= 0 or ``all``."""
    if text == "all":
        return text
    if not re.fullmatch(r"\d+", text):
        raise argparse.ArgumentTypeError(f"a fold is an integer >= 0 or 'all', got {text!r}")
    return int(text)


def _env_int(name: str, default: int) -> int:
    """nnU-Net's ``_getDefaultValue``: an integer from the environment, else ``default``."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


# ---------------------------------------------------------------------------------------------- options


def add_dataset(p, required: bool = True, default=None, help: str = "nnU-Net dataset id or name (DatasetXXX_Name)",
                old=()) -> argparse.Action:
    return _alias(p, p.add_argument("-d", "--dataset", required=required, default=default, help=help), old)


def add_folds(p, rule: str = FOLDS_TRAINED, default=None, help: str = "folds", old=()) -> argparse.Action:
    """``rule``: :data:`FOLDS_TRAINED` (commands that use trained models) or :data:`FOLDS_SPLIT` (commands that
    train); the default ``None`` means that rule (resolved by :func:`trained_folds` / :func:`split_folds`)."""
    a = p.add_argument("-f", "--folds", nargs="+", type=fold, default=default, metavar="FOLD",
                       help=f"{help}: integers or 'all' (default: {rule})")
    return _alias(p, a, old)


def add_output(p, kind: str, required: bool = True, default=None, help: str = "") -> argparse.Action:
    """``kind``: ``folder`` or ``file`` (one JSON result; only the commands of :data:`FILE_OUTPUT`)."""
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
    what = "output folder" if kind == "folder" else "result JSON file"
    return p.add_argument("-o", "--output", required=required, default=default, metavar="FOLDER" if kind == "folder"
                          else "FILE.json", help=f"{what}{': ' + help if help else ''}")


def add_input(p, help: str, required: bool = True) -> argparse.Action:
    return p.add_argument("-i", "--input", required=required, metavar="FOLDER", help=help)


def add_configuration(p, many: bool = False, required: bool = True, default=None, help: str = "",
                      old=()) -> argparse.Action:
    text = help or ("nnU-Net configurations" if many else "nnU-Net configuration, e.g. 2d or 3d_fullres")
    a = p.add_argument("-c", "--configuration", nargs="+" if many else None, required=required, default=default,
                       dest="configurations" if many else "configuration", help=text)
    return _alias(p, a, old)


def add_plans(p, default="nnUNetPlans", help: str = "", old=()) -> argparse.Action:
    text = help or f"plans identifier (default {default or 'nnUNetPlans'})"
    return _alias(p, p.add_argument("-p", "--plans", default=default, help=text), old)


def add_trainer(p, many: bool = False, default="nnUNetTrainer", required: bool = False, help: str = "",
                old=()) -> argparse.Action:
    if many:
        a = p.add_argument("-tr", "--trainers", nargs="+", default=default, required=required,
                           help=help or "trainer classes")
    else:
        a = p.add_argument("-tr", "--trainer", default=default, required=required,
                           help=help or f"trainer class (default {default or 'nnUNetTrainer'})")
    return _alias(p, a, old)


def add_checkpoint(p) -> argparse.Action:
    return p.add_argument("-chk", default=CHECKPOINT, dest="checkpoint",
                          help=f"checkpoint file of each fold (default {CHECKPOINT}, as nnUNetv2_predict)")


def add_device(p, default: str = "cuda", help: str = "", old=()) -> argparse.Action:
    text = help or f"cpu, cuda (or cuda:N) or mps (default {default}, as nnUNetv2_predict)"
    return _alias(p, p.add_argument("-device", default=default, help=text), old)


def add_processes(p, default=1, help: str = "worker processes") -> argparse.Action:
    return p.add_argument("-np", "--num-processes", type=int, default=default,
                          help=f"{help} (default {default})" if default is not None else help)


def add_prediction_processes(p) -> None:
    """``-npp``/``-nps`` as ``nnUNetv2_predict`` (resolved by :func:`prediction_processes`; after ``-np``
    where the command has it: ``-np N`` then sets both)."""
    np_ = "; -np when given" if "-np" in p._option_string_actions else ""
    p.add_argument("-npp", type=int, default=None,
                   help=f"preprocessing processes (default 3 or $nnUNet_npp, as nnUNetv2_predict{np_})")
    p.add_argument("-nps", type=int, default=None,
                   help=f"segmentation export processes (default 3 or $nnUNet_nps, as nnUNetv2_predict{np_})")


def add_overwrite(p, what: str = "an existing non-empty output folder as a whole") -> argparse.Action:
    return p.add_argument("--overwrite", action="store_true", help=f"replace {what} (default: refuse)")


def add_thresholds(p, help: str = "probability thresholds in (0, 1)") -> argparse.Action:
    return p.add_argument("--thresholds", type=float, nargs="+", default=None, help=help)


def add_file_ending(p, what: str = "masks") -> argparse.Action:
    """``--file-ending``: the image format of the files a command reads (and writes), one of
    nnunet_ext.core.io.FILE_ENDINGS, read through SimpleITK with the same geometry checks."""
    from nnunet_ext.core.io import FILE_ENDINGS

    return p.add_argument("--file-ending", default=".nii.gz", choices=FILE_ENDINGS, dest="file_ending",
                          help=f"image format of the {what}: {', '.join(FILE_ENDINGS)} (default .nii.gz)")


# ---------------------------------------------------------------------------------------------- checks


def _device(v) -> None:
    if not re.fullmatch(r"(cpu|mps|cuda(:\d+)?)", str(v)):
        raise ValueError(f"-device must be cpu, cuda (or cuda:N) or mps, got {v!r}")


def _thresholds(values) -> None:
    for t in values:
        validate.probability(t, "--thresholds")
        if not 0 < t < 1:
            raise ValueError(f"--thresholds must lie strictly between 0 and 1, got {t}")


CHECKS = {  # destination of a shared option -> its check (ValueError naming the option)
    "dataset": lambda v: validate.dataset_ref(v, "-d/--dataset"),
    "device": _device,
    "num_processes": lambda v: validate.workers(v, "-np/--num-processes"),
    "npp": lambda v: validate.workers(v, "-npp"),
    "nps": lambda v: validate.workers(v, "-nps"),
    "thresholds": _thresholds,
}


def check(args: argparse.Namespace) -> None:
    """The declared checks of the shared options present (not None) in ``args``."""
    for dest, fn in CHECKS.items():
        if getattr(args, dest, None) is not None:
            fn(getattr(args, dest))


# ---------------------------------------------------------------------------------------------- defaults


def new_dataset(args, name=None) -> tuple[int, str | None]:
    """``-d`` of a command that writes a new dataset: its id, and its name when ``-d`` gave one (which must
    agree with ``--name``)."""
    m = re.fullmatch(r"Dataset(\d{3})_([A-Za-z0-9_-]+)", str(args.dataset))
    if not m:
        return validate.dataset_id(args.dataset, "-d/--dataset"), name
    if name is not None and name != m.group(2):
        raise ValueError(f"-d {args.dataset} names the dataset {m.group(2)}, --name {name}: give one of them")
    return int(m.group(1)), m.group(2)


def trained_folds(dataset, configuration: str, trainer: str, plans: str, checkpoint: str = CHECKPOINT) -> list:
    """Every fold of a trained model that has ``checkpoint`` (the default of ``-f`` where a model is used)."""
    from nnunet_ext.nnunet_adapter import ModelRef

    return ModelRef(str(dataset), configuration, trainer, plans, checkpoint=checkpoint).available_folds()


def split_folds(dataset) -> list[int]:
    """Every fold of the dataset's ``splits_final.json`` (0..4, nnU-Net's 5-fold split, when there is none
    yet or the dataset is not found: the command then says what is missing)."""
    try:
        from nnunet_ext.core.io import read_json
        from nnunet_ext.nnunet_adapter import preprocessed_folder

        f = preprocessed_folder(dataset) / "splits_final.json"
        return list(range(len(read_json(f)))) if f.is_file() else list(NNUNET_FOLDS)
    except (OSError, RuntimeError, ValueError):
        return list(NNUNET_FOLDS)


def prediction_processes(args) -> tuple[int, int]:
    """(-npp, -nps): given, else ``-np`` when given, else nnUNetv2_predict's defaults."""
    n = getattr(args, "num_processes", None)
    npp = args.npp if args.npp is not None else n if n is not None else _env_int("nnUNet_npp", 3)
    nps = args.nps if args.nps is not None else n if n is not None else _env_int("nnUNet_nps", 3)
    return npp, nps


# ---------------------------------------------------------------------------------------------- argv


def argv_of(parser: argparse.ArgumentParser, args: argparse.Namespace, drop=()) -> list[str]:
    """The options of ``args`` that differ from ``parser``'s defaults, as a command line that ``parser``
    parses back to ``args`` (hidden aliases and the destinations in ``drop`` left out)."""
    out: list[str] = []
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.dest in drop or isinstance(a, (argparse._HelpAction,
                                                                            argparse._VersionAction)):
            continue
        v = getattr(args, a.dest, None)
        if not a.option_strings:  # positional
            out += [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
            continue
        if v == a.default or v is None:
            continue
        flag = a.option_strings[0]
        if a.nargs == 0:
            out.append(flag)
        elif isinstance(a, argparse._AppendAction):
            for item in v:
                out += [flag, *map(str, item)] if isinstance(item, (list, tuple)) else [f"{flag}={item}"]
        elif a.nargs == "?" and v == a.const:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, repr(v) if isinstance(v, float) else str(v)]
    return out
