"""``nnunet-ext submission build`` (a challenge submission folder from a trained model) and ``nnunet-ext
submission test`` (its entrypoint run locally and checked)."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.cli.common import SELECTION_CHOOSES, add_selection_option, refuse_beside

COMMANDS = ("submission",)


def register(sub) -> None:
    p = options.verb(sub, "submission", "package a trained model as a challenge submission; test it locally", [
        "nnunet-ext submission build -d 521 -c 3d_fullres -tr LSRTrainer -f 0 1 2 3 4 --challenge wmh2017 "
        "-o wmh_submission",
        "nnunet-ext submission build -d 540 --consensus --challenge msseg2 -o msseg2_cascade",
        "nnunet-ext submission test wmh_submission --input sample_subject/"])
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = options.verb(ssub, "build", "write the submission folder (model, Dockerfile, entrypoint, README)",
                     "nnunet-ext submission build -d 521 -c 3d_fullres -tr LSRTrainer --challenge wmh2017 -o sub")
    options.add_dataset(b)
    options.add_configuration(b, required=False, help="nnU-Net configuration (required unless --selection)")
    options.add_trainer(b, default=None, help="trainer class (default nnUNetTrainer)")
    options.add_plans(b, default=None, help="plans identifier (default nnUNetPlans)")
    options.add_folds(b, help="folds packaged and ensembled")
    add_selection_option(b, "package")
    b.add_argument("--consensus", nargs="?", const="", default=None, metavar="FILE",
                   help="package the trained consensus cascade of -d (every rater model, the consensus model; run as "
                        "`nnunet-ext consensus predict` does): its consensus.json (default: the one in the dataset's raw "
                        "folder) or the folder holding it; replaces -c -tr -p -f")
    options.add_checkpoint(b)
    b.add_argument("--challenge", required=True, choices=("generic", "wmh2017", "msseg2", "isbi2015"),
                   help="the input/output layout the entrypoint follows")
    b.add_argument("--tag", default="nnunet-ext-submission", help="docker image tag used in the README")
    b.add_argument("--cohort", default=None,
                   help="cohort-conditioned (SCIN) models: the cohort whose labelling style the submission predicts in")
    options.add_output(b, "folder", help="the submission folder")
    t = options.verb(ssub, "test", "run the entrypoint locally (no Docker) and check names, geometry, values",
                     "nnunet-ext submission test wmh_submission --input sample_subject/")
    t.add_argument("folder", help="the submission folder `submission build` wrote")
    t.add_argument("--input", required=True, help="sample input in the challenge's layout")
    t.add_argument("--work", default=None,
                   help="keep each run in a fresh WORK/run_<n>/ (output/, entrypoint.log); default: temporary")
    t.add_argument("--timeout", type=float, default=3600.0, help="seconds before the entrypoint is killed (default 3600)")
    options.add_device(t, "cpu", help="cpu, cuda or mps for the entrypoint (default cpu: a local test)")


def check(args) -> None:
    if args.action != "build":
        return
    if args.consensus is not None:
        refuse_beside("--consensus", args, {**SELECTION_CHOOSES, "selection": "--selection"}, models="models")
    elif args.selection is not None:
        refuse_beside("--selection", args, SELECTION_CHOOSES)
    elif args.configuration is None:
        raise ValueError("submission build needs -c CONFIGURATION (or --selection)")


def run(args) -> int:
    from nnunet_ext.workflows import submission

    if args.action == "test":
        return _test(args, submission)
    o = submission.BuildOptions(challenge=args.challenge, checkpoint=args.checkpoint, tag=args.tag)
    if args.consensus is not None:
        out = submission.build(args.output, args.dataset, options=o, consensus=args.consensus)
    elif args.selection is not None:
        out = submission.build(args.output, args.dataset, options=o, selection=args.selection)
    else:
        from dataclasses import replace

        trainer, plans = args.trainer or "nnUNetTrainer", args.plans or "nnUNetPlans"
        folds = args.folds if args.folds is not None else \
            options.trained_folds(args.dataset, args.configuration, trainer, plans, args.checkpoint)
        out = submission.build(args.output, args.dataset, args.configuration, trainer,
                               replace(o, plans=plans, folds=folds, cohort=args.cohort))
    print(f"wrote {out} (see {out / 'README.md'})")
    return 0


def _test(args, submission) -> int:
    res = submission.check_submission(sub_dir=args.folder, input_dir=args.input, work_dir=args.work,
                                      device=args.device, timeout=args.timeout)
    if not res.ok and res.log_tail and not res.rows[0]["ok"]:
        print("entrypoint output (last lines):\n" + res.log_tail)
    print(submission.format_rows(res.rows))
    if res.run_dir is not None:
        print(f"outputs and entrypoint.log in {res.run_dir}")
    print("PASS" if res.ok else "FAIL")
    return 0 if res.ok else 1
