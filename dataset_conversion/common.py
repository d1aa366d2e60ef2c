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
