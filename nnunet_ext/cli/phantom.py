"""``nnunet-ext phantom``: a synthetic MS-lesion dataset in nnU-Net raw format."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.core import validate

COMMANDS = ("phantom",)


def register(sub) -> None:
    p = options.verb(sub, "phantom", "write a synthetic MS-lesion dataset in nnU-Net raw format", [
        "nnunet-ext phantom -d 501 --cases 20 --shape 64 64 64 --seed 0",
        "nnunet-ext phantom -d 502 --cases 10 --raters 3 --soft",
        "nnunet-ext phantom -d 503 --cases 10 --timepoints 2",
        "nnunet-ext phantom -d 504 --cases 10 --site-spacing 1 1 1 --site-spacing 1 1 3",
        "nnunet-ext phantom -d 505 --cases 12 --cohort all --cohort no_small"])
    options.add_dataset(p, help="the new dataset's id (1-999) or DatasetXXX_Name", old="--dataset-id")
    p.add_argument("--name", default=None, help="dataset name (folder Dataset<ID>_<NAME>; default MSPhantom or "
                                                "the name in -d)")
    p.add_argument("--cases", type=int, default=20, help="training cases (imagesTr/labelsTr; default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="held-out cases (imagesTs/labelsTs; default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"),
                   help="image size in voxels (default 64 64 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm (default 1 1 1)")
    p.add_argument("--difficulty", default="medium", help="easy, medium (default), hard, or a number in [0, 1]")
    p.add_argument("--raters", type=int, default=0, help="also write this many rater masks per case")
    p.add_argument("--soft", action="store_true", help="also write partial-volume soft labels in [0, 1]")
    p.add_argument("--timepoints", type=int, default=1, choices=(1, 2),
                   help="2: two FLAIR channels, label = new lesions at time point 2")
    p.add_argument("--new-lesions", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"),
                   help="with --timepoints 2: new lesions in a case that has any (75 %% of cases; default 1 4)")
    p.add_argument("--site-spacing", type=float, nargs=3, action="append", default=None, metavar=("X", "Y", "Z"),
                   help="add a site with this spacing (repeat); cases are assigned to sites in turn")
    p.add_argument("--cohort", action="append", default=None, choices=("all", "no_small"),
                   help="add a cohort with this labelling protocol (repeat); cases are assigned to cohorts in turn, "
                        "no_small training labels omit lesions of <= 10 voxels; writes cohorts.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    options.add_processes(p, 1)
    options.add_overwrite(p, "an existing non-empty dataset folder as a whole")


def check(args) -> None:
    dataset_id, name = options.new_dataset(args, args.name)
    validate.dataset_name(name or "MSPhantom", "--name")
    validate.count(args.cases, "--cases", 1, validate.MAX_CASES)
    validate.count(args.test_cases, "--test-cases", 0, validate.MAX_CASES)
    if args.cases + args.test_cases > validate.MAX_CASES:
        raise ValueError(f"--cases + --test-cases must be at most {validate.MAX_CASES}, got "
                         f"{args.cases + args.test_cases}")
    validate.shape(args.shape, "--shape", max_voxels=256 ** 3)
    validate.spacing(args.spacing, "--spacing")
    for s in args.site_spacing or ():
        validate.spacing(s, "--site-spacing")
    validate.integer(args.raters, "--raters", 0, validate.MAX_RATERS)
    lo, hi = args.new_lesions
    if not 0 < lo <= hi <= 1000:
        raise ValueError(f"--new-lesions must be 0 < MIN <= MAX <= 1000, got {lo} {hi}")
    if tuple(args.new_lesions) != (1, 4) and args.timepoints != 2:
        raise ValueError("--new-lesions needs --timepoints 2")
    validate.integer(args.seed, "--seed", 0, 2 ** 32 - 1)


def run(args) -> int:
    from nnunet_ext.cli.common import raw_folder
    from nnunet_ext.data.phantom import PhantomConfig, parse_difficulty, write_phantom_dataset

    dataset_id, name = options.new_dataset(args, args.name)
    raw = raw_folder(args)
    cfg = PhantomConfig(shape=args.shape, spacing=args.spacing, difficulty=parse_difficulty(args.difficulty),
                        raters=args.raters, soft=args.soft, timepoints=args.timepoints, new_lesions=tuple(args.new_lesions),
                        sites=tuple(args.site_spacing or ()), cohorts=tuple(args.cohort or ()), seed=args.seed)
    root = write_phantom_dataset(raw_root=raw, dataset_id=dataset_id, n_train=args.cases, cfg=cfg,
                                 n_test=args.test_cases, name=name or "MSPhantom", num_workers=args.num_processes,
                                 overwrite=args.overwrite)
    print(f"wrote {root}")
    return 0
