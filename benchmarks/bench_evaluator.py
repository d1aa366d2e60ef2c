"""Speed and agreement of our per-case metrics against panoptica and medpy on the same mask pairs.

Pairs: phantom reference masks and a perturbed "prediction" (some lesions dropped, some dilated or eroded,
false-positive blobs added). Timings are the best of ``--repeats`` runs on one core
(``OMP_NUM_THREADS=1``); run it on an otherwise idle machine.

    pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/bench_evaluator.py --sizes 96 256 -o benchmarks/results/evaluator.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_ext.metrics.lesions import case_metrics, label_components
from nnunet_ext.data.phantom import PhantomConfig, generate_case


def make_pair(size: int, seed: int, upsample: int):
    """Phantom generated at size/upsample and upsampled (nearest), so lesion loads are realistic for the grid
    (a 256^3 1-mm brain holds lesions of thousands of voxels)."""
    case = generate_case(PhantomConfig(shape=(size // upsample,) * 3, lesions_per_case=(12, 20), empty_fraction=0.0,
                                       seed=seed), 0)
    ref = case.label.astype(bool)
    if upsample > 1:
        ref = ref.repeat(upsample, 0).repeat(upsample, 1).repeat(upsample, 2)
        case.images[0] = case.images[0].repeat(upsample, 0).repeat(upsample, 1).repeat(upsample, 2)
    rng = np.random.default_rng(seed)
    lab, n = label_components(ref, 26)
    pred = np.zeros_like(ref)
    for i in range(1, n + 1):
        les = lab == i
        r = rng.random()
        if r < 0.25:
            continue  # missed
        if r < 0.5:
            les = ndimage.binary_dilation(les)
        elif r < 0.6:
            er = ndimage.binary_erosion(les)
            les = er if er.any() else les
        pred |= les
    brain = case.images[0] > 0.4
    cand = np.flatnonzero(brain & ~ndimage.binary_dilation(ref, iterations=3))
    for c in rng.choice(cand, 6, replace=False):
        z, y, x = np.unravel_index(c, ref.shape)
        pred[z:z + 2, y:y + 3, x:x + 2] = True
    return ref, pred


def best_time(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def ours(ref, pred, spacing):
    return case_metrics(ref, pred, spacing)


def panoptica_eval(ref, pred, spacing):
    from panoptica import (CCABackend, ConnectedComponentsInstanceApproximator, InputType, Metric,
                           NaiveThresholdMatching, Panoptica_Evaluator)
    from panoptica.utils.citation_reminder import disable_citation_reminder

    disable_citation_reminder()
    ev = Panoptica_Evaluator(expected_input=InputType.SEMANTIC,
                             instance_approximator=ConnectedComponentsInstanceApproximator(CCABackend.cc3d),
                             instance_matcher=NaiveThresholdMatching(), instance_metrics=[Metric.IOU],
                             global_metrics=[Metric.DSC, Metric.HD95], verbose=False)
    res = ev.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), voxelspacing=spacing, verbose=False)
    r = res["ungrouped"] if isinstance(res, dict) else res
    r = r[0] if isinstance(r, tuple) else r
    return {"num_ref_instances": r.n_ref_instances, "num_pred_instances": r.n_pred_instances,
            "tp": r.tp, "fp": r.fp, "fn": r.fn, "global_dsc": r.global_bin_dsc, "global_hd95": r.global_bin_hd95}


def medpy_eval(ref, pred, spacing):
    from medpy.metric import binary

    return {"dice": binary.dc(pred, ref), "hd95": binary.hd95(pred, ref, voxelspacing=spacing),
            # the same surface distances, combined as max of the two directed 95th percentiles (our definition)
            "hd95_directed_max": max(np.percentile(binary.__surface_distances(pred, ref, spacing, 1), 95),
                                     np.percentile(binary.__surface_distances(ref, pred, spacing, 1), 95)),
            "obj_tpr": binary.obj_tpr(pred, ref), "obj_fpr": binary.obj_fpr(pred, ref)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 256])
    ap.add_argument("--upsample", type=int, nargs="+", default=[2, 4], help="per size: phantom grid divisor")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="array order z y x")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    rows = []
    for size, up in zip(args.sizes, args.upsample):
        ref, pred = make_pair(size, seed=size, upsample=up)
        sp = tuple(args.spacing)
        t_ours, m = best_time(lambda: ours(ref, pred, sp), args.repeats)
        row = {"size": size, "ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum()),
               "ours_s": t_ours, "ours": {k: m[k] for k in ("dice", "hd95", "ref_lesions", "pred_lesions",
                                                             "lesion_tp", "lesion_fn", "lesion_fp")}}
        try:
            t_p, p = best_time(lambda: panoptica_eval(ref, pred, sp), args.repeats)
            row.update({"panoptica_s": t_p, "panoptica": p, "ours_over_panoptica": t_ours / t_p})
        except ImportError as e:
            row["panoptica"] = f"not installed: {e}"
        try:
            t_m, md = best_time(lambda: medpy_eval(ref, pred, sp), args.repeats)
            row.update({"medpy_s": t_m, "medpy": md})
        except ImportError as e:
            row["medpy"] = f"not installed: {e}"
        m6 = case_metrics(ref, pred, sp, connectivity=6)
        row["ours_6conn"] = {k: m6[k] for k in ("ref_lesions", "pred_lesions", "lesion_tpr", "lesion_ppv")}
        rows.append(row)
        print(json.dumps(row, indent=1, default=float), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
