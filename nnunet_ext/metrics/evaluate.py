"""Evaluate a folder of predicted masks against a folder of reference masks (NIfTI, matched by case name)."""
from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.io import read_image
from nnunet_ext.core.progress import step
from nnunet_ext.metrics.cases import (as_binary, check_same_grid, check_same_header, list_cases,  # noqa: F401
                                      load_mask, load_probabilities, need_3d, prob_files)
from nnunet_ext.metrics.lesions import (DEFAULT_BINS, RULE_PRESETS, SIZE_UNITS, aggregate, case_metrics,
                                        check_connectivity, check_counting, parse_bins, parse_detection)
from nnunet_ext.metrics.soft import (add_ap_counts, add_counts, average_precision_from_counts, ece_from_counts,
                                     ece_from_probability_counts, probability_reliability_diagram,
                                     reliability_diagram, volume_pearson)

# Presets reproduce a challenge's (or a seed paper's) scoring; docs/evaluation.md has one table per preset.
# wmh2017: the organisers' evaluation.py (nnunet_ext.metrics.wmh2017): label 2 masked out, their
#   binarisation of the prediction, 26-connected lesions detected by any overlap, HD95 on their border.
# msseg2: Anima's animaSegPerfAnalyzer lesion detection (nnunet_ext.metrics.anima), masks read as Anima does.
# isbi2015: Carass et al. 2017 score and components (nnunet_ext.metrics.isbi).
# nichyporuk (= lsr) / focal_tversky: the seed theses' lesion rules (nnunet_ext.metrics.lesions.RULE_PRESETS).
PRESETS = {"wmh2017": {**RULE_PRESETS["wmh2017"], "reader": "wmh2017", "surface": "wmh2017"},
           "msseg2": {"connectivity": 6, "detection": "any", "reader": "anima", "anima": True},
           "isbi2015": {"connectivity": 26, "detection": "any", "isbi": True},
           "nichyporuk": dict(RULE_PRESETS["nichyporuk"]),
           "lsr": dict(RULE_PRESETS["lsr"]),
           "focal_tversky": dict(RULE_PRESETS["focal_tversky"])}


def _read_case(ref_path, pred_path, label, reader):
    """(ref, pred, spacing) binary masks as the preset's reader takes them."""
    if reader == "wmh2017":
        from nnunet_ext.metrics.wmh2017 import prepare_case

        ref_raw, spacing = read_image(ref_path)
        need_3d(ref_raw, ref_path)
        if pred_path is None:
            return prepare_case(ref_raw, np.zeros(ref_raw.shape, np.uint8)) + (spacing,)
        pred_raw, _ = read_image(pred_path)
        need_3d(pred_raw, pred_path)
        # the organisers only require the same size and copy the reference's geometry onto the prediction
        check_same_grid(ref_path, ref_raw.shape, spacing, pred_path, pred_raw.shape, spacing)
        return prepare_case(ref_raw, pred_raw) + (spacing,)
    if reader == "anima":
        from nnunet_ext.metrics.anima import binarize

        ref_raw, spacing = read_image(ref_path)
        need_3d(ref_raw, ref_path)
        ref = binarize(ref_raw)
        if pred_path is None:
            return ref, np.zeros_like(ref), spacing
        pred_raw, p_spacing = read_image(pred_path)
        check_same_grid(ref_path, ref.shape, spacing, pred_path, pred_raw.shape, p_spacing)
        check_same_header(ref_path, pred_path, "the prediction")
        return ref, binarize(pred_raw), spacing
    ref, spacing = load_mask(ref_path, label)
    if pred_path is None:
        return ref, np.zeros_like(ref), spacing
    pred, p_spacing = load_mask(pred_path, label)
    check_same_grid(ref_path, ref.shape, spacing, pred_path, pred.shape, p_spacing)
    check_same_header(ref_path, pred_path, "the prediction")
    return ref, pred, spacing


