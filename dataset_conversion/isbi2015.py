"""ISBI 2015 Longitudinal MS Lesion Segmentation Challenge -> nnU-Net raw dataset.

Official layout (training release): ``<root>/training<NN>/preprocessed/training<NN>_<TT>_{flair,t2,pd,mprage}_pp.nii``
and ``<root>/training<NN>/masks/training<NN>_<TT>_mask{1,2}.nii`` (two raters), one case per subject and
time point (``training01_01``). Test releases have no masks and go to imagesTs.

Output: channels FLAIR (0000), T2 (0001), PD (0002), MPRAGE (0003); both raters kept in
``ratersTr/rater1|rater2``, their average in ``softlabelsTr`` (0, 0.5, 1), and ``labelsTr`` from
``--label`` (rater1, rater2, intersection or union; default rater1, the mask most papers train on).
``case_groups.json`` records each case's subject (the ``training<NN>`` folder), so that ``nnunet-ext split``
keeps the time points of one subject in one fold.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.data.raw import find_files
from nnunet_ext.data.raw import (mask_array, read_checked, staged_dataset, write_dataset_json,
                                 write_json, write_like, write_multirater_case)
from nnunet_ext.core.progress import step
from nnunet_ext.workflows.splits import write_case_groups

MODALITIES = ("flair", "t2", "pd", "mprage")
LABEL_RULES = ("rater1", "rater2", "intersection", "union")
_FLAIR = re.compile(r"(.+)_flair_pp\.nii(\.gz)?$")


def find_cases(source) -> dict[str, dict]:
    """Case id -> image and mask paths. Files that only resemble the layout (``*_flair_pp.nii.bak``) are
    skipped with a warning; a case with one of its two masks is an error (not silently a test case)."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    cases = {}
    for flair in find_files(source, "*_flair_pp.nii*"):  # case folders that are links included
        m = _FLAIR.match(flair.name)
        if m is None or not flair.is_file():
            warnings.warn(f"skipping {flair}: not a .nii / .nii.gz file")
            continue
        cid = m.group(1)
        ext = ".nii" + (m.group(2) or "")
        subject = flair.parent.parent
        if cid in cases:
            raise ValueError(f"case {cid} found twice: {cases[cid]['images'][0]} and {flair}")
        images = [flair.parent / f"{cid}_{mod}_pp{ext}" for mod in MODALITIES]
        for p in images:
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing (expected the ISBI 2015 layout: all four *_pp images)")
        masks = [subject / "masks" / f"{cid}_mask{k}{ext}" for k in (1, 2)]
        present = [p.is_file() for p in masks]
        if any(present) and not all(present):
            missing = masks[present.index(False)]
            raise FileNotFoundError(f"{missing} is missing while {masks[present.index(True)].name} is present: "
                                    f"a training case needs both masks (a test case neither)")
        cases[cid] = {"images": images, "masks": masks, "labelled": all(present), "subject": subject.name}
    if not cases:
        raise ValueError(f"no *_flair_pp.nii files below {source} (expected the ISBI 2015 layout)")
    return cases


def convert(source, raw_root, dataset_id: int, name: str = "ISBI2015", label: str = "rater1",
            progress: bool = True, overwrite: bool = False) -> Path:
    """Built in a staging folder, moved into place at the end (see :mod:`..common`)."""
    if label not in LABEL_RULES:
        raise ValueError(f"label must be one of {LABEL_RULES}, got {label!r}")
    cases = find_cases(source)
    if not any(c["labelled"] for c in cases.values()):
        raise ValueError(f"no case below {source} has its two masks (masks/<case>_mask1/2.nii): nothing to train on")
    with staged_dataset(raw_root, dataset_id, name, overwrite, inputs=[source]) as (root, final):
        summary, n_train = {}, 0
        for k, (cid, c) in enumerate(cases.items(), 1):
            if c["labelled"]:
                imgs = read_checked(c["images"] + c["masks"])
                images, masks = imgs[:4], imgs[4:]
                a = [mask_array(p, m) for p, m in zip(c["masks"], masks)]
                rule = {"rater1": a[0], "rater2": a[1], "intersection": a[0] * a[1],
                        "union": np.maximum(a[0], a[1])}[label]
                lab = sitk.GetImageFromArray(rule.astype(np.uint8))
                lab.CopyInformation(images[0])
                summary[cid] = {"split": "Tr", **write_multirater_case(root, cid, images, lab, masks, c["masks"])}
                n_train += 1
            else:
                for i, img in enumerate(read_checked(c["images"])):
                    write_like(img, root / "imagesTs" / f"{cid}_{i:04d}.nii.gz")
                summary[cid] = {"split": "Ts"}
            step("isbi2015", k, len(cases), progress, item=cid)
        write_dataset_json(root, {"0": "FLAIR", "1": "T2", "2": "PD", "3": "MPRAGE"}, {"background": 0, "lesion": 1},
                           n_train, name, {"label_rule": label, "raters": 2})
        write_json(root / "conversion.json", summary)
        write_case_groups(root, {cid: {"subject": c["subject"]} for cid, c in cases.items()})
    return final
