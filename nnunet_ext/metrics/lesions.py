"""Voxel- and lesion-wise metrics of one case (binary masks, array order ``(z, y, x)``).

Definitions (also in docs/evaluation.md):

* Lesions are connected components of a binary mask (``connectivity`` 6, 18 or 26; default 26, the
  WMH 2017 challenge's "fully connected" components).
* Detection rule (WMH 2017 challenge evaluation): a reference lesion is *detected* when the predicted mask
  covers at least ``max(1, ceil(min_overlap * |lesion|))`` of its voxels (``min_overlap=0``: any voxel).
  A predicted component that touches no reference-lesion voxel is a *false positive*. This is
  many-to-many: one predicted component can detect several reference lesions (merged lesions) and one
  reference lesion can be covered by several components (split lesion, no FP counted). Libraries that
  match one-to-one (panoptica, picai-eval) or by overlap ratio (Anima / MSSEG) count such cases
  differently; medpy and Anima use 6-connectivity by default.
* ``lesion_tpr`` = detected / reference lesions; ``lesion_ppv`` = predicted components touching a reference
  lesion / predicted components; ``lesion_fdr`` = 1 - ``lesion_ppv``;
  ``lesion_f1`` = 2 P R / (P + R) (0 when P + R = 0).
* Size bins: reference lesions are binned by their size for TP/FN/TPR, predicted components by theirs for
  FP/PPV; the bin's F1 combines the two. Lesions smaller than the first bin are counted in the totals only.
* HD95 (MetricsReloaded / WMH definition): surface voxels are mask voxels with a 6-neighbour outside the
  mask; for each surface voxel of one mask the Euclidean distance in mm (spacing honoured) to the nearest
  surface voxel of the other; the 95th percentile of each directed set; HD95 is the larger of the two.
* Empty masks (undefined values are ``None`` in JSON and skipped, with a count, in means):

  ============ ========= ==== ==== ==== ==== ===== ========================
  reference    predicted dice ppv  tpr  avd  hd95  lesion_tpr / lesion_ppv
  ============ ========= ==== ==== ==== ==== ===== ========================
  empty        empty     1    1    1    0    0     1 / 1
  empty        non-empty 0    0    None None None  1 / 0 (all FP)
  non-empty    empty     0    None 0    100  None  0 / 1
  ============ ========= ==== ==== ==== ==== ===== ========================

  (lesion_tpr 1 with no reference lesion and lesion_ppv 1 with no predicted lesion follow the WMH 2017
  evaluation script.) For an empty reference the false-positive lesion count and volume are reported
  (``fp_volume_mm3``), as in MSSEG-2.
"""
from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

DEFAULT_BINS: tuple[tuple[int, int | None], ...] = ((3, 10), (11, 50), (51, None))


def bin_name(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


def parse_bins(text: str) -> tuple[tuple[int, int | None], ...]:
    """Parse ``"3-10,11-50,51+"`` into ``((3, 10), (11, 50), (51, None))``."""
    bins = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part.endswith("+"):
                bins.append((int(part[:-1]), None))
            else:
                lo, hi = part.split("-")
                bins.append((int(lo), int(hi)))
        except ValueError:
            raise ValueError(f"bad size bin {part!r}: use LO-HI or LO+ (voxels), comma-separated")
    for lo, hi in bins:
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"bad size bin {bin_name(lo, hi)}: need 1 <= LO <= HI")
    return tuple(bins)


