"""Helpers shared by the converters (and the phantom writer).

A dataset is always built in a staging folder beside ``Dataset<ID>_<name>`` and moved into place at the
end (:func:`staged_dataset`), under a lock on the dataset id, so an interrupted or concurrent run never
leaves a mixed dataset. Every input image is read with the checked reader of :mod:`nnunet_ext.core.io`
(truncated gzip, NaN/Inf, 3-D, geometry) and every mask is checked to be binary before anything is written.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.core import validate
from nnunet_ext.core.io import check_3d, check_same_geometry, mask_array, read_sitk, write_sitk  # noqa: F401


def target_folder(raw_root: str | os.PathLike, dataset_id: int, name: str) -> Path:
    """``<raw_root>/Dataset<ID>_<name>`` after validating id and name; ValueError when another folder
    already uses the id."""
    dataset_id = validate.dataset_id(dataset_id)
    name = validate.dataset_name(name)
    raw_root = Path(raw_root)
    root = raw_root / f"Dataset{dataset_id:03d}_{name}"
    clash = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p != root] if raw_root.is_dir() else []
    if clash:
        raise ValueError(f"dataset id {dataset_id} is already used by {clash[0]}; choose another id")
    return root


@contextlib.contextmanager
def staged_dataset(raw_root, dataset_id: int, name: str, overwrite: bool = False, inputs=()):
    """Yield ``(staging, final)``: build the dataset in ``staging``; it replaces ``final`` at the end.

    Refuses a non-empty existing dataset unless ``overwrite``; locks the dataset id (two runs on the same
    id: the second fails with a message); refuses a dataset folder that overlaps one of ``inputs``."""
    from nnunet_ext.core.safety import output_lock, staged_folder

    final = target_folder(raw_root, dataset_id, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".Dataset{dataset_id:03d}.lock"
    with output_lock(lock, what=f"dataset {dataset_id} ({final})"):
        target_folder(raw_root, dataset_id, name)  # again under the lock
        with staged_folder(final, overwrite=overwrite, lock=False, inputs=inputs, what="dataset") as staging:
            yield staging, final


def write_like(img: sitk.Image, path: Path) -> None:
    """Atomic write with a per-process temporary name."""
    write_sitk(img, path)


def write_json(path: Path, obj) -> None:
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def write_dataset_json(root: Path, channels: dict, labels: dict, n_train: int, name: str, extra: dict | None = None):
    if n_train < 1:
        raise ValueError(f"{root.name}: no training case to write (numTraining would be 0)")
    d = {"channel_names": channels, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz", "name": name}
    d.update(extra or {})
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(root / "dataset.json", json.dumps(d, indent=2))


def read_checked(paths) -> list[sitk.Image]:
    """Read images that must share one 3-D geometry (the error names the offending file), each checked for
    truncation and NaN/Inf (:func:`nnunet_ext.core.io.read_sitk`)."""
    imgs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} is missing")
        img = read_sitk(p)
        check_3d(p, img)
        imgs.append(img)
    for p, img in zip(paths[1:], imgs[1:]):
        check_same_geometry(paths[0], imgs[0], p, img)
    return imgs


def write_multirater_case(root: Path, cid: str, images: list[sitk.Image], label: sitk.Image,
                          raters: list[sitk.Image], rater_paths=(), split: str = "Tr", rater_ids=None,
                          label_path=None) -> dict:
    """Channels ``<cid>_000k``, label, every rater in ``raters<split>/rater<k>/`` (``k`` from ``rater_ids``,
    default 1, 2, ...), and the rater average in ``softlabels<split>/`` (float32). Every mask must be binary
    (0/1; 0/255 is mapped to 0/1) and is checked before anything of the case is written."""
    rater_ids = list(rater_ids) if rater_ids is not None else list(range(1, len(raters) + 1))
    if len(rater_ids) != len(raters):
        raise ValueError(f"{cid}: {len(raters)} rater masks but {len(rater_ids)} rater numbers")
    paths = list(rater_paths) + [None] * (len(raters) - len(list(rater_paths)))
    arrays = [mask_array(p or f"{cid} rater {k}", img) for p, k, img in zip(paths, rater_ids, raters)]
    lab = mask_array(label_path or f"{cid} label", label)
    for k, img in enumerate(images):
        write_like(img, root / f"images{split}" / f"{cid}_{k:04d}.nii.gz")
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(images[0])
    write_like(out, root / f"labels{split}" / f"{cid}.nii.gz")
    for k, a in zip(rater_ids, arrays):
        r = sitk.GetImageFromArray(a)
        r.CopyInformation(images[0])
        write_like(r, root / f"raters{split}" / f"rater{k}" / f"{cid}.nii.gz")
    if arrays:
        soft = sitk.GetImageFromArray(np.mean(arrays, 0).astype(np.float32))
        soft.CopyInformation(images[0])
        write_like(soft, root / f"softlabels{split}" / f"{cid}.nii.gz")
    return {"lesion_voxels": int(lab.sum()), "rater_voxels": [int(a.sum()) for a in arrays]}


def progress_line(text: str, enabled: bool) -> None:
    if enabled:
        print(f"\r{text}", end="", flush=True)


def find_files(source, pattern: str) -> list[Path]:
    """``source.rglob(pattern)`` that also enters folders reached through symbolic links (``Path.rglob`` of
    Python < 3.13 skips them, so a case folder that is a link would be dropped without a word); each real
    folder is visited once (no loop through a link to a parent). A broken link below ``source`` is a
    warning naming it. Sorted paths below ``source`` as found (links not resolved)."""
    import warnings

    source = Path(source)
    seen, out = set(), []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        d = Path(dirpath)
        for n in dirnames + filenames:
            if os.path.islink(d / n) and not os.path.exists(d / n):
                warnings.warn(f"{d / n}: broken symbolic link, skipped; fix or remove it")
        out += [p for p in d.glob(pattern) if p.is_file()]
    return sorted(set(out))
