"""Metrics of soft (probabilistic) predictions: soft Dice, Brier score, entropy agreement with the raters,
expected calibration error (ECE) with a reliability diagram.

* ``soft_dice(p, s) = 2 sum(p s) / (sum p + sum s)`` (1 when both sums are 0);
* ``brier(p, s) = mean((p - s)^2)`` against the rater average ``s``;
* ``image_entropy(q) = mean_voxels H(q)`` with the binary entropy ``H(q) = -q ln q - (1 - q) ln(1 - q)``
  (nats); ``entropy_mae`` (SoftSeg thesis) is ``|image_entropy(p) - image_entropy(s)|`` per case, its mean
  over cases the MAE: how well the prediction's total uncertainty reproduces the raters' disagreement;
* ``ipe_voxelwise(p, s) = mean |H(p) - H(s)|`` (voxel by voxel; our earlier "ipe", kept under this name);
* **ECE (SoftSeg thesis)**: voxels binned by their probability ``p`` into ``n_bins`` (10) equal-width bins
  on [0, 1] (``[k/10, (k+1)/10)``, the last bin closed); per bin the mean probability and the observed
  frequency of the reference (fraction of reference voxels, hard or rater average);
  ``ECE = sum_k |B_k| / N * |freq(B_k) - mean_p(B_k)|``. Counts per bin are returned so cases can be pooled;
* ``ece_confidence_05`` (our earlier ECE, kept under this name): voxels binned by confidence
  ``max(p, 1 - p)`` into ``n_bins`` bins over [0.5, 1]; accuracy = ``(p >= 0.5) == reference``.
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


def ipe_voxelwise(p: np.ndarray, s: np.ndarray) -> float:
    """Voxel-wise mean absolute entropy difference (our earlier ``ipe``)."""
    return float(np.mean(np.abs(binary_entropy(p) - binary_entropy(s))))


ipe = ipe_voxelwise  # old name


def image_entropy(q: np.ndarray) -> float:
    """Mean binary entropy (nats) of a probability map: the whole-image uncertainty."""
    return float(np.mean(binary_entropy(q)))


def entropy_abs_error(p: np.ndarray, s: np.ndarray) -> float:
    """``|image_entropy(p) - image_entropy(s)|`` (one case of the SoftSeg entropy MAE)."""
    return abs(image_entropy(p) - image_entropy(s))


def _check_prob(p: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if not np.isfinite(p).all() or (p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6)):
        raise ValueError(f"{what}: values must be finite and in [0, 1]")
    return np.clip(p, 0.0, 1.0)


def probability_calibration_counts(p: np.ndarray, target: np.ndarray, n_bins: int = 10) -> dict:
    """Per probability bin on [0, 1] (``n_bins`` equal widths): voxel count, summed probability, summed
    target (hard reference 0/1 or rater average in [0, 1]). Shapes of ``p`` and ``target`` must match."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins}")
    if np.shape(p) != np.shape(target):
        raise ValueError(f"shape mismatch: probabilities {np.shape(p)} vs reference {np.shape(target)}")
    p = _check_prob(p, "probabilities").ravel()
    t = _check_prob(target, "reference").ravel()
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)  # [k/n, (k+1)/n), p = 1 in the last bin
    return {"count": np.bincount(idx, minlength=n_bins).tolist(),
            "prob_sum": np.bincount(idx, weights=p, minlength=n_bins).tolist(),
            "target_sum": np.bincount(idx, weights=t, minlength=n_bins).tolist()}


def ece_from_probability_counts(c: dict) -> float:
    """SoftSeg ECE from :func:`probability_calibration_counts` (pooled or per case)."""
    n = np.asarray(c["count"], float)
    if n.sum() == 0:
        return 0.0
    ok = n > 0
    gap = np.abs(np.asarray(c["target_sum"])[ok] / n[ok] - np.asarray(c["prob_sum"])[ok] / n[ok])
    return float(np.sum(n[ok] / n.sum() * gap))


def ece(p: np.ndarray, target: np.ndarray, n_bins: int = 10) -> float:
    """SoftSeg ECE of one probability map against a (hard or soft) reference."""
    return ece_from_probability_counts(probability_calibration_counts(p, target, n_bins))


def calibration_counts(p: np.ndarray, ref: np.ndarray, n_bins: int = 10) -> dict:
    """Per confidence bin over [0.5, 1] (the ``ece_confidence_05`` variant): voxel count, summed confidence,
    number of correct voxels."""
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
    """``ece_confidence_05`` from :func:`calibration_counts`."""
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


def probability_reliability_diagram(counts: dict, png, title: str = "") -> Path:
    """Reliability diagram of the SoftSeg ECE: observed reference frequency against mean probability per bin
    on [0, 1], with the voxel count per bin below (log scale)."""
    from nnunet_ext.plotting import pyplot, save_figure

    plt = pyplot()
    n = np.asarray(counts["count"], float)
    k = len(n)
    edges = np.linspace(0.0, 1.0, k + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    ok = n > 0
    freq = np.zeros(k)
    meanp = np.zeros(k)
    freq[ok] = np.asarray(counts["target_sum"])[ok] / n[ok]
    meanp[ok] = np.asarray(counts["prob_sum"])[ok] / n[ok]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centres[ok], freq[ok], width=1.0 / k * 0.9, color="tab:blue", label="observed frequency")
    ax.bar(centres[ok], (meanp - freq)[ok], bottom=freq[ok], width=1.0 / k * 0.9, color="tab:red", alpha=0.35,
           label="gap to mean probability")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction of reference voxels")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title((title + "\n" if title else "") + f"ECE ({k} bins on [0, 1]) = {ece_from_probability_counts(counts):.4f}")
    ax2.bar(centres, np.maximum(n, 0.5), width=1.0 / k * 0.9, color="gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("voxels")
    ax2.set_xlabel("predicted probability p")
    return save_figure(fig, png)


def reliability_diagram(counts: dict, png, title: str = "") -> Path:
    """Reliability diagram of the ``ece_confidence_05`` variant (confidence bins over [0.5, 1])."""
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
    average (soft Dice, Brier and the SoftSeg ECE use it when given, else the hard reference; the entropy
    metrics need it). ``calibration`` holds the SoftSeg ECE counts, ``calibration_confidence_05`` those of
    the older variant."""
    target = ref.astype(np.float32) if soft_ref is None else soft_ref
    out = {"soft_dice": soft_dice(p, target), "brier": brier(p, target),
           "entropy_mae": entropy_abs_error(p, soft_ref) if soft_ref is not None else None,
           "ipe_voxelwise": ipe_voxelwise(p, soft_ref) if soft_ref is not None else None,
           "calibration": probability_calibration_counts(p, target, n_bins),
           "calibration_confidence_05": calibration_counts(p, ref, n_bins)}
    out["ece"] = ece_from_probability_counts(out["calibration"])
    out["ece_confidence_05"] = ece_from_counts(out["calibration_confidence_05"])
    return out


def volume_pearson(ref_volumes, pred_volumes) -> float | None:
    """Pearson correlation of reference and predicted lesion volumes across cases (ISBI 2015's VC)."""
    r, p = np.asarray(ref_volumes, float), np.asarray(pred_volumes, float)
    if len(r) < 2 or r.std() == 0 or p.std() == 0:
        return None
    return float(np.corrcoef(r, p)[0, 1])
