"""Dice-optimal probability threshold of soft models, found on the validation folds and applied at prediction.

After nnU-Net's end-of-training validation (which our soft trainers run with probabilities saved), the
fold's validation cases are thresholded at 0.05, 0.10, ..., 0.95 and the pooled voxel counts
(TP, FP, FN per threshold) are written to ``fold_<k>/nnunet_ext_threshold.json``. At prediction the counts
of the folds in use are summed and the threshold with the best pooled Dice is applied to the lesion
probability (ties: the threshold closest to 0.5).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_ext.metrics.grid import threshold_grid

THRESHOLDS = tuple(threshold_grid())
FILE = "nnunet_ext_threshold.json"
ACTIVATIONS = ("softmax", "normalized_relu", "normalized_relu_case")


def soft_output(prob: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """The model's soft lesion map from nnU-Net's class probabilities ``prob`` (C, ...): the lesion
    probability (``softmax``), or, for ``normalized_relu``, the blended SoftSeg output Q that the network
    produced per patch (:mod:`nnunet_ext.networks.activations`): nnU-Net exports softmax([0, Q]), so
    ``Q = ln p1 - ln p0`` (clipped to [0, 1] against rounding; outside the crop, where nnU-Net writes
    p0 = 1, it is 0). ``normalized_relu_case``: the blended un-normalised ReLU ``R = ln p1 - ln p0`` divided by
    its maximum over the case (0 where the maximum is 0), SoftSeg's normalisation with the case as the
    batch."""
    if activation == "softmax":
        return prob[1].astype(np.float32)
    if activation in ("normalized_relu", "normalized_relu_case"):
        p = np.clip(prob.astype(np.float64), 1e-12, 1.0)
        r = np.clip(np.log(p[1]) - np.log(p[0]), 0.0, None)
        if activation == "normalized_relu":
            return np.minimum(r, 1.0).astype(np.float32)
        mx = r.max() if r.size else 0.0
        return (r / mx if mx > 0 else np.zeros_like(r)).astype(np.float32)
    raise ValueError(f"unknown output activation {activation!r}; known: {ACTIVATIONS}")


def threshold_counts(prob: np.ndarray, ref: np.ndarray, thresholds=THRESHOLDS) -> dict[str, list[int]]:
    ref = ref.astype(bool)
    n_ref = int(ref.sum())
    tp, fp, fn = [], [], []
    for t in thresholds:
        pred = prob >= t
        a = int(np.count_nonzero(pred & ref))
        tp.append(a)
        fp.append(int(np.count_nonzero(pred)) - a)
        fn.append(n_ref - a)
    return {"tp": tp, "fp": fp, "fn": fn}


def best_threshold(counts: dict, thresholds=THRESHOLDS) -> tuple[float, list[float]]:
    tp, fp, fn = (np.asarray(counts[k], float) for k in ("tp", "fp", "fn"))
    den = 2 * tp + fp + fn
    dice = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 1.0)
    order = sorted(range(len(thresholds)), key=lambda i: (-dice[i], abs(thresholds[i] - 0.5)))
    return float(thresholds[order[0]]), dice.round(6).tolist()


def fold_threshold_from_validation(fold_dir: str | Path, gt_dir: str | Path, file_ending: str = ".nii.gz",
                                   activation: str = "softmax") -> dict:
    """Counts per threshold of the soft output (``activation``) over a fold's ``validation/<case>.npz``
    against ``gt_dir/<case><ending>``; written to ``fold_dir/nnunet_ext_threshold.json``."""
    from nnunet_ext.core.io import read_image

    fold_dir, gt_dir = Path(fold_dir), Path(gt_dir)
    files = sorted((fold_dir / "validation").glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no validation probabilities in {fold_dir / 'validation'} (train with --npz)")
    total = None
    for f in files:
        case = f.name[:-4]
        ref, _ = read_image(gt_dir / f"{case}{file_ending}")
        with np.load(f) as z:
            c = threshold_counts(soft_output(z["probabilities"], activation), ref == 1)
        total = c if total is None else {k: [a + b for a, b in zip(total[k], c[k])] for k in total}
    t, dice = best_threshold(total)
    out = {"thresholds": list(THRESHOLDS), **total, "dice": dice, "best_threshold": t, "n_cases": len(files),
           "activation": activation}
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(fold_dir / FILE, json.dumps(out, indent=1))
    return out


def combined_threshold(model_dir: str | Path, folds) -> dict | None:
    """Best threshold over the given folds' stored counts; None when no fold has any."""
    total, used, activation = None, [], "softmax"
    for f in folds:
        p = Path(model_dir) / f"fold_{f}" / FILE
        if not p.is_file():
            continue
        c = json.loads(p.read_text())
        activation = c.get("activation", "softmax")
        total = {k: c[k] for k in ("tp", "fp", "fn")} if total is None else \
            {k: [a + b for a, b in zip(total[k], c[k])] for k in total}
        used.append(f)
    if total is None:
        return None
    t, dice = best_threshold(total)
    return {"threshold": t, "folds": used, "dice": dice, "thresholds": list(THRESHOLDS), "activation": activation}
