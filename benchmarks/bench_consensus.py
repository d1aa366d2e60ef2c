"""Consensus cascade vs a single nnU-Net on the consensus labels, two-time-point phantom, CPU (2d).

Phantom: two FLAIR time points, label = new lesions (the reference "consensus"), ``--raters`` raters whose
masks perturb lesion boundaries and omit 3-10-voxel lesions with probability 0.1 / 0.2 / 0.3 / ... Budget: the
cascade trains 3 rater models x K folds + the consensus model x K folds, each for E epochs x I iterations;
the single model trains K folds for (raters + 1) x E epochs x I iterations each, the same total number of
training iterations. Both predict the held-out cases with their K-fold ensembles; scores with
``--preset msseg2`` (Anima-style detection); inference time of the cascade / the single model measured
back to back (``timing`` mode repeats only that).

    python benchmarks/bench_consensus.py study --workdir /tmp/cascade_bench -o benchmarks/results/consensus_study.json
    python benchmarks/bench_consensus.py timing --workdir /tmp/cascade_bench -o benchmarks/results/consensus_timing.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from nnunet_ext.workflows import consensus
from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset

SRC = 580


def setup(args) -> tuple[Path, Path]:
    work = Path(args.workdir)
    env = nnunet_env(work, 2)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                                           "nnUNet_def_n_proc", "nnUNet_n_proc_DA")})
    src = Path(env["nnUNet_raw"]) / dataset_folder_name(SRC, "NewLesionPhantom")
    if not (src / "phantom.json").exists():
        cfg = PhantomConfig(shape=(args.shape,) * 3, timepoints=2, raters=args.raters, seed=args.seed)
        write_phantom_dataset(env["nnUNet_raw"], SRC, args.cases, cfg, n_test=args.test_cases, name="NewLesionPhantom",
                              num_workers=2)
    return work, src


def budget(epochs: int, iterations: int) -> None:
    os.environ.update(NNUNET_EXT_NUM_EPOCHS=str(epochs), NNUNET_EXT_ITERATIONS=str(iterations),
                      NNUNET_EXT_VAL_ITERATIONS="4")


def single_dataset(src: Path, state: dict) -> dict:
    """The consensus labels as a plain dataset (same images, same split) for the single-model arm."""
    did = state["raters"][list(state["raters"])[-1]]["id"] + 10
    name = f"Dataset{did:03d}_NewLesionSingle"
    out = Path(os.environ["nnUNet_raw"]) / name
    if not (out / "dataset.json").exists():
        for sub in ("imagesTr", "labelsTr"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for p in (src / "imagesTr").iterdir():
            os.symlink(p.resolve(), out / "imagesTr" / p.name)
        for p in (src / "labelsTr").iterdir():
            shutil.copy2(p, out / "labelsTr" / p.name)
        dj = json.loads((src / "dataset.json").read_text())
        (out / "dataset.json").write_text(json.dumps({**dj, "name": "NewLesionSingle"}, indent=1))
    return {"id": did, "name": name}


def train_single(single: dict, state: dict, args, log: Path) -> None:
    env = nnunet_env(None, 2)
    pre = Path(os.environ["nnUNet_preprocessed"]) / single["name"]
    if not (pre / "nnUNetPlans_2d").is_dir():
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(single["id"]), "-c", "2d", "-np", "2"], env, log)
    consensus.write_splits(single["name"], state["splits"])
    for f in range(state["n_folds"]):
        out = Path(os.environ["nnUNet_results"]) / single["name"] / "ExtBaselineTrainer__nnUNetPlans__2d" / f"fold_{f}"
        if not (out / "checkpoint_final.pth").exists():
            run_logged([nnunet_command("nnUNetv2_train"), str(single["id"]), "2d", str(f), "-tr", "ExtBaselineTrainer",
                        "-device", "cpu"], env, log)


def predict_both(work: Path, src: Path, single: dict, state: dict) -> dict:
    times = {}
    for arm in ("cascade", "single"):
        out = work / f"pred_{arm}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        if arm == "cascade":
            consensus.predict(SRC, src / "imagesTs", out, device="cpu", jobs=1, keep_rater_predictions=True)
        else:
            out.mkdir(parents=True)
            run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(src / "imagesTs"), "-o", str(out), "-d",
                        str(single["id"]), "-c", "2d", "-tr", "ExtBaselineTrainer", "-f",
                        *map(str, range(state["n_folds"])), "-device", "cpu", "-npp", "2", "-nps", "2"],
                       nnunet_env(None, 2), out / "predict.log")
        times[arm] = time.perf_counter() - t
    times["cascade_over_single"] = times["cascade"] / times["single"]
    return times


def study(args):
    work, src = setup(args)
    log = work / "bench.log"
    if not (src / consensus.STATE).exists():
        consensus.split_raters(SRC, n_folds=args.folds)
    state = json.loads((src / consensus.STATE).read_text())
    n_r = len(state["raters"])
    budget(args.epochs, args.iterations)
    consensus.train(SRC, 1, "2d", "ExtBaselineTrainer", device="cpu")
    consensus.build_stage2(SRC, device="cpu")
    consensus.train(SRC, 2, "2d", "ExtBaselineTrainer", device="cpu")
    single = single_dataset(src, state)
    budget(args.epochs * (n_r + 1), args.iterations)
    train_single(single, state, args, log)
    times = predict_both(work, src, single, state)
    res = {"settings": vars(args), "raters": n_r,
           "iterations_total": {"cascade": (n_r + 1) * args.folds * args.epochs * args.iterations,
                                "single": args.folds * (n_r + 1) * args.epochs * args.iterations},
           "inference_seconds": times, "scores": {}}
    for arm in ("cascade", "single"):
        ev = evaluate_folders(src / "labelsTs", work / f"pred_{arm}", preset="msseg2", progress=False)
        res["scores"][arm] = {**ev["aggregate"]["msseg2"], "pooled": {k: ev["aggregate"]["pooled"][k] for k in
                                                                      ("lesion_tpr", "lesion_ppv", "lesion_f1")}}
    res["rater_model_table"] = consensus.evaluate(SRC, work / "pred_cascade")["table"]
    print(json.dumps(res, indent=1, default=float))
    return res


def timing(args):
    work, src = setup(args)
    state = json.loads((src / consensus.STATE).read_text())
    single = single_dataset(src, state)
    runs = [predict_both(work, src, single, state) for _ in range(args.repeats)]
    return {"settings": vars(args), "runs": runs,
            "cascade_over_single_median": sorted(r["cascade_over_single"] for r in runs)[len(runs) // 2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("study", "timing"))
    ap.add_argument("--workdir", default="cascade_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=10)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--raters", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = study(args) if args.mode == "study" else timing(args)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
