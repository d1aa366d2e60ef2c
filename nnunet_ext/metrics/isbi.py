"""The ISBI 2015 longitudinal MS lesion challenge score (Carass et al., NeuroImage 148:77-102, 2017,
PMC5344762; ``nnunet-ext evaluate --preset isbi2015``).

Components of one case (prediction P against one rater's reference R, binary masks):

* ``dice`` = 2 |P n R| / (|P| + |R|), ``ppv`` = |P n R| / |P| (voxels);
* ``ltpr`` = reference lesions touched by P / reference lesions;
* ``lfpr`` = predicted lesions touching no reference lesion / predicted lesions;
* lesions are connected components, 26-connected by default: JHU's ``lesion_metrics`` package
  (jcreinhold/lesion-metrics, ``lesion_metrics/metrics.py`` at f75ffe2, from the organisers' lab) labels them
  with ``skimage.measure.label`` and its default, full connectivity (26 in 3D).

Across cases: ``corr`` = Pearson correlation of the predicted and reference lesion volumes (per rater).
Raw score of a rater r: the mean over cases s of
``dice/8 + ppv/8 + (1 - lfpr)/4 + ltpr/4 + corr/4``; the challenge score SC averages it over raters.

Normalisation: the published scores place the raters' agreement with each other at 90 and a perfect
segmentation at 100; we implement that as the linear map ``100 - 10 (1 - raw) / (1 - raw_inter_rater)``
where ``raw_inter_rater`` is the raw score of one rater scored against the other (averaged over both
directions, :func:`inter_rater_raw_score`). This is our reading of the paper's normalisation; the
inter-rater raw score of the challenge's own test data is not public here, so ``normalized`` is only
given when that value is supplied (``--isbi-rater-score``) or computed from two rater folders.

Empty cases (conventions of :func:`nnunet_ext.metrics.lesions.lesion_rates`, ``"wmh"``): ``ltpr`` 1 without
reference lesions, ``lfpr`` 0 without predicted lesions; ``dice`` and ``ppv`` 1 when both masks are empty;
``ppv`` of an empty prediction against a non-empty reference (undefined) is counted as 0.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from nnunet_ext.metrics.lesions import label_components, lesion_rates, voxel_volume

WEIGHTS = {"dice": 1 / 8, "ppv": 1 / 8, "one_minus_lfpr": 1 / 4, "ltpr": 1 / 4, "corr": 1 / 4}


def isbi_case(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
              connectivity: int = 26) -> dict:
    """ISBI 2015 per-case components of binary masks ``ref``/``pred`` (same shape, zyx, ``spacing`` mm)."""
    if np.shape(ref) != np.shape(pred):
        raise ValueError(f"shape mismatch: reference {np.shape(ref)} vs prediction {np.shape(pred)}")
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    tp = int(np.count_nonzero(ref & pred))
    nr, npr = int(ref.sum()), int(pred.sum())
    dice = 1.0 if nr + npr == 0 else 2 * tp / (nr + npr)
    ppv = (1.0 if nr == 0 else 0.0) if npr == 0 else tp / npr
    rl, n_ref = label_components(ref, connectivity)
    pl, n_pred = label_components(pred, connectivity)
    touched_ref = int(np.count_nonzero(np.bincount(rl[pred], minlength=n_ref + 1)[1:]))
    touching_pred = int(np.count_nonzero(np.bincount(pl[ref], minlength=n_pred + 1)[1:]))
    r = lesion_rates(touched_ref, n_ref, touching_pred, n_pred, "wmh")
    v = voxel_volume(spacing)
    return {"dice": dice, "ppv": ppv, "ltpr": r["lesion_tpr"], "lfpr": r["lesion_fdr"],
            "ref_lesions": n_ref, "pred_lesions": n_pred,
            "ref_volume_mm3": nr * v, "pred_volume_mm3": npr * v}


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def rater_raw_score(cases: Mapping[str, dict]) -> dict:
    """Raw score of one rater's reference: mean over cases of the weighted components (``corr`` over the
    cases; an undefined correlation, fewer than 2 cases or constant volumes, counts as 0)."""
    if not cases:
        raise ValueError("ISBI score: no cases")
    corr = pearson([c["pred_volume_mm3"] for c in cases.values()], [c["ref_volume_mm3"] for c in cases.values()])
    c_used = 0.0 if corr is None else corr
    per_case = [WEIGHTS["dice"] * c["dice"] + WEIGHTS["ppv"] * c["ppv"] + WEIGHTS["one_minus_lfpr"] * (1 - c["lfpr"])
                + WEIGHTS["ltpr"] * c["ltpr"] + WEIGHTS["corr"] * c_used for c in cases.values()]
    mean = lambda k: float(np.mean([c[k] for c in cases.values()]))  # noqa: E731
    return {"raw": float(np.mean(per_case)), "corr": corr, "dice": mean("dice"), "ppv": mean("ppv"),
            "ltpr": mean("ltpr"), "lfpr": mean("lfpr"), "n_cases": len(cases)}


def normalize(raw: float, inter_rater_raw: float) -> float:
    """Linear map with a perfect raw score 1 -> 100 and the inter-rater raw score -> 90."""
    if not 0 < inter_rater_raw < 1:
        raise ValueError(f"inter-rater raw score must be in (0, 1), got {inter_rater_raw}")
    return 100.0 - 10.0 * (1.0 - raw) / (1.0 - inter_rater_raw)


def isbi_score(cases_by_rater: Mapping[str, Mapping[str, dict]], inter_rater_raw: float | None = None) -> dict:
    """Challenge score SC over raters: ``cases_by_rater[rater][case]`` = :func:`isbi_case` output of the
    prediction against that rater. ``normalized`` needs ``inter_rater_raw``."""
    per_rater = {r: rater_raw_score(c) for r, c in cases_by_rater.items()}
    if not per_rater:
        raise ValueError("ISBI score: no rater")
    raw = float(np.mean([v["raw"] for v in per_rater.values()]))
    return {"raw": raw, "normalized": None if inter_rater_raw is None else normalize(raw, inter_rater_raw),
            "inter_rater_raw": inter_rater_raw, "per_rater": per_rater}


def inter_rater_raw_score(rater_a: Mapping[str, tuple], rater_b: Mapping[str, tuple], connectivity: int = 26) -> float:
    """Raw score of rater A scored against rater B and B against A (mean of both): ``rater_x[case] = (mask,
    spacing)``, the same cases in both."""
    if set(rater_a) != set(rater_b) or not rater_a:
        raise ValueError("inter-rater score: both raters need the same, non-empty set of cases")
    ab = {c: isbi_case(rater_b[c][0], rater_a[c][0], rater_b[c][1], connectivity) for c in rater_a}
    ba = {c: isbi_case(rater_a[c][0], rater_b[c][0], rater_a[c][1], connectivity) for c in rater_a}
    return float(np.mean([rater_raw_score(ab)["raw"], rater_raw_score(ba)["raw"]]))
