"""``nnunet-ext consensus STEP``: the multi-rater consensus cascade (one nnU-Net per rater, then a consensus
nnU-Net on the images and the rater models' out-of-fold probabilities)."""
from __future__ import annotations

import argparse

from nnunet_ext.cli import options
from nnunet_ext.cluster.launcher import add_launcher_arguments, launcher_options
from nnunet_ext.core import validate

COMMANDS = ("consensus",)


def register(sub) -> None:
    p = options.verb(sub, "consensus", "multi-rater consensus cascade: one nnU-Net per rater, then a consensus nnU-Net", [
        "nnunet-ext consensus split-raters -d 540 -nfolds 5",
        "nnunet-ext consensus train -d 540 --stage 1 -c 3d_fullres -tr LSRTrainer",
        "nnunet-ext consensus build-stage2 -d 540",
        "nnunet-ext consensus train -d 540 --stage 2 -c 3d_fullres",
        "nnunet-ext consensus predict -d 540 -i imagesTs -o pred --keep-rater-predictions",
        "nnunet-ext consensus evaluate -d 540 --pred pred -o cascade_eval.json"])
    csub = p.add_subparsers(dest="consensus_command", required=True, metavar="STEP")
    _register_split_raters(csub)
    _register_train(csub)
    _register_prepare(csub)
    _register_build_stage2(csub)
    _register_predict(csub)
    c = options.verb(csub, "evaluate", "each rater model and the consensus model vs the consensus and each rater",
                     "nnunet-ext consensus evaluate -d 540 --pred pred -o cascade_eval.json")
    options.add_dataset(c, help="source dataset (id or name)")
    c.add_argument("--pred", required=True, help="output folder of `consensus predict --keep-rater-predictions`")
    c.add_argument("--ref", default=None, help="consensus references (default: the source's labelsTs)")
    c.add_argument("--raters", default=None, help="folder of <rater>/ references (default: the source's ratersTs)")
    options.add_output(c, "file", required=False, help="the table of every model against every reference")


def _register_split_raters(csub) -> None:
    c = options.verb(csub, "split-raters", "one raw dataset per ratersTr/<rater>/ folder, shared K-fold split",
                     "nnunet-ext consensus split-raters -d 540 -nfolds 5")
    options.add_dataset(c, help="source dataset (id or name) with ratersTr/")
    nfolds = c.add_argument("-nfolds", "--nfolds", type=int, default=5, dest="n_folds",
                            help="K of the shared K-fold split (default 5)")
    options.deprecated(c, "--folds", nfolds)
    c.add_argument("--first-id", type=int, default=None, help="first new dataset id (default: after the highest used)")
    c.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")


def _register_train(csub) -> None:
    c = options.verb(csub, "train", "plan/preprocess and train every fold of stage 1 (rater models) or stage 2 with "
                                    "nnU-Net", [
        "nnunet-ext consensus train -d 540 --stage 1 -c 3d_fullres -tr LSRTrainer -j 2",
        "# on Slurm: rater x fold array, build-stage2, stage-2 folds, chained with afterok",
        "nnunet-ext consensus train -d 540 --stage all -c 3d_fullres --launcher slurm --gpus-per-task 1 "
        "--cpus-per-task 8 --mem 48G --time 1-00:00:00",
        "nnunet-ext jobs status $nnUNet_results/nnunet_ext_jobs/Dataset540_*/consensus_train_stageall"])
    options.add_dataset(c, help="source dataset (id or name)")
    c.add_argument("--stage", required=True, choices=("1", "2", "all"),
                   help="1: rater models, 2: consensus model, all: 1 + build-stage2 + 2")
    options.add_configuration(c)
    options.add_trainer(c)
    options.add_plans(c)
    options.add_folds(c, options.FOLDS_SPLIT, help="folds to train; with --stage all the stage-2 folds (stage 1 "
                                                   "always trains every fold: stage 2's inputs are out of fold)")
    options.add_device(c)
    options.add_processes(c, 2, "planning/preprocessing processes")
    c.add_argument("--id", type=int, default=None, dest="stage2_id", help="--stage all: id of the consensus dataset")
    c.add_argument("-num_gpus", type=int, default=1, help="nnU-Net DDP: GPUs per fold training, inside one task "
                                                          "(with --gpus-per-task N on Slurm; default 1)")
    c.add_argument("--workdir", default=None, help="launcher scripts, markers and logs (default: "
                                                   "$nnUNet_results/nnunet_ext_jobs/<dataset>/consensus_train_stage<S>)")
    c.add_argument("--record-only", action="store_true",
                   help="only record the trained stage's settings in consensus.json (the launcher's last step)")
    add_launcher_arguments(c)


def _register_prepare(csub) -> None:
    c = options.verb(csub, "prepare", "launcher step before concurrent folds: plan/preprocess, split, one-off "
                                      "unpacking", "nnunet-ext consensus prepare -d 540 --stage 1 -c 3d_fullres")
    options.add_dataset(c, help="source dataset (id or name)")
    c.add_argument("--stage", type=int, required=True, choices=(1, 2), help="1: rater datasets, 2: consensus dataset")
    options.add_configuration(c)
    options.add_plans(c)
    c.add_argument("--rater", nargs="+", default=None, dest="raters", help="stage 1: only these raters (default all)")
    options.add_processes(c, 2, "planning/preprocessing processes")


