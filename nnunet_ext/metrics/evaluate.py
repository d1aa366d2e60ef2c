"""Evaluate a folder of predicted masks against a folder of reference masks (NIfTI, matched by case name)."""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.io import case_name, read_image
from nnunet_ext.metrics.lesions import DEFAULT_BINS, aggregate, as_binary, case_metrics, check_connectivity
from nnunet_ext.metrics.soft import add_counts, ece_from_counts, reliability_diagram, volume_pearson


def list_cases(folder: str | os.PathLike, file_ending: str = ".nii.gz") -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    return {case_name(p, file_ending): p for p in sorted(folder.iterdir())
            if p.name.endswith(file_ending) and not p.name.startswith(".")}


def load_mask(path: Path, label: int | None) -> tuple[np.ndarray, tuple[float, ...]]:
    arr, spacing = read_image(path)
    if label is not None:
        return arr == label, spacing
    return as_binary(arr, str(path)), spacing


def check_same_grid(ref_path, ref_shape, ref_spacing, other_path, shape, spacing, rtol: float = 1e-3) -> None:
    if tuple(ref_shape) != tuple(shape):
        raise ValueError(f"shape mismatch: {other_path} has shape {tuple(shape)} but reference {ref_path} has "
                         f"{tuple(ref_shape)} (array order z, y, x)")
    if not np.allclose(ref_spacing, spacing, rtol=rtol):
        raise ValueError(f"spacing mismatch: {other_path} has spacing {tuple(spacing)} but reference {ref_path} "
                         f"has {tuple(ref_spacing)} (mm, array order z, y, x)")


# Presets reproduce a challenge's scoring. wmh2017 (WMH Segmentation Challenge, evaluation.py of the
# organisers): reference label 1 = WMH, label 2 = other pathology, masked out of both images; lesions are
# fully connected (26) components detected by any overlap; HD95 on in-plane (2D-eroded) boundaries.
# msseg2 (MSSEG-2 2021, new lesions): binary masks, 6-connected components, Anima's lesion detection
# (nnunet_ext.metrics.anima) per case under "msseg2", summarised in aggregate["msseg2"].
PRESETS = {"wmh2017": {"lesion_label": 1, "masked_label": 2, "connectivity": 26, "min_overlap": 0.0,
                       "inplane_surface": True},
           "msseg2": {"connectivity": 6, "min_overlap": 0.0, "anima": True}}


def _evaluate_one(args) -> tuple[str, dict, dict | None]:
    case, ref_path, pred_path, label, connectivity, min_overlap, bins, preset, prob_path, soft_path = args
    p = PRESETS[preset] if preset else {}
    if "masked_label" in p:
        ref_raw, spacing = read_image(ref_path)
        ref, outside = ref_raw == p["lesion_label"], ref_raw == p["masked_label"]
    else:
        ref, spacing = load_mask(ref_path, label)
    if pred_path is None:
        pred, p_spacing = np.zeros_like(ref), spacing
    else:
        pred, p_spacing = load_mask(pred_path, p.get("lesion_label") if p and label is None else label)
        check_same_grid(ref_path, ref.shape, spacing, pred_path, pred.shape, p_spacing)
    if "masked_label" in p:
        pred = pred & ~outside
    m = case_metrics(ref, pred, spacing, connectivity, min_overlap, bins, p.get("inplane_surface", False))
    if p.get("anima"):
        from nnunet_ext.metrics.anima import anima_detection

        m["msseg2"] = anima_detection(ref, pred, spacing)
    m["prediction_missing"] = pred_path is None
    calib = None
    if prob_path is not None:
        from nnunet_ext.metrics.operating_points import load_probabilities
        from nnunet_ext.metrics.soft import soft_case_metrics

        prob = load_probabilities(prob_path)
        check_same_grid(ref_path, ref.shape, spacing, prob_path, prob.shape, spacing)
        soft_ref = None
        if soft_path is not None:
            soft_ref, s_spacing = read_image(soft_path)
            check_same_grid(ref_path, ref.shape, spacing, soft_path, soft_ref.shape, s_spacing)
        sm = soft_case_metrics(prob, ref, soft_ref)
        calib = sm.pop("calibration")
        m.update(sm)
    return case, m, calib


