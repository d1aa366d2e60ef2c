"""NIfTI reading and writing with SimpleITK.

Arrays are in SimpleITK's array order ``(z, y, x)``; spacings given to and returned from this module are
in the same array order (``(sz, sy, sx)``), which is also how nnU-Net stores spacing in its ``.pkl`` files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Return ``(array_zyx, spacing_zyx)`` of an image file."""
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in reversed(img.GetSpacing()))


def read_geometry(path: str | os.PathLike) -> dict:
    """Size, spacing, origin and direction of an image (SimpleITK order, x first), without the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {"size": tuple(reader.GetSize()), "spacing": tuple(reader.GetSpacing()),
            "origin": tuple(reader.GetOrigin()), "direction": tuple(reader.GetDirection())}


def write_image(array: np.ndarray, spacing_zyx: Sequence[float], path: str | os.PathLike,
                reference: sitk.Image | None = None) -> None:
    """Write ``array`` (z, y, x) with ``spacing_zyx``; geometry is copied from ``reference`` when given.

    The file is written to a temporary name first and renamed, so an interrupted run never leaves a
    half-written image behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    if reference is not None:
        img.CopyInformation(reference)
    else:
        img.SetSpacing([float(s) for s in reversed(tuple(spacing_zyx))])
    tmp = path.with_name(".tmp_" + path.name)
    sitk.WriteImage(img, str(tmp), True)
    os.replace(tmp, path)


def case_name(path: str | os.PathLike, file_ending: str = ".nii.gz") -> str:
    """Case identifier of an image file: its name without ``file_ending``."""
    name = Path(path).name
    if not name.endswith(file_ending):
        raise ValueError(f"{path}: expected a file ending in {file_ending}")
    return name[: -len(file_ending)]


def check_same_geometry(reference, ref_img: sitk.Image, other, img: sitk.Image) -> None:
    """ValueError naming both files unless the two images share size, spacing, origin and direction."""
    if ref_img.GetSize() != img.GetSize() or not np.allclose(ref_img.GetSpacing(), img.GetSpacing(), rtol=1e-4) \
            or not np.allclose(ref_img.GetOrigin(), img.GetOrigin(), atol=1e-3) \
            or not np.allclose(ref_img.GetDirection(), img.GetDirection(), atol=1e-4):
        raise ValueError(f"geometry mismatch: {other} (size {img.GetSize()}, spacing {img.GetSpacing()}) does not "
                         f"match {reference} (size {ref_img.GetSize()}, spacing {ref_img.GetSpacing()})")
