"""MSSEG 2016 (MICCAI 2016 MS lesion segmentation challenge) -> nnU-Net raw dataset.

Official layout: ``<root>/<Center_NN>/<Patient_NN>/Preprocessed_Data/{FLAIR,T1,T2,DP,GADO}_preprocessed.nii.gz``
and ``<root>/<Center_NN>/<Patient_NN>/Masks/{ManualSegmentation_1..7,Consensus}.nii.gz`` (seven raters and
their consensus); ``Raw_Data/`` is ignored. Case ids: ``Center_01_Patient_01``.

Output: channels FLAIR, T1, T2, DP, GADO (0000-0004); ``labelsTr`` = Consensus; every rater in
``ratersTr/rater1..7``; the rater average in ``softlabelsTr``. ``case_groups.json``: subject = the case
(one scan per patient), site = the ``Center_NN`` folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.data.raw import find_files
from nnunet_ext.data.raw import (read_checked, staged_dataset, write_dataset_json, write_json,
                                 write_multirater_case)
from nnunet_ext.core.progress import step
from nnunet_ext.workflows.splits import write_case_groups

MODALITIES = ("FLAIR", "T1", "T2", "DP", "GADO")
_RATER = re.compile(r"ManualSegmentation_(\d+)\.nii\.gz$")


def find_cases(source) -> dict[str, Path]:
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    cases = {}
    for cons in find_files(source, "Masks/Consensus.nii.gz"):  # patient folders that are links too
        patient = cons.parent.parent
        cases["_".join(patient.relative_to(source).parts)] = patient
    if not cases:
        raise ValueError(f"no <Center>/<Patient>/Masks/Consensus.nii.gz below {source} (expected the MSSEG 2016 layout)")
    return cases


def rater_files(patient: Path) -> dict[int, Path]:
    """Rater number (from ``ManualSegmentation_<k>``) -> mask file of one patient."""
    out = {}
    for p in sorted((patient / "Masks").glob("ManualSegmentation_*")):
        m = _RATER.match(p.name)
        if m is None:
            continue
        out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def convert(source, raw_root, dataset_id: int, name: str = "MSSEG2016", progress: bool = True,
            overwrite: bool = False) -> Path:
    """``ratersTr/rater<k>`` holds ``ManualSegmentation_<k>`` of every patient (the number in the file name,
    never the sort position); every patient must have the same rater numbers."""
    cases = find_cases(source)
    jobs, numbers = [], None
    for cid, patient in cases.items():
        images = [patient / "Preprocessed_Data" / f"{m}_preprocessed.nii.gz" for m in MODALITIES]
        for p in images:
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing (expected the MSSEG 2016 layout)")
        raters = rater_files(patient)
        if numbers is None:
            numbers, first = sorted(raters), patient
        elif sorted(raters) != numbers:
            lacking = sorted(set(numbers) - set(raters)) or sorted(set(raters) - set(numbers))
            raise ValueError(f"{patient / 'Masks'} has rater masks {sorted(raters)}, {first / 'Masks'} has {numbers} "
                             f"(ManualSegmentation_{lacking[0]}.nii.gz differs); every patient needs the same raters")
        jobs.append((cid, patient, images, raters))
    with staged_dataset(raw_root, dataset_id, name, overwrite, inputs=[source]) as (root, final):
        summary = {}
        for k, (cid, patient, images, raters) in enumerate(jobs, 1):
            cons = patient / "Masks" / "Consensus.nii.gz"
            paths = images + [cons] + list(raters.values())
            imgs = read_checked(paths)
            summary[cid] = {"source": str(patient),
                            **write_multirater_case(root, cid, imgs[:5], imgs[5], imgs[6:], list(raters.values()),
                                                    rater_ids=list(raters), label_path=cons)}
            step("msseg2016", k, len(cases), progress, item=cid)
        write_dataset_json(root, {str(i): m for i, m in enumerate(MODALITIES)}, {"background": 0, "lesion": 1},
                           len(cases), name, {"raters": len(numbers), "rater_numbers": numbers, "label": "Consensus"})
        write_json(root / "conversion.json", summary)
        write_case_groups(root, {cid: {"subject": cid, "site": patient.relative_to(Path(source)).parts[0]}
                                 for cid, patient in cases.items()})
    return final
