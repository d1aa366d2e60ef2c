"""``nnunet-ext demo``: nnU-Net's default trainer against LSRDiceTrainer on the phantom, same CPU budget. A
fixed recipe: its defaults (dataset 501, 2d, fold 0, -device cpu) are the documented run's."""
from __future__ import annotations

from nnunet_ext.cli import options

COMMANDS = ("demo",)


def register(sub) -> None:
    p = options.verb(sub, "demo", "nnU-Net's default trainer vs LSRDiceTrainer on the phantom, same CPU budget: "
                                  "comparison table, report and overlaid curves",
                     "nnunet-ext demo --workdir nnunet_ext_demo")
    p.add_argument("--workdir", default="nnunet_ext_demo",
                   help="nnUNet_raw/preprocessed/results go here unless those variables are set")
    options.add_dataset(p, required=False, default="501", help="the phantom's dataset id or Dataset<ID>_MSPhantom "
                                                               "(default 501)", old="--dataset-id")
    options.add_configuration(p, required=False, default="2d", help="nnU-Net configuration (default 2d)")
    options.add_trainer(p, many=True, default=["ExtBaselineTrainer", "LSRDiceTrainer"],
                        help="arms (default ExtBaselineTrainer = nnU-Net's default + budget variables, LSRDiceTrainer)")
    options.add_folds(p, "0 (the demo's recipe: one fold)", default=[0], help="the one fold trained per arm",
                      old="--fold")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per arm (default 20)")
    p.add_argument("--iterations", type=int, default=20, help="training iterations per epoch (default 20)")
    p.add_argument("--cases", type=int, default=20, help="phantom training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=64,
                   help="phantom held-out cases (default 64: about 150 lesions of 3-10 voxels)")
    p.add_argument("--tta", action="store_true",
                   help="predict the held-out cases with nnU-Net's mirroring (4x the prediction time in 2d); "
                        "default: without, as nnUNetv2_predict --disable_tta, for both arms")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("X", "Y", "Z"),
                   help="phantom image size (default 48 48 48)")
    p.add_argument("--difficulty", default="medium", help="easy, medium (default), hard, or a number in [0, 1]")
    options.add_device(p, "cpu", help="cpu, cuda (or cuda:N) or mps (default cpu: the demo's recipe)", old="--device")
    options.add_processes(p, 2, "nnU-Net pre/post-processing processes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the phantom, of every training (compare --train-seed) and of the bootstrap: the same "
                        "seed gives the same report on the same machine (default 0)")


def check(args) -> None:
    dataset_id, name = options.new_dataset(args)
    if name not in (None, "MSPhantom"):
        raise ValueError(f"-d/--dataset: the demo's phantom is Dataset{dataset_id:03d}_MSPhantom, got {args.dataset}")
    if len(args.folds) != 1:
        raise ValueError(f"-f/--folds: the demo trains one fold per arm, got {' '.join(map(str, args.folds))}")


def config(args):
    """The :class:`DemoConfig` of parsed arguments."""
    from nnunet_ext.data.phantom import parse_difficulty
    from nnunet_ext.workflows.demo import DemoConfig

    dataset_id, _ = options.new_dataset(args)
    return DemoConfig(workdir=args.workdir, dataset_id=dataset_id, configuration=args.configuration,
                      trainers=tuple(args.trainers), fold=args.folds[0], epochs=args.epochs,
                      iterations=args.iterations, train_cases=args.cases, test_cases=args.test_cases,
                      shape=tuple(args.shape), difficulty=parse_difficulty(args.difficulty), device=args.device,
                      n_proc=args.num_processes, seed=args.seed, disable_tta=not args.tta)


def run(args) -> int:
    from nnunet_ext.workflows.demo import run_demo

    run_demo(config(args))
    return 0
