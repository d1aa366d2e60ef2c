"""Multi-rater label fusion and soft labels.

Every function takes rater masks as a sequence of equally shaped binary arrays (array order ``(z, y, x)``)
and returns an array of that shape: uint8 for hard methods, float32 in [0, 1] for soft ones.

* ``majority``: foreground where *more than half* of the raters marked it; with an even number of raters a
  tie (exactly half) is background.
* ``intersection`` / ``union``: all / any rater.
* ``mean``: fraction of raters (soft).
* ``staple``: SimpleITK's STAPLE (Warfield et al. 2004); ``soft=True`` returns its per-voxel foreground
  probability, otherwise that probability thresholded at 0.5.
* ``inter_soft_union``: 1 where all raters agree, ``gamma`` where only some do, 0 elsewhere.
* ``soft_rim`` (Kats et al. 2019): a hard core of 1 -- the strict majority vote of the raters (more than
  half; with two raters this is their intersection, with one rater its mask) -- plus a rim: the core dilated
  by a ball of ``radius_mm`` (spacing honoured); rim voxels brighter than the mean intensity of the lesion
  they surround (26-connected components of the core) get ``gamma``, other rim voxels 0.
* ``inter_soft_union_rim`` (Bar-Ilan thesis, section 3.2.1, Fig. 9d, "intersection + soft union"): 1 on the
  raters' intersection; ``gamma`` on the voxels where the raters disagree (union minus intersection) and on
  the intensity-gated 3D dilation of the *intersection* -- ``soft_rim`` of the intersection: voxels within
  a ball of ``radius_mm`` (spacing honoured) of an intersection lesion and brighter than that lesion's mean
  intensity; 0 elsewhere. A lesion marked by only some raters is ``gamma`` and gets no rim. With one rater
  it equals ``soft_rim`` of that rater. Paper defaults: ``gamma`` 0.5, ``radius_mm`` 1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ext.core.progress import step

HARD_METHODS = ("majority", "intersection", "union", "staple")
SOFT_METHODS = ("mean", "staple_soft", "inter_soft_union", "soft_rim", "inter_soft_union_rim")
IMAGE_METHODS = ("soft_rim", "inter_soft_union_rim")
METHODS = HARD_METHODS + SOFT_METHODS


def _stack(raters: Sequence[np.ndarray]) -> np.ndarray:
    if len(raters) < 1:
        raise ValueError("need at least one rater mask")
    shapes = {r.shape for r in raters}
    if len(shapes) != 1:
        raise ValueError(f"rater masks differ in shape: {sorted(shapes)}")
    stack = np.stack([np.asarray(r) for r in raters])
    if not np.isin(stack, (0, 1)).all():
        raise ValueError("rater masks must be binary (0/1)")
    return stack.astype(bool)


def majority(raters) -> np.ndarray:
    s = _stack(raters)
    return (2 * s.sum(0) > len(s)).astype(np.uint8)


def intersection(raters) -> np.ndarray:
    return _stack(raters).all(0).astype(np.uint8)


def union(raters) -> np.ndarray:
    return _stack(raters).any(0).astype(np.uint8)


def mean(raters) -> np.ndarray:
    return _stack(raters).mean(0).astype(np.float32)


def inter_soft_union(raters, gamma: float = 0.5) -> np.ndarray:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    s = _stack(raters)
    out = np.where(s.all(0), 1.0, np.where(s.any(0), gamma, 0.0))
    return out.astype(np.float32)


def staple(raters, soft: bool = False, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    s = _stack(raters)
    imgs = []
    for r in s:
        img = sitk.GetImageFromArray(r.astype(np.uint8))
        img.SetSpacing([float(v) for v in reversed(tuple(spacing))])
        imgs.append(img)
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    prob = sitk.GetArrayFromImage(f.Execute(imgs)).astype(np.float32)
    prob = np.nan_to_num(prob, nan=0.0)  # raters that never mark anything give 0/0 sensitivities
    return prob if soft else (prob >= 0.5).astype(np.uint8)


def ball(radius_mm: float, spacing) -> np.ndarray:
    """Boolean ellipsoidal structuring element of ``radius_mm`` for voxel ``spacing`` (array order)."""
    if radius_mm <= 0:
        raise ValueError(f"radius must be > 0 mm, got {radius_mm}")
    r = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def soft_rim(mask: np.ndarray, image: np.ndarray, spacing=(1.0, 1.0, 1.0), radius_mm: float = 1.0,
             gamma: float = 0.5, connectivity: int = 26) -> np.ndarray:
    """Soft-rim label of a binary ``mask`` on ``image`` (see module docstring)."""
    if mask.shape != image.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape} differ in shape")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    from nnunet_ext.metrics.lesions import label_components

    mask = _stack([mask])[0]
    out = mask.astype(np.float32)
    if not mask.any():
        return out
    lab, n = label_components(mask, connectivity)
    means = ndimage.mean(image, lab, index=np.arange(1, n + 1))
    # each rim voxel belongs to the nearest lesion (grey dilation spreads labels; ties go to the larger id)
    st = ball(radius_mm, spacing)
    near = ndimage.grey_dilation(lab, footprint=st)
    rim = (near > 0) & ~mask
    thr = np.concatenate([[np.inf], means])[near]
    out[rim & (image > thr)] = gamma
    return out


def inter_soft_union_rim(raters, image: np.ndarray, spacing=(1.0, 1.0, 1.0), radius_mm: float = 1.0,
                         gamma: float = 0.5, connectivity: int = 26) -> np.ndarray:
    """Intersection 1; rater disagreement and the intensity-gated rim around the intersection ``gamma``."""
    s = _stack(raters)
    inter = s.all(0)
    out = soft_rim(inter.astype(np.uint8), image, spacing, radius_mm, gamma, connectivity)
    out[s.any(0) & ~inter] = gamma
    return out


def fuse(method: str, raters: Sequence[np.ndarray], gamma: float = 0.5, image: np.ndarray | None = None,
         spacing=(1.0, 1.0, 1.0), radius_mm: float = 1.0) -> np.ndarray:
    """Dispatch by method name (``METHODS``). ``soft_rim`` applies the rim to the strict majority vote of
    the raters (two raters: their intersection; one rater: its mask); it and ``inter_soft_union_rim`` need
    ``image``."""
    if method == "majority":
        return majority(raters)
    if method == "intersection":
        return intersection(raters)
    if method == "union":
        return union(raters)
    if method == "mean":
        return mean(raters)
    if method == "staple":
        return staple(raters, False, spacing)
    if method == "staple_soft":
        return staple(raters, True, spacing)
    if method == "inter_soft_union":
        return inter_soft_union(raters, gamma)
    if method == "soft_rim":
        if image is None:
            raise ValueError("soft_rim needs the image (FLAIR) the rim intensities come from")
        return soft_rim(majority(raters), image, spacing, radius_mm, gamma)
    if method == "inter_soft_union_rim":
        if image is None:
            raise ValueError("inter_soft_union_rim needs the image (FLAIR) the rim intensities come from")
        return inter_soft_union_rim(raters, image, spacing, radius_mm, gamma)
    raise ValueError(f"unknown fusion method {method!r}; known: {', '.join(METHODS)}")


def fuse_folders(method: str, rater_dirs: Sequence, output_dir, image_dir=None, channel: int = 0,
                 gamma: float = 0.5, radius_mm: float = 1.0, file_ending: str = ".nii.gz", progress: bool = True,
                 overwrite: bool = False) -> list[str]:
    """Fuse the rater folders case by case (cases = those present in every rater folder; a case missing
    from some rater is an error naming it). Outputs keep the first rater's geometry; every rater (and the
    image, for the rim methods: ``<image_dir>/<case>_<channel:04d><file_ending>``) must share it.
    ``file_ending``: one of nnunet_ext.core.io.FILE_ENDINGS (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``).

    The output folder must not overlap any input; it is built in a staging folder and moved into place at
    the end (a non-empty one is refused unless ``overwrite``, which replaces it as a whole); zero cases is
    an error. Masks may be 0/1 or 0/255; everything is read with the checked reader (truncated gzip,
    NaN/Inf, 3-D)."""
    from pathlib import Path

    from nnunet_ext.core import validate
    from nnunet_ext.core.io import check_3d, check_file_ending, check_same_geometry, mask_array, read_sitk, write_image
    from nnunet_ext.metrics.evaluate import list_cases
    from nnunet_ext.core.safety import staged_folder

    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}; known: {', '.join(METHODS)}")
    check_file_ending(file_ending)
    gamma = validate.probability(gamma, "gamma (--gamma)")
    radius_mm = validate.finite(radius_mm, "radius_mm (--radius-mm)", high=20.0, positive=True)
    channel = validate.integer(channel, "channel (--channel)", 0, 9999)
    if method in IMAGE_METHODS and image_dir is None:
        raise ValueError(f"{method} needs --images (the FLAIR the rim intensities come from)")
    if method not in IMAGE_METHODS and image_dir is not None:
        raise ValueError(f"--images is only used by {' and '.join(IMAGE_METHODS)}, not by {method}")
    rater_dirs = [Path(d) for d in rater_dirs]
    if not rater_dirs:
        raise ValueError("need at least one rater folder (--raters)")
    for d in rater_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"rater folder {d} not found")
    if len({d.resolve() for d in rater_dirs}) != len(rater_dirs):
        raise ValueError("the same rater folder is given twice in --raters")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found")
    listings = [list_cases(d, file_ending) for d in rater_dirs]
    cases = sorted(set().union(*listings))
    if not cases:
        raise ValueError(f"no <case>{file_ending} masks in the rater folders {', '.join(map(str, rater_dirs))}")
    for d, lst in zip(rater_dirs, listings):
        missing = [c for c in cases if c not in lst]
        if missing:
            raise FileNotFoundError(f"rater folder {d} has no {missing[0]}{file_ending}")
    with staged_folder(output_dir, overwrite=overwrite, inputs=rater_dirs + ([image_dir] if image_dir else []),
                       what="output folder") as out:
        for k, case in enumerate(cases, 1):
            paths = [lst[case] for lst in listings]
            imgs = [read_sitk(p) for p in paths]
            check_3d(paths[0], imgs[0])
            for p, img in zip(paths[1:], imgs[1:]):
                check_same_geometry(paths[0], imgs[0], p, img)
            arrays = [mask_array(p, img) for p, img in zip(paths, imgs)]
            image = None
            if image_dir is not None:
                ipath = Path(image_dir) / f"{case}_{channel:04d}{file_ending}"
                if not ipath.is_file():
                    raise FileNotFoundError(f"image {ipath} not found for {method}")
                iimg = read_sitk(ipath)
                check_same_geometry(paths[0], imgs[0], ipath, iimg)
                image = sitk.GetArrayFromImage(iimg).astype(np.float32)
            spacing = tuple(reversed(imgs[0].GetSpacing()))
            fused = fuse(method, arrays, gamma, image, spacing, radius_mm)
            write_image(fused, spacing, out / f"{case}{file_ending}", reference=imgs[0])
            step(f"fuse {method}", k, len(cases), progress, item=case)
    return cases
