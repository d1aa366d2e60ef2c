"""NIfTI reading and writing with SimpleITK, with the checks SimpleITK leaves out.

Arrays are in SimpleITK's array order ``(z, y, x)``; spacings given to and returned from this module are
in the same array order (``(sz, sy, sx)``), which is also how nnU-Net stores spacing in its ``.pkl`` files.

SimpleITK (2.5, ITK 5.4) reads a truncated ``.nii.gz`` or ``.nii`` with the missing part as zeros and NaN /
Inf voxels of a NIfTI file as 0, so nothing downstream can notice either. :func:`read_sitk` (and everything
built on it: :func:`read_image`, :func:`read_mask`) therefore first checks the file itself: the whole gzip
stream is decompressed (truncation and CRC errors are caught), the NIfTI voxel block must be complete
(nibabel), and floating-point voxels must be finite unless the caller allows otherwise. Every failure is a
:class:`ImageReadError` (a ``ValueError``) naming the file and what to do about it.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


class ImageReadError(ValueError):
    """An image file that cannot be trusted: missing, truncated, corrupt, or with NaN/Inf voxels."""


_FLOAT_IDS = None


def _is_float_pixel(pixel_id: int) -> bool:
    global _FLOAT_IDS
    if _FLOAT_IDS is None:
        _FLOAT_IDS = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
    return pixel_id in _FLOAT_IDS


def _is_nifti(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith(".nii") or n.endswith(".nii.gz")


def _gunzip(path: Path) -> bytes:
    """The whole decompressed content of a gzip file; ImageReadError on truncation or corruption."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ImageReadError(f"{path}: damaged gzip file ({e}); the file is truncated or corrupt, copy it again "
                             f"from the source") from None


