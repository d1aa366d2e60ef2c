"""Semi-supervised benchmarks on the phantom (real nnU-Net, CPU, 2d configuration).

1. Cost: ``nnunet-ext pseudolabel`` time divided by ``nnUNetv2_predict`` (mirroring on) time on the same
   cases in the same run (target <= 1.05; pseudolabel also writes confidence maps and the student
   dataset).
2. Study: a teacher trained on few labeled cases (default 4 + the rest unlabeled), pseudo-labels for the
   unlabeled cases, a student trained on labeled + kept pseudo-labeled cases with the same budget; teacher
   vs student Dice and lesion F1 on the same held-out cases.

    python benchmarks/bench_ssl.py --workdir /tmp/ssl_bench -o benchmarks/results/ssl.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

TEACHER, STUDENT = 550, 551


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="ssl_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--labeled", type=int, default=5, help="labeled cases (nnU-Net's 5-fold split needs >= 5)")
    ap.add_argument("--unlabeled", type=int, default=16)
    ap.add_argument("--test-cases", type=int, default=10)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--trainer", default="ExtBaselineTrainer")
    ap.add_argument("--tst", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(args.workdir)
    env = nnunet_env(work, 2)
    tenv = dict(env, NNUNET_EXT_NUM_EPOCHS=str(args.epochs), NNUNET_EXT_ITERATIONS=str(args.iterations),
                NNUNET_EXT_VAL_ITERATIONS="4")
    log = work / "bench.log"
    raw = Path(env["nnUNet_raw"])
    troot = raw / f"Dataset{TEACHER}_MSPhantom"
    if not (troot / "phantom.json").exists():
        # one phantom draw: the first `labeled` cases stay labeled, the next `unlabeled` lose their labels
        write_phantom_dataset(raw, TEACHER, args.labeled + args.unlabeled, PhantomConfig(shape=(args.shape,) * 3, seed=3),
                              n_test=args.test_cases, num_workers=2)
        unl = work / "unlabeled"
        unl.mkdir(exist_ok=True)
        for i in range(args.labeled, args.labeled + args.unlabeled):
            case = f"phantom_{i:03d}"
            shutil.move(str(troot / "imagesTr" / f"{case}_0000.nii.gz"), unl / f"{case}_0000.nii.gz")
            (troot / "labelsTr" / f"{case}.nii.gz").unlink()
        ds = json.loads((troot / "dataset.json").read_text())
        ds["numTraining"] = args.labeled
        (troot / "dataset.json").write_text(json.dumps(ds, indent=2))
    unl = work / "unlabeled"
    res = {"settings": vars(args)}

    def train_eval(dataset_id, name):
        out = Path(env["nnUNet_results"]) / name / f"{args.trainer}__nnUNetPlans__2d" / "fold_0"
        if not (Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d").is_dir():
            run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d", "-np", "2"],
                       env, log)
        if not (out / "checkpoint_final.pth").exists():
            run_logged([nnunet_command("nnUNetv2_train"), str(dataset_id), "2d", "0", "-tr", args.trainer, "-device",
                        "cpu"], tenv, log)
        pred = work / f"pred_{name}"
        if not pred.exists():
            run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(troot / "imagesTs"), "-o", str(pred), "-d",
                        str(dataset_id), "-c", "2d", "-f", "0", "-tr", args.trainer, "-device", "cpu", "-npp", "1",
                        "-nps", "1"], env, log)
        ev = evaluate_folders(troot / "labelsTs", pred, progress=False)["aggregate"]
        return {"mean_dice": ev["mean"]["dice"], "pooled_dice": ev["pooled"]["dice"],
                "lesion_f1_pooled": ev["pooled"]["lesion_f1"], "lesion_tpr_pooled": ev["pooled"]["lesion_tpr"],
                "small_lesion_tpr": ev["pooled"]["bins"]["3-10"]["lesion_tpr"]}

    res["teacher"] = train_eval(TEACHER, troot.name)
    # cost: plain nnUNetv2_predict with mirroring vs pseudolabel, same cases, same run
    t = time.perf_counter()
    run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(unl), "-o", str(work / "timing_predict"), "-d", str(TEACHER),
                "-c", "2d", "-f", "0", "-tr", args.trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
    t_predict = time.perf_counter() - t
    sname = f"Dataset{STUDENT}_MSStudent"
    shutil.rmtree(raw / sname, ignore_errors=True)
    t = time.perf_counter()
    run_logged([nnunet_command("nnunet-ext"), "pseudolabel", "-d", str(TEACHER), "-c", "2d", "-tr", args.trainer, "-f", "0",
                "-i", str(unl), "--student", sname, "--tst", str(args.tst), "-device", "cpu", "-npp", "1", "-nps", "1"],
               env, log)
    t_pseudo = time.perf_counter() - t
    res["cost"] = {"nnUNetv2_predict_s": t_predict, "pseudolabel_s": t_pseudo, "ratio": t_pseudo / t_predict,
                   "cases": args.unlabeled}
    prov = json.loads((raw / sname / "provenance.json").read_text())
    res["pseudolabels"] = {"kept": len(prov["kept"]), "dropped": len(prov["dropped"])}
    res["student"] = train_eval(STUDENT, sname)
    print(json.dumps(res, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
