"""Metrics of soft (probabilistic) predictions: soft Dice, Brier score, entropy agreement with the raters,
expected calibration error (ECE) with a reliability diagram.

* ``soft_dice(p, s) = 2 sum(p s) / (sum p + sum s)`` (1 when both sums are 0);
* ``brier(p, s) = mean((p - s)^2)`` against the rater average ``s``;
* ``image_entropy(q) = sum_voxels H(q)`` (SoftSeg thesis, eq. 5.1) with the voxel entropy over the two
  classes ``H(q) = -sum_c q_c ln q_c = -q ln q - (1 - q) ln(1 - q)`` (nats, 0 ln 0 = 0); ``entropy_mae``
  is ``|image_entropy(p) - image_entropy(s)|`` per case, its mean over cases the MAE: how well the
  prediction's total uncertainty reproduces the raters' disagreement (s the rater average);
* ``ipe_voxelwise(p, s) = mean |H(p) - H(s)|`` (voxel by voxel; our earlier "ipe", kept under this name);
* **ECE** (SoftSeg thesis, eq. 5.3-5.5, computed as the google-research ``uncertainties`` code it cites,
  ``postprocessing/metrics.py: calibration``): each voxel has the class probabilities ``(1 - p, p)``
  (float64); confidence = the maximum class probability, predicted class = the argmax (a tie p = 0.5 is
  background), accuracy = predicted class == the hard reference; confidences binned into ``n_bins`` (10)
  bins ``[t_k, t_(k+1))`` with ``t = linspace(0, 1, n_bins + 1)``;
  ``ECE = sum_k |B_k| / N * |acc(B_k) - conf(B_k)|`` with N the binned voxels of all cases pooled. As in
  that code, a confidence of exactly 1 (p = 0 or 1, e.g. SoftSeg's zeros, or within float64 rounding of
  them) falls in no bin and does not count in N (``unbinned`` in the counts);
* ``ece_probability_bins`` (our earlier "ece", kept under this name): voxels binned by their probability
  ``p`` into 10 bins on [0, 1] (last bin closed); per bin the mean probability against the observed
  frequency of the reference (fraction of reference voxels, hard or rater average);
* ``ece_confidence_05`` (an earlier variant, kept under this name): confidence ``max(p, 1 - p)`` in 10 bins
  over [0.5, 1] (confidence 1 in the last); accuracy = ``(p >= 0.5) == reference``.
Counts per bin are returned so cases can be pooled.
* **Voxel-level average precision** (the Nichyporuk thesis' "AP", Tables 4.3-4.7): the area under the
  voxel precision-recall curve over every threshold of the probability map,
  ``AP = sum_k (R_k - R_(k-1)) P_k`` over the distinct probabilities ``t_1 > t_2 > ...`` (a voxel is
  positive when ``p >= t_k``; ``R_0 = 0``; no interpolation: scikit-learn's ``average_precision_score``).
  Probabilities are rounded to multiples of 1e-6 first (values closer than that tie), so that counts of
  cases add up exactly (:func:`ap_counts`): pooled over cases it is the dataset-level AP; undefined
  (``None``) without reference voxels.
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
    """Voxel entropy (nats) over the classes ``(1 - q, q)``, 0 at q = 0 and q = 1."""
    from scipy.special import entr

    q = np.clip(np.asarray(q, np.float64), 0.0, 1.0)
    return entr(q) + entr(1.0 - q)


def ipe_voxelwise(p: np.ndarray, s: np.ndarray) -> float:
    """Voxel-wise mean absolute entropy difference (our earlier ``ipe``)."""
    return float(np.mean(np.abs(binary_entropy(p) - binary_entropy(s))))


ipe = ipe_voxelwise  # old name


def image_entropy(q: np.ndarray) -> float:
    """Entropy of a probability map (SoftSeg thesis, eq. 5.1): the voxel entropies over the classes,
    summed over the image (nats)."""
    return float(np.sum(binary_entropy(q)))


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


def ece_probability_bins(p: np.ndarray, target: np.ndarray, n_bins: int = 10) -> float:
    """``ece_probability_bins`` of one probability map against a (hard or soft) reference."""
    return ece_from_probability_counts(probability_calibration_counts(p, target, n_bins))


def confidence_counts(p: np.ndarray, ref: np.ndarray, n_bins: int = 10) -> dict:
    """The thesis' ECE counts (module docstring) of lesion probabilities ``p`` against the hard reference
    ``ref``: per confidence bin ``[t_k, t_(k+1))``, ``t = linspace(0, 1, n_bins + 1)``, the voxel count,
    summed confidence and number of correct voxels; ``unbinned``: ``[voxels with confidence 1]``."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins}")
    if np.shape(p) != np.shape(ref):
        raise ValueError(f"shape mismatch: probabilities {np.shape(p)} vs reference {np.shape(ref)}")
    p = _check_prob(p, "probabilities").ravel()
    prob = np.stack([1.0 - p, p], 1)  # the classes (background, lesion)
    conf = prob.max(1)
    pred = prob.argmax(1)  # first maximum: a tie is background, as numpy's argmax in the cited code
    correct = pred == (np.asarray(ref).ravel() > 0)
    tau = np.linspace(0, 1, n_bins + 1)
    idx = np.searchsorted(tau, conf, side="right") - 1  # tau[k] <= conf < tau[k + 1]; conf = 1 -> n_bins
    inside = idx < n_bins
    idx, conf, correct = idx[inside], conf[inside], correct[inside]
    return {"count": np.bincount(idx, minlength=n_bins).tolist(),
            "conf_sum": np.bincount(idx, weights=conf, minlength=n_bins).tolist(),
            "correct": np.bincount(idx, weights=correct, minlength=n_bins).tolist(),
            "unbinned": [int((~inside).sum())]}