def check_file(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> np.ndarray | None:
    """Check one image file before SimpleITK reads it.

    Returns the NIfTI voxel array in SimpleITK's array order when it contains NaN/Inf values and
    ``allow_nonfinite`` is set (SimpleITK would zero them), else ``None``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, expected an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes); copy it again from the source")
    is_gz = path.name.lower().endswith(".gz")
    raw = _gunzip(path) if is_gz else None
    if not _is_nifti(path):
        return None
    import nibabel as nib

    try:
        if raw is not None:
            cls = nib.Nifti2Image if len(raw) >= 4 and int.from_bytes(raw[:4], "little") in (540, 0x1C020000) \
                else nib.Nifti1Image
            img = cls.from_bytes(raw)
        else:
            img = nib.load(str(path))
        kind = np.dtype(img.get_data_dtype()).kind
        slope = img.header.get("scl_slope")
        needs_values = kind in "fc" or (slope is not None and np.size(slope) == 1 and np.isfinite(slope)
                                        and float(slope) not in (0.0, 1.0))
        if not needs_values:
            # integers cannot hold NaN; still make sure the voxel block is complete
            shape = img.shape
            n_bytes = int(np.prod(shape)) * np.dtype(img.get_data_dtype()).itemsize
            offset = int(img.header.get("vox_offset", 0)) if hasattr(img.header, "get") else 0
            size = len(raw) if raw is not None else path.stat().st_size
            if size < offset + n_bytes:
                raise ImageReadError(f"{path}: truncated NIfTI file ({size} bytes, {offset + n_bytes} needed); "
                                     f"copy it again from the source")
            return None
        arr = np.asanyarray(img.dataobj)
    except ImageReadError:
        raise
    except Exception as e:  # nibabel: HeaderDataError, OSError "Expected n bytes", ValueError...
        raise ImageReadError(f"{path}: not a readable NIfTI file ({str(e).splitlines()[0]}); "
                             f"copy it again from the source") from None
    bad = ~np.isfinite(arr)
    if bad.any():
        if not allow_nonfinite:
            raise ImageReadError(f"{path}: {int(bad.sum())} NaN/Inf voxel(s) (e.g. at voxel x,y,z "
                                 f"{tuple(int(v) for v in np.argwhere(bad)[0][:3])}); fix or replace the file")
        return np.ascontiguousarray(np.asarray(arr).T)
    return None


def read_sitk(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> sitk.Image:
    """``sitk.ReadImage`` after :func:`check_file`; NaN/Inf voxels are an error unless ``allow_nonfinite``
    (then they are kept, where SimpleITK alone would return 0)."""
    path = Path(path)
    keep = check_file(path, allow_nonfinite=allow_nonfinite)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageReadError(f"{path}: SimpleITK cannot read it ({_itk_message(e)}); check the file format") from None
    if keep is not None:
        arr = sitk.GetArrayFromImage(img)
        if keep.shape[:arr.ndim] == arr.shape or keep.shape == arr.shape:
            fixed = sitk.GetImageFromArray(keep.astype(arr.dtype, copy=False).reshape(arr.shape),
                                           isVector=img.GetNumberOfComponentsPerPixel() > 1)
            fixed.CopyInformation(img)
            img = fixed
    elif not allow_nonfinite and _is_float_pixel(img.GetPixelID()) and not _is_nifti(path):
        arr = sitk.GetArrayViewFromImage(img)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: {int((~np.isfinite(arr)).sum())} NaN/Inf voxel(s); fix or replace the file")
    return img


def _itk_message(e: Exception) -> str:
    """The informative line of an ITK exception (they span several lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:") or "ERROR" in ln.upper() and ":" in ln:
            return ln.replace("Description:", "").strip()
    return lines[-1] if lines else type(e).__name__


def read_image(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    """Return ``(array_zyx, spacing_zyx)`` of an image file (checked, see :func:`read_sitk`)."""
    img = read_sitk(path, allow_nonfinite=allow_nonfinite)
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in reversed(img.GetSpacing()))


def check_3d(path, img: sitk.Image) -> None:
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: expected a 3-D single-channel image, got {img.GetDimension()}-D with "
                             f"{img.GetNumberOfComponentsPerPixel()} component(s) (size {img.GetSize()})")


def mask_array(path, img: sitk.Image, *, allowed=(0, 1), accept_255: bool = True) -> np.ndarray:
    """Voxels of a mask image as uint8 with values in ``allowed``. A 0/255 mask (a common export) becomes
    0/1 when ``accept_255``; any other value is an ImageReadError naming the file and the values."""
    a = sitk.GetArrayFromImage(img)
    vals = np.unique(a)
    if accept_255 and tuple(allowed) == (0, 1) and set(vals.tolist()) <= {0, 255} and 255 in vals:
        return (a == 255).astype(np.uint8)
    if not np.isin(vals, allowed).all():
        bad = [v for v in vals.tolist() if v not in allowed][:6]
        raise ImageReadError(f"{path}: mask values must be in {sorted(allowed)} (or 0/255), found {bad}")
    return a.astype(np.uint8)


def read_mask(path, *, reference: sitk.Image | None = None, reference_path=None, allowed=(0, 1),
              accept_255: bool = True) -> tuple[np.ndarray, sitk.Image]:
    """A 3-D mask file as ``(uint8 array, image)``: integrity, 3-D, geometry against ``reference`` (when
    given), values in ``allowed`` (0/255 -> 0/1 when ``accept_255``)."""
    img = read_sitk(path)
    check_3d(path, img)
    if reference is not None:
        check_same_geometry(reference_path, reference, path, img)
    return mask_array(path, img, allowed=allowed, accept_255=accept_255), img


def check_range(arr: np.ndarray, path, low: float | None = None, high: float | None = None) -> None:
    """ValueError naming ``path`` when ``arr`` has non-finite values or values outside ``[low, high]``."""
    if arr.size == 0:
        raise ValueError(f"{path}: empty image")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise ValueError(f"{path}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ValueError(f"{path}: values must lie in [{low}, {high}], found [{lo:g}, {hi:g}]")


def read_npz(path: str | os.PathLike, key: str | None = None):
    """An ``.npz`` file (or one of its arrays); a truncated or damaged archive is a ValueError naming it."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if key is None:
                return {k: z[k] for k in z.files}
            if key not in z.files:
                raise ValueError(f"{path}: no array {key!r} (has {z.files})")
            return z[key]
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: damaged .npz file ({e}); re-create it (e.g. predict again with "
                         f"--save_probabilities)") from None


def read_geometry(path: str | os.PathLike) -> dict:
    """Size, spacing, origin and direction of an image (SimpleITK order, x first), without the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"{path}: SimpleITK cannot read it ({_itk_message(e)})") from None
    return {"size": tuple(reader.GetSize()), "spacing": tuple(reader.GetSpacing()),
            "origin": tuple(reader.GetOrigin()), "direction": tuple(reader.GetDirection())}


def unique_tmp(path: str | os.PathLike) -> Path:
    """A per-process, per-call temporary sibling of ``path`` that keeps its file ending (so SimpleITK picks
    the same format): ``.tmp_<pid>_<random>_<name>`` (nnunet_ext.core.safety.unique_name)."""
    from nnunet_ext.core.safety import unique_name

    return unique_name(path)


def write_sitk(img: sitk.Image, path: str | os.PathLike, compress: bool = True, compression_level: int = -1) -> None:
    """Write ``img`` atomically (nnunet_ext.core.safety.atomic_output): to a unique temporary name, then renamed
    over ``path``. Concurrent writers never share a temporary file, and an interrupted write leaves ``path``
    as it was (the temporary file is removed unless the process is killed outright; it is never a name
    anything trusts). ``compression_level``: SimpleITK's (-1: the format's default)."""
    from nnunet_ext.core.safety import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(21, "output path is a folder", str(path))
    with atomic_output(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), compress, compression_level)
        except RuntimeError as e:
            raise OSError(f"cannot write {path} ({_itk_message(e)}); check that its folder is writable") from None


