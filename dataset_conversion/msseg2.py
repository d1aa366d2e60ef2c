"""MSSEG-2 (MICCAI 2021, new MS lesions between two FLAIR time points) -> nnU-Net raw dataset.

Official layout: one folder per patient, ``<root>/<patient>/`` with
``flair_time01_on_middle_space.nii.gz``, ``flair_time02_on_middle_space.nii.gz`` (co-registered in a
middle space), ``ground_truth_expert1..4.nii.gz`` (the four raters' new-lesion masks) and
``ground_truth.nii.gz`` (their consensus). Case ids: ``MSSEG2_<patient>``.

Output: channels ``FLAIR_tp1`` (0000) and ``FLAIR_tp2`` (0001) of one case; ``labelsTr`` = consensus;
every rater in ``ratersTr/rater1..4``; the rater average in ``softlabelsTr``. Cases without new lesions
(empty consensus) are kept. Patients without ``ground_truth.nii.gz`` (the test set as distributed) go to
``imagesTs``; ``--test-input`` converts a second folder whose patients all go to imagesTs/labelsTs (and
ratersTs when their rater masks are present). The source is only read.
"""
from __future__ import annotations

from pathlib import Path

from nnunet_ext.dataset_conversion.common import (read_checked, staged_dataset, write_dataset_json, write_json,
                                                  write_like, write_multirater_case)

TIMEPOINTS = ("flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz")
CONSENSUS = "ground_truth.nii.gz"
N_RATERS = 4


def find_patients(source) -> dict[str, Path]:
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    found = {f"MSSEG2_{p.name}": p for p in sorted(source.iterdir()) if p.is_dir() and (p / TIMEPOINTS[0]).is_file()}
    if not found:
        raise ValueError(f"no <patient>/{TIMEPOINTS[0]} below {source} (expected the MSSEG-2 layout)")
    return found


def _convert_patient(root: Path, cid: str, patient: Path, split: str) -> dict:
    raters = [patient / f"ground_truth_expert{k}.nii.gz" for k in range(1, N_RATERS + 1)]
    images = [patient / t for t in TIMEPOINTS]
    has_label = (patient / CONSENSUS).is_file()
    if not has_label:
        if split == "Ts_labelled":
            raise FileNotFoundError(f"{patient / CONSENSUS} is missing")
        for k, img in enumerate(read_checked(images)):
            write_like(img, root / "imagesTs" / f"{cid}_{k:04d}.nii.gz")
        return {"source": str(patient), "split": "test (no ground truth)"}
    present = [r for r in raters if r.is_file()]
    if present and len(present) != N_RATERS:
        missing = sorted(set(raters) - set(present))
        raise FileNotFoundError(f"{missing[0]} is missing (the other raters of {patient.name} are present)")
    imgs = read_checked(images + [patient / CONSENSUS] + present)
    out_split = "Tr" if split == "Tr" else "Ts"
    info = write_multirater_case(root, cid, imgs[:2], imgs[2], imgs[3:], present, split=out_split,
                                 label_path=patient / CONSENSUS)
    return {"source": str(patient), "split": f"images{out_split}", "new_lesion_voxels": info["lesion_voxels"],
            "rater_voxels": info["rater_voxels"]}


def convert(source, raw_root, dataset_id: int, name: str = "MSSEG2", test_source=None, progress: bool = True,
            overwrite: bool = False) -> Path:
    """Built in a staging folder, moved into place at the end; a patient id present in both the training
    and the test folder is an error."""
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
            summary[cid] = _convert_patient(root, cid, patient, split)
            if progress:
                print(f"\rmsseg2: {k}/{len(jobs)}", end="", flush=True)
        if progress:
            print()
        n_train = sum(1 for v in summary.values() if v["split"] == "imagesTr")
        write_dataset_json(root, {"0": "FLAIR_tp1", "1": "FLAIR_tp2"}, {"background": 0, "lesion": 1}, n_train, name,
                           {"raters": N_RATERS, "label": "consensus of new lesions (ground_truth.nii.gz)",
                            "description": "MSSEG-2: new lesions at time point 2"})
        write_json(root / "conversion.json", summary)
    return final
