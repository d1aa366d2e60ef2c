"""Operating-point sweep: voxel- and lesion-level TPR/FDR per size bin over probability thresholds.

Input probability maps are nnU-Net's ``--save_probabilities`` output (``<case>.npz`` with key
``probabilities``, classes first, in the geometry of the original image) or NIfTI probability maps. Counts
are pooled over cases at each threshold (dataset-level); the *segmentation* operating point maximises voxel
F1 (pooled Dice), the *detection* operating point maximises lesion F1. Each point also holds ``per_scan``:
the mean over cases of each case's own voxel and lesion TPR / FDR / F1 at that same threshold (the
Nichyporuk thesis' per-scan curves, section 3.4.2: averaged at a fixed threshold, never at a fixed
precision; undefined values skipped and counted in ``n_undefined``). ``voxel_ap`` is the dataset-level
voxel average precision (:mod:`nnunet_ext.metrics.soft`) and ``voxel_ap_per_scan`` its mean over cases;
both use every probability value, not only the sweep's thresholds.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.metrics.grid import threshold_grid
from nnunet_ext.metrics.cases import check_same_grid, check_same_header, list_cases, load_mask, load_probabilities, prob_files
from nnunet_ext.metrics.lesions import (DEFAULT_BINS, LesionRule, _bin_key, label_components, lesion_counts,  # noqa: F401
                                        rule_of, split_rule_fields,
                                        lesion_rates)
from nnunet_ext.metrics.soft import add_ap_counts, ap_counts, average_precision_from_counts
from nnunet_ext.core.progress import step

_prob_files = prob_files  # old private name


def default_thresholds() -> list[float]:
    """The sweep's thresholds: :func:`nnunet_ext.metrics.grid.threshold_grid` with its extremes."""
    return threshold_grid(extremes=True)


@dataclass(frozen=True)
class SweepOptions:
    """What :func:`sweep` reads besides the lesion rule: ``class_index`` (the probability channel),
    ``label`` (the reference label), ``allow_missing``, ``progress`` and ``file_ending`` (the reference
    masks' and NIfTI-like probability maps' format, one of nnunet_ext.core.io.FILE_ENDINGS)."""
    class_index: int = 1
    label: int | None = None
    allow_missing: bool = False
    progress: bool = True
    file_ending: str = ".nii.gz"


