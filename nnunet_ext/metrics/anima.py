"""Lesion detection as scored in the MSSEG challenges (Anima's ``animaSegPerfAnalyzer -l``).

Our re-implementation of ``anima::SegPerfCAnalyzer`` as of Anima-Public commit
``d9fb323d4d15b228318e42b42df16c7ebbf8f6df`` (2026-03-04; the analyzer's logic last changed in c92adf9d,
2021-08-23, "fix exit condition in loop in falsePositiveRatioTester"), files
``Anima/segmentation/validation_tools/segmentation_performance_analyzer/animaSegPerf{CAnalyzer,App}.cxx``
(Commowick et al., Sci. Rep. 2018, "Lesion detection"), with the command line's defaults:

1. both images are read as ``unsigned short`` (a float value is truncated: 0.7 -> 0) and every non-zero
   voxel is lesion;
2. a reference without any non-zero voxel is the *empty ground truth* case: only the number and volume of
   predicted lesions (components above the minimum size) are reported;
3. otherwise connected components of both masks with 6-connectivity (ITK's default); components of
   ``min_volume`` (3 mm^3) or less are dropped (kept: at least ``floor(min_volume / voxel volume) + 1``
   voxels) and the rest **relabelled by decreasing size** (ITK's ``RelabelComponentImageFilter``; equal
   sizes keep raster order of their first voxel);
4. overlap table ``O[i][j]``: voxels of reference component i (0 = background) in predicted component j;
5. a reference lesion i is **detected** when the predicted components cover more than ``alpha`` (10 %) of
   it and, walking through the predicted components by decreasing overlap with it (ties in label order,
   i.e. larger component first) until they account for ``gamma`` (65 %) of its overlap, none has more than
   ``beta`` (70 %) of its volume outside every reference lesion (``O[0][j] / |j|``). The walk is bounded by
   the number of labels of the *other* image (the August 2021 fix); it then always reaches ``gamma`` first;
6. the same test with the roles swapped decides which predicted lesions are true positives; lesion
   PPV = TP predicted / predicted lesions (**0 without predicted lesions**), sensitivity = TP reference /
   reference lesions (undefined, ``None``, when every reference lesion is below the minimum size: Anima
   divides 0 by 0, and such a case still counts as a case with lesions), F1 = 2 PPV S / (PPV + S), 0 unless
   PPV + S > 0 (NaN included, as Anima's test).

Where Anima's result is implementation-defined we choose: the overlap sort is ``std::sort`` (not stable):
with more than 16 components in the other image libstdc++'s introsort may order equal overlaps differently
from our stable label order; this matters only when the gamma walk ends between two equal overlaps. With
``gamma = 1`` and rounding, Anima's walk can read past its vector; ours stops (lesion detected).
"""
from __future__ import annotations

import numpy as np

from nnunet_ext.metrics.lesions import lesion_rates

DEFAULTS = {"min_volume": 3.0, "alpha": 0.10, "beta": 0.70, "gamma": 0.65}


def binarize(arr: np.ndarray) -> np.ndarray:
    """Anima's reading of a mask: values truncated to an integer (``unsigned short``), non-zero = lesion."""
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.copy()
    if np.issubdtype(a.dtype, np.floating):
        return np.trunc(a) != 0
    return a != 0


def anima_voxel_volume(spacing_zyx) -> float:
    """Voxel volume multiplied in ITK's order (x, then y, then z), so that ``floor(3 / v)`` rounds as Anima's."""
    sz, sy, sx = (float(s) for s in spacing_zyx)
    return sx * sy * sz


def size_ordered_components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, int]:
    """6-connected components with at least ``min_voxels`` voxels, labelled 1..n by decreasing size (ties by
    the raster position, x fastest, of their first voxel): ITK's ConnectedComponent + RelabelComponent."""
    import cc3d

    lab, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=6, return_N=True)
    if n == 0:
        return lab.astype(np.int64), 0
    flat = lab.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    _, first = np.unique(flat, return_index=True)  # first C-order index of labels 0..n
    labels = np.arange(1, n + 1)
    keep = labels[sizes[1:] >= min_voxels]
    order = keep[np.lexsort((first[keep], -sizes[keep]))]
    relabel = np.zeros(n + 1, np.int64)
    relabel[order] = np.arange(1, len(order) + 1)
    return relabel[lab], len(order)