def _evaluate_one(args) -> tuple[str, dict, dict | None]:
    case, ref_path, pred_path, label, opts, preset, prob_path, soft_path = args
    p = PRESETS[preset] if preset else {}
    ref, pred, spacing = _read_case(ref_path, pred_path, label, p.get("reader"))
    m = case_metrics(ref, pred, spacing, connectivity=opts["connectivity"], bins=opts["bins"],
                     detection=opts["detection"], size_unit=opts["size_unit"], symmetric=opts["symmetric"],
                     surface=p.get("surface", "face"), counting=opts["counting"])
    if p.get("anima"):
        from nnunet_ext.metrics.anima import anima_detection

        m["msseg2"] = anima_detection(ref, pred, spacing)
    if p.get("isbi"):
        from nnunet_ext.metrics.isbi import isbi_case

        m["isbi2015"] = isbi_case(ref, pred, spacing, opts["connectivity"])
    m["prediction_missing"] = pred_path is None
    calib = None
    if prob_path is not None:
        from nnunet_ext.metrics.soft import soft_case_metrics

        prob = load_probabilities(prob_path)
        check_same_grid(ref_path, ref.shape, spacing, prob_path, prob.shape, spacing)
        check_same_header(ref_path, prob_path, "the probability map")
        soft_ref = None
        if soft_path is not None:
            soft_ref, s_spacing = read_image(soft_path)
            check_same_grid(ref_path, ref.shape, spacing, soft_path, soft_ref.shape, s_spacing)
            check_same_header(ref_path, soft_path, "the soft reference")
            if not np.isfinite(soft_ref).all() or soft_ref.min() < 0 or soft_ref.max() > 1:
                raise ValueError(f"{soft_path}: soft reference values must be finite and in [0, 1], found "
                                 f"[{np.nanmin(soft_ref):g}, {np.nanmax(soft_ref):g}]")
        sm = soft_case_metrics(prob, ref, soft_ref)
        calib = {"calibration": sm.pop("calibration"), "calibration_confidence_05": sm.pop("calibration_confidence_05"),
                 "calibration_probability_bins": sm.pop("calibration_probability_bins"),
                 "ap_counts": sm.pop("ap_counts")}
        m.update(sm)
    return case, m, calib


def resolve_options(preset: str | None = None, connectivity: int = 26, min_overlap: float = 0.0,
                    bins: Sequence = DEFAULT_BINS, detection=None, size_unit: str = "voxels",
                    symmetric: bool = False, counting: str = "reference", presets: dict | None = None) -> dict:
    """The lesion rule in force: a preset's connectivity / detection (/ bins, counting) override the
    arguments; ``presets`` (default :data:`PRESETS`) are the presets accepted."""
    presets = PRESETS if presets is None else presets
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(presets)}")
        p = presets[preset]
        connectivity, detection = p["connectivity"], p["detection"]
        bins = p.get("bins", bins)
        counting = p.get("counting", "reference")
    check_connectivity(connectivity)
    check_counting(counting, symmetric)
    if size_unit not in SIZE_UNITS:
        raise ValueError(f"size_unit must be one of {SIZE_UNITS}, got {size_unit!r}")
    if isinstance(bins, str):
        bins = parse_bins(bins)
    rule = parse_detection(detection) if detection is not None else None
    if rule is None:
        from nnunet_ext.metrics.lesions import rule_from_min_overlap

        rule = rule_from_min_overlap(min_overlap)
    return {"connectivity": connectivity, "detection": rule, "bins": tuple(tuple(b) for b in bins),
            "size_unit": size_unit, "symmetric": bool(symmetric), "counting": counting}


