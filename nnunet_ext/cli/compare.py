"""``nnunet-ext compare``: trainers side by side with the same split, budget and data; paired bootstrap CIs;
a Markdown + JSON + PNG report."""
from __future__ import annotations

import shlex

from nnunet_ext.cli import options
from nnunet_ext.cli.evaluate import add_rule_options
from nnunet_ext.cluster.launcher import add_launcher_arguments, launcher_options

COMMANDS = ("compare",)
_PARSER = []  # the parser register() made: the report's command line is written from it


def register(sub) -> None:
    p = options.verb(sub, "compare", "train/predict/evaluate trainers side by side: same split, budget and data; "
                                     "paired bootstrap CIs; Markdown + JSON + PNG report", [
        "nnunet-ext compare -d 501 -c 2d -tr ExtBaselineTrainer LSRTrainer LSRDiceTrainer -f 0 1 2 3 4 -o cmp",
        "nnunet-ext compare -d 501 -c 2d -tr ExtBaselineTrainer LSRDiceTrainer -f 0 --epochs 20 --iterations 20 "
        "-device cpu --test-images imagesTs --test-labels labelsTs -o cmp"],
        note="The first trainer is the reference arm. Re-running continues where a run stopped.")
    options.add_dataset(p)
    options.add_configuration(p)
    options.add_trainer(p, many=True, default=None, required=True,
                        help="trainers (arms); the first is the reference. cascade:TRAINER is the dataset's consensus "
                             "cascade (nnunet-ext consensus; both stages with TRAINER), against a test set; DATASET:TRAINER is TRAINER "
                             "trained on another dataset (id or name: a pseudo-labelled student, other labels), against a "
                             "test set")
    options.add_folds(p, options.FOLDS_SPLIT, help="folds trained per arm")
    options.add_plans(p)
    p.add_argument("--test-images", default=None, help="held-out images (<case>_0000.nii.gz); default: validation folds")
    p.add_argument("--test-labels", default=None, help="their labels (<case>.nii.gz)")
    options.add_output(p, "folder", required=False, help="the report (default compare_<dataset>_<configuration>)")
    p.add_argument("--epochs", type=int, default=None, help="training budget for every arm (NNUNET_EXT_NUM_EPOCHS)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (NNUNET_EXT_ITERATIONS)")
    p.add_argument("--val-iterations", type=int, default=None, help="NNUNET_EXT_VAL_ITERATIONS")
    options.add_device(p, old="--device")
    options.add_processes(p, 2, "nnU-Net pre/post-processing processes")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--train-seed", type=int, default=None, metavar="N",
                   help="seed every training (NNUNET_EXT_SEED=N: random, numpy and torch seeded, data augmentation in "
                        "seeded workers in a fixed order, deterministic algorithms): the same seed gives the same weights on the "
                        "same device; slower than unseeded training on CPU. Default: nnU-Net's unseeded training")
    options.add_thresholds(p, "sweep thresholds in (0, 1) (default 0.01 ... 0.98)")
    add_rule_options(p, detailed=False, detection=False)
    p.add_argument("--create-split", action="store_true",
                   help="write nnU-Net's default 5-fold split when splits_final.json is missing")
    p.add_argument("--cohort", default=None, help="cohort to predict SCIN arms in")
    p.add_argument("--disable_tta", action="store_true",
                   help="predict every arm without mirroring, as nnUNetv2_predict --disable_tta (4x fewer forward "
                        "passes in 2d, 8x in 3d)")
    p.add_argument("--soft-reference", default=None, metavar="DIR",
                   help="folder of <case> rater-average maps of the evaluated cases: adds each arm's Brier score against "
                        "them and the thesis' pooled ECE, with paired intervals (calibration studies)")
    add_launcher_arguments(p)
    _PARSER[:] = [p]


def check(args) -> None:
    if args.output is not None:
        from nnunet_ext.core.safety import check_output_not_input

        check_output_not_input(args.output, [args.test_images, args.test_labels], what="-o/--output")


def run(args) -> int:
    from nnunet_ext.metrics.lesions import parse_bins
    from nnunet_ext.workflows.compare import CompareConfig, compare

    if args.folds is None:
        args.folds = options.split_folds(args.dataset)
    command_line = "nnunet-ext compare " + shlex.join(options.argv_of(_PARSER[0], args))
    try:
        compare(CompareConfig(
            dataset=args.dataset, configuration=args.configuration, trainers=args.trainers, folds=args.folds,
            plans=args.plans, test_images=args.test_images, test_labels=args.test_labels, output=args.output,
            epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
            device=args.device, n_proc=args.num_processes, n_bootstrap=args.bootstrap, seed=args.seed,
            train_seed=args.train_seed,
            thresholds=args.thresholds, connectivity=args.connectivity, bins=parse_bins(args.bins),
            create_split=args.create_split, cohort=args.cohort, soft_reference=args.soft_reference,
            disable_tta=args.disable_tta,
            launcher_options=launcher_options(args),
            command_line=command_line))
    except NotImplementedError as e:
        raise ValueError(str(e)) from None
    return 0
