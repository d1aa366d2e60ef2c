"""``nnunet-ext`` command line: the verbs, one module each (or one per small group of related verbs), assembled
and dispatched here.

A verb module exposes ``COMMANDS`` (the names it adds), ``register(subparsers)`` (its parser: a help line for
every option and an examples epilog; shared options through :mod:`nnunet_ext.cli.options`), optionally
``check(args)`` (checks that need more than argparse: one ``ValueError`` naming the option) and
``run(args) -> int`` (calls the importable function the verb runs, prints what it did, returns the exit
status). A new verb is a new module listed in :data:`VERBS`.
"""
from __future__ import annotations

import argparse
import signal
import sys
from importlib import import_module

# the verb modules of nnunet_ext.cli, in the order `nnunet-ext --help` lists their commands
VERBS = ("trainers_path", "phantom", "evaluate", "validation", "fuse", "preprocess", "train", "predict",
         "pseudolabel", "submission", "convert", "split", "consensus", "compare", "jobs", "demo")

EXAMPLES = """examples:
  export nnUNet_extTrainer=$(nnunet-ext trainers-path)
  nnunet-ext phantom -d 501 --cases 20 --test-cases 6 --shape 64 64 64 --seed 0
  nnUNetv2_plan_and_preprocess -d 501 -c 2d -np 2
  nnUNetv2_train 501 2d 0 -tr ExtBaselineTrainer -device cpu
  nnUNetv2_predict -i $nnUNet_raw/Dataset501_MSPhantom/imagesTs -o pred -d 501 -c 2d -f 0 \\
      -tr ExtBaselineTrainer --save_probabilities -device cpu
  nnunet-ext evaluate --ref $nnUNet_raw/Dataset501_MSPhantom/labelsTs --pred pred -o results.json
  nnunet-ext operating-points --ref $nnUNet_raw/Dataset501_MSPhantom/labelsTs --prob pred -o ops.json
  nnunet-ext demo

Options every command spells alike (-d, -f, -o, -c, -p, -tr, -chk, -device, -np/-npp/-nps): see
`nnunet-ext COMMAND --help` and docs/cli.md.
"""


def verb_modules() -> dict:
    """command name -> the module that registers and runs it."""
    out = {}
    for name in VERBS:
        module = import_module(f"nnunet_ext.cli.{name}")
        for command in module.COMMANDS:
            out[command] = module
    return out


def build_parser() -> argparse.ArgumentParser:
    from nnunet_ext.cli import options

    parser = argparse.ArgumentParser(prog="nnunet-ext", description="MS-lesion segmentation methods for nnU-Net v2.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(verb_modules().values()):
        module.register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    import os

    from nnunet_ext.core import progress

    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"--quiet", "--verbose"} & set(argv)
    if len(flags) == 2:
        raise ValueError("--quiet and --verbose exclude each other; give one")
    saved = os.environ.get(progress.ENV)
    if flags:  # accepted anywhere on the command line, like --debug; the processes the command starts follow it
        argv = [a for a in argv if a not in flags]
        progress.set_verbosity(progress.QUIET if "--quiet" in flags else progress.VERBOSE)
    try:
        return _run(argv)
    finally:
        progress.end()
        if flags:
            if saved is None:
                os.environ.pop(progress.ENV, None)
            else:
                os.environ[progress.ENV] = saved


def _run(argv: list[str]) -> int:
    from nnunet_ext.cli import options
    from nnunet_ext.core.paths import resolve_nnunet_folders
    from nnunet_ext.core.platforms import check_command

    args = build_parser().parse_args(argv)
    module = verb_modules()[args.command]
    resolve_nnunet_folders()  # relative nnUNet_* folders: absolute from here on, for this command and its children
    check_command(args.command, getattr(args, "num_processes", None))
    options.check(args)
    if hasattr(module, "check"):
        module.check(args)
    return module.run(args)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors -> one line and exit status 2, Ctrl-C -> 130, ``--debug``
    (anywhere) keeps the traceback (see :mod:`nnunet_ext.core.errors`)."""
    from nnunet_ext.core.errors import run_cli

    rc = run_cli(run, list(sys.argv[1:] if argv is None else argv), console=argv is None)
    # The console command has finished: a late Ctrl-C must not turn success into a traceback. Not when called
    # from Python: ignored signals would be inherited by every process the caller starts later, and
    # nnU-Net's pools (terminate, then join) would then wait forever for their workers.
    if argv is None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    sys.exit(rc)


if __name__ == "__main__":
    main()