def evaluate_folders(ref_dir, pred_dir, output: str | os.PathLike | None = None, connectivity: int = 26,
                     min_overlap: float = 0.0, bins: Sequence = DEFAULT_BINS,
                     allow_missing: bool = False, label: int | None = None, file_ending: str = ".nii.gz",
                     num_workers: int = 1, progress: bool = True, preset: str | None = None,
                     prob_dir=None, soft_ref_dir=None, reliability_png=None, detection=None,
                     size_unit: str = "voxels", symmetric: bool = False, cases: Sequence[str] | None = None,
                     isbi_rater_score: float | None = None, counting: str = "reference",
                     check_label: bool = True) -> dict:
    """Evaluate every reference case (or only ``cases``); return (and write to ``output`` JSON + CSV)
    per-case results and aggregates. A reference case without prediction is an error unless
    ``allow_missing`` (then it counts as an empty prediction). ``detection`` (e.g.
    ``"voxels>=3 or fraction>0.5"``) overrides ``min_overlap``; a ``preset`` overrides both and the
    connectivity (and ``counting``: ``"prediction"`` counts TP on predicted lesions, the Nichyporuk thesis)."""
    opts = resolve_options(preset, connectivity, min_overlap, bins, detection, size_unit, symmetric, counting)
    refs, preds = list_cases(ref_dir, file_ending), list_cases(pred_dir, file_ending)
    if cases is not None:
        unknown = [c for c in cases if c not in refs]
        if unknown:
            raise FileNotFoundError(f"no reference {Path(ref_dir) / (unknown[0] + file_ending)}")
        refs = {c: refs[c] for c in cases}
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
        probs = prob_files(prob_dir)
        lacking = [c for c in refs if c not in probs]
        if lacking:
            raise FileNotFoundError(f"no probability map for reference case {lacking[0]} in {prob_dir}")
        if soft_ref_dir is not None:
            softs = list_cases(soft_ref_dir, file_ending)
            lacking = [c for c in refs if c not in softs]
            if lacking:
                raise FileNotFoundError(f"no soft reference {Path(soft_ref_dir) / (lacking[0] + file_ending)}")
    jobs = [(c, refs[c], preds.get(c), label, opts, preset, probs.get(c), softs.get(c)) for c in refs]
    per_case, calibration, calibration05, ap = {}, None, None, None
    calibration_pb = [None]  # counts of ece_probability_bins

    def collect(k, c, m, calib):
        nonlocal calibration, calibration05, ap
        per_case[c] = m
        if calib is not None:
            calibration = add_counts(calibration, calib["calibration"])
            calibration05 = add_counts(calibration05, calib["calibration_confidence_05"])
            calibration_pb[0] = add_counts(calibration_pb[0], calib["calibration_probability_bins"])
            ap = add_ap_counts(ap, calib["ap_counts"])
        step("evaluate", k, len(jobs), progress, item=c)

    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as ex:
            for k, (c, m, calib) in enumerate(ex.map(_evaluate_one, jobs), 1):
                collect(k, c, m, calib)
    else:
        for k, job in enumerate(jobs, 1):
            collect(k, *_evaluate_one(job))
    # check_label=False: the label is the dataset's lesion label by construction (a fold's validation), and
    # folds whose cases and predictions are all lesion-free (e.g. MSSEG-2 patients without new lesions) are valid
    if check_label and label is not None and not any(m["ref_volume_mm3"] or m["pred_volume_mm3"]
                                                     for m in per_case.values()):
        raise ValueError(f"--label {label}: no reference in {ref_dir} and no prediction in {pred_dir} holds label "
                         f"{label} (every score would be that of two empty masks); check the label value")
    result = {
        "settings": {"ref_dir": str(ref_dir), "pred_dir": str(pred_dir), "connectivity": opts["connectivity"],
                     "detection": opts["detection"].text(), "min_overlap": min_overlap,
                     "bins": [list(b) for b in opts["bins"]], "size_unit": opts["size_unit"],
                     "symmetric": opts["symmetric"], "counting": opts["counting"], "label": label, "preset": preset,
                     "missing_predictions": missing, "predictions_without_reference": extra},
        "per_case": per_case,
        "aggregate": aggregate(per_case, opts["bins"]),
    }
    result["aggregate"]["volume_pearson"] = volume_pearson([m["ref_volume_mm3"] for m in per_case.values()],
                                                           [m["pred_volume_mm3"] for m in per_case.values()])
    if preset is not None and PRESETS[preset].get("anima"):
        from nnunet_ext.metrics.anima import aggregate_msseg2

        result["aggregate"]["msseg2"] = aggregate_msseg2(per_case)
    if preset is not None and PRESETS[preset].get("isbi"):
        from nnunet_ext.metrics.isbi import isbi_score

        result["aggregate"]["isbi2015"] = isbi_score({"reference": {c: m["isbi2015"] for c, m in per_case.items()}},
                                                     isbi_rater_score)
    if calibration is not None:
        agg = result["aggregate"]
        agg["pooled"]["ece"] = ece_from_counts(calibration)  # the SoftSeg thesis' ECE, cases pooled
        agg["pooled"]["ece_probability_bins"] = ece_from_probability_counts(calibration_pb[0])
        agg["pooled"]["ece_confidence_05"] = ece_from_counts(calibration05)
        agg["pooled"]["voxel_ap"] = average_precision_from_counts(ap)
        agg["calibration_counts"] = calibration
        agg["calibration_counts_confidence_05"] = calibration05
        agg["calibration_counts_probability_bins"] = calibration_pb[0]
        for k in ("soft_dice", "brier", "entropy_mae", "ipe_voxelwise", "ece", "ece_probability_bins",
                  "ece_confidence_05", "voxel_ap"):
            vals = [m[k] for m in per_case.values() if m.get(k) is not None]
            agg["mean"][k] = float(np.mean(vals)) if vals else None
        if reliability_png is not None:
            title = f"{Path(pred_dir).name}: {len(per_case)} cases"
            reliability_diagram(calibration, reliability_png, title, low=0.0)
            probability_reliability_diagram(calibration_pb[0],
                                            Path(reliability_png).with_suffix(".probability_bins.png"), title)
            reliability_diagram(calibration05, Path(reliability_png).with_suffix(".confidence_05.png"), title)
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
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(output, json.dumps(result, indent=1))
    rows = [{"case": c, **_flatten(m)} for c, m in result["per_case"].items()]
    rows.append({"case": "mean", **_flatten(result["aggregate"]["mean"])})
    rows.append({"case": "pooled", **_flatten(result["aggregate"]["pooled"])})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = output.with_suffix(".csv")
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return output, csv_path


