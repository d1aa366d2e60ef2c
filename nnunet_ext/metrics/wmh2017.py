"""The WMH Segmentation Challenge 2017 scoring (``nnunet-ext evaluate --preset wmh2017``).

Reproduces ``evaluation.py`` of the organisers (github.com/hjkuijf/wmhchallenge, commit 2e628cb, the
Python 3 version) with our own code:

* reference: WMH = values in [0.5, 1.5], "other pathology" = values in [1.5, 2.5] (label 1 and 2);
* prediction: voxels of other pathology set to 0, then binarised as the organisers' ``BinaryThreshold``
  does it: an **integer** image is foreground where ``1 <= v <= 1000`` (the upper bound cast to the pixel
  type, as SimpleITK does: 232 for uint8), a **float** image where ``0.5 <= v <= 1000``;
* Dice, AVD (volume difference / reference volume x 100, in voxels), lesion recall (26-connected reference
  lesions touched by the prediction), lesion F1 (precision = 26-connected predicted components touching
  the reference / predicted components; recall 1 without reference lesions, precision 1 without predicted
  components), HD95 on the organisers' border (:func:`nnunet_ext.metrics.lesions.surface_mask`,
  ``"wmh2017"``: 3 x 3 in-plane erosion, outside the image foreground; distances in mm with the reference's
  spacing; max of the two directed 95th percentiles).

Where their script cannot score a case we keep our conventions (docs/evaluation.md): empty reference and
prediction (their Dice and HD95 are NaN, AVD divides by zero), empty reference with a prediction (HD95 and
AVD crash), empty prediction (HD95 NaN), a mask without border voxels (their k-d tree is empty); an
integer-typed reference (SimpleITK truncates their thresholds 0.5/1.5/2.5 to 0/1/2 so background counts as
WMH; we read it by value, as their script reads a float reference); an int8 prediction (their threshold
call fails; we use ``v >= 1``).
"""
from __future__ import annotations

import numpy as np


def reference_masks(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(wmh, other_pathology)`` of a reference image: values in [0.5, 1.5] and in [1.5, 2.5]."""
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.copy(), np.zeros(a.shape, bool)
    return (a >= 0.5) & (a <= 1.5), (a >= 1.5) & (a <= 2.5)


def _integer_upper(dtype: np.dtype) -> int | None:
    """1000 cast to an integer pixel type the way SimpleITK's BinaryThreshold does it (C conversion: wraps
    for 8-bit types); ``None`` when the result is below the lower threshold 1 (their call fails)."""
    if dtype == np.uint8:
        return 1000 % 256  # 232
    if dtype == np.int8:
        return None  # 1000 -> -24 < 1: "Lower threshold cannot be greater than upper threshold"
    return 1000


def binarize_prediction(arr: np.ndarray) -> np.ndarray:
    """The organisers' binarisation of a (masked) prediction image (module docstring)."""
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.copy()
    if np.issubdtype(a.dtype, np.integer):
        hi = _integer_upper(a.dtype)
        return (a >= 1) if hi is None else (a >= 1) & (a <= hi)
    return (a >= 0.5) & (a <= 1000)


def prepare_case(ref_arr: np.ndarray, pred_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(reference_wmh, prediction)`` binary masks as the organisers' ``getImages``: the prediction with the
    reference's other-pathology voxels removed, then binarised."""
    if np.shape(ref_arr) != np.shape(pred_arr):
        raise ValueError(f"shape mismatch: reference {np.shape(ref_arr)} vs prediction {np.shape(pred_arr)}")
    wmh, other = reference_masks(ref_arr)
    pred = np.where(other, np.zeros((), dtype=np.asarray(pred_arr).dtype), pred_arr)
    return wmh, binarize_prediction(pred)