def _register_build_stage2(csub) -> None:
    c = options.verb(csub, "build-stage2", "consensus dataset: images + out-of-fold probability of each rater model",
                     "nnunet-ext consensus build-stage2 -d 540")
    options.add_dataset(c, help="source dataset (id or name)")
    options.add_configuration(c, required=False, help="stage-1 configuration (default: as trained)")
    options.add_trainer(c, default=None, help="stage-1 trainer (default: as trained)")
    options.add_plans(c, default=None, help="stage-1 plans (default: as trained)")
    c.add_argument("--id", type=int, default=None, dest="stage2_id", help="dataset id of the consensus dataset")
    options.add_device(c, help="for re-predicting held-out cases trained without --npz: cpu, cuda (or cuda:N) or "
                               "mps (default cuda, as nnUNetv2_predict)")
    options.add_processes(c, 2, "prediction and export processes")


def _register_predict(csub) -> None:
    c = options.verb(csub, "predict", "rater models, then the consensus model, on new cases",
                     "nnunet-ext consensus predict -d 540 -i imagesTs -o pred --keep-rater-predictions")
    options.add_dataset(c, help="source dataset (id or name)")
    options.add_input(c, "nnU-Net input folder (<case>_0000.nii.gz, ...)")
    options.add_output(c, "folder", help="consensus masks (and raters/<rater>/ with --keep-rater-predictions)")
    options.add_checkpoint(c)
    options.add_device(c)
    c.add_argument("--save_probabilities", action="store_true", help="also write the consensus model's <case>.npz")
    c.add_argument("--disable_tta", action="store_true",
                   help="every model without mirroring, as nnUNetv2_predict --disable_tta")
    c.add_argument("--keep-rater-predictions", action="store_true", help="also write <out>/raters/<rater>/ masks")
    options.add_processes(c, 2, "prediction and export processes")
    c.add_argument("--workdir", default=None,
                   help="--launcher slurm: scripts, markers, logs (default <output>/.nnunet_ext_jobs)")
    add_launcher_arguments(c)  # -j N: rater models predicted at once (also inside the one Slurm job)


def check(args: argparse.Namespace) -> None:
    from nnunet_ext.core.safety import check_output_not_input

    step = args.consensus_command
    if step == "split-raters":
        validate.integer(args.n_folds, "-nfolds", 2, 100)
        if args.first_id is not None:
            validate.dataset_id(args.first_id, "--first-id")
    elif step == "train" and "all" in (args.folds or ()):
        raise NotImplementedError("consensus train -f all: the stages train the folds of the shared split "
                                  "(0 ... K-1); stage 2's inputs are out of fold")
    elif step == "predict":
        check_output_not_input(args.output, [args.input], what="-o")
    elif step == "evaluate" and args.output is not None:
        check_output_not_input(args.output, [args.pred, args.ref, args.raters], what="-o/--output")


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.workflows import consensus

    step = {"split-raters": _split_raters, "train": _train, "prepare": _prepare, "build-stage2": _build_stage2,
            "predict": _predict, "evaluate": _evaluate}[args.consensus_command]
    return step(args, consensus) or 0


def _split_raters(args, consensus) -> None:
    state = consensus.split_raters(dataset=args.dataset, first_id=args.first_id, n_folds=args.n_folds, copy=args.copy)
    for r, v in state["raters"].items():
        print(f"{r}: dataset {v['id']} ({v['name']})")
    print(f"{state['n_folds']}-fold split shared by all rater datasets; mapping in "
          f"{consensus.dataset_folder(args.dataset) / consensus.STATE}")


def _train(args, consensus) -> None:
    from nnunet_ext.cli.common import print_launched

    stage = args.stage if args.stage == "all" else int(args.stage)
    if args.record_only:
        if stage == "all":
            raise ValueError("--record-only records one stage: --stage 1 or 2")
        consensus.record_training(dataset=args.dataset, stage=stage, configuration=args.configuration,
                                  trainer=args.trainer, plans=args.plans, folds=args.folds)
        print(f"recorded stage {stage} ({args.trainer}, {args.configuration}) in consensus.json")
        return
    res = consensus.train(dataset=args.dataset, stage=stage, configuration=args.configuration, trainer=args.trainer,
                          plans=args.plans, folds=args.folds, device=args.device, n_proc=args.num_processes,
                          launcher=launcher_options(args), workdir=args.workdir, stage2_id=args.stage2_id,
                          num_gpus=args.num_gpus)
    print_launched(res)


def _prepare(args, consensus) -> None:
    names = consensus.prepare(dataset=args.dataset, stage=args.stage, configuration=args.configuration,
                              plans=args.plans, raters=args.raters, n_proc=args.num_processes)
    print(f"prepared {', '.join(names)}")


def _build_stage2(args, consensus) -> None:
    out = consensus.build_stage2(args.dataset, args.configuration, args.trainer, args.plans, args.stage2_id,
                                 args.device, args.num_processes)
    print(f"wrote {out}")


def _predict(args, consensus) -> None:
    from nnunet_ext.cli.common import print_launched

    launcher = launcher_options(args)
    kw = dict(dataset=args.dataset, input_dir=args.input, output_dir=args.output, device=args.device, jobs=args.jobs,
              keep_rater_predictions=args.keep_rater_predictions, save_probabilities=args.save_probabilities,
              n_proc=args.num_processes, checkpoint=args.checkpoint, disable_tta=args.disable_tta)
    if launcher.launcher == "slurm" or launcher.dry_run:
        print_launched(consensus.launch_predict(launcher=launcher, workdir=args.workdir, **kw))
    else:
        res = consensus.predict(**kw)
        print(f"{len(res['cases'])} case(s) -> {args.output}")


def _evaluate(args, consensus) -> None:
    res = consensus.evaluate(dataset=args.dataset, pred_dir=args.pred, output=args.output, ref_dir=args.ref,
                             raters_dir=args.raters)
    print(consensus.format_table(res))
