"""``nnunet-ext train``: ``nnUNetv2_train`` for several configurations, trainers and folds through the launcher
(local, ``-j N``, or one Slurm job array), optionally followed by ``nnUNetv2_find_best_configuration``."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.cluster.launcher import add_launcher_arguments, launcher_options

COMMANDS = ("train",)


def register(sub) -> None:
    p = options.verb(sub, "train", "nnUNetv2_train for configurations x trainers x folds, locally or as Slurm job "
                                   "arrays; finished folds skipped, interrupted ones continued (--c)", [
        "nnunet-ext train -d 501 -c 3d_fullres -tr LSRTrainer -f 0 1 2 3 4 --launcher slurm --gpus-per-task 1",
        "nnunet-ext train -d 501 -c 2d 3d_fullres -tr nnUNetTrainer -f 0 1 2 3 4 --npz --then-find-best -j 2",
        "nnunet-ext train -d 502 -c 2d -tr ExtBaselineTrainer -f 0 --epochs 20 --iterations 20 -device cpu",
        "nnunet-ext jobs status $nnUNet_results/nnunet_ext_jobs/Dataset501_*/train_*"],
        note="docs/cluster.md. Every fold runs `nnUNetv2_train D C F -tr T -p P -device DEV --c`.")
    options.add_dataset(p)
    options.add_configuration(p, many=True)
    options.add_trainer(p, many=True, default=["nnUNetTrainer"], help="trainer classes (default nnUNetTrainer)")
    options.add_folds(p, options.FOLDS_SPLIT, help="folds to train")
    options.add_plans(p)
    options.add_device(p, help="cuda, cpu or mps, as nnUNetv2_train (default cuda)")
    p.add_argument("--npz", action="store_true",
                   help="as nnUNetv2_train: keep the validation probabilities (find-best ensembles need them)")
    p.add_argument("--then-find-best", action="store_true",
                   help="run nnUNetv2_find_best_configuration after the last fold (Slurm: a job with "
                        "--dependency=afterok on the training arrays)")
    p.add_argument("--epochs", type=int, default=None, help="training budget of every job (NNUNET_EXT_NUM_EPOCHS; "
                                                            "our trainers only)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (NNUNET_EXT_ITERATIONS)")
    p.add_argument("--val-iterations", type=int, default=None, help="NNUNET_EXT_VAL_ITERATIONS")
    p.add_argument("--workdir", default=None, help="launcher scripts, markers and logs (default: "
                                                   "$nnUNet_results/nnunet_ext_jobs/<dataset>/train_<digest>)")
    add_launcher_arguments(p)


def run(args) -> int:
    from nnunet_ext.cli.common import print_launched
    from nnunet_ext.workflows.train import TrainOptions, train

    folds = args.folds if args.folds is not None else options.split_folds(args.dataset)
    res = train(TrainOptions(dataset=args.dataset, configurations=args.configurations, trainers=args.trainers,
                             folds=folds, plans=args.plans, device=args.device, npz=args.npz,
                             then_find_best=args.then_find_best, epochs=args.epochs, iterations=args.iterations,
                             val_iterations=args.val_iterations, workdir=args.workdir,
                             launcher=launcher_options(args)))
    print_launched(res)
    return 0