def evaluate_folders(ref_dir, pred_dir, output: str | os.PathLike | None = None, connectivity: int = 26,
                     min_overlap: float = 0.0, bins: Sequence[tuple[int, int | None]] = DEFAULT_BINS,
                     allow_missing: bool = False, label: int | None = None, file_ending: str = ".nii.gz",
                     num_workers: int = 1, progress: bool = True, preset: str | None = None,
                     prob_dir=None, soft_ref_dir=None, reliability_png=None) -> dict:
    """Evaluate every reference case; return (and write to ``output`` JSON + CSV) per-case results and
    aggregates. A reference case without prediction is an error unless ``allow_missing`` (then it counts
    as an empty prediction)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        connectivity, min_overlap = PRESETS[preset]["connectivity"], PRESETS[preset]["min_overlap"]
    check_connectivity(connectivity)
    refs, preds = list_cases(ref_dir, file_ending), list_cases(pred_dir, file_ending)
    if not refs:
        raise ValueError(f"no reference files ending in {file_ending} in {ref_dir}")
    missing = [c for c in refs if c not in preds]
    if missing and not allow_missing:
        raise FileNotFoundError(f"no prediction for {len(missing)} reference case(s), e.g. "
                                f"{Path(pred_dir) / (missing[0] + file_ending)}; pass --allow-missing to count "
                                f"them as empty predictions")
    extra = sorted(set(preds) - set(refs))
    probs = softs = {}
    if prob_dir is not None:
        from nnunet_ext.metrics.operating_points import _prob_files

        probs = _prob_files(prob_dir)
        lacking = [c for c in refs if c not in probs]
        if lacking:
            raise FileNotFoundError(f"no probability map for reference case {lacking[0]} in {prob_dir}")
        if soft_ref_dir is not None:
            softs = list_cases(soft_ref_dir, file_ending)
            lacking = [c for c in refs if c not in softs]
            if lacking:
                raise FileNotFoundError(f"no soft reference {Path(soft_ref_dir) / (lacking[0] + file_ending)}")
    jobs = [(c, refs[c], preds.get(c), label, connectivity, min_overlap, tuple(bins), preset, probs.get(c),
             softs.get(c)) for c in refs]
    per_case, calibration = {}, None
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as ex:
            results = ex.map(_evaluate_one, jobs)
            for k, (c, m, calib) in enumerate(results, 1):
                per_case[c] = m
                calibration = calibration if calib is None else add_counts(calibration, calib)
                if progress:
                    print(f"\revaluate: {k}/{len(jobs)}", end="", flush=True)
    else:
        for k, job in enumerate(jobs, 1):
            c, m, calib = _evaluate_one(job)
            per_case[c] = m
            calibration = calibration if calib is None else add_counts(calibration, calib)
            if progress:
                print(f"\revaluate: {k}/{len(jobs)}", end="", flush=True)
    if progress:
        print()
    result = {
        "settings": {"ref_dir": str(ref_dir), "pred_dir": str(pred_dir), "connectivity": connectivity,
                     "min_overlap": min_overlap, "bins": [list(b) for b in bins], "label": label, "preset": preset,
                     "missing_predictions": missing, "predictions_without_reference": extra},
        "per_case": per_case,
        "aggregate": aggregate(per_case, bins),
    }
    result["aggregate"]["volume_pearson"] = volume_pearson([m["ref_volume_mm3"] for m in per_case.values()],
                                                           [m["pred_volume_mm3"] for m in per_case.values()])
    if preset is not None and PRESETS[preset].get("anima"):
        from nnunet_ext.metrics.anima import aggregate_msseg2

        result["aggregate"]["msseg2"] = aggregate_msseg2(per_case)
    if calibration is not None:
        result["aggregate"]["pooled"]["ece"] = ece_from_counts(calibration)
        result["aggregate"]["calibration_counts"] = calibration
        for k in ("soft_dice", "brier", "ipe", "ece"):
            vals = [m[k] for m in per_case.values() if m.get(k) is not None]
            result["aggregate"]["mean"][k] = float(np.mean(vals)) if vals else None
        if reliability_png is not None:
            reliability_diagram(calibration, reliability_png, f"{Path(pred_dir).name}: {len(per_case)} cases")
    if output is not None:
        write_results(result, output)
    return result


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_results(result: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``output`` (JSON) and the same name with ``.csv`` (one row per case, then ``mean`` and
    ``pooled`` rows)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(".tmp_" + output.name)
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, output)
    rows = [{"case": c, **_flatten(m)} for c, m in result["per_case"].items()]
    rows.append({"case": "mean", **_flatten(result["aggregate"]["mean"])})
    rows.append({"case": "pooled", **_flatten(result["aggregate"]["pooled"])})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = output.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return output, csv_path


def format_table(result: dict) -> str:
    """A short human-readable summary of an evaluation result."""
    mean, pooled = result["aggregate"]["mean"], result["aggregate"]["pooled"]
    fmt = lambda v: "  n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    lines = [f"cases: {result['aggregate']['n_cases']}",
             f"mean  dice {fmt(mean['dice'])}  ppv {fmt(mean['ppv'])}  tpr {fmt(mean['tpr'])}  "
             f"hd95 {fmt(mean['hd95'])} mm  avd {fmt(mean['avd'])} %",
             f"lesions (pooled): ref {pooled['ref_lesions']}  pred {pooled['pred_lesions']}  tp {pooled['lesion_tp']}"
             f"  fn {pooled['lesion_fn']}  fp {pooled['lesion_fp']}  tpr {fmt(pooled['lesion_tpr'])}"
             f"  fdr {fmt(pooled['lesion_fdr'])}  f1 {fmt(pooled['lesion_f1'])}",
             "size bin   ref  tp  fn  fp    tpr    f1"]
    for name, b in pooled["bins"].items():
        lines.append(f"{name:>8} {b['ref_lesions']:5d} {b['lesion_tp']:3d} {b['lesion_fn']:3d} {b['lesion_fp']:3d}"
                     f" {fmt(b['lesion_tpr'])} {fmt(b['lesion_f1'])}")
    if "msseg2" in result["aggregate"]:
        a = result["aggregate"]["msseg2"]
        lines.append(f"MSSEG-2 (Anima detection): {a['cases_with_lesions']} cases with new lesions: dice "
                     f"{fmt(a['dice_mean'])}  lesion F1 {fmt(a['lesion_f1_mean'])}  sens "
                     f"{fmt(a['lesion_sensitivity_mean'])}  ppv {fmt(a['lesion_ppv_mean'])}; "
                     f"{a['cases_without_lesions']} without: FP lesions {fmt(a['fp_lesions_mean'])}  "
                     f"FP volume {fmt(a['fp_volume_mm3_mean'])} mm3")
    if "ece" in pooled:
        lines.append(f"soft: dice {fmt(mean['soft_dice'])}  brier {fmt(mean['brier'])}  ipe {fmt(mean['ipe'])}  "
                     f"ECE (pooled) {fmt(pooled['ece'])}")
    return "\n".join(lines)
