"""Evaluate a folder of predicted masks against a folder of reference masks (NIfTI, matched by case name)."""
from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.io import read_image
from nnunet_ext.core.progress import step
from nnunet_ext.core.validate import options_of
from nnunet_ext.metrics.cases import (as_binary, check_same_grid, check_same_header, list_cases,  # noqa: F401
                                      load_mask, load_probabilities, need_3d, prob_files)
from nnunet_ext.metrics.lesions import (DEFAULT_BINS, RULE_PRESETS, LesionRule, aggregate, case_metrics, rule_of,
                                        split_rule_fields)
from nnunet_ext.metrics.soft import (add_ap_counts, add_counts, average_precision_from_counts, ece_from_counts,
                                     ece_from_probability_counts, probability_reliability_diagram,
                                     reliability_diagram, volume_pearson)

# Presets reproduce a challenge's (or a seed paper's) scoring; docs/evaluation.md has one table per preset.
# wmh2017: the organisers' evaluation.py (nnunet_ext.metrics.wmh2017): label 2 masked out, their
#   binarisation of the prediction, 26-connected lesions detected by any overlap, HD95 on their border.
# msseg2: Anima's animaSegPerfAnalyzer lesion detection (nnunet_ext.metrics.anima), masks read as Anima does.
# isbi2015: Carass et al. 2017 score and components (nnunet_ext.metrics.isbi).
# nichyporuk (= lsr) / focal_tversky: the seed theses' lesion rules (nnunet_ext.metrics.lesions.RULE_PRESETS).
@dataclass(frozen=True)
class Preset:
    """A challenge's (or seed paper's) scoring: its lesion rule (the :class:`LesionRule` fields it fixes;
    :meth:`lesion_rule`) plus the metric choices: how masks are read (``reader``), the HD95 ``surface``, and
    the organisers' extra scores (``anima``: MSSEG-2's detection, ``isbi``: the ISBI 2015 score)."""
    rule: dict = field(hash=False)
    reader: str | None = None
    surface: str = "face"
    anima: bool = False
    isbi: bool = False

    def lesion_rule(self, bins=DEFAULT_BINS, size_unit: str = "voxels", symmetric: bool = False) -> LesionRule:
        """The preset's :class:`LesionRule` (``bins`` where the preset fixes none)."""
        return LesionRule.preset("this", {"this": self.rule}, bins, size_unit, symmetric)


PRESETS = {"wmh2017": Preset(RULE_PRESETS["wmh2017"], reader="wmh2017", surface="wmh2017"),
           "msseg2": Preset({"connectivity": 6, "detection": "any"}, reader="anima", anima=True),
           "isbi2015": Preset({"connectivity": 26, "detection": "any"}, isbi=True),
           "nichyporuk": Preset(RULE_PRESETS["nichyporuk"]),
           "lsr": Preset(RULE_PRESETS["lsr"]),
           "focal_tversky": Preset(RULE_PRESETS["focal_tversky"])}


@dataclass(frozen=True)
class EvaluateOptions:
    """What :func:`evaluate_folders` reads and writes besides the lesion rule: ``allow_missing`` (a reference
    case without prediction counts as an empty prediction), ``label`` (compare this label only),
    ``file_ending``, ``num_workers``, ``progress``, soft outputs (``prob_dir`` probability maps,
    ``soft_ref_dir`` soft references, ``reliability_png``), ``cases`` (only these), ``isbi_rater_score``
    and ``check_label`` (a ``label`` found in no file is an error)."""
    allow_missing: bool = False
    label: int | None = None
    file_ending: str = ".nii.gz"
    num_workers: int = 1
    progress: bool = True
    prob_dir: object = None
    soft_ref_dir: object = None
    reliability_png: object = None
    cases: tuple | None = None
    isbi_rater_score: float | None = None
    check_label: bool = True




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
    case, ref_path, pred_path, label, rule, preset, prob_path, soft_path = args
    p = PRESETS[preset] if preset else Preset({})
    ref, pred, spacing = _read_case(ref_path, pred_path, label, p.reader)
    m = case_metrics(ref, pred, spacing, surface=p.surface, **rule.options())
    if p.anima:
        from nnunet_ext.metrics.anima import anima_detection

        m["msseg2"] = anima_detection(ref, pred, spacing)
    if p.isbi:
        from nnunet_ext.metrics.isbi import isbi_case

        m["isbi2015"] = isbi_case(ref, pred, spacing, rule.connectivity)
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
    """The lesion rule in force as a dict (:meth:`LesionRule.resolve`, :meth:`LesionRule.options`): a preset's
    connectivity / detection (/ bins, counting) override the arguments; ``presets`` (default
    :data:`PRESETS`) are the presets accepted."""
    return LesionRule.resolve(preset, connectivity, min_overlap, bins, detection, size_unit, symmetric, counting,
                              PRESETS if presets is None else presets).options()