def overlap_table(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> np.ndarray:
    """``O[i, j]`` = voxels with reference label i and predicted label j (0 = background)."""
    idx = ref_lab.ravel().astype(np.int64) * (n_pred + 1) + pred_lab.ravel()
    return np.bincount(idx, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)


def detected(table: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """For each row lesion i >= 1 of ``table`` (rows: the image whose lesions are tested, columns: the other
    image, label 0 = background), whether it is detected (Anima's getTruePositiveLesions +
    falsePositiveRatioTester)."""
    n_rows, n_cols = table.shape
    col_sum = table.sum(0)
    out = np.zeros(n_rows - 1, bool)
    for i in range(1, n_rows):
        tp = int(table[i, 1:].sum())
        if not tp / (tp + int(table[i, 0])) > alpha:
            continue
        order = np.argsort(-table[i, 1:], kind="stable") + 1  # decreasing overlap, ties in label order
        weight, k, ok = 0.0, 0, True
        while weight < gamma and k < n_cols and k < len(order):  # Anima's bound: the other image's label count
            j = order[k]
            if float(table[0, j]) / float(col_sum[j]) > beta:
                ok = False
                break
            weight += float(table[i, j]) / float(tp)
            k += 1
        out[i - 1] = ok
    return out


def anima_detection(ref: np.ndarray, pred: np.ndarray, spacing, min_volume: float = 3.0, alpha: float = 0.10,
                    beta: float = 0.70, gamma: float = 0.65) -> dict:
    """MSSEG-style lesion detection of masks ``ref``/``pred`` (same grid, ``spacing`` zyx in mm); non-binary
    input is read as Anima reads it (:func:`binarize`)."""
    if np.shape(ref) != np.shape(pred):
        raise ValueError(f"shape mismatch: reference {np.shape(ref)}, prediction {np.shape(pred)}")
    if not min_volume >= 0 or not (0 < alpha <= 1 and 0 < beta <= 1 and 0 < gamma <= 1):
        raise ValueError("need min_volume >= 0 and alpha, beta, gamma in (0, 1]")
    ref, pred = binarize(ref), binarize(pred)
    voxel = anima_voxel_volume(spacing)
    min_voxels = int(np.floor(min_volume / voxel)) + 1
    pred_lab, n_pred = size_ordered_components(pred, min_voxels)
    pred_voxels = int((pred_lab > 0).sum())
    if not ref.any():  # Anima's empty ground truth: number and volume of predicted lesions only
        return {"ref_empty": True, "ref_lesions": 0, "pred_lesions": n_pred, "tp_ref": 0, "tp_pred": 0,
                "lesion_sensitivity": None, "lesion_ppv": None, "lesion_f1": None,
                "fp_lesions": n_pred, "fp_volume_mm3": pred_voxels * voxel, "min_lesion_voxels": min_voxels}
    ref_lab, n_ref = size_ordered_components(ref, min_voxels)
    table = overlap_table(ref_lab, n_ref, pred_lab, n_pred)
    tp_ref = int(detected(table, alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    tp_pred = int(detected(table.T, alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    r = lesion_rates(tp_ref, n_ref, tp_pred, n_pred, "anima")
    return {"ref_empty": False, "ref_lesions": n_ref, "pred_lesions": n_pred, "tp_ref": tp_ref, "tp_pred": tp_pred,
            "lesion_sensitivity": r["lesion_tpr"], "lesion_ppv": r["lesion_ppv"], "lesion_f1": r["lesion_f1"],
            "fp_lesions": None, "fp_volume_mm3": None, "min_lesion_voxels": min_voxels}


def aggregate_msseg2(per_case: dict) -> dict:
    """MSSEG-2 summary: Dice and lesion F1 (means) over cases whose reference has any lesion voxel (Anima's
    non-empty ground truth, sub-threshold-only references included); number and volume of predicted
    lesions over cases without."""
    def has_lesions(m):
        a = m["msseg2"]
        return not a.get("ref_empty", a["ref_lesions"] == 0)

    with_lesions = {c: m for c, m in per_case.items() if has_lesions(m)}
    without = {c: m for c, m in per_case.items() if not has_lesions(m)}
    mean = lambda vals: float(np.mean(vals)) if vals else None  # noqa: E731
    return {
        "cases_with_lesions": len(with_lesions), "cases_without_lesions": len(without),
        "dice_mean": mean([m["dice"] for m in with_lesions.values() if m["dice"] is not None]),
        "lesion_f1_mean": mean([m["msseg2"]["lesion_f1"] for m in with_lesions.values()]),
        "lesion_sensitivity_mean": mean([m["msseg2"]["lesion_sensitivity"] for m in with_lesions.values()
                                         if m["msseg2"]["lesion_sensitivity"] is not None]),
        "lesion_ppv_mean": mean([m["msseg2"]["lesion_ppv"] for m in with_lesions.values()]),
        "fp_lesions_mean": mean([m["msseg2"]["fp_lesions"] for m in without.values()]),
        "fp_volume_mm3_mean": mean([m["msseg2"]["fp_volume_mm3"] for m in without.values()]),
    }