def check_connectivity(connectivity: int) -> int:
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return connectivity


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask: (labels uint32, count)."""
    lab, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8),
                                       connectivity=check_connectivity(connectivity), return_N=True)
    return lab, int(n)


def _in_bin(sizes: np.ndarray, lo: int, hi: int | None) -> np.ndarray:
    return (sizes >= lo) & (sizes <= (hi if hi is not None else np.iinfo(np.int64).max))


def _safe_div(a: float, b: float, empty: float | None) -> float | None:
    return float(a) / float(b) if b > 0 else empty


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _bin_rates(b: dict) -> dict:
    """Add TPR/PPV/F1 of one size bin from its counts. A bin without reference lesions has no TPR and one
    without predicted lesions no PPV (``None``); F1 then takes the missing one as 1 (WMH convention), and is
    ``None`` when the bin is empty on both sides."""
    tpr = _safe_div(b["lesion_tp"], b["ref_lesions"], None)
    ppv = _safe_div(b["pred_lesions"] - b["lesion_fp"], b["pred_lesions"], None)
    f1 = None if tpr is None and ppv is None else _f1(1.0 if ppv is None else ppv, 1.0 if tpr is None else tpr)
    return {**b, "lesion_tpr": tpr, "lesion_ppv": ppv, "lesion_f1": f1}


def lesion_counts(ref: np.ndarray, pred: np.ndarray, connectivity: int = 26, min_overlap: float = 0.0,
                  bins: Sequence[tuple[int, int | None]] = DEFAULT_BINS, ref_labels=None, pred_labels=None) -> dict:
    """Lesion-wise detection counts and rates (see module docstring). ``ref_labels``/``pred_labels`` are
    precomputed ``(labels, n)`` to reuse."""
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    rl, nr = ref_labels if ref_labels is not None else label_components(ref, connectivity)
    pl, npred = pred_labels if pred_labels is not None else label_components(pred, connectivity)
    ref_sizes = np.bincount(rl.ravel(), minlength=nr + 1)[1:]
    pred_sizes = np.bincount(pl.ravel(), minlength=npred + 1)[1:]
    predm = pl > 0
    covered = np.bincount(rl[predm], minlength=nr + 1)[1:]  # predicted voxels in each reference lesion
    need = np.maximum(1, np.ceil(min_overlap * ref_sizes - 1e-9))
    detected = covered >= need
    touching = np.bincount(pl[rl > 0], minlength=npred + 1)[1:] > 0  # pred components touching a ref lesion
    tp, fn, fp = int(detected.sum()), int((~detected).sum()), int((~touching).sum())
    tpr = _safe_div(tp, nr, 1.0)
    ppv = _safe_div(int(touching.sum()), npred, 1.0)
    out = {"ref_lesions": nr, "pred_lesions": npred, "lesion_tp": tp, "lesion_fn": fn, "lesion_fp": fp,
           "lesion_tpr": tpr, "lesion_ppv": ppv, "lesion_fdr": 1.0 - ppv, "lesion_f1": _f1(ppv, tpr), "bins": {}}
    for lo, hi in bins:
        rb, pb = _in_bin(ref_sizes, lo, hi), _in_bin(pred_sizes, lo, hi)
        out["bins"][bin_name(lo, hi)] = _bin_rates({
            "ref_lesions": int(rb.sum()), "pred_lesions": int(pb.sum()), "lesion_tp": int((detected & rb).sum()),
            "lesion_fn": int((~detected & rb).sum()), "lesion_fp": int((~touching & pb).sum())})
    return out


_FACE_3D = ndimage.generate_binary_structure(3, 1)
_FACE_INPLANE = np.zeros((3, 3, 3), bool)
_FACE_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _surface_points(mask: np.ndarray, spacing, inplane: bool = False) -> np.ndarray:
    """Coordinates in mm of the surface voxels (mask voxels with a 6-neighbour outside; with ``inplane``
    only the 4 in-plane (y, x) neighbours count, as the WMH 2017 script's 2D erosion)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = np.pad(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
    surf = crop & ~ndimage.binary_erosion(crop, _FACE_INPLANE if inplane else _FACE_3D)
    return (np.argwhere(surf) - 1 + lo) * np.asarray(spacing, dtype=np.float64)


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         inplane_surface: bool = False) -> float | None:
    """95th-percentile Hausdorff distance in mm (max of the two directed 95th percentiles).

    0 when both masks are empty, ``None`` when exactly one is."""
    r_any, p_any = bool(ref.any()), bool(pred.any())
    if not r_any and not p_any:
        return 0.0
    if not r_any or not p_any:
        return None
    rs = _surface_points(ref.astype(bool), spacing, inplane_surface)
    ps = _surface_points(pred.astype(bool), spacing, inplane_surface)
    d_pr = cKDTree(rs).query(ps, k=1)[0]
    d_rp = cKDTree(ps).query(rs, k=1)[0]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def as_binary(arr: np.ndarray, what: str) -> np.ndarray:
    """Binary view of a 0/1 mask; anything else is a ValueError naming ``what``."""
    if arr.dtype == bool:
        return arr
    vals = np.unique(arr)
    if not np.all(np.isin(vals, (0, 1))):
        shown = ", ".join(str(v) for v in vals[:6]) + (" ..." if len(vals) > 6 else "")
        raise ValueError(f"{what}: expected a binary mask (values 0/1), found values {shown}; "
                         f"use --label to select one label")
    return arr.astype(bool)