def evaluate_folders(ref_dir, pred_dir, output: str | os.PathLike | None = None, rule: LesionRule | None = None,
                     options: EvaluateOptions | None = None, **fields) -> dict:
    """Evaluate every reference case (or only ``options.cases``); return (and write to ``output`` JSON + CSV)
    per-case results and aggregates. ``rule``: the :class:`LesionRule`; or its fields as keywords, with
    ``preset`` (a :data:`PRESETS` name: its rule and scoring; ``bins``, ``size_unit``, ``symmetric`` apply
    where the preset fixes none) and the legacy ``min_overlap`` (``detection`` overrides it). ``options``:
    :class:`EvaluateOptions`, or its fields as keywords. A reference case without prediction is an error
    unless ``allow_missing`` (then it counts as an empty prediction)."""
    rule_fields, rest = split_rule_fields(fields)
    preset, min_overlap = rule_fields.get("preset"), rule_fields.get("min_overlap", 0.0)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    if preset is not None and rule is None:
        rule_fields["presets"] = PRESETS
    rule = rule_of(rule, rule_fields, "evaluate_folders")
    o = options_of(EvaluateOptions, options, rest, "evaluate_folders")
    return _evaluate(ref_dir, pred_dir, output, rule, preset, min_overlap, o)


def _evaluate(ref_dir, pred_dir, output, rule: LesionRule, preset, min_overlap, o: EvaluateOptions) -> dict:
    allow_missing, label, file_ending, num_workers, progress = (o.allow_missing, o.label, o.file_ending,
                                                                o.num_workers, o.progress)
    prob_dir, soft_ref_dir, reliability_png, cases = o.prob_dir, o.soft_ref_dir, o.reliability_png, o.cases
    from nnunet_ext.core.io import check_file_ending

    check_file_ending(file_ending)  # .nii.gz, .nii, .mha, .nrrd: read through SimpleITK, same geometry checks
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
        probs = prob_files(prob_dir, file_ending)
        lacking = [c for c in refs if c not in probs]
        if lacking:
            raise FileNotFoundError(f"no probability map for reference case {lacking[0]} in {prob_dir}")
        if soft_ref_dir is not None:
            softs = list_cases(soft_ref_dir, file_ending)
            lacking = [c for c in refs if c not in softs]
            if lacking:
                raise FileNotFoundError(f"no soft reference {Path(soft_ref_dir) / (lacking[0] + file_ending)}")
    jobs = [(c, refs[c], preds.get(c), label, rule, preset, probs.get(c), softs.get(c)) for c in refs]
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
    if o.check_label and label is not None and not any(m["ref_volume_mm3"] or m["pred_volume_mm3"]
                                                     for m in per_case.values()):
        raise ValueError(f"--label {label}: no reference in {ref_dir} and no prediction in {pred_dir} holds label "
                         f"{label} (every score would be that of two empty masks); check the label value")
    result = {
        "settings": {"ref_dir": str(ref_dir), "pred_dir": str(pred_dir), "connectivity": rule.connectivity,
                     "detection": rule.detection.text(), "min_overlap": min_overlap,
                     "bins": [list(b) for b in rule.bins], "size_unit": rule.size_unit,
                     "symmetric": rule.symmetric, "counting": rule.counting, "label": label, "preset": preset,
                     "missing_predictions": missing, "predictions_without_reference": extra},
        "per_case": per_case,
        "aggregate": aggregate(per_case, rule.bins),
    }
    result["aggregate"]["volume_pearson"] = volume_pearson([m["ref_volume_mm3"] for m in per_case.values()],
                                                           [m["pred_volume_mm3"] for m in per_case.values()])
    if preset is not None and PRESETS[preset].anima:
        from nnunet_ext.metrics.anima import aggregate_msseg2

        result["aggregate"]["msseg2"] = aggregate_msseg2(per_case)
    if preset is not None and PRESETS[preset].isbi:
        from nnunet_ext.metrics.isbi import isbi_score

        result["aggregate"]["isbi2015"] = isbi_score({"reference": {c: m["isbi2015"] for c, m in per_case.items()}},
                                                     o.isbi_rater_score)
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
