"""Whole-case lesion sizes carried through nnU-Net's data pipeline as a second segmentation channel.

The size map of a case (every lesion voxel holds its lesion's voxel count, see
:func:`nnunet_ext.lsr.lesion_size_map`) is computed once from the preprocessed segmentation and cached as
``<preprocessed config folder>/nnunet_ext_lesion_sizes_cc<connectivity>/<case>.npy`` (int16). The training
dataset returns it stacked under the segmentation, so nnU-Net's own cropping, spatial augmentation,
mirroring and deep-supervision downsampling treat it exactly like the labels (it is constant per lesion,
so label-wise interpolation keeps it exact). Where interpolation separates two touching lesions of
different sizes differently from the labels, a lesion voxel can get size 0 and then weighs 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.lsr import lesion_size_map
from nnunet_ext.training.plumbing import WithExtraSegChannel


def size_folder(preprocessed_config_folder: str, connectivity: int) -> Path:
    return Path(preprocessed_config_folder) / f"nnunet_ext_lesion_sizes_cc{connectivity}"


def ensure_size_maps(dataset, folder: Path, classes: Sequence[int], connectivity: int) -> int:
    """Compute the missing size maps of ``dataset``'s cases (atomic writes); returns how many were made."""
    folder.mkdir(parents=True, exist_ok=True)
    made = 0
    for key in dataset.identifiers:
        target = folder / f"{key}.npy"
        if target.exists():
            continue
        _, seg, _, _ = dataset.load_case(key)
        sizes = lesion_size_map(np.asarray(seg[0]), classes, connectivity).astype(np.int16)
        tmp = folder / f".tmp_{os.getpid()}_{key}.npy"
        np.save(tmp, sizes)
        os.replace(tmp, target)
        made += 1
    return made


class WithLesionSizes(WithExtraSegChannel):
    """Wraps an nnU-Net dataset; ``load_case`` returns the segmentation with the size map as channel 1."""

    def __init__(self, base, folder: Path):
        super().__init__(base)
        self.folder = Path(folder)
        self.remedy = f"delete {self.folder} to recompute"

    def load_extra(self, identifier):
        return np.load(self.folder / f"{identifier}.npy", mmap_mode="r")
