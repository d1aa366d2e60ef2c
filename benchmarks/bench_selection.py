"""Lesion-aware selection benchmark on the phantom (real nnU-Net 2d training on CPU, tiny budget).

Argmax (nnU-Net's default output) against the probability threshold and minimum lesion size chosen by
``nnunet-ext select`` on the **validation folds only** (``fold_k/validation/<case>.npz``), both scored on
held-out cases (imagesTs/labelsTs) the selection never saw: pooled lesion F1 and small-lesion (3-10 voxel)
F1.

    python benchmarks/bench_selection.py --workdir /tmp/sel_bench -o benchmarks/results/selection.json

Stages (each skipped when its output exists): phantom + 2d planning; ``nnUNetv2_train D 2d k --npz`` for
each fold (``NNUNET_EXT_NUM_EPOCHS`` x ``NNUNET_EXT_ITERATIONS``); ``nnUNetv2_predict`` of the held-out
cases with the same folds and ``--save_probabilities``; selection; scoring.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset

DATASET = 530
TRAINER = "ExtBaselineTrainer"


def prepare(work: Path, args) -> tuple[dict, Path]:
    env = nnunet_env(work, 2)
    name = dataset_folder_name(DATASET, "MSPhantom")
    raw = Path(env["nnUNet_raw"]) / name
    if not (raw / "phantom.json").exists():
        write_phantom_dataset(env["nnUNet_raw"], DATASET, args.cases,
                              PhantomConfig(shape=(args.shape,) * 3, seed=args.seed, difficulty=args.difficulty),
                              n_test=args.test_cases, num_workers=2)
    if not (Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d").is_dir():
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"],
                   env, work / "bench.log")
    return env, raw


def model_dir(env) -> Path:
    return Path(env["nnUNet_results"]) / dataset_folder_name(DATASET, "MSPhantom") / f"{TRAINER}__nnUNetPlans__2d"


def train_folds(env, args, log: Path) -> dict:
    env = dict(env, NNUNET_EXT_NUM_EPOCHS=str(args.epochs), NNUNET_EXT_ITERATIONS=str(args.iterations),
               NNUNET_EXT_VAL_ITERATIONS="4")
    seconds = {}
    for f in args.folds:
        out = model_dir(env) / f"fold_{f}"
        if not (out / "checkpoint_final.pth").exists():
            t0 = time.time()
            run_logged([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", str(f), "-tr", TRAINER, "-device", "cpu",
                        "--npz"], env, log)
            seconds[f] = round(time.time() - t0, 1)
        elif not any((out / "validation").glob("*.npz")):
            run_logged([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", str(f), "-tr", TRAINER, "-device", "cpu",
                        "--val", "--npz"], env, log)
    return seconds


def predict_test(env, raw: Path, args, work: Path, log: Path) -> Path:
    out = work / "pred_test"
    if not (out / "done").exists():
        run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET),
                    "-c", "2d", "-tr", TRAINER, "-f", *[str(f) for f in args.folds], "-device", "cpu",
                    "--save_probabilities", "-npp", "1", "-nps", "1"], env, log)
        (out / "done").write_text("ok")
    return out


def score_test(raw: Path, pred: Path, threshold: float | None, min_mm3: float, connectivity: int) -> dict:
    """Pooled lesion F1 (all, 3-10 voxels) on the held-out cases: argmax when ``threshold`` is None."""
    from nnunet_ext.metrics.cases import list_cases, load_mask, load_probabilities
    from nnunet_ext.metrics.lesions import DEFAULT_BINS, aggregate, case_metrics, remove_small_lesions

    refs = list_cases(raw / "labelsTs")
    per_case = {}
    for c, rp in refs.items():
        ref, spacing = load_mask(rp, 1)
        prob = load_probabilities(pred / f"{c}.npz")
        mask = load_mask(pred / f"{c}.nii.gz", 1)[0] if threshold is None else prob >= threshold
        mask = remove_small_lesions(mask, spacing, min_mm3, connectivity)
        per_case[c] = case_metrics(ref, mask, spacing, connectivity=connectivity, bins=DEFAULT_BINS)
    pooled = aggregate(per_case, DEFAULT_BINS)["pooled"]
    small = pooled["bins"]["3-10"]
    return {"lesion_f1": pooled["lesion_f1"], "lesion_tpr": pooled["lesion_tpr"], "lesion_ppv": pooled["lesion_ppv"],
            "small_lesion_f1": small["lesion_f1"], "small_lesion_tpr": small["lesion_tpr"],
            "small_ref_lesions": small["ref_lesions"], "dice_pooled": pooled["dice"], "cases": len(per_case)}


def score_validation_fold(env, fold: int, threshold: float | None, min_mm3: float, connectivity: int) -> dict:
    """Pooled lesion F1 (all, 3-10 voxels) on one fold's validation cases (nnU-Net's argmax masks when
    ``threshold`` is None, else its validation probabilities >= threshold), minimum size applied."""
    from nnunet_ext.metrics.cases import list_cases, load_mask, load_probabilities
    from nnunet_ext.metrics.lesions import DEFAULT_BINS, aggregate, case_metrics, remove_small_lesions

    val = model_dir(env) / f"fold_{fold}" / "validation"
    gt = Path(env["nnUNet_preprocessed"]) / dataset_folder_name(DATASET, "MSPhantom") / "gt_segmentations"
    per_case = {}
    for c in list_cases(val):
        ref, spacing = load_mask(gt / f"{c}.nii.gz", 1)
        mask = load_mask(val / f"{c}.nii.gz", 1)[0] if threshold is None else \
            load_probabilities(val / f"{c}.npz") >= threshold
        mask = remove_small_lesions(mask, spacing, min_mm3, connectivity)
        per_case[c] = case_metrics(ref, mask, spacing, connectivity=connectivity, bins=DEFAULT_BINS)
    pooled = aggregate(per_case, DEFAULT_BINS)["pooled"]
    small = pooled["bins"]["3-10"]
    return {"lesion_f1": pooled["lesion_f1"], "lesion_tpr": pooled["lesion_tpr"], "lesion_ppv": pooled["lesion_ppv"],
            "small_lesion_f1": small["lesion_f1"], "small_lesion_tpr": small["lesion_tpr"],
            "small_ref_lesions": small["ref_lesions"], "dice_pooled": pooled["dice"], "cases": len(per_case)}


def crossfold(env, args) -> dict:
    """Select on the validation cases of one fold, score on another fold's validation cases (never seen by
    the selection, predicted by a model that never trained on them); every ordered pair of folds."""
    from nnunet_ext.workflows.selection import select

    out = {}
    for f_sel in args.folds:
        sel = select(dataset=DATASET, configurations=["2d"], trainers=[TRAINER], plans="nnUNetPlans", folds=[f_sel],
                     metric=args.metric, write_contract=False, progress=False,
                     output=Path(args.workdir) / f"selection_fold{f_sel}.json")
        b = sel["best"]
        for f_test in args.folds:
            if f_test == f_sel:
                continue
            out[f"select_on_{f_sel}_test_on_{f_test}"] = {
                "selected": {k: b[k] for k in ("threshold", "min_lesion_mm3", "lesion_f1", "small_lesion_f1")},
                "test_argmax": score_validation_fold(env, f_test, None, 0.0, b["connectivity"]),
                "test_selected": score_validation_fold(env, f_test, b["threshold"], b["min_lesion_mm3"],
                                                       b["connectivity"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/sel_bench")
    ap.add_argument("-o", "--output", default="benchmarks/results/selection.json")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=25)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--metric", default="lesion_f1")
    ap.add_argument("--stage", choices=("train", "all", "crossfold"), default="all",
                    help="crossfold: no test prediction; select on one fold's validation cases, score on another's")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    t0 = time.time()
    env, raw = prepare(work, args)
    train_seconds = train_folds(env, args, log)
    if args.stage == "crossfold":
        import os

        os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        result = {"settings": {"dataset": DATASET, "cases": args.cases, "shape": args.shape,
                               "difficulty": args.difficulty, "configuration": "2d", "trainer": TRAINER,
                               "folds": args.folds, "epochs": args.epochs, "iterations": args.iterations,
                               "metric": args.metric, "seed": args.seed, "mode": "crossfold"},
                  "crossfold": crossfold(env, args)}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1, default=float))
        print(json.dumps(result["crossfold"], indent=1, default=float))
        return
    pred = predict_test(env, raw, args, work, log)
    if args.stage == "train":
        return
    import os

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunet_ext.workflows.selection import select

    sel = select(dataset=DATASET, configurations=["2d"], trainers=[TRAINER], plans="nnUNetPlans", folds=args.folds,
                 metric=args.metric, write_contract=False, progress=False)
    best = sel["best"]
    conn = best["connectivity"]
    result = {
        "settings": {"dataset": DATASET, "cases": args.cases, "test_cases": args.test_cases, "shape": args.shape,
                     "difficulty": args.difficulty, "configuration": "2d", "trainer": TRAINER, "folds": args.folds,
                     "epochs": args.epochs, "iterations": args.iterations, "metric": args.metric, "seed": args.seed},
        "selection_on_validation": best,
        "validation_argmax": sel["argmax"],
        "test_argmax": score_test(raw, pred, None, 0.0, conn),
        "test_selected": score_test(raw, pred, best["threshold"], best["min_lesion_mm3"], conn),
        "train_seconds": train_seconds, "total_seconds": round(time.time() - t0, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("selection_on_validation", "test_argmax", "test_selected")}, indent=1,
                     default=float))
    np.set_printoptions()


if __name__ == "__main__":
    main()
