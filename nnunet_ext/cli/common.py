"""What several commands print or resolve alike (not options: those are in :mod:`nnunet_ext.cli.options`)."""
from __future__ import annotations

import os


def print_launched(res: dict) -> None:
    """What a launcher run did: Slurm job ids (or the dry run), or the local stages."""
    if res["launcher"] == "slurm":
        ids = {k: v for k, v in res["stages"].items() if v}
        print(("submitted " + ", ".join(f"{k}={v}" for k, v in ids.items())) if ids else "nothing submitted")
    print(f"scripts, markers and logs: {res['workdir']} (nnunet-ext jobs status {res['workdir']})")


def raw_folder(args) -> str:
    """``--raw`` or ``$nnUNet_raw``; exits with a message when neither is given."""
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise SystemExit("error: set nnUNet_raw or pass --raw")
    return raw


def refuse_beside(what: str, args, opts: dict, models: str = "model(s)") -> None:
    """``what`` (``--selection``, ``--consensus``) chooses the models and folds: any of ``opts``
    (destination -> flag) given as well is an error."""
    given = [flag for dest, flag in opts.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ValueError(f"{what} chooses the {models} and folds; drop {' '.join(given)}")


SELECTION_CHOOSES = {"configuration": "-c", "trainer": "-tr", "plans": "-p", "folds": "-f", "cohort": "--cohort"}


def add_selection_option(p, verb: str) -> None:
    p.add_argument("--selection", nargs="?", const="", default=None, metavar="FILE",
                   help=f"{verb} the model or ensemble `nnunet-ext select` chose, with its threshold and minimum "
                        f"lesion size (default file $nnUNet_results/<Dataset>/nnunet_ext_selection.json); "
                        f"replaces -c -tr -p -f")
