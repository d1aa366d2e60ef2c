"""``nnunet-ext convert``: a public challenge dataset -> an nnU-Net raw dataset."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.core import validate

COMMANDS = ("convert",)
CHALLENGES = {"wmh2017": "WMH2017", "isbi2015": "ISBI2015", "msseg2016": "MSSEG2016", "msseg2": "MSSEG2"}


def register(sub) -> None:
    p = options.verb(sub, "convert", "convert a public challenge dataset to an nnU-Net raw dataset", [
        "nnunet-ext convert wmh2017 -i WMH/training -d 521 [--test-input WMH/test]",
        "nnunet-ext convert msseg2 -i segmentation_challenge_miccai21/training -d 540"])
    p.add_argument("challenge", choices=tuple(CHALLENGES), help="which challenge's layout -i holds")
    options.add_input(p, "the challenge's training folder (never modified)")
    options.add_dataset(p, help="the new dataset's id (1-999) or DatasetXXX_Name", old="--dataset-id")
    p.add_argument("--name", default=None, help="dataset name (default: the challenge's, or the name in -d)")
    p.add_argument("--test-input", default=None,
                   help="wmh2017, msseg2: a labelled test folder -> imagesTs/labelsTs (never modified)")
    p.add_argument("--label", default=None, choices=("rater1", "rater2", "intersection", "union"),
                   help="isbi2015 only: which rater mask(s) become labelsTr (default rater1; both are kept in ratersTr)")
    p.add_argument("--subtraction", action="store_true",
                   help="msseg2 only: add channel 2, follow-up minus baseline after z-scoring each time point over "
                        "its nonzero voxels (0 where either is 0); nnU-Net does not normalise it again (noNorm)")
    p.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    options.add_overwrite(p, "an existing non-empty dataset folder as a whole")


def check(args) -> None:
    _, name = options.new_dataset(args, args.name)
    if name is not None:
        validate.dataset_name(name, "--name")
    if args.label is not None and args.challenge != "isbi2015":
        raise NotImplementedError(f"--label only applies to isbi2015 (two raters); {args.challenge} labels are "
                                  f"fixed (see `nnunet-ext convert --help`)")
    if args.subtraction and args.challenge != "msseg2":
        raise NotImplementedError(f"--subtraction (follow-up minus baseline) needs two time points: it applies to "
                                  f"msseg2, not {args.challenge}")
    if args.test_input is not None and args.challenge not in ("wmh2017", "msseg2"):
        raise NotImplementedError(f"--test-input is supported for wmh2017 and msseg2, not {args.challenge} "
                                  f"(its test release has no masks; convert it as a separate dataset)")
    from nnunet_ext.core.safety import check_output_not_input

    for src in (args.input, args.test_input):
        if src is not None and args.raw is not None:
            check_output_not_input(args.raw, [src], what="--raw")


def run(args) -> int:
    from nnunet_ext.cli.common import raw_folder
    from nnunet_ext.dataset_conversion import isbi2015, msseg2, msseg2016, wmh2017

    dataset_id, name = options.new_dataset(args, args.name)
    common = dict(source=args.input, raw_root=raw_folder(args), dataset_id=dataset_id, overwrite=args.overwrite,
                  name=name or CHALLENGES[args.challenge])
    if args.challenge == "wmh2017":
        root = wmh2017.convert(**common, test_source=args.test_input)
    elif args.challenge == "isbi2015":
        root = isbi2015.convert(**common, label=args.label or "rater1")
    elif args.challenge == "msseg2":
        root = msseg2.convert(**common, test_source=args.test_input, subtraction=args.subtraction)
    else:
        root = msseg2016.convert(**common)
    print(f"wrote {root}")
    return 0
