"""Metrics of soft (probabilistic) predictions: soft Dice, Brier score, inter-rater preservation error,
expected calibration error with a reliability diagram.

* ``soft_dice(p, s) = 2 sum(p s) / (sum p + sum s)`` (1 when both sums are 0);
* ``brier(p, s) = mean((p - s)^2)`` against the rater average ``s``;
* ``ipe(p, s) = mean |H(p) - H(s)|`` with the binary entropy ``H(q) = -q ln q - (1 - q) ln(1 - q)`` (nats):
  how well the prediction's uncertainty reproduces the raters' disagreement (0 = perfectly);
* ECE: voxels binned by confidence ``c = max(p, 1 - p)`` into ``n_bins`` equal-width bins over [0.5, 1]
  (the range of a binary confidence); accuracy = prediction ``p >= 0.5`` equals the hard reference;
  ``ECE = sum_k |B_k| / N * |acc(B_k) - conf(B_k)|``. Counts per bin are returned so cases can be pooled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def soft_dice(p: np.ndarray, s: np.ndarray) -> float:
    p, s = p.astype(np.float64), s.astype(np.float64)
    den = p.sum() + s.sum()
    return 1.0 if den == 0 else float(2 * (p * s).sum() / den)


def brier(p: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean((p.astype(np.float64) - s.astype(np.float64)) ** 2))


def binary_entropy(q: np.ndarray) -> np.ndarray:
    q = np.clip(q.astype(np.float64), 1e-12, 1 - 1e-12)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q))


def ipe(p: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean(np.abs(binary_entropy(p) - binary_entropy(s))))


def calibration_counts(p: np.ndarray, ref: np.ndarray, n_bins: int = 10) -> dict:
    """Per confidence bin: voxel count, summed confidence, number of correct voxels."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = p.astype(np.float64).ravel()
    conf = np.maximum(p, 1 - p)
    correct = ((p >= 0.5) == ref.astype(bool).ravel())
    idx = np.clip(np.floor((conf - 0.5) * 2 * n_bins + 1e-9).astype(int), 0, n_bins - 1)  # [lo, hi) bins
    return {"count": np.bincount(idx, minlength=n_bins).tolist(),
            "conf_sum": np.bincount(idx, weights=conf, minlength=n_bins).tolist(),
            "correct": np.bincount(idx, weights=correct, minlength=n_bins).tolist()}


def ece_from_counts(c: dict) -> float:
    n = np.asarray(c["count"], float)
    if n.sum() == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(np.asarray(c["correct"]) / n - np.asarray(c["conf_sum"]) / n)
    return float(np.nansum(n / n.sum() * gap))


def add_counts(a: dict | None, b: dict) -> dict:
    if a is None:
        return {k: list(v) for k, v in b.items()}
    return {k: [x + y for x, y in zip(a[k], b[k])] for k in a}


def reliability_diagram(counts: dict, png, title: str = "") -> Path:
    from nnunet_ext.plotting import pyplot, save_figure

    plt = pyplot()

    n = np.asarray(counts["count"], float)
    k = len(n)
    edges = np.linspace(0.5, 1.0, k + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.asarray(counts["correct"]) / n
        conf = np.asarray(counts["conf_sum"]) / n
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ok = n > 0
    ax.bar(centres[ok], acc[ok], width=0.5 / k * 0.9, color="tab:blue", label="accuracy")
    ax.bar(centres[ok], (conf - acc)[ok], bottom=acc[ok], width=0.5 / k * 0.9, color="tab:red", alpha=0.35,
           label="gap to confidence")
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title((title + "\n" if title else "") + f"ECE = {ece_from_counts(counts):.4f}")
    ax2.bar(centres, n, width=0.5 / k * 0.9, color="gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("voxels")
    ax2.set_xlabel("confidence max(p, 1-p)")
    return save_figure(fig, png)


def soft_case_metrics(p: np.ndarray, ref: np.ndarray, soft_ref: np.ndarray | None = None, n_bins: int = 10) -> dict:
    """Soft metrics of one case: ``p`` lesion probabilities, ``ref`` hard reference, ``soft_ref`` the rater
    average (soft Dice/Brier use it when given, else the hard reference; IPE needs it)."""
    target = ref.astype(np.float32) if soft_ref is None else soft_ref
    out = {"soft_dice": soft_dice(p, target), "brier": brier(p, target),
           "ipe": ipe(p, soft_ref) if soft_ref is not None else None,
           "calibration": calibration_counts(p, ref, n_bins)}
    out["ece"] = ece_from_counts(out["calibration"])
    return out


def volume_pearson(ref_volumes, pred_volumes) -> float | None:
    """Pearson correlation of reference and predicted lesion volumes across cases (ISBI 2015's VC)."""
    r, p = np.asarray(ref_volumes, float), np.asarray(pred_volumes, float)
    if len(r) < 2 or r.std() == 0 or p.std() == 0:
        return None
    return float(np.corrcoef(r, p)[0, 1])
