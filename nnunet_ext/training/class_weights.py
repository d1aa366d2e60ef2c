"""Class weights from the training cases' preprocessed labels.

:func:`negative_positive_ratio` is the positive-class weight of the LSR thesis' weighted BCE (Nichyporuk 2021,
section 4.3.1: "a commonly selected default positive weight is #negative voxels / #positive voxels",
computed "within the brain region"): background voxels (label 0) over lesion voxels (label 1) of the
training cases, counted inside nnU-Net's nonzero mask (the brain of a skull-stripped scan), i.e. without the
``-1`` voxels nnU-Net's cropping marks outside it. Other labels (an ignore label) are not counted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
    cache_path = Path(cache_folder) / CACHE_FILE if cache_folder is not None else None
    cache = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    changed = False
    total = {"outside": 0, "negative": 0, "positive": 0}
    for key in ids:
        counts = cache.get(key)
        if not (isinstance(counts, dict) and set(counts) == set(total)):
            _, seg, _, _ = dataset.load_case(key)
            counts = region_voxel_counts(seg[0])
            cache[key] = counts
            changed = True
        for k in total:
            total[k] += int(counts[k])
    if changed and cache_path is not None:
        from nnunet_ext.safety import atomic_write_text

        atomic_write_text(cache_path, json.dumps(cache))
    if total["positive"] == 0:
        raise ValueError(f"the {len(ids)} training cases hold no lesion voxel (label 1): no positive-class weight")
    return total["negative"] / total["positive"], total
