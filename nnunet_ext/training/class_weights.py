"""Class weights from the training cases' preprocessed labels.

:func:`negative_positive_ratio` is the positive-class weight of the LSR thesis' weighted BCE (Nichyporuk 2021,
section 4.3.1: "a commonly selected default positive weight is #negative voxels / #positive voxels",
computed "within the brain region"): background voxels (label 0) over lesion voxels (label 1) of the
training cases, counted inside nnU-Net's nonzero mask (the brain of a skull-stripped scan), i.e. without the
``-1`` voxels nnU-Net's cropping marks outside it. Other labels (an ignore label) are not counted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_ext.training.case_stats import cached_case_counts

CACHE_FILE = "nnunet_ext_stats/region_voxels.json"  # a subfolder: nnU-Net infers its dataset class from the files beside the cases


def region_voxel_counts(seg: np.ndarray) -> dict:
    """``{"outside": #(-1), "negative": #(0), "positive": #(1)}`` of one preprocessed label array."""
    s = np.asarray(seg)
    return {"outside": int(np.count_nonzero(s == -1)), "negative": int(np.count_nonzero(s == 0)),
            "positive": int(np.count_nonzero(s == 1))}


def negative_positive_ratio(dataset, identifiers, cache_folder=None) -> tuple[float, dict]:
    """(#negative / #positive, summed counts) over the preprocessed labels of ``identifiers``
    (``dataset.load_case(key)`` gives nnU-Net's ``(data, seg, seg_prev, properties)``); per-case counts are
    cached in ``cache_folder/nnunet_ext_stats/region_voxels.json`` (written atomically). No lesion voxel in the
    training cases is a ValueError."""
    ids = list(identifiers)
    if not ids:
        raise ValueError("negative_positive_ratio needs at least one training case")
    keys = ("outside", "negative", "positive")
    counts = cached_case_counts(dataset, ids, Path(cache_folder) / CACHE_FILE if cache_folder is not None else None,
                                region_voxel_counts, lambda c: isinstance(c, dict) and set(c) == set(keys))
    total = {k: sum(int(c[k]) for c in counts) for k in keys}
    if total["positive"] == 0:
        raise ValueError(f"the {len(ids)} training cases hold no lesion voxel (label 1): no positive-class weight")
    return total["negative"] / total["positive"], total
