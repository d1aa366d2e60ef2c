"""Lesion detection as scored in the MSSEG challenges (Anima's ``animaSegPerfAnalyzer``, lesion detection mode).

Our re-implementation of the algorithm of ``anima::SegPerfCAnalyzer`` (Anima-Public,
``segmentation/validation_tools/segmentation_performance_analyzer``; Commowick et al., Sci. Rep. 2018,
section "Lesion detection") with Anima's defaults:

1. connected components of both masks with 6-connectivity (ITK's ``ConnectedComponentImageFilter``
   default); components of ``min_volume`` (3 mm^3) or less are dropped from both masks (Anima keeps
   components of at least ``floor(min_volume / voxel volume) + 1`` voxels);
2. overlap table ``O[i][j]``: voxels of reference component i (0 = background) in predicted component j;
3. a reference lesion i is **detected** when the predicted components cover more than ``alpha`` (10 %) of
   it, and, walking through the predicted components that overlap it by decreasing overlap until they
   account for ``gamma`` (65 %) of its overlap, none has more than ``beta`` (70 %) of its volume outside
   every reference lesion (``O[0][j] / |j|``);
4. the same test with the roles swapped decides which predicted lesions are true positives; lesion
   PPV = TP predicted / predicted lesions, sensitivity = TP reference / reference lesions,
   F1 = 2 PPV sens / (PPV + sens).

One Anima detail is kept for fidelity: the walk in step 3 is also bounded by the number of labels of the
*other* image (including background), which can end it before ``gamma`` is reached; the lesion then counts
as detected, as in Anima. Undefined ratios (no reference or no predicted lesion) are ``None`` here
(Anima divides by zero); MSSEG-2 scores cases without new lesions by the number and volume of
predicted lesions instead, which are returned as ``fp_lesions`` / ``fp_volume_mm3``.
"""
from __future__ import annotations

import numpy as np

DEFAULTS = {"min_volume": 3.0, "alpha": 0.10, "beta": 0.70, "gamma": 0.65}


def _components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, int]:
    import cc3d

    lab, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=6, return_N=True)
    if n == 0:
        return lab, 0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= min_voxels)
    keep = keep[keep > 0]
    relabel = np.zeros(n + 1, np.int64)
    relabel[keep] = np.arange(1, len(keep) + 1)
    return relabel[lab], len(keep)


def overlap_table(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> np.ndarray:
    """``O[i, j]`` = voxels with reference label i and predicted label j (0 = background)."""
    idx = ref_lab.ravel().astype(np.int64) * (n_pred + 1) + pred_lab.ravel()
    return np.bincount(idx, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)


def detected(table: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """For each row lesion i >= 1 of ``table`` (rows: the image whose lesions are tested, columns: the other
    image), whether it is detected (Anima's getTruePositiveLesions + falsePositiveRatioTester)."""
    n_rows, n_cols = table.shape
    col_sum = table.sum(0)
    out = np.zeros(n_rows - 1, bool)
    for i in range(1, n_rows):
        tp = table[i, 1:].sum()
        if tp / max(1, tp + table[i, 0]) <= alpha:
            continue
        order = np.argsort(-table[i, 1:], kind="stable") + 1
        weight, k, ok = 0.0, 0, True
        while weight < gamma and k < n_rows and k < len(order):  # k < n_rows: Anima's bound (see module doc)
            j = order[k]
            if table[0, j] / col_sum[j] > beta:
                ok = False
                break
            weight += table[i, j] / tp
            k += 1
        out[i - 1] = ok
    return out


def anima_detection(ref: np.ndarray, pred: np.ndarray, spacing, min_volume: float = 3.0, alpha: float = 0.10,
                    beta: float = 0.70, gamma: float = 0.65) -> dict:
    """MSSEG-style lesion detection of binary masks ``ref``/``pred`` (same grid, ``spacing`` in mm)."""
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, prediction {pred.shape}")
    if min_volume < 0 or not (0 < alpha <= 1 and 0 < beta <= 1 and 0 < gamma <= 1):
        raise ValueError("need min_volume >= 0 and alpha, beta, gamma in (0, 1]")
    voxel = float(np.prod(spacing))
    min_voxels = int(np.floor(min_volume / voxel)) + 1
    ref_lab, n_ref = _components(ref, min_voxels)
    pred_lab, n_pred = _components(pred, min_voxels)
    table = overlap_table(ref_lab, n_ref, pred_lab, n_pred)
    tp_ref = int(detected(table, alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    tp_pred = int(detected(table.T, alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    sens = tp_ref / n_ref if n_ref else None
    ppv = tp_pred / n_pred if n_pred else None
    f1 = None
    if sens is not None and ppv is not None:
        f1 = 0.0 if sens + ppv == 0 else 2 * sens * ppv / (sens + ppv)
    pred_voxels = int((pred_lab > 0).sum())
    return {"ref_lesions": n_ref, "pred_lesions": n_pred, "tp_ref": tp_ref, "tp_pred": tp_pred,
            "lesion_sensitivity": sens, "lesion_ppv": ppv, "lesion_f1": f1,
            "fp_lesions": n_pred if n_ref == 0 else None,
            "fp_volume_mm3": pred_voxels * voxel if n_ref == 0 else None,
            "min_lesion_voxels": min_voxels}


def aggregate_msseg2(per_case: dict) -> dict:
    """MSSEG-2 summary: Dice and lesion F1 (means) over cases with new lesions; number and volume of
    predicted lesions over cases without."""
    with_lesions = {c: m for c, m in per_case.items() if m["msseg2"]["ref_lesions"] > 0}
    without = {c: m for c, m in per_case.items() if m["msseg2"]["ref_lesions"] == 0}
    mean = lambda vals: float(np.mean(vals)) if vals else None  # noqa: E731
    return {
        "cases_with_lesions": len(with_lesions), "cases_without_lesions": len(without),
        "dice_mean": mean([m["dice"] for m in with_lesions.values() if m["dice"] is not None]),
        "lesion_f1_mean": mean([m["msseg2"]["lesion_f1"] for m in with_lesions.values()
                                if m["msseg2"]["lesion_f1"] is not None] +
                               [0.0 for m in with_lesions.values() if m["msseg2"]["lesion_f1"] is None]),
        "lesion_sensitivity_mean": mean([m["msseg2"]["lesion_sensitivity"] for m in with_lesions.values()]),
        "lesion_ppv_mean": mean([m["msseg2"]["lesion_ppv"] for m in with_lesions.values()
                                 if m["msseg2"]["lesion_ppv"] is not None]),
        "fp_lesions_mean": mean([m["msseg2"]["fp_lesions"] for m in without.values()]),
        "fp_volume_mm3_mean": mean([m["msseg2"]["fp_volume_mm3"] for m in without.values()]),
    }
