"""Voxel uncertainty of a prediction: the entropy of the predicted class distribution (``predict --uncertainty``).

Definition (predictive entropy, natural log, in nats)::

    H(x) = - sum_c P_c(x) ln P_c(x)        (0 ln 0 = 0)

where ``P(x)`` is the class distribution that the prediction of voxel ``x`` comes from: the distribution whose
argmax (or whose lesion probability at the model's threshold) is the mask. ``H`` is 0 where the model is sure
and at most ``ln C`` (``ln 2 = 0.693`` for lesion against background). For a lesion probability ``q`` alone
(two classes ``(1 - q, q)``) it is the binary entropy ``-q ln q - (1 - q) ln(1 - q)``.

``P`` is made from the flipped predictions the predictor already makes (test-time mirroring), so the entropy
costs no extra network pass; it is computed in nnU-Net's export workers from the class probabilities in the
input geometry. What ``P`` is, per model (nnunet_ext.inference.contract, nnunet_ext.inference.predictor):

* softmax models with the contract's ``tta = "mean_logits"`` (nnU-Net's own aggregation, the default):
  nnU-Net averages the logits of the flips, so ``P = softmax(mean of the flips' logits)``, the normalised
  geometric mean of the flips' class distributions;
* softmax models with ``tta = "mean_probabilities"``: ``P`` is the arithmetic mean of the flips' softmax
  probabilities inside each sliding-window tile;
* sigmoid baselines (e.g. ``ConvDiceTrainer``) have nnU-Net's two-class head and ``sigmoid(z_lesion -
  z_background)`` is its softmax lesion probability: the same as softmax models;
* SoftSeg models (``activation = "normalized_relu"`` or ``"normalized_relu_case"``): the binary entropy of
  the soft lesion map ``Q`` (the mean of the flips' normalized-ReLU outputs, or the blended ReLU divided by
  the case maximum), i.e. of ``(1 - Q, Q)``;
* several folds: nnU-Net averages what the mirroring step returns over the folds (logits, or the
  log-probabilities of ``mean_probabilities``), so ``P`` is the folds' normalised geometric mean;
* an ensemble of models (``predict --selection`` with several members): the binary entropy of the members'
  mean lesion probability.

The lesion probability (``lesion_probability``) is the summed probability of the foreground classes: the
lesion class of a two-class model, the soft map of SoftSeg models.
"""
from __future__ import annotations

import numpy as np

UNIT = "nats"
DEFINITION = ("entropy -sum_c P_c ln P_c (nats) of the predicted class distribution P the mask is made from "
              "(built from the test-time flips the predictor already runs; binary entropy of the soft map "
              "for SoftSeg models and of the mean lesion probability for ensembles)")


def _check_probabilities(prob: np.ndarray, what: str) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim < 2 or prob.shape[0] < 2:
        raise ValueError(f"{what} must be class probabilities (C >= 2, *spatial), got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got {prob.dtype}")
    return prob


def entropy(prob: np.ndarray) -> np.ndarray:
    """Voxel entropy (nats, float32) of class probabilities ``prob`` ``(C, *spatial)``; ``0 ln 0 = 0``.
    Values slightly outside [0, 1] from float rounding are clipped."""
    from scipy.special import entr

    prob = _check_probabilities(prob, "prob")
    out = np.zeros(prob.shape[1:], np.float32)
    for c in range(prob.shape[0]):  # one channel at a time: no (C, *spatial) temporary
        out += entr(np.clip(prob[c], 0, 1).astype(np.float32, copy=False))
    return out


def binary_entropy(q: np.ndarray) -> np.ndarray:
    """Voxel entropy (nats, float32) of the two classes ``(1 - q, q)`` of a lesion probability map ``q``."""
    from scipy.special import entr

    q = np.clip(np.asarray(q, np.float32), 0, 1)
    return entr(q) + entr(np.float32(1) - q)


def lesion_probability(prob: np.ndarray) -> np.ndarray:
    """Probability that a voxel is lesion (any foreground class), float32, from class probabilities
    ``prob`` ``(C, *spatial)``: ``prob[1]`` for two classes, ``sum_{c >= 1} prob[c]`` otherwise."""
    prob = _check_probabilities(prob, "prob")
    if prob.shape[0] == 2:
        return np.asarray(prob[1], np.float32)
    return np.clip(prob[1:].sum(0, dtype=np.float32), 0, 1)
