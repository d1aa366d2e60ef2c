"""The demo: phantom -> nnU-Net planning/preprocessing -> short CPU training -> prediction -> evaluation.

Every step calls nnU-Net's own commands. Steps whose results exist are skipped, so an interrupted demo
continues where it stopped (training resumes from nnU-Net's latest checkpoint with ``--c``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.metrics.evaluate import evaluate_folders, format_table
from nnunet_ext.metrics.operating_points import sweep, write_sweep
from nnunet_ext.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset


@dataclass
class DemoConfig:
    workdir: str = "nnunet_ext_demo"
    dataset_id: int = 501
    train_cases: int = 20
    test_cases: int = 6
    shape: tuple[int, int, int] = (48, 48, 48)  # 64^3 costs 4x per iteration on CPU (docs/demo.md)
    difficulty: float = 0.5
    seed: int = 0
    configuration: str = "2d"  # 3d_fullres learns nothing in a CPU budget (docs/demo.md)
    trainer: str = "ExtBaselineTrainer"
    fold: int = 0
    epochs: int = 25
    iterations: int = 20
    val_iterations: int = 4
    device: str = "cpu"
    n_proc: int = 2


def run_demo(cfg: DemoConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(work, cfg.n_proc)
    env.update({"NNUNET_EXT_NUM_EPOCHS": str(cfg.epochs), "NNUNET_EXT_ITERATIONS": str(cfg.iterations),
                "NNUNET_EXT_VAL_ITERATIONS": str(cfg.val_iterations)})
    log = work / "demo.log"
    raw, pre, res = (Path(env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    print(f"nnUNet_raw={raw}\nnnUNet_preprocessed={pre}\nnnUNet_results={res}\nlog: {log}", flush=True)
    t0 = time.time()
    name = dataset_folder_name(cfg.dataset_id, "MSPhantom")
    ds = raw / name
    print(f"[1/5] phantom {name}: {cfg.train_cases} training + {cfg.test_cases} test cases", flush=True)
    if (ds / "phantom.json").exists():
        print("   exists, reused")
    else:
        write_phantom_dataset(raw, cfg.dataset_id, cfg.train_cases,
                              PhantomConfig(shape=cfg.shape, difficulty=cfg.difficulty, seed=cfg.seed),
                              n_test=cfg.test_cases, num_workers=cfg.n_proc)
    print(f"[2/5] nnU-Net planning and preprocessing ({cfg.configuration})", flush=True)
    if (pre / name / f"nnUNetPlans_{cfg.configuration}").is_dir():
        print("   exists, reused")
    else:
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(cfg.dataset_id), "-c", cfg.configuration,
              "-np", str(cfg.n_proc), "--verify_dataset_integrity"], env, log)
    out = res / name / f"{cfg.trainer}__nnUNetPlans__{cfg.configuration}" / f"fold_{cfg.fold}"
    print(f"[3/5] training {cfg.trainer} ({cfg.configuration}, fold {cfg.fold}, {cfg.epochs} epochs x "
          f"{cfg.iterations} iterations on {cfg.device})", flush=True)
    if (out / "checkpoint_final.pth").exists():
        print("   exists, reused")
    else:
        cmd = [nnunet_command("nnUNetv2_train"), str(cfg.dataset_id), cfg.configuration, str(cfg.fold),
               "-tr", cfg.trainer, "-device", cfg.device]
        if (out / "checkpoint_latest.pth").exists():
            cmd.append("--c")
        run_logged(cmd, env, log)
    pred = work / "predictions"
    print("[4/5] nnUNetv2_predict on the held-out test cases", flush=True)
    run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(ds / "imagesTs"), "-o", str(pred), "-d", str(cfg.dataset_id),
          "-c", cfg.configuration, "-f", str(cfg.fold), "-tr", cfg.trainer, "-device", cfg.device,
          "--save_probabilities", "-npp", "1", "-nps", "1"], env, log)
    print("[5/5] lesion-wise evaluation", flush=True)
    result = evaluate_folders(ds / "labelsTs", pred, work / "results.json", progress=False)
    ops = sweep(ds / "labelsTs", pred, progress=False)
    write_sweep(ops, work / "operating_points.json", work / "operating_points.png",
                title=f"{cfg.trainer} on the MS phantom ({cfg.configuration}, {cfg.epochs}x{cfg.iterations} iterations)")
    print(format_table(result))
    print(f"operating points: best segmentation t={ops['best_segmentation']['threshold']:g}, best detection "
          f"t={ops['best_detection']['threshold']:g}")
    print(f"results: {work / 'results.json'} (+ .csv), curves: {work / 'operating_points.png'}")
    print(f"total {time.time() - t0:.0f} s")
    return result
