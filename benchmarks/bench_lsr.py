"""LSR benchmarks on the phantom, with real nnU-Net training on CPU (2d configuration).

``overhead``: seconds per training iteration of LSRTrainer vs ExtBaselineTrainer (= nnUNetTrainer) on the
same preprocessed phantom in the same run (runs interleaved, first epoch of each run discarded; nnU-Net's
own "Epoch time" log lines).

``study``: the operating-point study of Nichyporuk et al. (2021): ExtBaselineTrainer (Dice + CE),
BCETrainer (plain BCE) and LSRTrainer (LSR-weighted BCE) trained with the same budget on the same split
(fold 0), predicted on the same held-out cases, operating-point curves per size bin, small-lesion
(3-10 voxel) F1 at the segmentation-optimal threshold and the gap between the best segmentation and best
detection thresholds.

    python benchmarks/bench_lsr.py study --workdir /tmp/lsr_bench -o benchmarks/results/lsr_study.json
    python benchmarks/bench_lsr.py overhead --workdir /tmp/lsr_bench -o benchmarks/results/lsr_overhead.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.metrics.operating_points import sweep, write_sweep
from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset

DATASET = 520
ARMS = ["ExtBaselineTrainer", "BCETrainer", "LSRTrainer"]


def prepare(work: Path, args) -> tuple[dict, Path]:
    env = nnunet_env(work, 2)
    name = dataset_folder_name(DATASET, "MSPhantom")
    raw = Path(env["nnUNet_raw"]) / name
    if not (raw / "phantom.json").exists():
        write_phantom_dataset(env["nnUNet_raw"], DATASET, args.cases, PhantomConfig(shape=(args.shape,) * 3, seed=args.seed),
                              n_test=args.test_cases, num_workers=2)
    if not (Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d").is_dir():
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"],
                   env, work / "bench.log")
    return env, raw


def train(env, trainer, fold, epochs, iterations, log, fresh=False):
    env = dict(env, NNUNET_EXT_NUM_EPOCHS=str(epochs), NNUNET_EXT_ITERATIONS=str(iterations),
               NNUNET_EXT_VAL_ITERATIONS="4")
    out = Path(env["nnUNet_results"]) / dataset_folder_name(DATASET, "MSPhantom") / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
    if fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "checkpoint_final.pth").exists():
        run_logged([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", str(fold), "-tr", trainer, "-device", "cpu"],
                   env, log)
    return out


def epoch_times(out: Path) -> list[float]:
    logs = sorted(out.glob("training_log_*.txt"))
    return [float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", logs[-1].read_text())]


def overhead(args):
    work = Path(args.workdir)
    env, _ = prepare(work, args)
    per_iter = {t: [] for t in ("ExtBaselineTrainer", "LSRTrainer")}
    for rep in range(args.repeats):
        for t in per_iter:
            out = train(env, t, 4, args.overhead_epochs, args.iterations, work / "bench.log", fresh=True)
            times = epoch_times(out)[1:]  # first epoch includes start-up
            per_iter[t] += [x / args.iterations for x in times]
    import numpy as np

    res = {t: {"s_per_iteration_mean": float(np.mean(v)), "s_per_iteration_median": float(np.median(v)), "n_epochs": len(v)}
           for t, v in per_iter.items()}
    res["overhead_percent_median"] = 100 * (res["LSRTrainer"]["s_per_iteration_median"] /
                                            res["ExtBaselineTrainer"]["s_per_iteration_median"] - 1)
    res["settings"] = vars(args)
    print(json.dumps(res, indent=1))
    return res


def study(args):
    work = Path(args.workdir)
    env, raw = prepare(work, args)
    res = {"settings": vars(args), "arms": {}}
    for t in ARMS:
        train(env, t, 0, args.epochs, args.iterations, work / "bench.log")
        pred = work / f"pred_{t}"
        if not pred.exists():
            run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                        str(DATASET), "-c", "2d", "-f", "0", "-tr", t, "-device", "cpu", "--save_probabilities",
                        "-npp", "1", "-nps", "1"], env, work / "bench.log")
        ops = sweep(raw / "labelsTs", pred, progress=False)
        write_sweep(ops, work / f"ops_{t}.json", work / f"ops_{t}.png", title=f"{t}, phantom study")
        seg_t = ops["best_segmentation"]["threshold"]
        at_seg = next(p for p in ops["points"] if p["threshold"] == seg_t)
        at_half = next(p for p in ops["points"] if abs(p["threshold"] - 0.5) < 1e-9)
        ev = evaluate_folders(raw / "labelsTs", pred, progress=False)  # nnU-Net's argmax masks
        res["arms"][t] = {
            "best_segmentation": ops["best_segmentation"], "best_detection": ops["best_detection"],
            "threshold_gap": ops["threshold_gap"],
            "small_lesion_f1_at_seg_threshold": at_seg["bins"]["3-10"]["lesion_f1"],
            "small_lesion_tpr_at_seg_threshold": at_seg["bins"]["3-10"]["lesion_tpr"],
            "small_lesion_f1_at_0.5": at_half["bins"]["3-10"]["lesion_f1"],
            "lesion_f1_at_0.5": at_half["lesion_f1"], "voxel_f1_at_0.5": at_half["voxel_f1"],
            "argmax_mean_dice": ev["aggregate"]["mean"]["dice"],
            "argmax_pooled_bins": ev["aggregate"]["pooled"]["bins"],
        }
        print(t, json.dumps(res["arms"][t], indent=1, default=float), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("study", "overhead"))
    ap.add_argument("--workdir", default="lsr_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=12)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--overhead-epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    res = study(args) if args.mode == "study" else overhead(args)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
