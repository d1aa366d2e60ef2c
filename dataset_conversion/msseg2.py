"""MSSEG-2 (MICCAI 2021, new MS lesions between two FLAIR time points) -> nnU-Net raw dataset.

Official layout: one folder per patient, ``<root>/<patient>/`` with
``flair_time01_on_middle_space.nii.gz``, ``flair_time02_on_middle_space.nii.gz`` (co-registered in a
middle space), ``ground_truth_expert1..4.nii.gz`` (the four raters' new-lesion masks) and
``ground_truth.nii.gz`` (their consensus). Case ids: ``MSSEG2_<patient>``.

Output: channels ``FLAIR_tp1`` (0000) and ``FLAIR_tp2`` (0001) of one case; ``labelsTr`` = consensus;
every rater in ``ratersTr/rater1..4``; the rater average in ``softlabelsTr``. Cases without new lesions
(empty consensus) are kept. Patients without ``ground_truth.nii.gz`` (the test set as distributed) go to
``imagesTs``; ``--test-input`` converts a second folder whose patients all go to imagesTs/labelsTs (and
ratersTs when their rater masks are present). The source is only read. ``case_groups.json`` records each
case's subject (the patient; one case per patient).

``subtraction=True`` (``--subtraction``) adds channel 2 (0002) to every case, training and test alike: the
follow-up minus the baseline after the same intensity normalisation of each time point, as several
MSSEG-2 teams fed their networks (:func:`subtraction_image`). nnU-Net z-scores channels 0 and 1 itself;
channel 2 is named ``noNorm`` in ``dataset.json`` so that nnU-Net feeds it as written (see
:func:`subtraction_image` for why it is not z-scored a second time).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.data.raw import (read_checked, staged_dataset, write_dataset_json, write_json,
                                 write_like, write_multirater_case)
from nnunet_ext.core.progress import step
from nnunet_ext.workflows.splits import write_case_groups

TIMEPOINTS = ("flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz")
CONSENSUS = "ground_truth.nii.gz"
N_RATERS = 4
SUBTRACTION = {"channel": 2, "channel_name": "noNorm",
               "definition": "z(FLAIR_tp2) - z(FLAIR_tp1); z(I) = (I - mean) / std over the nonzero voxels of I "
                             "(population std); 0 where either time point is 0"}


def zscore_nonzero(arr: np.ndarray) -> np.ndarray:
    """``(arr - mean) / std`` with mean and (population) standard deviation over the nonzero voxels of
    ``arr`` (the brain of a brain-extracted image; the head otherwise); ``max(std, 1e-8)`` as nnU-Net's
    z-score. float64."""
    a = np.asarray(arr, np.float64)
    m = a != 0
    if not m.any():
        return np.zeros_like(a)
    v = a[m]
    return (a - v.mean()) / max(float(v.std()), 1e-8)


def subtraction_image(baseline: np.ndarray, followup: np.ndarray) -> np.ndarray:
    """Follow-up minus baseline after the same normalisation of each: ``z(followup) - z(baseline)`` with
    :func:`zscore_nonzero`, 0 wherever either time point is 0 (outside the shared field of view or brain
    mask). float32.

    The teams that fed a subtraction to their networks (MSSEG-2 proceedings: Andresen et al., "U-Net(B, F,
    F-B)", p. 111; Medeiros de Sousa and de Oliveira, p. 101; La Rosa et al., p. 65, who z-score each
    skull-stripped time point and subtract the first from the second) subtract normalised images and use the
    difference as it is: a new lesion then reads as "this many standard deviations brighter than at
    baseline" in every case. A second per-case z-score of the difference (nnU-Net's default for a channel)
    would divide each case by the spread of its own difference image, which depends on how much changed and
    on the registration, so the channel is stored for nnU-Net's ``noNorm``."""
    b, f = np.asarray(baseline), np.asarray(followup)
    if b.shape != f.shape:
        raise ValueError(f"baseline and follow-up differ in shape: {b.shape} vs {f.shape}")
    both = (b != 0) & (f != 0)
    return np.where(both, zscore_nonzero(f) - zscore_nonzero(b), 0.0).astype(np.float32)


