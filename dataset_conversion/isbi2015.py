"""ISBI 2015 Longitudinal MS Lesion Segmentation Challenge -> nnU-Net raw dataset.

Official layout (training release): ``<root>/training<NN>/preprocessed/training<NN>_<TT>_{flair,t2,pd,mprage}_pp.nii``
and ``<root>/training<NN>/masks/training<NN>_<TT>_mask{1,2}.nii`` (two raters), one case per subject and
time point (``training01_01``). Test releases have no masks and go to imagesTs.

Output: channels FLAIR (0000), T2 (0001), PD (0002), MPRAGE (0003); both raters kept in
``ratersTr/rater1|rater2``, their average in ``softlabelsTr`` (0, 0.5, 1), and ``labelsTr`` from
``--label`` (rater1, rater2, intersection or union; default rater1, the mask most papers train on).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.dataset_conversion.common import (read_checked, target_folder, write_dataset_json,
                                                  write_multirater_case)

MODALITIES = ("flair", "t2", "pd", "mprage")
LABEL_RULES = ("rater1", "rater2", "intersection", "union")


def find_cases(source) -> dict[str, dict]:
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    cases = {}
    for flair in sorted(source.rglob("*_flair_pp.nii*")):
        m = re.match(r"(.+)_flair_pp\.nii(\.gz)?$", flair.name)
        cid = m.group(1)
        ext = ".nii" + (m.group(2) or "")
        subject = flair.parent.parent
        cases[cid] = {"images": [flair.parent / f"{cid}_{mod}_pp{ext}" for mod in MODALITIES],
                      "masks": [subject / "masks" / f"{cid}_mask{k}{ext}" for k in (1, 2)]}
    if not cases:
        raise ValueError(f"no *_flair_pp.nii files below {source} (expected the ISBI 2015 layout)")
    return cases


def convert(source, raw_root, dataset_id: int, name: str = "ISBI2015", label: str = "rater1",
            progress: bool = True) -> Path:
    if label not in LABEL_RULES:
        raise ValueError(f"label must be one of {LABEL_RULES}, got {label!r}")
    root = target_folder(raw_root, dataset_id, name)
    summary, n_train = {}, 0
    cases = find_cases(source)
    for k, (cid, c) in enumerate(cases.items(), 1):
        has_masks = all(p.is_file() for p in c["masks"])
        imgs = read_checked(c["images"] + (c["masks"] if has_masks else []))
        images, masks = imgs[:4], imgs[4:]
        if has_masks:
            a = [sitk.GetArrayFromImage(m) for m in masks]
            rule = {"rater1": a[0], "rater2": a[1], "intersection": a[0] * a[1],
                    "union": np.maximum(a[0], a[1])}[label]
            lab = sitk.GetImageFromArray(rule.astype(np.uint8))
            summary[cid] = {"split": "Tr", **write_multirater_case(root, cid, images, lab, masks, c["masks"])}
            n_train += 1
        else:
            from nnunet_ext.dataset_conversion.common import write_like

            for i, img in enumerate(images):
                write_like(img, root / "imagesTs" / f"{cid}_{i:04d}.nii.gz")
            summary[cid] = {"split": "Ts"}
        if progress:
            print(f"\risbi2015: {k}/{len(cases)}", end="", flush=True)
    if progress:
        print()
    write_dataset_json(root, {"0": "FLAIR", "1": "T2", "2": "PD", "3": "MPRAGE"}, {"background": 0, "lesion": 1},
                       n_train, name, {"label_rule": label, "raters": 2})
    (root / "conversion.json").write_text(json.dumps(summary, indent=1))
    return root
