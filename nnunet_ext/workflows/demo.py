"""The demo: nnU-Net's default trainer against the plugin's small-lesion trainer on the phantom, same budget.

phantom -> ``nnUNetv2_plan_and_preprocess`` -> :func:`nnunet_ext.workflows.compare.compare` (``nnUNetv2_train`` of both
arms on the same split with the same budget, prediction of the held-out cases through the model contract,
argmax + threshold sweep, paired bootstrap) -> comparison table on the terminal, report + overlaid curves in the
work folder. Every step is skipped when its result exists, so an interrupted demo continues where it stopped.

The default trainer arm is ``ExtBaselineTrainer``: nnU-Net's ``nnUNetTrainer`` unchanged except that it honours
the CPU budget variables (``nnUNetTrainer`` itself would train 1000 x 250 iterations). The small-lesion arm is
``LSRDiceTrainer`` (nnU-Net's Dice + lesion-size-reweighted cross-entropy), whose Dice term learns at nnU-Net's
pace; plain LSR (``LSRTrainer``, BCE only, output bias at the class prior) is not yet measured at this budget
(docs/results.md).

``seed`` seeds everything random in the demo: the phantom, every training (compare's ``train_seed``,
``NNUNET_EXT_SEED``: seeded data augmentation workers, deterministic algorithms) and the bootstrap, so
the same seed gives the same report on the same machine.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset


@dataclass
class DemoConfig:
    workdir: str = "nnunet_ext_demo"
    dataset_id: int = 501
    train_cases: int = 20
    test_cases: int = 64  # >= 100 lesions of 3-10 voxels (docs/demo.md)
    shape: tuple[int, int, int] = (48, 48, 48)  # 64^3 costs 4x per iteration on CPU (docs/demo.md)
    difficulty: float = 0.5
    seed: int = 0  # the phantom's, every training's and the bootstrap's
    configuration: str = "2d"  # 3d_fullres learns nothing in a CPU budget (docs/demo.md)
    trainers: tuple[str, ...] = field(default_factory=lambda: ("ExtBaselineTrainer", "LSRDiceTrainer"))
    fold: int = 0
    epochs: int = 20
    iterations: int = 20
    val_iterations: int = 4
    device: str = "cpu"
    n_proc: int = 2
    n_bootstrap: int = 2000
    disable_tta: bool = True  # the held-out cases without mirroring: 4x cheaper in 2d, the same for both arms


def demo_command(cfg: DemoConfig) -> str:
    """The ``nnunet-ext demo`` command line that runs ``cfg``: the work folder and every setting that differs
    from the defaults (the report records it, so a run with ``--seed 2`` or ``--cases 12`` says so)."""
    import shlex

    d = DemoConfig()
    parts = ["--workdir", cfg.workdir]
    flags = [("-d", "dataset_id"), ("-c", "configuration"), ("-f", "fold"), ("--epochs", "epochs"),
             ("--iterations", "iterations"), ("--cases", "train_cases"), ("--test-cases", "test_cases"),
             ("--difficulty", "difficulty"), ("-device", "device"), ("-np", "n_proc"), ("--seed", "seed")]
    if tuple(cfg.trainers) != tuple(d.trainers):
        parts += ["-tr", *cfg.trainers]
    if tuple(cfg.shape) != tuple(d.shape):
        parts += ["--shape", *map(str, cfg.shape)]
    for flag, k in flags:
        value = getattr(cfg, k)
        if value != getattr(d, k):
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if not cfg.disable_tta:
        parts.append("--tta")
    return "nnunet-ext demo " + shlex.join(parts)  # text for the report; never run from here


def run_demo(cfg: DemoConfig) -> dict:
    from nnunet_ext.workflows.compare import CompareConfig, compare

    if len(cfg.trainers) < 2:
        raise ValueError("the demo compares at least two trainers")
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(work, cfg.n_proc)
    log = work / "demo.log"
    raw, pre, res = (Path(env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    print(f"nnUNet_raw={raw}\nnnUNet_preprocessed={pre}\nnnUNet_results={res}\nlog: {log}", flush=True)
    t0 = time.time()
    name = dataset_folder_name(cfg.dataset_id, "MSPhantom")
    ds = raw / name
    print(f"[demo 1/3] phantom {name}: {cfg.train_cases} training + {cfg.test_cases} held-out cases, "
          f"{'x'.join(map(str, cfg.shape))}", flush=True)
    if (ds / "phantom.json").exists():
        print("   exists, reused")
    else:
        write_phantom_dataset(raw, cfg.dataset_id, cfg.train_cases,
                              PhantomConfig(shape=cfg.shape, difficulty=cfg.difficulty, seed=cfg.seed),
                              n_test=cfg.test_cases, num_workers=cfg.n_proc)
    print(f"[demo 2/3] nnU-Net planning and preprocessing ({cfg.configuration})", flush=True)
    if (pre / name / f"nnUNetPlans_{cfg.configuration}").is_dir():
        print("   exists, reused")
    else:
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(cfg.dataset_id), "-c", cfg.configuration,
                    "-np", str(cfg.n_proc), "--verify_dataset_integrity"], env, log)
    print(f"[demo 3/3] nnunet-ext compare: {' vs '.join(cfg.trainers)}, {cfg.epochs} epochs x {cfg.iterations} "
          f"iterations each, fold {cfg.fold}, {cfg.test_cases} held-out cases", flush=True)
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_def_n_proc", "nnUNet_n_proc_DA")}
    os.environ.update({k: env[k] for k in saved})  # compare reads nnU-Net's folders from the environment
    try:
        report = compare(CompareConfig(
            dataset=str(cfg.dataset_id), configuration=cfg.configuration, trainers=list(cfg.trainers),
            folds=[cfg.fold], test_images=str(ds / "imagesTs"), test_labels=str(ds / "labelsTs"),
            output=str(work / "report"), epochs=cfg.epochs, iterations=cfg.iterations,
            val_iterations=cfg.val_iterations, device=cfg.device, n_proc=cfg.n_proc, n_bootstrap=cfg.n_bootstrap,
            seed=cfg.seed, train_seed=cfg.seed, create_split=True, disable_tta=cfg.disable_tta,
            command_line=f"{demo_command(cfg)}  # = nnunet-ext compare -d {cfg.dataset_id} -c "
                         f"{cfg.configuration} -tr {' '.join(cfg.trainers)} -f {cfg.fold} --test-images {ds / 'imagesTs'} "
                         f"--test-labels {ds / 'labelsTs'} --epochs {cfg.epochs} --iterations {cfg.iterations} "
                         f"--val-iterations {cfg.val_iterations} -device {cfg.device} --seed {cfg.seed} --train-seed {cfg.seed} "
                         f"--create-split{' --disable_tta' if cfg.disable_tta else ''} -o {work / 'report'}"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"demo total {time.time() - t0:.0f} s", flush=True)
    return report