def sweep(ref_dir, prob_dir, thresholds: Sequence[float] | None = None, rule: LesionRule | None = None,
          options: SweepOptions | None = None, **fields) -> dict:
    """Pooled voxel and lesion rates at each threshold (a voxel is foreground when p >= threshold), per-scan
    means at each threshold, voxel AP. ``rule``: the :class:`LesionRule`, or its fields as keywords (with
    ``min_overlap``, or a lesion-rule ``preset``: ``wmh2017``, ``nichyporuk`` / ``lsr``, ``focal_tversky``)
    as in :func:`nnunet_ext.metrics.evaluate.evaluate_folders`; ``options``: :class:`SweepOptions`, or its
    fields as keywords."""
    from nnunet_ext.core.io import check_file_ending
    from nnunet_ext.core.validate import options_of

    rule_fields, rest = split_rule_fields(fields)
    preset = rule_fields.get("preset")
    rule = rule_of(rule, rule_fields, "sweep")
    o = options_of(SweepOptions, options, rest, "sweep")
    class_index, label, allow_missing, progress, file_ending = (o.class_index, o.label, o.allow_missing,
                                                                o.progress, o.file_ending)
    check_file_ending(file_ending)
    connectivity, bins, detection = rule.connectivity, rule.bins, rule.detection
    size_unit, symmetric, counting = rule.size_unit, rule.symmetric, rule.counting
    min_overlap = 0.0  # (the rule's detection holds it)
    thresholds = sorted(float(t) for t in (thresholds if thresholds is not None else default_thresholds()))
    if not thresholds or thresholds[0] <= 0 or thresholds[-1] > 1:
        raise ValueError("thresholds must be in (0, 1]")
    refs, probs = list_cases(ref_dir, file_ending), prob_files(prob_dir, file_ending)
    if not refs:
        raise ValueError(f"--ref {ref_dir}: no reference masks (<case>{file_ending}) in this folder; give the folder of "
                         f"the reference labels")
    missing = [c for c in refs if c not in probs]
    if missing and not allow_missing:
        raise FileNotFoundError(f"no probability map for reference case {missing[0]} in {prob_dir}")
    keys = ("voxel_tp", "voxel_fp", "voxel_fn", "ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp")
    acc = [{k: 0 for k in keys} | {"bins": {_bin_key(b): {k: 0 for k in keys[3:]} for b in bins}}
           for _ in thresholds]
    cases = [c for c in refs if c in probs]
    if not cases:
        raise ValueError(f"--prob {prob_dir}: no probability map of any reference case of {ref_dir} (e.g. "
                         f"{next(iter(refs))}); give the prediction folder of these cases")
    scans = [{k: [] for k in _PER_SCAN} for _ in thresholds]
    ap, ap_scans = None, []
    label_seen = False
    for n, c in enumerate(cases, 1):
        ref, spacing = load_mask(refs[c], label)
        label_seen = label_seen or bool(ref.any())
        p = load_probabilities(probs[c], class_index)
        check_same_grid(refs[c], ref.shape, spacing, probs[c], p.shape, spacing)
        check_same_header(refs[c], probs[c], "the probability map")
        ref_labels = label_components(ref, connectivity)
        n_ref = int(ref.sum())
        counts = ap_counts(p, ref)
        ap = add_ap_counts(ap, counts)
        ap_scans.append(average_precision_from_counts(counts))
        for a, sc, t in zip(acc, scans, thresholds):
            pred = p >= t
            tp = int(np.count_nonzero(pred & ref))
            fp = int(np.count_nonzero(pred)) - tp
            a["voxel_tp"] += tp
            a["voxel_fp"] += fp
            a["voxel_fn"] += n_ref - tp
            lc = lesion_counts(ref, pred, connectivity, min_overlap, bins, ref_labels=ref_labels, detection=detection,
                               size_unit=size_unit, spacing=spacing, symmetric=symmetric, counting=counting)
            for k in keys[3:]:
                a[k] += lc[k]
                for b in a["bins"]:
                    a["bins"][b][k] += lc["bins"][b][k]
            case = {"voxel_tpr": tp / n_ref if n_ref else None, "voxel_ppv": tp / (tp + fp) if tp + fp else None,
                    "voxel_f1": 2 * tp / (tp + fp + n_ref) if tp + fp + n_ref else None,
                    "lesion_tpr": lc["lesion_tpr"], "lesion_ppv": lc["lesion_ppv"], "lesion_f1": lc["lesion_f1"]}
            for k in _PER_SCAN:
                sc[k].append(case[k])
        step("operating points", n, len(cases), progress, item=c)
    if label is not None and not label_seen:
        raise ValueError(f"--label {label}: no reference in {ref_dir} holds label {label}; check the label value")
    points = []
    for t, a, sc in zip(thresholds, acc, scans):
        row = {"threshold": t, **{k: a[k] for k in keys}}
        row.update(_rates(a))
        row["bins"] = {b: {**v, **_rates(v, voxel=False)} for b, v in a["bins"].items()}
        row["per_scan"] = _per_scan_means(sc)
        points.append(row)
    ap_defined = [v for v in ap_scans if v is not None]
    best_seg = max(points, key=lambda r: r["voxel_f1"])
    best_det = max(points, key=lambda r: (r["lesion_f1"] if r["lesion_f1"] is not None else -1))
    return {"thresholds": thresholds, "points": points, "cases": cases, "missing": missing,
            "best_segmentation": {"threshold": best_seg["threshold"], "voxel_f1": best_seg["voxel_f1"],
                                  "lesion_f1": best_seg["lesion_f1"]},
            "best_detection": {"threshold": best_det["threshold"], "voxel_f1": best_det["voxel_f1"],
                               "lesion_f1": best_det["lesion_f1"]},
            "threshold_gap": abs(best_seg["threshold"] - best_det["threshold"]),
            "voxel_ap": average_precision_from_counts(ap) if ap is not None else None,
            "voxel_ap_per_scan": {"mean": float(np.mean(ap_defined)) if ap_defined else None,
                                  "n_undefined": len(ap_scans) - len(ap_defined)},
            "rule": {"connectivity": connectivity, "detection": detection.text(), "counting": counting,
                     "bins": [list(b) for b in bins], "size_unit": size_unit, "symmetric": symmetric,
                     "preset": preset}}


_PER_SCAN = ("voxel_tpr", "voxel_ppv", "voxel_f1", "lesion_tpr", "lesion_ppv", "lesion_f1")


def _per_scan_means(values: dict) -> dict:
    """Mean over cases of each per-case rate at one threshold (``None`` skipped and counted); FDR = 1 - PPV."""
    out, undefined = {}, {}
    for k, vals in values.items():
        ok = [v for v in vals if v is not None]
        out[k] = float(np.mean(ok)) if ok else None
        if len(ok) < len(vals):
            undefined[k] = len(vals) - len(ok)
    for kind in ("voxel", "lesion"):
        ppv = out.pop(f"{kind}_ppv")
        out[f"{kind}_fdr"] = None if ppv is None else 1.0 - ppv
    out["n_undefined"] = undefined
    return out


