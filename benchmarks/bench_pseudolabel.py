"""Cost of ``nnunet-ext pseudolabel`` (the one predictor) against ``nnUNetv2_predict`` with mirroring (issue 13).

Target: pseudolabel wall time <= 1.05x nnUNetv2_predict's on the same unlabeled cases, measured in the same
run at 3d_fullres-shaped sizes.

Steps (all real nnU-Net commands, CPU):

1. phantom teacher dataset (``nnunet-ext phantom``; its ``imagesTs`` -- default 16 cases -- are the unlabeled
   cases), ``nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2``;
2. a teacher trained very briefly (the cost of prediction does not depend on how good the weights are):
   ``NNUNET_EXT_NUM_EPOCHS=1 NNUNET_EXT_ITERATIONS=2 nnUNetv2_train ID 3d_fullres 0 -tr ExtBaselineTrainer``;
3. timed, interleaved A B A B ...: A = ``nnUNetv2_predict ... -npp 1 -nps 1`` (mirroring on, nnU-Net's
   default), B = ``nnunet-ext pseudolabel ...`` into a fresh student dataset each time (pseudolabel runs
   the predictor with one preprocessing and one export process, i.e. the same as -npp 1 -nps 1).

Every timed run records wall time, the CPU time of the command (user + sys of the child processes) and
the load average before and after; the JSON is rewritten after each run, so a partial run keeps its
numbers. Commands run under ``nice -n 5`` (``--nice``).

    python benchmarks/bench_pseudolabel.py --workdir /tmp/pl_bench --width-divisor 4 -o benchmarks/results/pseudolabel.json

Where the difference goes, per case, in one process (after the run above, on its teacher):

    python benchmarks/bench_pseudolabel.py --export-profile /tmp/pl_bench
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_ext.core.paths import nnunet_command, nnunet_env

TEACHER = 873


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], env: dict, log: Path, nice: int) -> dict:
    """Run ``cmd`` (under nice), output appended to ``log``; wall and child CPU seconds."""
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    print("$ " + " ".join(full), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    la0 = loadavg()
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(full) + "\n")
        f.flush()
        rc = subprocess.call(full, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"command failed with exit code {rc}: {' '.join(full)} (output in {log})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": la0, "load_after": loadavg()}
    print(f"   ... {res}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/pl_bench")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("-d", "--dataset", type=int, default=TEACHER, help="teacher dataset id (students: id+1, id+2, ...)")
    ap.add_argument("--cases", type=int, default=5, help="labeled training cases (5: nnU-Net's 5-fold split)")
    ap.add_argument("--unlabeled", type=int, default=16, help="unlabeled cases (the phantom's test cases)")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs")
    ap.add_argument("--nice", type=int, default=5)
    ap.add_argument("--width-divisor", type=int, default=1,
                    help="divide the planned 3d_fullres features_per_stage by this (a smaller network: both arms run "
                         "the same network passes, so this shrinks the common part and makes the ratio stricter)")
    ap.add_argument("--tst", type=float, default=0.0,
                    help="pseudolabel's case threshold; 0 keeps every case, so every student file is written (worst case)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(work, 2)
    env.update(nnUNet_def_n_proc="2", nnUNet_n_proc_DA="2")
    log = work / "bench.log"
    raw = Path(env["nnUNet_raw"])
    ext, did = nnunet_command("nnunet-ext"), str(args.dataset)
    tname = f"Dataset{args.dataset:03d}_MSPhantom"
    troot = raw / tname
    setup = {}
    if not (troot / "phantom.json").exists():
        setup["phantom"] = run([ext, "phantom", "-d", did, "--cases", str(args.cases), "--test-cases", str(args.unlabeled),
                                "--shape", *map(str, args.shape), "--seed", "0", "-np", "2"], env, log, 0)
    pre = Path(env["nnUNet_preprocessed"]) / tname
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        setup["plan_and_preprocess"] = run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", did, "-c", "3d_fullres",
                                            "-np", "2"], env, log, 0)
    plans_file = pre / "nnUNetPlans.json"
    plans_all = json.loads(plans_file.read_text())
    arch = plans_all["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    planned = plans_all.setdefault("nnunet_ext_bench_planned_features", list(arch["features_per_stage"]))
    want = [max(4, f // args.width_divisor) for f in planned]
    model = Path(env["nnUNet_results"]) / tname / "ExtBaselineTrainer__nnUNetPlans__3d_fullres"
    if arch["features_per_stage"] != want:
        arch["features_per_stage"] = want
        plans_file.write_text(json.dumps(plans_all, indent=1))
        shutil.rmtree(model, ignore_errors=True)  # trained with another width
    if not (model / "fold_0" / "checkpoint_final.pth").exists():
        tenv = dict(env, NNUNET_EXT_NUM_EPOCHS="1", NNUNET_EXT_ITERATIONS="2", NNUNET_EXT_VAL_ITERATIONS="1")
        setup["train"] = run([nnunet_command("nnUNetv2_train"), did, "3d_fullres", "0", "-tr", "ExtBaselineTrainer",
                              "-device", "cpu"], tenv, log, 0)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    unl = troot / "imagesTs"
    n_unl = len(list(unl.glob("*_0000.nii.gz")))
    predict_cmd = lambda out: [nnunet_command("nnUNetv2_predict"), "-i", str(unl), "-o", str(out), "-d", did, "-c",  # noqa: E731
                               "3d_fullres", "-f", "0", "-tr", "ExtBaselineTrainer", "-device", "cpu", "-npp", "1",
                               "-nps", "1"]
    pseudo_cmd = lambda name: [ext, "pseudolabel", "-d", did, "-c", "3d_fullres", "-tr", "ExtBaselineTrainer",  # noqa: E731
                               "-f", "0", "-i", str(unl), "--student", name, "--tst", repr(args.tst), "-device", "cpu",
                               "-npp", "1", "-nps", "1"]
    res = {"issue": 13, "target": "pseudolabel wall time <= 1.05 x nnUNetv2_predict (mirroring on), same cases, same run",
           "command": " ".join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
           "settings": {**vars(args), "unlabeled_cases": n_unl, "patch_size": plans["patch_size"],
                        "spacing": plans["spacing"], "batch_size": plans["batch_size"],
                        "features_per_stage": plans["architecture"]["arch_kwargs"]["features_per_stage"],
                        "planned_features_per_stage": planned,
                        "nnUNet_def_n_proc": env["nnUNet_def_n_proc"], "cpu_count": os.cpu_count()},
           "commands": {"A_nnUNetv2_predict": " ".join(predict_cmd(work / "pred_<round>")),
                        "B_pseudolabel": " ".join(pseudo_cmd(f"Dataset<{args.dataset + 1}+round>_Student"))},
           "setup": setup, "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "runs": []}

    def save():
        a = [r for r in res["runs"] if r["arm"] == "A_nnUNetv2_predict"]
        b = [r for r in res["runs"] if r["arm"] == "B_pseudolabel"]
        if a and b:
            ma, mb = statistics.median(r["wall_s"] for r in a), statistics.median(r["wall_s"] for r in b)
            ca, cb = statistics.median(r["cpu_s"] for r in a), statistics.median(r["cpu_s"] for r in b)
            pairs = [round(y["wall_s"] / x["wall_s"], 3) for x, y in zip(a, b)]
            res["summary"] = {"median_wall_s": {"A_nnUNetv2_predict": ma, "B_pseudolabel": mb},
                              "ratio_wall_median": round(mb / ma, 3), "ratio_wall_per_round": pairs,
                              "median_cpu_s": {"A_nnUNetv2_predict": ca, "B_pseudolabel": cb},
                              "ratio_cpu_median": round(cb / ca, 3),
                              "rounds_done": min(len(a), len(b))}
        res["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(json.dumps(res.get("summary", {}), indent=1), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(res, indent=1) + "\n")

    for r in range(args.rounds):
        out = work / f"pred_{r}"
        shutil.rmtree(out, ignore_errors=True)
        res["runs"].append({"arm": "A_nnUNetv2_predict", "round": r, **run(predict_cmd(out), env, log, args.nice)})
        save()
        sname = f"Dataset{args.dataset + 1 + r:03d}_Student"
        shutil.rmtree(raw / sname, ignore_errors=True)
        res["runs"].append({"arm": "B_pseudolabel", "round": r, **run(pseudo_cmd(sname), env, log, args.nice)})
        prov = json.loads((raw / sname / "provenance.json").read_text())
        res["runs"][-1]["kept"], res["runs"][-1]["dropped"] = len(prov["kept"]), len(prov["dropped"])
        save()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(raw / sname, ignore_errors=True)


def export_profile(work: Path, dataset: int, repeats: int = 3) -> dict:
    """In one process, on one unlabeled case: nnU-Net's export step (``export_prediction_from_logits``, what
    ``nnUNetv2_predict`` runs per case) against the one predictor's export with pseudolabel's hook
    (``export_with_contract`` + ``pseudolabel.finish_case``), and nnU-Net's mirroring step (mean of logits)
    against ``mean_probabilities`` on one tile. Median seconds of ``repeats`` runs each, interleaved."""
    import functools
    import tempfile

    import torch

    env = nnunet_env(work, 2)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from nnunet_ext.inference.predictor import export_with_contract, load_predictor
    from nnunet_ext.workflows.pseudolabel import finish_case

    torch.set_num_threads(1)
    tname = f"Dataset{dataset:03d}_MSPhantom"
    model = Path(env["nnUNet_results"]) / tname / "ExtBaselineTrainer__nnUNetPlans__3d_fullres"
    img = sorted((Path(env["nnUNet_raw"]) / tname / "imagesTs").glob("*_0000.nii.gz"))[0]
    case = img.name[:-len("_0000.nii.gz")]
    pred = load_predictor(model, [0], device="cpu")
    pm, cm, dj = pred.plans_manager, pred.configuration_manager, pred.dataset_json
    pre = cm.preprocessor_class(verbose=False)
    data, _, props = pre.run_case([str(img)], None, pm, cm, dj)
    torch.manual_seed(0)
    logits = torch.randn((2, *data.shape[1:]))
    out = {"case": case, "preprocessed_shape": list(data.shape[1:]), "nnunet_export_s": [], "pseudolabel_export_s": [],
           "mean_logits_mirror_s": [], "mean_probabilities_mirror_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "Dataset999_Student"
        for d in ("imagesTr", "labelsTr", "confidenceTr", "lesionmapTr", ".nnunet_ext_progress"):
            (root / d).mkdir(parents=True)
        hook_args = {"root": str(root), "ending": ".nii.gz", "alpha": 0.3, "vpt": 0.3, "tst": 0.0, "ignore_label": None,
                     "files": {case: [str(img)]}, "soft": False, "soft_rim_gamma": None, "soft_rim_mm": 1.0}
        options = {"activation": "softmax", "threshold": None, "min_lesion_mm3": 0.0, "connectivity": 26,
                   "save_probabilities": False, "write_soft": False, "write_mask": False,
                   "hook": finish_case, "hook_args": hook_args}
        ours = functools.partial(export_with_contract, options)
        tile = torch.from_numpy(np.asarray(data[:, :cm.patch_size[0], :cm.patch_size[1], :cm.patch_size[2]])).float()[None]
        for _ in range(repeats):
            t = time.perf_counter()
            export_prediction_from_logits(logits.clone(), props, cm, pm, dj, str(Path(tmp) / case), False, 1)
            out["nnunet_export_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ours(logits.clone(), props, cm, pm, dj, str(Path(tmp) / "x" / case), False, 1)
            out["pseudolabel_export_s"].append(time.perf_counter() - t)
            pred.network.load_state_dict(pred.list_of_parameters[0])
            with torch.no_grad():
                for mode in ("mean_logits", "mean_probabilities"):
                    pred.contract.tta = mode
                    t = time.perf_counter()
                    pred._internal_maybe_mirror_and_predict(tile)
                    out[f"{mode}_mirror_s"].append(time.perf_counter() - t)
    for k in [k for k in out if k.endswith("_s")]:
        out[k] = {"median": round(statistics.median(out[k]), 3), "all": [round(x, 3) for x in out[k]]}
    return out


if __name__ == "__main__":
    if "--export-profile" in sys.argv:
        i = sys.argv.index("--export-profile")
        work = Path(sys.argv[i + 1]) if len(sys.argv) > i + 1 else Path("/tmp/pl_bench")
        reps = int(sys.argv[i + 2]) if len(sys.argv) > i + 2 else 3
        print(json.dumps(export_profile(work.resolve(), TEACHER, reps), indent=1))
    else:
        main()
