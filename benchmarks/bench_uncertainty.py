"""Cost of ``nnunet-ext predict --uncertainty`` (and ``--lesion-table``) against plain ``nnunet-ext predict``.

Target: at most 1.05x the wall time of plain prediction with mirroring (nnU-Net's default test-time flips) on
the same cases. The entropy comes from the probabilities the flipped predictions already give, so the extra
work is in nnU-Net's export workers: one entropy map per case (and the connected components and their
statistics for the table), one more float32 NIfTI written per case.

Steps (real nnU-Net, CPU):

1. a phantom (``nnunet-ext phantom``, default 8 training and 6 test cases of 64^3) planned for ``2d``
   (``nnUNetv2_plan_and_preprocess -c 2d -np 2``); 2d is the configuration with the fewest flips (4), i.e.
   the least network work to hide the extra export work behind;
2. a model trained very briefly (the cost of prediction does not depend on how good the weights are):
   ``NNUNET_EXT_NUM_EPOCHS=1 NNUNET_EXT_ITERATIONS=2 nnUNetv2_train ID 2d 0 -tr ExtBaselineTrainer``;
3. in this process, one loaded predictor (nnunet_ext.inference.predictor.load_predictor, mirroring on, fold 0),
   then ``predict_cases`` on the test cases into a fresh folder per run, one preprocessing and one export
   process (``-npp 1 -nps 1``), arms alternating in a rotating order, after one untimed run of each:
   ``plain``, ``uncertainty`` (``--uncertainty``), ``both`` (``--uncertainty --lesion-table``).

Reported: wall and CPU seconds per run (CPU: this process and its finished children, i.e. nnU-Net's
workers), per-arm medians, the ratio of the medians to ``plain``, the median of the per-round ratios and the
ratio of the summed CPU seconds; the load average around every run (the machine may be shared); the number
of predicted lesions. Also the export-side work alone, per case, in this process (CPU and wall, median of 5):
the entropy map, the lesion table of the reference lesions and of the predicted mask (a briefly trained
model predicts many small noise lesions: a worst case for the table) and the entropy map's NIfTI write. The
JSON is rewritten after every run.

    nice -n 5 python benchmarks/bench_uncertainty.py --workdir /tmp/unc_bench --width-divisor 4 --max-cases 1 \
        --repeats 5 --threads 1 -o benchmarks/results/uncertainty_overhead.json
    nice -n 5 python benchmarks/bench_uncertainty.py --workdir /tmp/unc_bench \
        --export-side-only /tmp/unc_bench/runs/both_0 -o benchmarks/results/uncertainty_overhead.json

``--width-divisor 4`` divides the planned network's features per stage by 4 (and retrains the brief model):
both arms run exactly the same network passes, so a narrower network only shrinks the part they share and
the ratio it gives is an upper bound on the planned network's (whose one 64^3 case costs minutes of CPU on
two shared cores). ``--threads 1``: on a loaded machine two torch threads spin against each other (about 4x the
CPU seconds of one thread here); the export workers use one thread either way.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET = 874
TRAINER = "ExtBaselineTrainer"
ARMS = {"plain": {}, "uncertainty": {"uncertainty": True}, "both": {"uncertainty": True, "lesion_table": True}}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (nnU-Net's preprocessing and export
    workers end with each prediction call)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def sh(cmd: list[str], env: dict, log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{cmd[0]} failed (exit {rc}); see {log}")


def prepare(work: Path, cases: int, test_cases: int, shape: int, width_divisor: int = 1) -> tuple[dict, Path, Path]:
    """(env, raw dataset folder, model folder): phantom, 2d plan (its ``features_per_stage`` divided by
    ``width_divisor``), a briefly trained model (reused if there, with the same width)."""
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1",
                "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2"})
    log = work / "prepare.log"
    raw = Path(env["nnUNet_raw"]) / "Dataset874_MSPhantom"
    if not (raw / "dataset.json").is_file():
        sh([nnunet_command("nnunet-ext"), "phantom", "-d", str(DATASET), "--cases", str(cases), "--test-cases",
            str(test_cases), "--shape", str(shape), str(shape), str(shape), "--seed", "0", "--quiet"], env, log)
    model = Path(env["nnUNet_results"]) / raw.name / f"{TRAINER}__nnUNetPlans__2d"
    plans_file = Path(env["nnUNet_preprocessed"]) / raw.name / "nnUNetPlans.json"
    if not plans_file.is_file():
        sh([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"], env, log)
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    planned = plans.setdefault("nnunet_ext_bench_planned_features", list(arch["features_per_stage"]))
    want = [max(4, f // width_divisor) for f in planned]
    if arch["features_per_stage"] != want:
        arch["features_per_stage"] = want
        plans_file.write_text(json.dumps(plans, indent=1))
        shutil.rmtree(model, ignore_errors=True)  # trained with another width
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        sh([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env, log)
    return env, raw, model


def export_side_costs(raw: Path, pred: Path, cases: list[str], connectivity: int = 26, repeats: int = 5) -> dict:
    """CPU and wall seconds per case (medians of ``repeats`` after one untimed call) of the export-side work
    alone, on a prediction folder of the ``both`` arm: the entropy map, the lesion table of the reference lesions
    and of the predicted mask (both with the predicted lesion probability), the entropy map's NIfTI write."""
    import SimpleITK as sitk

    from nnunet_ext.inference.lesion_table import Geometry, case_lesions
    from nnunet_ext.inference.uncertainty import entropy

    def timed(fn):
        fn()
        cpu, wall = [], []
        for _ in range(repeats):
            c, t = time.process_time(), time.perf_counter()
            out = fn()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
        return out, round(statistics.median(cpu), 4), round(statistics.median(wall), 4)

    rows = []
    for case in cases:
        ref = sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        q = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "soft" / f"{case}.nii.gz"))).astype(np.float32)
        prob = np.stack([1 - q, q])
        geo = Geometry.from_image(ref)
        ent, e_cpu, e_wall = timed(lambda: entropy(prob))
        ref_rows, r_cpu, r_wall = timed(lambda: case_lesions(case, sitk.GetArrayFromImage(ref), q, ent, geo,
                                                               connectivity)[0])
        pred_rows, p_cpu, p_wall = timed(lambda: case_lesions(case, mask, q, ent, geo, connectivity)[0])
        out = pred.parent / f".bench_entropy_{case}.nii.gz"

        def write():
            img = sitk.GetImageFromArray(ent)
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(out), True, 1)

        _, w_cpu, w_wall = timed(write)
        out.unlink()
        rows.append({"case": case, "voxels": int(q.size), "reference_lesions": len(ref_rows),
                     "predicted_lesions": len(pred_rows), "entropy_cpu_s": e_cpu, "entropy_wall_s": e_wall,
                     "table_reference_cpu_s": r_cpu, "table_reference_wall_s": r_wall,
                     "table_predicted_cpu_s": p_cpu, "table_predicted_wall_s": p_wall,
                     "entropy_write_cpu_s": w_cpu, "entropy_write_wall_s": w_wall})
    return {"repeats": repeats, "per_case": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/unc_bench")
    ap.add_argument("-o", "--output", default="benchmarks/results/uncertainty_overhead.json")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every arm once)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--test-cases", type=int, default=6)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--max-cases", type=int, default=None, help="time only the first N test cases")
    ap.add_argument("--width-divisor", type=int, default=1,
                    help="divide the planned network's features per stage by this (less network work per voxel, "
                         "the same extra work: the ratio is then an upper bound on the planned network's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the predicting process (default: the predictor's, one per CPU core); "
                         "1 avoids threads spinning against each other on a loaded machine")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help="arms to time (plain is always timed)")
    ap.add_argument("--export-side-only", metavar="RUN_FOLDER", default=None,
                    help="only time the export-side work on a finished run folder of the both arm (e.g. "
                         "WORKDIR/runs/both_0) and add it to -o")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    if args.export_side_only:
        run = Path(args.export_side_only)
        out = Path(args.output)
        result = json.loads(out.read_text()) if out.is_file() else {}
        cases = sorted(p.name[:-7] for p in (run / "soft").glob("*.nii.gz"))
        raw = work / "nnUNet_raw" / "Dataset874_MSPhantom"
        result["export_side_alone"] = {"run": str(run), **export_side_costs(raw, run, cases)}
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["export_side_alone"], indent=1))
        return
    work.mkdir(parents=True, exist_ok=True)
    env, raw, model = prepare(work, args.cases, args.test_cases, args.shape, args.width_divisor)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        os.environ[k] = env[k]
    os.environ.setdefault("nnUNet_def_n_proc", "2")

    import torch

    from nnunet_ext.inference.predictor import load_predictor, predict_cases

    predictor = load_predictor(model, [0], device="cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    images = raw / "imagesTs"
    files = sorted(images.glob("*_0000.nii.gz"))[:args.max_cases]
    inputs = [[str(f)] for f in files]  # one channel per case (the phantom)
    arms = {a: ARMS[a] for a in ARMS if a == "plain" or a in args.arms}
    runs_dir = work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    result = {"what": "wall seconds of predict_cases on the test cases, one loaded predictor, mirroring on, "
                      "-npp 1 -nps 1; arms alternate in a rotating order",
              "dataset": raw.name, "configuration": "2d", "trainer": TRAINER, "fold": 0,
              "test_cases": len(inputs), "shape": [args.shape] * 3,
              "mirroring_passes_per_patch": 4, "width_divisor": args.width_divisor,
              "features_per_stage": predictor.plans_manager.get_configuration("2d").network_arch_init_kwargs[
                  "features_per_stage"], "command": " ".join(["python", *sys.argv]),
              "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "runs": []}
    out = Path(args.output)

    def save():
        times = {a: [r["wall_s"] for r in result["runs"] if r["arm"] == a and r["timed"]] for a in arms}
        cpu = {a: [r["cpu_s"] for r in result["runs"] if r["arm"] == a and r["timed"]] for a in arms}
        if all(cpu.values()):
            result["median_cpu_s"] = {a: round(statistics.median(v), 3) for a, v in cpu.items()}
            result["cpu_ratio_of_sums"] = {a: round(sum(cpu[a]) / sum(cpu["plain"]), 4) for a in arms if a != "plain"}
        if all(times.values()):
            med = {a: statistics.median(t) for a, t in times.items()}
            result["median_wall_s"] = {a: round(v, 3) for a, v in med.items()}
            result["ratio_of_medians"] = {a: round(med[a] / med["plain"], 4) for a in arms if a != "plain"}
            rounds = sorted({r["round"] for r in result["runs"] if r["timed"]})
            per_round = {a: [] for a in arms if a != "plain"}
            for k in rounds:
                t = {r["arm"]: r["wall_s"] for r in result["runs"] if r["round"] == k and r["timed"]}
                for a in per_round:
                    if a in t and "plain" in t:
                        per_round[a].append(t[a] / t["plain"])
            result["median_per_round_ratio"] = {a: round(statistics.median(v), 4) for a, v in per_round.items() if v}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    names = list(arms)
    for k in range(-1, args.repeats):  # round -1: one untimed run of each arm (warm caches, first-call costs)
        order = names[k % len(names):] + names[:k % len(names)] if k >= 0 else names
        for arm in order:
            dest = runs_dir / f"{arm}_{k + 1}"
            la0 = loadavg()
            c0 = cpu_seconds()
            t = time.perf_counter()
            predict_cases(model, [0], inputs, dest, device="cpu", predictor=predictor, npp=1, nps=1, progress=False,
                          **arms[arm])
            wall = time.perf_counter() - t
            cpu = cpu_seconds() - c0
            n_les = None
            if (dest / "cases.csv").is_file():
                import csv

                with open(dest / "cases.csv") as f:
                    n_les = sum(int(r["lesions"]) for r in csv.DictReader(f))
            result["runs"].append({"round": k + 1, "arm": arm, "timed": k >= 0, "wall_s": round(wall, 3),
                                   "cpu_s": round(cpu, 3),
                                   "loadavg_before": la0, "loadavg_after": loadavg(), "predicted_lesions": n_les})
            print(f"round {k + 1} {arm}: {wall:.2f} s (load {la0[0]})", flush=True)
            save()
            if k >= 0 and not (k == args.repeats - 1 and arm == names[-1]):
                shutil.rmtree(dest, ignore_errors=True)
    last = runs_dir / f"{names[-1]}_{args.repeats}"
    result["export_side_alone"] = export_side_costs(raw, last, [f.name[:-12] for f in files])
    save()
    print(json.dumps({k: result.get(k) for k in ("median_wall_s", "ratio_of_medians", "median_per_round_ratio")}))


if __name__ == "__main__":
    main()
