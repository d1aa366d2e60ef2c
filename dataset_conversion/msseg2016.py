"""MSSEG 2016 (MICCAI 2016 MS lesion segmentation challenge) -> nnU-Net raw dataset.

Official layout: ``<root>/<Center_NN>/<Patient_NN>/Preprocessed_Data/{FLAIR,T1,T2,DP,GADO}_preprocessed.nii.gz``
and ``<root>/<Center_NN>/<Patient_NN>/Masks/{ManualSegmentation_1..7,Consensus}.nii.gz`` (seven raters and
their consensus); ``Raw_Data/`` is ignored. Case ids: ``Center_01_Patient_01``.

Output: channels FLAIR, T1, T2, DP, GADO (0000-0004); ``labelsTr`` = Consensus; every rater in
``ratersTr/rater1..7``; the rater average in ``softlabelsTr``.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_ext.dataset_conversion.common import (read_checked, target_folder, write_dataset_json,
                                                  write_multirater_case)

MODALITIES = ("FLAIR", "T1", "T2", "DP", "GADO")


def find_cases(source) -> dict[str, Path]:
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    cases = {}
    for cons in sorted(source.rglob("Masks/Consensus.nii.gz")):
        patient = cons.parent.parent
        cases["_".join(patient.relative_to(source).parts)] = patient
    if not cases:
        raise ValueError(f"no <Center>/<Patient>/Masks/Consensus.nii.gz below {source} (expected the MSSEG 2016 layout)")
    return cases


def convert(source, raw_root, dataset_id: int, name: str = "MSSEG2016", progress: bool = True) -> Path:
    root = target_folder(raw_root, dataset_id, name)
    summary = {}
    cases = find_cases(source)
    n_raters = None
    for k, (cid, patient) in enumerate(cases.items(), 1):
        images = [patient / "Preprocessed_Data" / f"{m}_preprocessed.nii.gz" for m in MODALITIES]
        raters = sorted(patient.glob("Masks/ManualSegmentation_*.nii.gz"), key=lambda p: int(p.stem.split("_")[-1].split(".")[0]))
        if n_raters is None:
            n_raters = len(raters)
        elif len(raters) != n_raters:
            raise ValueError(f"{patient / 'Masks'} has {len(raters)} rater masks, other cases {n_raters}")
        paths = images + [patient / "Masks" / "Consensus.nii.gz"] + raters
        imgs = read_checked(paths)
        summary[cid] = {"source": str(patient),
                        **write_multirater_case(root, cid, imgs[:5], imgs[5], imgs[6:], raters)}
        if progress:
            print(f"\rmsseg2016: {k}/{len(cases)}", end="", flush=True)
    if progress:
        print()
    write_dataset_json(root, {str(i): m for i, m in enumerate(MODALITIES)}, {"background": 0, "lesion": 1},
                       len(cases), name, {"raters": n_raters, "label": "Consensus"})
    (root / "conversion.json").write_text(json.dumps(summary, indent=1))
    return root