def write_image(array: np.ndarray, spacing_zyx: Sequence[float], path: str | os.PathLike,
                reference: sitk.Image | None = None) -> None:
    """Write ``array`` (z, y, x) with ``spacing_zyx``; geometry is copied from ``reference`` when given.

    Atomic with a per-process temporary name (see :func:`write_sitk`)."""
    img = sitk.GetImageFromArray(array)
    if reference is not None:
        img.CopyInformation(reference)
    else:
        img.SetSpacing([float(s) for s in reversed(tuple(spacing_zyx))])
    write_sitk(img, path)


# the image formats the evaluation and fusion commands read and write (``--file-ending``): SimpleITK reads
# them all with their geometry; NIfTI files also get the integrity checks of check_file
FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


def check_file_ending(file_ending: str, option: str = "--file-ending") -> str:
    """``file_ending`` when it is one of :data:`FILE_ENDINGS`, else a ValueError naming ``option``."""
    if file_ending not in FILE_ENDINGS:
        raise ValueError(f"{option} {file_ending!r}: not a supported image format; use one of {', '.join(FILE_ENDINGS)}")
    return file_ending


def case_name(path: str | os.PathLike, file_ending: str = ".nii.gz") -> str:
    """Case identifier of an image file: its name without ``file_ending``."""
    name = Path(path).name
    if not name.endswith(file_ending):
        raise ValueError(f"{path}: expected a file ending in {file_ending}")
    return name[: -len(file_ending)]


def check_same_geometry(reference, ref_img: sitk.Image, other, img: sitk.Image) -> None:
    """ValueError naming both files unless the two images share dimension, size, spacing, origin and
    direction."""
    if ref_img.GetDimension() != img.GetDimension():
        raise ValueError(f"geometry mismatch: {other} is {img.GetDimension()}-D, {reference} "
                         f"{ref_img.GetDimension()}-D")
    if ref_img.GetSize() != img.GetSize() or not np.allclose(ref_img.GetSpacing(), img.GetSpacing(), rtol=1e-4) \
            or not np.allclose(ref_img.GetOrigin(), img.GetOrigin(), atol=1e-3) \
            or not np.allclose(ref_img.GetDirection(), img.GetDirection(), atol=1e-4):
        raise ValueError(f"geometry mismatch: {other} (size {img.GetSize()}, spacing {img.GetSpacing()}, origin "
                         f"{tuple(round(v, 3) for v in img.GetOrigin())}) does not match {reference} (size "
                         f"{ref_img.GetSize()}, spacing {ref_img.GetSpacing()}, origin "
                         f"{tuple(round(v, 3) for v in ref_img.GetOrigin())}); resample one onto the other's grid")


def read_json(path: str | os.PathLike, required: Sequence[str] = ()):
    """A JSON file; ValueError naming the file when it is damaged or lacks one of the ``required`` keys."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or re-create it") from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}; fix or re-create it")
    return obj
