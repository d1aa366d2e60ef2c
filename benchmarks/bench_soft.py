"""Soft-label study on the phantom with real nnU-Net training on CPU (2d configuration).

ExtBaselineTrainer (nnU-Net's Dice + CE on the hard consensus), SoftDiceTrainer and SoftSegTrainer (soft
partial-volume targets), same budget, same split (fold 0), predicted on the same held-out cases with
probabilities. Reports Dice (nnU-Net's argmax masks and the stored-threshold masks of ``nnunet-ext
predict``), soft Dice, Brier score and expected calibration error against the soft reference, bytes of
the stored soft vs hard preprocessed labels, and seconds per training iteration of each arm (nnU-Net's
epoch times, first epoch dropped).

    python benchmarks/bench_soft.py --workdir /tmp/soft_bench -o benchmarks/results/soft_study.json
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import numpy as np

from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset

DATASET = 540
ARMS = ["ExtBaselineTrainer", "SoftDiceTrainer", "SoftSegTrainer"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="soft_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=8)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.workdir)
    env = nnunet_env(work, 2)
    log = work / "bench.log"
    name = dataset_folder_name(DATASET, "MSPhantom")
    raw = Path(env["nnUNet_raw"]) / name
    if not (raw / "phantom.json").exists():
        write_phantom_dataset(env["nnUNet_raw"], DATASET, args.cases,
                              PhantomConfig(shape=(args.shape,) * 3, soft=True, seed=1), n_test=args.test_cases,
                              num_workers=2)
    pre = Path(env["nnUNet_preprocessed"]) / name
    if not (pre / "nnUNetPlans_2d").is_dir():
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"], env, log)
    run_logged([nnunet_command("nnunet-ext"), "preprocess-soft", "-d", str(DATASET), "-c", "2d"], env, log)
    soft_bytes = sum(p.stat().st_size for p in (pre / "nnUNetPlans_2d" / "nnunet_ext_soft").glob("*.npz"))
    hard_bytes = sum(p.stat().st_size for p in (pre / "nnUNetPlans_2d").glob("*_seg.b2nd"))
    res = {"settings": vars(args), "soft_label_bytes": soft_bytes, "hard_label_bytes": hard_bytes, "arms": {}}
    tenv = dict(env, NNUNET_EXT_NUM_EPOCHS=str(args.epochs), NNUNET_EXT_ITERATIONS=str(args.iterations),
                NNUNET_EXT_VAL_ITERATIONS="4")
    for t in ARMS:
        out = Path(env["nnUNet_results"]) / name / f"{t}__nnUNetPlans__2d" / "fold_0"
        if not (out / "checkpoint_final.pth").exists():
            run_logged([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", t, "-device", "cpu"], tenv, log)
        times = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", sorted(out.glob("training_log_*.txt"))[-1].read_text())]
        pred = work / f"pred_{t}"
        if not pred.exists():
            run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                        str(DATASET), "-c", "2d", "-f", "0", "-tr", t, "-device", "cpu", "--save_probabilities",
                        "-npp", "1", "-nps", "1"], env, log)
        ev = evaluate_folders(raw / "labelsTs", pred, prob_dir=pred, soft_ref_dir=raw / "softlabelsTs",
                              reliability_png=work / f"reliability_{t}.png", progress=False)
        arm = {"s_per_iteration_median": float(np.median(times[1:])) / args.iterations,
               "argmax_mean_dice": ev["aggregate"]["mean"]["dice"], "argmax_pooled_dice": ev["aggregate"]["pooled"]["dice"],
               "soft_dice": ev["aggregate"]["mean"]["soft_dice"], "brier": ev["aggregate"]["mean"]["brier"],
               "ipe_voxelwise": ev["aggregate"]["mean"]["ipe_voxelwise"], "ece_pooled": ev["aggregate"]["pooled"]["ece"],
               "lesion_f1_pooled": ev["aggregate"]["pooled"]["lesion_f1"]}
        if t != "ExtBaselineTrainer":
            ours = work / f"ours_{t}"
            subprocess.run([nnunet_command("nnunet-ext"), "predict", "-i", str(raw / "imagesTs"), "-o", str(ours), "-d",
                            str(DATASET), "-c", "2d", "-tr", t, "-f", "0", "-device", "cpu"], env=env, check=True,
                           capture_output=True)
            ev2 = evaluate_folders(raw / "labelsTs", ours, progress=False)
            arm["stored_threshold"] = json.loads((ours / "nnunet_ext_predict.json").read_text())["threshold"]
            arm["threshold_mean_dice"] = ev2["aggregate"]["mean"]["dice"]
            arm["threshold_pooled_dice"] = ev2["aggregate"]["pooled"]["dice"]
        res["arms"][t] = arm
        print(t, json.dumps(arm), flush=True)
    base = res["arms"]["ExtBaselineTrainer"]["s_per_iteration_median"]
    for t in ARMS[1:]:
        res["arms"][t]["iteration_overhead_percent"] = 100 * (res["arms"][t]["s_per_iteration_median"] / base - 1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
