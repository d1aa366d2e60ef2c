"""WMH Segmentation Challenge 2017 (wmh.grand-challenge.org) -> nnU-Net raw dataset.

Official layout (training and test releases alike): ``<root>/<site>/[<scanner>/]<case id>/`` holding
``wmh.nii.gz`` (0 background, 1 white-matter hyperintensity, 2 other pathology) and ``pre/FLAIR.nii.gz``,
``pre/T1.nii.gz`` (the organisers' preprocessed, co-registered images). Sites: Utrecht, Singapore, GE3T
(Amsterdam) in training; further Amsterdam scanners in the test release.

Output: channels FLAIR (0000) and T1 (0001); labels background 0, WMH 1, and other pathology mapped to
nnU-Net's ignore label 2 (``"ignore": 2``), so it is neither learned as WMH nor as background. Case ids
are the path below the root joined by ``_`` (e.g. ``Utrecht_0``, ``Amsterdam_GE1T5_137``). Score
predictions as the challenge does with ``nnunet-ext evaluate --preset wmh2017`` against the original
``wmh.nii.gz`` files. ``case_groups.json`` records each case's site (the first folder below the release root:
Utrecht, Singapore, Amsterdam or GE3T) for ``nnunet-ext split --group-by site``; every case is its own subject.
"""
from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from nnunet_ext.data.raw import find_files
from nnunet_ext.data.raw import (mask_array, read_checked, staged_dataset, write_dataset_json,
                                 write_json, write_like)
from nnunet_ext.core.progress import step
from nnunet_ext.workflows.splits import write_case_groups


def find_cases(source: str | os.PathLike) -> dict[str, Path]:
    """Case id -> case folder, for every folder below ``source`` holding ``wmh.nii.gz``."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    cases = {}
    for wmh in find_files(source, "wmh.nii.gz"):  # case folders that are links included
        folder = wmh.parent
        cid = "_".join(folder.relative_to(source).parts) or folder.name
        for needed in ("pre/FLAIR.nii.gz", "pre/T1.nii.gz"):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"{folder / needed} is missing (expected the official WMH 2017 layout)")
        cases[cid] = folder
    if not cases:
        raise ValueError(f"no case folders with wmh.nii.gz below {source}")
    return cases


def _read_case(folder: Path):
    """Checked FLAIR, T1 and label (values 0/1/2, one 3-D geometry) of one case folder."""
    paths = [folder / "pre" / "FLAIR.nii.gz", folder / "pre" / "T1.nii.gz", folder / "wmh.nii.gz"]
    flair, t1, wmh = read_checked(paths)
    arr = mask_array(paths[2], wmh, allowed=(0, 1, 2), accept_255=False)
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(flair)
    return flair, t1, lab, arr


def _convert_case(folder: Path, cid: str, images_dir: Path, labels_dir: Path) -> dict:
    flair, t1, lab, arr = _read_case(folder)
    write_like(flair, images_dir / f"{cid}_0000.nii.gz")
    write_like(t1, images_dir / f"{cid}_0001.nii.gz")
    write_like(lab, labels_dir / f"{cid}.nii.gz")
    return {"wmh_voxels": int((arr == 1).sum()), "other_pathology_voxels": int((arr == 2).sum())}


def convert(source: str | os.PathLike, raw_root: str | os.PathLike, dataset_id: int, name: str = "WMH2017",
            test_source: str | os.PathLike | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert the training release (and optionally the test release to imagesTs/labelsTs).

    Built in a staging folder and moved into place at the end; a non-empty existing dataset is refused
    unless ``overwrite``. A case id present in both releases is an error (it would overwrite or be lost)."""
    splits = [("Tr", source)] + ([("Ts", test_source)] if test_source is not None else [])
    found = {split: find_cases(src) for split, src in splits}
    if "Ts" in found:
        clash = sorted(set(found["Tr"]) & set(found["Ts"]))
        if clash:
            raise ValueError(f"case id {clash[0]} is in both the training folder ({found['Tr'][clash[0]]}) and the "
                             f"test folder ({found['Ts'][clash[0]]}); case ids must be unique across both")
    with staged_dataset(raw_root, dataset_id, name, overwrite, inputs=[source, test_source]) as (root, final):
        summary = {}
        for split, _ in splits:
            cases = found[split]
            for k, (cid, folder) in enumerate(cases.items(), 1):
                summary[cid] = {"split": split, "source": str(folder),
                                **_convert_case(folder, cid, root / f"images{split}", root / f"labels{split}")}
                step(f"wmh2017 {split}", k, len(cases), progress, item=cid)
        n_train = sum(1 for v in summary.values() if v["split"] == "Tr")
        write_dataset_json(root, {"0": "FLAIR", "1": "T1"}, {"background": 0, "WMH": 1, "ignore": 2}, n_train, name,
                           {"description": "WMH Segmentation Challenge 2017; label 2 (other pathology) is the ignore label",
                            "reference": "https://wmh.grand-challenge.org"})
        write_json(root / "conversion.json", summary)
        write_case_groups(root, {cid: {"subject": cid, "site": folder.relative_to(Path(src)).parts[0]}
                                 for split, src in splits for cid, folder in found[split].items()})
    return final
