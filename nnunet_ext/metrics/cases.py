"""Case files of an evaluation: folders matched by case name, masks, probability maps, grid checks.

Shared by :mod:`nnunet_ext.metrics.evaluate`, :mod:`nnunet_ext.metrics.operating_points`,
:mod:`nnunet_ext.metrics.validation` and :mod:`nnunet_ext.workflows.selection` (no module here imports another
evaluation module, so there is no import cycle). Arrays are in SimpleITK order ``(z, y, x)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nnunet_ext.core.io import case_name, read_image


_NIFTI_ENDINGS = (".nii.gz", ".nii")


def list_cases(folder: str | os.PathLike, file_ending: str = ".nii.gz") -> dict[str, Path]:
    """``{case: path}`` of the files ending in ``file_ending`` in ``folder`` (hidden files skipped). NIfTI is
    NIfTI: for ``.nii.gz`` or ``.nii`` both endings are case files (a case present as both is an error)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    endings = _NIFTI_ENDINGS if file_ending in _NIFTI_ENDINGS else (file_ending,)
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        ending = next((e for e in endings if p.name.endswith(e)), None)
        if ending is None or p.name.startswith("."):
            continue
        c = case_name(p, ending)
        if c in out:
            raise ValueError(f"case {c} is in {folder} twice ({out[c].name} and {p.name}); remove one of them")
        out[c] = p
    return out


def as_binary(arr: np.ndarray, what: str) -> np.ndarray:
    """Binary view of a 0/1 mask; anything else is a ValueError naming ``what``."""
    if arr.dtype == bool:
        return arr
    vals = np.unique(arr)
    if not np.all(np.isin(vals, (0, 1))):
        shown = ", ".join(str(v) for v in vals[:6]) + (" ..." if len(vals) > 6 else "")
        raise ValueError(f"{what}: expected a binary mask (values 0/1), found values {shown}; "
                         f"use --label to select one label")
    return arr.astype(bool)


def need_3d(arr: np.ndarray, path) -> None:
    """Lesion metrics work on 3-D masks (z, y, x); a 2-D (or 4-D) image is a ValueError naming the file."""
    if np.ndim(arr) != 3:
        raise ValueError(f"{path}: a {np.ndim(arr)}-D image; lesion metrics need 3-D masks (one volume per case)")


def load_mask(path: Path, label: int | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """``(mask, spacing_zyx)``: voxels equal to ``label``, or the binary (0/1) mask when ``label`` is None."""
    arr, spacing = read_image(path)
    need_3d(arr, path)
    if label is not None:
        return arr == label, spacing
    return as_binary(arr, str(path)), spacing


def check_same_grid(ref_path, ref_shape, ref_spacing, other_path, shape, spacing, rtol: float = 1e-3) -> None:
    if tuple(ref_shape) != tuple(shape):
        raise ValueError(f"shape mismatch: {other_path} has shape {tuple(shape)} but reference {ref_path} has "
                         f"{tuple(ref_shape)} (array order z, y, x)")
    if not np.allclose(ref_spacing, spacing, rtol=rtol):
        raise ValueError(f"spacing mismatch: {other_path} has spacing {tuple(spacing)} but reference {ref_path} "
                         f"has {tuple(ref_spacing)} (mm, array order z, y, x)")


def load_probabilities(path: Path, class_index: int = 1) -> np.ndarray:
    """Foreground probability map of one case, array order (z, y, x): nnU-Net's ``<case>.npz`` (key
    ``probabilities``, classes first) or a NIfTI map."""
    path = Path(path)
    if path.suffix == ".npz":
        from nnunet_ext.core.io import read_npz

        arrays = read_npz(path)  # a damaged archive is a ValueError naming the file
        if "probabilities" not in arrays:
            raise ValueError(f"{path}: no 'probabilities' array (expected nnU-Net --save_probabilities output)")
        p = arrays["probabilities"]
        if p.ndim != 4 or class_index >= p.shape[0]:
            raise ValueError(f"{path}: expected (classes, z, y, x) probabilities with class {class_index}, "
                             f"got shape {p.shape}")
        p = p[class_index]
    else:
        p = read_image(path)[0]
    if not np.isfinite(p).all() or p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise ValueError(f"{path}: probabilities must be finite and in [0, 1]")
    return p.astype(np.float32, copy=False)


def prob_files(prob_dir, file_ending: str = ".nii.gz") -> dict[str, Path]:
    """``{case: path}`` of the probability maps in ``prob_dir`` (``*.npz``, else ``*<file_ending>``)."""
    files = {p.name[:-4]: p for p in sorted(Path(prob_dir).glob("*.npz"))}
    if not files:
        files = list_cases(prob_dir, file_ending)
    if not files:
        raise ValueError(f"no probability maps (*.npz or *{file_ending}) in {prob_dir}")
    return files


def check_same_header(ref_path, other_path, what: str = "") -> None:
    """ValueError naming both files unless ``other_path`` has the reference's dimension, size, spacing,
    origin and direction (read from the headers only; ``.npz`` probability files carry no geometry and are
    checked by shape where they are read)."""
    from nnunet_ext.core.io import read_geometry

    if str(other_path).endswith(".npz"):
        return
    a, b = ({"dimension": len(g["size"]), **g} for g in (read_geometry(ref_path), read_geometry(other_path)))
    tol = {"spacing": dict(rtol=1e-4, atol=1e-6), "origin": dict(rtol=0, atol=1e-3), "direction": dict(rtol=0, atol=1e-4)}
    for k in ("dimension", "size", "spacing", "origin", "direction"):
        same = a[k] == b[k] if k in ("dimension", "size") else (len(a[k]) == len(b[k]) and np.allclose(a[k], b[k], **tol[k]))
        if not same:
            fmt = lambda v: tuple(round(x, 4) for x in v) if isinstance(v, tuple) else v  # noqa: E731
            raise ValueError(f"{k} mismatch: {what + ' ' if what else ''}{other_path} has {k} {fmt(b[k])}, the "
                             f"reference {ref_path} {fmt(a[k])}; resample one onto the other's grid")