def ece(p: np.ndarray, ref: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the SoftSeg thesis (module docstring) of one probability map against the hard reference;
    pool cases with :func:`confidence_counts`, :func:`add_counts` and :func:`ece_from_counts`."""
    return ece_from_counts(confidence_counts(p, ref, n_bins))


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
    """ECE from confidence counts: the thesis' (:func:`confidence_counts`) or ``ece_confidence_05``
    (:func:`calibration_counts`); weights are the voxel counts of the bins."""
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
    """Reliability diagram of ``ece_probability_bins``: observed reference frequency against mean probability per bin
    on [0, 1], with the voxel count per bin below (log scale)."""
    from nnunet_ext.core.plotting import pyplot, save_figure

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
    ax.set_title((title + "\n" if title else "")
                 + f"ece_probability_bins ({k} bins of p) = {ece_from_probability_counts(counts):.4f}")
    ax2.bar(centres, np.maximum(n, 0.5), width=1.0 / k * 0.9, color="gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("voxels")
    ax2.set_xlabel("predicted probability p")
    return save_figure(fig, png)


def reliability_diagram(counts: dict, png, title: str = "", low: float = 0.5) -> Path:
    """Reliability diagram of confidence counts with bins over [``low``, 1]: the thesis' ECE
    (:func:`confidence_counts`, ``low=0``) or the ``ece_confidence_05`` variant (``low=0.5``)."""
    from nnunet_ext.core.plotting import pyplot, save_figure

    plt = pyplot()

    n = np.asarray(counts["count"], float)
    k = len(n)
    edges = np.linspace(low, 1.0, k + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.asarray(counts["correct"]) / n
        conf = np.asarray(counts["conf_sum"]) / n
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ok = n > 0
    w = (1.0 - low) / k * 0.9
    ax.bar(centres[ok], acc[ok], width=w, color="tab:blue", label="accuracy")
    ax.bar(centres[ok], (conf - acc)[ok], bottom=acc[ok], width=w, color="tab:red", alpha=0.35,
           label="gap to confidence")
    ax.plot([low, 1], [low, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title((title + "\n" if title else "") + f"ECE = {ece_from_counts(counts):.4f}")
    ax2.bar(centres, np.maximum(n, 0.5), width=w, color="gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("voxels")
    ax2.set_xlabel("confidence max(p, 1-p)" + (f"; {counts['unbinned'][0]} voxels at confidence 1 not binned"
                                               if counts.get("unbinned") else ""))
    return save_figure(fig, png)


AP_STEPS = 10 ** 6  # probabilities are rounded to multiples of 1 / AP_STEPS for the average precision


def ap_counts(p: np.ndarray, ref: np.ndarray) -> dict:
    """Reference (positive) and other voxels per rounded probability ``round(p * 1e6)``, sparse:
    ``{"level": [...], "pos": [...], "neg": [...]}`` (levels ascending); add cases with :func:`add_ap_counts`."""
    if np.shape(p) != np.shape(ref):
        raise ValueError(f"shape mismatch: probabilities {np.shape(p)} vs reference {np.shape(ref)}")
    level = np.rint(_check_prob(p, "probabilities").ravel() * AP_STEPS).astype(np.int64)
    pos = np.bincount(level, weights=np.asarray(ref, bool).ravel(), minlength=AP_STEPS + 1)
    every = np.bincount(level, minlength=AP_STEPS + 1)
    keep = np.flatnonzero(every)
    return {"level": keep.tolist(), "pos": pos[keep].astype(np.int64).tolist(),
            "neg": (every[keep] - pos[keep].astype(np.int64)).tolist()}


def add_ap_counts(a: dict | None, b: dict) -> dict:
    """Sum of two :func:`ap_counts` (``a`` may be ``None``)."""
    if a is None:
        return {k: list(v) for k, v in b.items()}
    level = np.concatenate([a["level"], b["level"]]).astype(np.int64)
    keep, inv = np.unique(level, return_inverse=True)
    out = {"level": keep.tolist()}
    for k in ("pos", "neg"):
        out[k] = np.bincount(inv, weights=np.concatenate([a[k], b[k]]), minlength=len(keep)).astype(np.int64).tolist()
    return out


def average_precision_from_counts(c: dict) -> float | None:
    """Voxel-level average precision (module docstring) of :func:`ap_counts`; ``None`` without positives."""
    pos = np.asarray(c["pos"], np.float64)[::-1]  # from the highest probability down
    neg = np.asarray(c["neg"], np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0:
        return None
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    precision = tp / (tp + fp)  # tp + fp >= 1 at every level that holds a voxel
    return float(np.sum(pos / n_pos * precision))


def average_precision(p: np.ndarray, ref: np.ndarray) -> float | None:
    """Voxel-level average precision of one probability map against a binary reference."""
    return average_precision_from_counts(ap_counts(p, ref))


def soft_case_metrics(p: np.ndarray, ref: np.ndarray, soft_ref: np.ndarray | None = None, n_bins: int = 10) -> dict:
    """Soft metrics of one case: ``p`` lesion probabilities, ``ref`` hard reference, ``soft_ref`` the rater
    average (soft Dice, Brier and ``ece_probability_bins`` use it when given, else the hard reference; the
    entropy metrics need it; the thesis' ``ece`` always uses the hard reference). ``calibration`` holds the
    counts of ``ece``, ``calibration_probability_bins`` and ``calibration_confidence_05`` those of the
    other variants; ``voxel_ap`` is the voxel-level average precision against the hard reference,
    ``ap_counts`` its counts (to pool cases)."""
    target = ref.astype(np.float32) if soft_ref is None else soft_ref
    out = {"soft_dice": soft_dice(p, target), "brier": brier(p, target),
           "entropy_mae": entropy_abs_error(p, soft_ref) if soft_ref is not None else None,
           "ipe_voxelwise": ipe_voxelwise(p, soft_ref) if soft_ref is not None else None,
           "calibration": confidence_counts(p, ref, n_bins),
           "calibration_probability_bins": probability_calibration_counts(p, target, n_bins),
           "calibration_confidence_05": calibration_counts(p, ref, n_bins)}
    out["ece"] = ece_from_counts(out["calibration"])
    out["ece_probability_bins"] = ece_from_probability_counts(out["calibration_probability_bins"])
    out["ece_confidence_05"] = ece_from_counts(out["calibration_confidence_05"])
    out["ap_counts"] = ap_counts(p, ref)
    out["voxel_ap"] = average_precision_from_counts(out["ap_counts"])
    return out


def volume_pearson(ref_volumes, pred_volumes) -> float | None:
    """Pearson correlation of reference and predicted lesion volumes across cases (ISBI 2015's VC)."""
    r, p = np.asarray(ref_volumes, float), np.asarray(pred_volumes, float)
    if len(r) < 2 or r.std() == 0 or p.std() == 0:
        return None
    return float(np.corrcoef(r, p)[0, 1])


def calibration_record(p: np.ndarray, ref: np.ndarray, soft_ref: np.ndarray, n_bins: int = 10) -> dict:
    """What a case contributes to the pooled calibration statistics of a method comparison: the Brier score
    of the lesion probabilities ``p`` against the rater average ``soft_ref`` (Lemay 2022, eq. 5.2) and the
    thesis' ECE counts of ``p`` against the hard reference ``ref`` (:func:`confidence_counts`)."""
    if np.shape(soft_ref) != np.shape(p):
        raise ValueError(f"shape mismatch: probabilities {np.shape(p)} vs soft reference {np.shape(soft_ref)}")
    c = confidence_counts(p, ref, n_bins)
    return {"brier": brier(p, soft_ref), "count": c["count"], "conf_sum": c["conf_sum"], "correct": c["correct"]}


def calibration_on_indices(records, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Brier (mean over the resampled cases) and ECE (from the bin counts pooled over the resampled cases,
    ``sum_b |correct_b - conf_sum_b| / N``, which equals :func:`ece_from_counts` of the pooled counts) on each
    resample; ``records`` are :func:`calibration_record` values, ``idx`` (resamples, cases) case indices."""
    idx = np.atleast_2d(np.asarray(idx))
    b = np.array([r["brier"] for r in records], float)
    n, conf, corr = (np.array([r[k] for r in records], float) for k in ("count", "conf_sum", "correct"))
    total = n[idx].sum(1).sum(1)
    gap = np.abs(corr[idx].sum(1) - conf[idx].sum(1)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece_ = np.where(total > 0, gap / np.maximum(total, 1), 0.0)
    return {"brier": b[idx].mean(1), "ece": ece_}
