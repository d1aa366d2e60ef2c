"""``nnunet-ext split``: cross-validation folds that keep every subject (or site) whole -> nnU-Net's
``splits_final.json``; pseudo-labelled cases only ever in training."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.core import validate

COMMANDS = ("split",)


def register(sub) -> None:
    p = options.verb(sub, "split", "cross-validation folds that keep every subject (or site) whole -> nnU-Net's "
                                   "splits_final.json; pseudo-labelled cases only ever in training", [
        "nnunet-ext split -d 531                      # subjects from case_groups.json (nnunet-ext convert)",
        "nnunet-ext split -d 521 --group-by site -nfolds 3   # leave one site out",
        "nnunet-ext split -d 531 --pattern '^(training\\d+)_'  # subject = the first (...) group",
        "nnunet-ext split -d 531 --csv subjects.csv      # columns case,subject",
        "nnunet-ext split -d 531 --check                 # validate the existing splits_final.json"])
    options.add_dataset(p)
    p.add_argument("--group-by", choices=("subject", "site"), default="subject",
                   help="what must never be on both sides of a fold (default subject)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pattern", default=None, help="regular expression searched in each case id: its first (...) "
                                                   "group (or whole match) is the case's subject/site")
    g.add_argument("--csv", default=None, dest="csv_file", help="CSV with a header and the columns case and "
                                                                "subject (or site)")
    p.add_argument("-nfolds", "--nfolds", type=int, default=None, dest="n_folds", help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fold assignment (default 12345, nnU-Net's)")
    options.add_overwrite(p, "an existing splits_final.json that differs")
    p.add_argument("--check", action="store_true",
                   help="only validate the existing splits_final.json (no subject on both sides of a fold, no "
                        "pseudo-labelled case in val)")


def check(args) -> None:
    if args.check:
        given = [f for f, v in (("-nfolds", args.n_folds), ("--seed", args.seed), ("--overwrite", args.overwrite))
                 if v not in (None, False)]
        if given:
            raise NotImplementedError(f"--check validates the existing split and writes nothing; "
                                      f"drop {' '.join(given)}")
    if args.n_folds is not None:
        validate.integer(args.n_folds, "-nfolds", 2, 100)
    if args.seed is not None:
        validate.integer(args.seed, "--seed", 0, 2 ** 32 - 1)


def run(args) -> int:
    from nnunet_ext.workflows import splits

    if args.check:
        res = splits.check_existing(args.dataset, group_by=args.group_by, pattern=args.pattern, csv_file=args.csv_file)
        print(splits.format_split(res))
        if res["unused"]:
            print(f"note: {len(res['unused'])} training case(s) are in no fold, e.g. {res['unused'][0]}")
        print(f"{res['file']}: {len(res['splits'])} folds, no {args.group_by} on both sides of a fold, no "
              f"pseudo-labelled case in val")
        return 0
    res = splits.make_split(args.dataset, group_by=args.group_by, pattern=args.pattern, csv_file=args.csv_file,
                            n_folds=5 if args.n_folds is None else args.n_folds,
                            seed=12345 if args.seed is None else args.seed, overwrite=args.overwrite)
    print(splits.format_split(res))
    for f in res["written"]:
        print(f"wrote {f}")
    for f in res["unchanged"]:
        print(f"{f} already holds this split")
    return 0
