"""Conditional instance norm benchmarks on the phantom, real nnU-Net training on CPU (2d configuration).

``scin``: the missing-small-lesions experiment (Nichyporuk, thesis ch. 6) on the phantom. Two cohorts with
the same image distribution: ``cohort0_all`` labels every lesion, ``cohort1_no_small`` omits lesions of
10 voxels or fewer from its training labels. Arms, same budget, fold 0 of each dataset: single-cohort
(nnU-Net on cohort0_all cases only), naive pooling (nnU-Net on both cohorts) and SCINTrainer on both
cohorts, predicted once per cohort condition. Scored on held-out cases labelled with the original protocol
(all lesions): mean Dice and lesion F1 of 3-10-voxel lesions.

``film``: ResolutionFiLMTrainer vs ExtBaselineTrainer (= nnUNetTrainer) on a phantom mixing two sites,
1 mm isotropic and 1x1x3 mm (thick slices), same budget and split; scores overall and per site.

``overhead-net``: the network's share, forward + backward + SGD step of the planned network, plain vs
conditioned, interleaved on one thread (robust to other load on the machine).

``overhead``: seconds per training iteration of ResolutionFiLMTrainer and SCINTrainer vs
ExtBaselineTrainer on the same preprocessed data, runs interleaved, first epoch of each run discarded.

    python benchmarks/bench_conditioning.py scin --workdir /tmp/cond_bench -o benchmarks/results/scin_study.json
    python benchmarks/bench_conditioning.py film --workdir /tmp/cond_bench -o benchmarks/results/film_study.json
    python benchmarks/bench_conditioning.py overhead-net --workdir /tmp/cond_bench -o benchmarks/results/conditioning_overhead_net.json
    python benchmarks/bench_conditioning.py overhead --workdir /tmp/cond_bench -o benchmarks/results/conditioning_overhead.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np

from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.metrics.lesions import lesion_rates
from nnunet_ext.core.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.data.phantom import PhantomConfig, dataset_folder_name, write_phantom_dataset
from nnunet_ext.inference.predict import predict

SCIN_DS, SINGLE_DS, FILM_DS = 530, 531, 532


def plan(env, dataset: int, log: Path) -> None:
    name = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset:03d}_*")).name
    if not (Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d").is_dir():
        run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset), "-c", "2d", "-np", "2"], env, log)


def train(env, dataset: int, trainer: str, fold, epochs: int, iterations: int, log: Path, fresh=False) -> Path:
    env = dict(env, NNUNET_EXT_NUM_EPOCHS=str(epochs), NNUNET_EXT_ITERATIONS=str(iterations), NNUNET_EXT_VAL_ITERATIONS="4")
    name = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset:03d}_*")).name
    out = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
    if fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "checkpoint_final.pth").exists():
        run_logged([nnunet_command("nnUNetv2_train"), str(dataset), "2d", str(fold), "-tr", trainer, "-device", "cpu"],
                   env, log)
    return out


def epoch_times(out: Path) -> list[float]:
    logs = sorted(out.glob("training_log_*.txt"))
    return [float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", logs[-1].read_text())]


def score(ref: Path, pred: Path, cases=None) -> dict:
    ev = evaluate_folders(ref, pred, progress=False)
    per = ev["per_case"] if cases is None else {k: v for k, v in ev["per_case"].items() if k in cases}
    small = {"tp": 0, "fn": 0, "fp": 0}
    for v in per.values():
        b = v["bins"]["3-10"]
        small["tp"] += b["lesion_tp"]
        small["fn"] += b["lesion_fn"]
        small["fp"] += b["lesion_fp"]
    rates = lesion_rates(small["tp"], small["tp"] + small["fn"], small["tp"], small["tp"] + small["fp"],
                         convention="bin")
    tpr, ppv, f1 = rates["lesion_tpr"], rates["lesion_ppv"], rates["lesion_f1"]
    return {"cases": len(per), "mean_dice": float(np.mean([v["dice"] for v in per.values()])),
            "lesion_f1_mean": float(np.mean([v["lesion_f1"] for v in per.values()])),
            "small_lesions": small, "small_lesion_tpr": tpr, "small_lesion_ppv": ppv,
            "small_lesion_f1": f1}


def env_for(work: Path) -> dict:
    env = nnunet_env(work, 2)
    import os

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    return env


def scin(args):
    work = Path(args.workdir)
    env, log = env_for(work), work / "bench.log"
    raw = Path(env["nnUNet_raw"])
    root = raw / dataset_folder_name(SCIN_DS, "CohortPhantom")
    if not (root / "phantom.json").exists():
        cfg = PhantomConfig(shape=(args.shape,) * 3, seed=args.seed, cohorts=("all", "no_small"))
        write_phantom_dataset(raw, SCIN_DS, args.cases, cfg, n_test=args.test_cases, name="CohortPhantom", num_workers=2)
    single = raw / dataset_folder_name(SINGLE_DS, "CohortAllOnly")
    if not (single / "dataset.json").exists():
        cohorts = json.loads((root / "cohorts.json").read_text())
        keep = sorted(k for k, c in cohorts.items() if c == "cohort0_all" and (root / "labelsTr" / f"{k}.nii.gz").exists())
        for sub in ("imagesTr", "labelsTr"):
            (single / sub).mkdir(parents=True, exist_ok=True)
        for k in keep:
            shutil.copy(root / "imagesTr" / f"{k}_0000.nii.gz", single / "imagesTr")
            shutil.copy(root / "labelsTr" / f"{k}.nii.gz", single / "labelsTr")
        dj = json.loads((root / "dataset.json").read_text())
        dj.update(numTraining=len(keep), name="CohortAllOnly")
        (single / "dataset.json").write_text(json.dumps(dj, indent=1))
    for d in (SCIN_DS, SINGLE_DS):
        plan(env, d, log)
    res = {"settings": vars(args), "arms": {}}
    arms = [("single_cohort", SINGLE_DS, "ExtBaselineTrainer", None), ("pooled", SCIN_DS, "ExtBaselineTrainer", None),
            ("scin_as_cohort0_all", SCIN_DS, "SCINTrainer", "cohort0_all"),
            ("scin_as_cohort1_no_small", SCIN_DS, "SCINTrainer", "cohort1_no_small")]
    for arm, d, trainer, cohort in arms:
        out = train(env, d, trainer, 0, args.epochs, args.iterations, log)
        pred = work / f"pred_{arm}"
        if not (pred / "nnunet_ext_predict.json").exists():
            predict(root / "imagesTs", pred, d, "2d", trainer, folds=[0], device="cpu", n_proc=2, cohort=cohort)
        res["arms"][arm] = {"trainer": trainer, "dataset": d, "cohort": cohort,
                            "training_cases": len(json.loads((Path(env["nnUNet_preprocessed"]) / out.parent.parent.name /
                                                              "splits_final.json").read_text())[0]["train"]),
                            **score(root / "labelsTs", pred)}
        print(arm, json.dumps(res["arms"][arm], default=float), flush=True)
    return res


def film(args):
    work = Path(args.workdir)
    env, log = env_for(work), work / "bench.log"
    raw = Path(env["nnUNet_raw"])
    root = raw / dataset_folder_name(FILM_DS, "MixedSpacingPhantom")
    if not (root / "phantom.json").exists():
        cfg = PhantomConfig(shape=(args.shape,) * 3, seed=args.seed + 1, sites=((1.0, 1.0, 1.0), (1.0, 1.0, 3.0)))
        write_phantom_dataset(raw, FILM_DS, args.cases, cfg, n_test=args.test_cases, name="MixedSpacingPhantom",
                              num_workers=2)
    plan(env, FILM_DS, log)
    sites = json.loads((root / "phantom.json").read_text())["sites_of_cases"]
    res = {"settings": vars(args), "arms": {}}
    for trainer in ("ExtBaselineTrainer", "ResolutionFiLMTrainer"):
        train(env, FILM_DS, trainer, 0, args.epochs, args.iterations, log)
        pred = work / f"pred_film_{trainer}"
        if not (pred / "nnunet_ext_predict.json").exists():
            predict(root / "imagesTs", pred, FILM_DS, "2d", trainer, folds=[0], device="cpu", n_proc=2)
        res["arms"][trainer] = {"all": score(root / "labelsTs", pred)}
        for s, spacing in enumerate(("1x1x1 mm", "1x1x3 mm")):
            res["arms"][trainer][spacing] = score(root / "labelsTs", pred, {k for k, v in sites.items() if v == s})
        print(trainer, json.dumps(res["arms"][trainer], default=float), flush=True)
    return res


def overhead(args):
    work = Path(args.workdir)
    env, log = env_for(work), work / "bench.log"
    plan(env, SCIN_DS, log)
    per_iter = {t: [] for t in ("ExtBaselineTrainer", "ResolutionFiLMTrainer", "SCINTrainer")}
    for _ in range(args.repeats):
        for t in per_iter:
            out = train(env, SCIN_DS, t, 3, args.overhead_epochs, args.iterations, log, fresh=True)
            per_iter[t] += [x / args.iterations for x in epoch_times(out)[1:]]
    res = {t: {"s_per_iteration_median": float(np.median(v)), "s_per_iteration_mean": float(np.mean(v)), "n_epochs": len(v)}
           for t, v in per_iter.items()}
    base = res["ExtBaselineTrainer"]["s_per_iteration_median"]
    for t in ("ResolutionFiLMTrainer", "SCINTrainer"):
        res[t]["overhead_percent_median"] = 100 * (res[t]["s_per_iteration_median"] / base - 1)
    res["settings"] = vars(args)
    print(json.dumps(res, indent=1))
    return res


def overhead_net(args):
    """Forward + backward + SGD step of nnU-Net's planned 2d network (dataset 530's plans, its batch and
    patch size) unconditioned vs FiLM vs SCIN, interleaved, one thread: the network share of an iteration."""
    import time

    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.networks.conditional_norm import condition_network

    work = Path(args.workdir)
    env_for(work)
    plans = PlansManager(str(next((work / "nnUNet_preprocessed").glob(f"Dataset{SCIN_DS}_*")) / "nnUNetPlans.json"))
    cm = plans.get_configuration("2d")
    torch.set_num_threads(1)

    def build(kind):
        torch.manual_seed(0)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=True, deep_supervision=True)
        if kind == "spacing":
            condition_network(net, kind).ext_condition.set(torch.tensor([[1.0, 1.0, 3.0]] * cm.batch_size))
        elif kind == "cohort":
            condition_network(net, kind, 8).ext_condition.set(torch.arange(cm.batch_size) % 2)
        return net, torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    nets = {k: build(k) for k in ("plain", "spacing", "cohort")}
    x = torch.randn(cm.batch_size, 1, *cm.patch_size)
    times = {k: [] for k in nets}
    for rep in range(args.net_repeats + 2):
        for k, (net, opt) in nets.items():
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sum(o.float().square().mean() for o in net(x)).backward()
            opt.step()
            if rep >= 2:  # warm-up
                times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"batch_size": cm.batch_size, "patch_size": list(cm.patch_size), "threads": 1, "repeats": args.net_repeats,
           "median_s": med, "FiLM_overhead_percent": 100 * (med["spacing"] / med["plain"] - 1),
           "SCIN_overhead_percent": 100 * (med["cohort"] / med["plain"] - 1)}
    print(json.dumps(res, indent=1))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("scin", "film", "overhead", "overhead-net"))
    ap.add_argument("--workdir", default="cond_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--test-cases", type=int, default=10)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--overhead-epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--net-repeats", type=int, default=30)
    args = ap.parse_args()
    res = {"scin": scin, "film": film, "overhead": overhead, "overhead-net": overhead_net}[args.mode](args)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