def _rates(a: dict, voxel: bool = True) -> dict:
    """Voxel TPR/FDR/F1 and lesion TPR/FDR/F1 of pooled counts (lesion rates: ``"bin"`` convention of
    :func:`nnunet_ext.metrics.lesions.lesion_rates`)."""
    out = {}
    if voxel:
        tp, fp, fn = a["voxel_tp"], a["voxel_fp"], a["voxel_fn"]
        out["voxel_tpr"] = tp / (tp + fn) if tp + fn else None
        out["voxel_fdr"] = fp / (tp + fp) if tp + fp else 0.0
        out["voxel_f1"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    r = lesion_rates(a["lesion_tp"], a["lesion_tp"] + a["lesion_fn"], a["pred_lesions"] - a["lesion_fp"],
                     a["pred_lesions"], "bin")
    out["lesion_tpr"], out["lesion_fdr"], out["lesion_f1"] = r["lesion_tpr"], r["lesion_fdr"], r["lesion_f1"]
    return out


def plot_operating_points(result: dict, png: str | os.PathLike, title: str = "") -> Path:
    """TPR-vs-FDR curves: voxel level (left) and lesion level per size bin (right), with the best
    segmentation (voxel F1) and best detection (lesion F1) operating points marked."""
    from nnunet_ext.core.plotting import pyplot, save_figure

    plt = pyplot()

    pts = result["points"]
    seg_t, det_t = result["best_segmentation"]["threshold"], result["best_detection"]["threshold"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    markers = {"seg": dict(marker="o", ms=11, mfc="none", mew=2.2, color="black", ls="none"),
               "det": dict(marker="s", ms=11, mfc="none", mew=2.2, color="crimson", ls="none")}

    def curve(ax, xs, ys, label, **kw):
        ok = [(x, y, p["threshold"]) for x, y, p in zip(xs, ys, pts) if x is not None and y is not None]
        if not ok:
            return
        x, y, t = zip(*ok)
        line, = ax.plot(x, y, "-", marker=".", label=label, **kw)
        for xi, yi, ti in ok:
            if ti == seg_t:
                ax.plot([xi], [yi], **markers["seg"])
            if ti == det_t:
                ax.plot([xi], [yi], **markers["det"])

    ax = axes[0]
    curve(ax, [p["voxel_fdr"] for p in pts], [p["voxel_tpr"] for p in pts], "all voxels", color="tab:blue", lw=2)
    for p in pts[:: max(1, len(pts) // 6)]:
        if p["voxel_tpr"] is not None:
            ax.annotate(f"{p['threshold']:g}", (p["voxel_fdr"], p["voxel_tpr"]), fontsize=8,
                        textcoords="offset points", xytext=(4, -10), color="tab:blue")
    ax.set_title("Voxel level (segmentation)")
    ax = axes[1]
    curve(ax, [p["lesion_fdr"] for p in pts], [p["lesion_tpr"] for p in pts], "all lesions", color="black", lw=2.5)
    colors = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for i, b in enumerate(pts[0]["bins"]):
        n = pts[0]["bins"][b]["ref_lesions"]
        curve(ax, [p["bins"][b]["lesion_fdr"] for p in pts], [p["bins"][b]["lesion_tpr"] for p in pts],
              f"{b} voxels (n={n})", color=colors[i % len(colors)], lw=1.6)
    ax.set_title("Lesion level (detection), by lesion size")
    for ax, kind in zip(axes, ("voxel", "lesion")):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{kind} false discovery rate (FDR)")
        ax.set_ylabel(f"{kind} true positive rate (TPR)")
        ax.grid(alpha=0.3)
        ax.plot([], [], **markers["seg"], label=f"best segmentation F1, t={seg_t:g}")
        ax.plot([], [], **markers["det"], label=f"best detection F1, t={det_t:g}")
        ax.legend(loc="lower right", fontsize=8.5)
    bs, bd = result["best_segmentation"], result["best_detection"]
    fig.suptitle((title + "\n" if title else "") +
                 f"seg. optimum t={bs['threshold']:g} (voxel F1 {bs['voxel_f1']:.3f}, lesion F1 {bs['lesion_f1']:.3f})"
                 f"   det. optimum t={bd['threshold']:g} (voxel F1 {bd['voxel_f1']:.3f}, lesion F1 "
                 f"{bd['lesion_f1']:.3f})", fontsize=10)
    return save_figure(fig, png)


def write_sweep(result: dict, output_json, png=None, title: str = "") -> None:
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(output_json, json.dumps(result, indent=1))
    if png is not None:
        plot_operating_points(result, png, title)