def _with_subtraction(images: list) -> list:
    """The two time points plus their subtraction image (geometry of the baseline)."""
    sub = sitk.GetImageFromArray(subtraction_image(sitk.GetArrayFromImage(images[0]),
                                                   sitk.GetArrayFromImage(images[1])))
    sub.CopyInformation(images[0])
    return list(images[:2]) + [sub]


def find_patients(source) -> dict[str, Path]:
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    found = {f"MSSEG2_{p.name}": p for p in sorted(source.iterdir()) if p.is_dir() and (p / TIMEPOINTS[0]).is_file()}
    if not found:
        raise ValueError(f"no <patient>/{TIMEPOINTS[0]} below {source} (expected the MSSEG-2 layout)")
    return found


def _convert_patient(root: Path, cid: str, patient: Path, split: str, subtraction: bool = False) -> dict:
    raters = [patient / f"ground_truth_expert{k}.nii.gz" for k in range(1, N_RATERS + 1)]
    images = [patient / t for t in TIMEPOINTS]
    has_label = (patient / CONSENSUS).is_file()
    if not has_label:
        if split == "Ts_labelled":
            raise FileNotFoundError(f"{patient / CONSENSUS} is missing")
        imgs = read_checked(images)
        for k, img in enumerate(_with_subtraction(imgs) if subtraction else imgs):
            write_like(img, root / "imagesTs" / f"{cid}_{k:04d}.nii.gz")
        return {"source": str(patient), "split": "test (no ground truth)"}
    present = [r for r in raters if r.is_file()]
    if present and len(present) != N_RATERS:
        missing = sorted(set(raters) - set(present))
        raise FileNotFoundError(f"{missing[0]} is missing (the other raters of {patient.name} are present)")
    imgs = read_checked(images + [patient / CONSENSUS] + present)
    out_split = "Tr" if split == "Tr" else "Ts"
    channels = _with_subtraction(imgs[:2]) if subtraction else imgs[:2]
    info = write_multirater_case(root, cid, channels, imgs[2], imgs[3:], present, split=out_split,
                                 label_path=patient / CONSENSUS)
    return {"source": str(patient), "split": f"images{out_split}", "new_lesion_voxels": info["lesion_voxels"],
            "rater_voxels": info["rater_voxels"]}


def convert(source, raw_root, dataset_id: int, name: str = "MSSEG2", test_source=None, progress: bool = True,
            overwrite: bool = False, subtraction: bool = False) -> Path:
    """Built in a staging folder, moved into place at the end; a patient id present in both the training
    and the test folder is an error. ``subtraction``: add the subtraction channel (module docstring)."""
    train = find_patients(source)
    jobs = [(cid, p, "Tr") for cid, p in train.items()]
    if test_source is not None:
        test = find_patients(test_source)
        clash = sorted(set(train) & set(test))
        if clash:
            raise ValueError(f"patient {clash[0]} is in both {source} and {test_source}; ids must be unique")
        jobs += [(cid, p, "Ts_labelled") for cid, p in test.items()]
    if not any((p / CONSENSUS).is_file() for _, p, split in jobs if split == "Tr"):
        raise ValueError(f"no patient of {source} has {CONSENSUS}: nothing to train on")
    with staged_dataset(raw_root, dataset_id, name, overwrite, inputs=[source, test_source]) as (root, final):
        summary = {}
        for k, (cid, patient, split) in enumerate(jobs, 1):
            summary[cid] = _convert_patient(root, cid, patient, split, subtraction)
            step("msseg2", k, len(jobs), progress, item=cid)
        n_train = sum(1 for v in summary.values() if v["split"] == "imagesTr")
        channels = {"0": "FLAIR_tp1", "1": "FLAIR_tp2"}
        extra = {"raters": N_RATERS, "label": "consensus of new lesions (ground_truth.nii.gz)",
                 "description": "MSSEG-2: new lesions at time point 2"}
        if subtraction:
            channels["2"] = SUBTRACTION["channel_name"]
            extra["subtraction"] = SUBTRACTION
        write_dataset_json(root, channels, {"background": 0, "lesion": 1}, n_train, name, extra)
        write_json(root / "conversion.json", summary)
        write_case_groups(root, {cid: {"subject": cid} for cid, _, _ in jobs})
    return final
