"""Per-case voxel maps stored beside nnU-Net's preprocessed cases (soft targets, rater masks, lesion sizes).

A map lives in ``<preprocessed config folder>/<subfolder>/<case>.b2nd`` with the chunk and block shapes of
the case's own ``<case>_seg.b2nd`` (shape ``(1, *spatial)``), so nnU-Net's data loader reads only the
patch it crops, from the map as from the labels. Writes go to a per-process temporary name and are renamed
into place, so concurrent or interrupted runs never leave a half-written map that a later run trusts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SOFT_SCALE = 255.0  # soft maps and rater masks are stored as uint8 in 1/255 steps

SUFFIX = ".b2nd"


def map_path(folder, case: str) -> Path:
    return Path(folder) / f"{case}{SUFFIX}"


def save_map_like_seg(arr: np.ndarray, seg_file, target) -> None:
    """Store ``arr`` (spatial shape of the case) as ``target`` with the chunking of ``seg_file``."""
    import blosc2

    seg = blosc2.open(urlpath=str(seg_file), mode="r")
    arr = np.ascontiguousarray(arr)
    if arr.ndim == len(seg.shape) - 1:
        arr = arr[None]
    if tuple(arr.shape) != tuple(seg.shape):
        raise ValueError(f"map for {seg_file} has shape {arr.shape[1:]}, the case's segmentation {seg.shape[1:]}")
    from nnunet_ext.core.safety import atomic_output

    with atomic_output(target) as tmp:
        blosc2.asarray(arr, urlpath=str(tmp), chunks=seg.chunks, blocks=seg.blocks, mode="w",
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 8})


def open_map(folder, case: str, remedy: str = ""):
    """The stored map of ``case`` as a lazily read blosc2 array of shape (1, *spatial)."""
    import blosc2

    path = map_path(folder, case)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + (f": {remedy}" if remedy else ""))
    kw = {} if os.name == "nt" else {"mmap_mode": "r"}
    return blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, **kw)


def read_map(folder, case: str, remedy: str = "") -> np.ndarray:
    """The whole stored map of ``case`` as a numpy array (spatial shape, without the channel axis)."""
    return np.asarray(open_map(folder, case, remedy)[:])[0]