def format_table(result: dict) -> str:
    """A short human-readable summary of an evaluation result."""
    mean, pooled = result["aggregate"]["mean"], result["aggregate"]["pooled"]
    fmt = lambda v: "  n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    s = result["settings"]
    lines = [f"cases: {result['aggregate']['n_cases']}  (lesions: {s['connectivity']}-connected, detected when "
             f"{s.get('detection', 'any')}"
             f"{'; TP counted on predicted lesions' if s.get('counting') == 'prediction' else ''})",
             f"mean  dice {fmt(mean['dice'])}  ppv {fmt(mean['ppv'])}  tpr {fmt(mean['tpr'])}  "
             f"hd95 {fmt(mean['hd95'])} mm  avd {fmt(mean['avd'])} %",
             f"lesions (pooled): ref {pooled['ref_lesions']}  pred {pooled['pred_lesions']}  tp {pooled['lesion_tp']}"
             f"  fn {pooled['lesion_fn']}  fp {pooled['lesion_fp']}  tpr {fmt(pooled['lesion_tpr'])}"
             f"  fdr {fmt(pooled['lesion_fdr'])}  f1 {fmt(pooled['lesion_f1'])}",
             f"size bin ({s.get('size_unit', 'voxels')})   ref  tp  fn  fp    tpr    f1"]
    if s.get("counting") == "prediction":  # the thesis' per-scan convention beside the dataset-level one
        lines.insert(3, f"lesions (per-scan mean): tpr {fmt(mean['lesion_tpr'])}  fdr {fmt(mean['lesion_fdr'])}  "
                        f"f1 {fmt(mean['lesion_f1'])}  (undefined, skipped: {mean.get('n_undefined', {})})")
    for name, b in pooled["bins"].items():
        lines.append(f"{name:>16} {b['ref_lesions']:5d} {b['lesion_tp']:3d} {b['lesion_fn']:3d} {b['lesion_fp']:3d}"
                     f" {fmt(b['lesion_tpr'])} {fmt(b['lesion_f1'])}")
    if "msseg2" in result["aggregate"]:
        a = result["aggregate"]["msseg2"]
        lines.append(f"MSSEG-2 (Anima detection): {a['cases_with_lesions']} cases with new lesions: dice "
                     f"{fmt(a['dice_mean'])}  lesion F1 {fmt(a['lesion_f1_mean'])}  sens "
                     f"{fmt(a['lesion_sensitivity_mean'])}  ppv {fmt(a['lesion_ppv_mean'])}; "
                     f"{a['cases_without_lesions']} without: FP lesions {fmt(a['fp_lesions_mean'])}  "
                     f"FP volume {fmt(a['fp_volume_mm3_mean'])} mm3")
    if "isbi2015" in result["aggregate"]:
        a = result["aggregate"]["isbi2015"]
        r = a["per_rater"]["reference"]
        lines.append(f"ISBI 2015: raw score {fmt(a['raw'])}  normalized {fmt(a['normalized'])}  (dice {fmt(r['dice'])}"
                     f"  ppv {fmt(r['ppv'])}  ltpr {fmt(r['ltpr'])}  lfpr {fmt(r['lfpr'])}  corr {fmt(r['corr'])})")
    if "ece" in pooled:
        lines.append(f"soft: dice {fmt(mean['soft_dice'])}  brier {fmt(mean['brier'])}  entropy MAE "
                     f"{fmt(mean['entropy_mae'])}  ECE (pooled) {fmt(pooled['ece'])}  voxel AP "
                     f"(pooled) {fmt(pooled.get('voxel_ap'))}")
    return "\n".join(lines)