def case_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 connectivity: int = 26, min_overlap: float = 0.0,
                 bins: Sequence[tuple[int, int | None]] = DEFAULT_BINS, inplane_surface: bool = False) -> dict:
    """All per-case metrics for binary ``ref`` and ``pred`` (same shape) with voxel ``spacing`` (array
    order, mm)."""
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs prediction {pred.shape}")
    ref, pred = ref.astype(bool, copy=False), pred.astype(bool, copy=False)
    voxel_mm3 = float(np.prod(spacing))
    tp = int(np.count_nonzero(ref & pred))
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    fp, fn = n_pred - tp, n_ref - tp
    if n_ref == 0 and n_pred == 0:
        dice, ppv, tpr, avd = 1.0, 1.0, 1.0, 0.0
    else:
        dice = 2.0 * tp / (n_ref + n_pred)
        ppv = _safe_div(tp, n_pred, None)
        tpr = _safe_div(tp, n_ref, None)
        avd = abs(n_pred - n_ref) / n_ref * 100.0 if n_ref else None
    out = {"dice": dice, "ppv": ppv, "tpr": tpr, "avd": avd, "hd95": hd95(ref, pred, spacing, inplane_surface),
           "voxel_tp": tp, "voxel_fp": fp, "voxel_fn": fn,
           "ref_volume_mm3": n_ref * voxel_mm3, "pred_volume_mm3": n_pred * voxel_mm3}
    lc = lesion_counts(ref, pred, connectivity, min_overlap, bins)
    out.update(lc)
    if n_ref == 0:
        out["fp_volume_mm3"] = n_pred * voxel_mm3
    return out


def aggregate(per_case: dict[str, dict], bins: Sequence[tuple[int, int | None]] = DEFAULT_BINS) -> dict:
    """Mean over cases of each metric (``None`` skipped, ``n_undefined`` counts them) and pooled lesion
    and voxel counts with rates recomputed from the pooled counts."""
    keys = ["dice", "ppv", "tpr", "avd", "hd95", "lesion_tpr", "lesion_ppv", "lesion_fdr", "lesion_f1"]
    mean = {}
    for k in keys:
        vals = [c[k] for c in per_case.values() if c.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
        undefined = len(per_case) - len(vals)
        if undefined:
            mean.setdefault("n_undefined", {})[k] = undefined
    pooled = {k: int(sum(c[k] for c in per_case.values()))
              for k in ("voxel_tp", "voxel_fp", "voxel_fn", "ref_lesions", "pred_lesions",
                        "lesion_tp", "lesion_fn", "lesion_fp")}
    tp, fp, fn = pooled["voxel_tp"], pooled["voxel_fp"], pooled["voxel_fn"]
    pooled["dice"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    pooled["lesion_tpr"] = _safe_div(pooled["lesion_tp"], pooled["ref_lesions"], 1.0)
    pooled["lesion_ppv"] = _safe_div(pooled["pred_lesions"] - pooled["lesion_fp"], pooled["pred_lesions"], 1.0)
    pooled["lesion_fdr"] = 1.0 - pooled["lesion_ppv"]
    pooled["lesion_f1"] = _f1(pooled["lesion_ppv"], pooled["lesion_tpr"])
    pooled["bins"] = {}
    for lo, hi in bins:
        name = bin_name(lo, hi)
        b = {k: int(sum(c["bins"][name][k] for c in per_case.values()))
             for k in ("ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp")}
        pooled["bins"][name] = _bin_rates(b)
    return {"mean": mean, "pooled": pooled, "n_cases": len(per_case)}


__all__ = ["DEFAULT_BINS", "parse_bins", "label_components", "lesion_counts", "hd95", "case_metrics",
           "aggregate", "as_binary", "bin_name"]
