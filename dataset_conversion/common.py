"""Helpers shared by the converters."""
from __future__ import annotations

import json
import os
from pathlib import Path

import SimpleITK as sitk

from nnunet_ext.io import check_same_geometry  # noqa: F401  (re-exported for the converters)


def target_folder(raw_root: str | os.PathLike, dataset_id: int, name: str) -> Path:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    raw_root = Path(raw_root)
    root = raw_root / f"Dataset{dataset_id:03d}_{name}"
    clash = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p != root]
    if clash:
        raise ValueError(f"dataset id {dataset_id} is already used by {clash[0]}")
    return root


def write_like(img: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp_" + path.name)
    sitk.WriteImage(img, str(tmp), True)
    os.replace(tmp, path)


def write_dataset_json(root: Path, channels: dict, labels: dict, n_train: int, name: str, extra: dict | None = None):
    d = {"channel_names": channels, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz", "name": name}
    d.update(extra or {})
    (root / "dataset.json").write_text(json.dumps(d, indent=2))


def read_checked(paths) -> list[sitk.Image]:
    """Read images that must share one geometry (error names the offending file); masks must be 0/1."""
    imgs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} is missing")
        imgs.append(sitk.ReadImage(str(p)))
    for p, img in zip(paths[1:], imgs[1:]):
        check_same_geometry(paths[0], imgs[0], p, img)
    return imgs


def write_multirater_case(root: Path, cid: str, images: list[sitk.Image], label: sitk.Image,
                          raters: list[sitk.Image], rater_paths=(), split: str = "Tr") -> dict:
    """Channels ``<cid>_000k``, label, every rater in ``raters<split>/rater<k>/``, and the rater average in
    ``softlabels<split>/`` (float32); labels are cast to uint8 and must be binary."""
    import numpy as np

    for k, img in enumerate(images):
        write_like(img, root / f"images{split}" / f"{cid}_{k:04d}.nii.gz")
    arrays = []
    for path, img in zip(list(rater_paths) + [None] * len(raters), raters):
        a = sitk.GetArrayFromImage(img)
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{path or cid}: rater masks must be binary (0/1), found {np.unique(a)[:6]}")
        arrays.append(a.astype(np.uint8))
    lab = sitk.GetArrayFromImage(label)
    if not np.isin(lab, (0, 1)).all():
        raise ValueError(f"{cid}: label must be binary (0/1)")
    out = sitk.GetImageFromArray(lab.astype(np.uint8))
    out.CopyInformation(images[0])
    write_like(out, root / f"labels{split}" / f"{cid}.nii.gz")
    for k, a in enumerate(arrays, 1):
        r = sitk.GetImageFromArray(a)
        r.CopyInformation(images[0])
        write_like(r, root / f"raters{split}" / f"rater{k}" / f"{cid}.nii.gz")
    if arrays:
        soft = sitk.GetImageFromArray(np.mean(arrays, 0).astype(np.float32))
        soft.CopyInformation(images[0])
        write_like(soft, root / f"softlabels{split}" / f"{cid}.nii.gz")
    return {"lesion_voxels": int(lab.sum()), "rater_voxels": [int(a.sum()) for a in arrays]}
