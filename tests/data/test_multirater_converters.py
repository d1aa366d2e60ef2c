"""ISBI 2015 and MSSEG 2016 converters on fixtures that mimic the official layouts and names."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.io import read_image


def _write(path, arr, spacing=(1.0, 1.0, 1.2)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _digest(folder):
    return {p.relative_to(folder): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _masks():
    m1 = np.zeros((4, 8, 8), np.uint8)
    m1[1:3, 2:5, 2:5] = 1  # 18 voxels
    m2 = np.zeros_like(m1)
    m2[1:3, 3:6, 3:6] = 1  # 18 voxels, overlapping m1 in 2*2*2 = 8
    return m1, m2


@pytest.fixture
def isbi_source(tmp_path):
    src = tmp_path / "ISBI" / "training"
    rng = np.random.default_rng(0)
    m1, m2 = _masks()
    for subj in ("training01", "training02"):
        for tp in ("01", "02"):
            cid = f"{subj}_{tp}"
            for mod in ("flair", "t2", "pd", "mprage"):
                _write(src / subj / "preprocessed" / f"{cid}_{mod}_pp.nii", rng.random((4, 8, 8)).astype(np.float32))
                _write(src / subj / "orig" / f"{cid}_{mod}.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
            _write(src / subj / "masks" / f"{cid}_mask1.nii", m1)
            _write(src / subj / "masks" / f"{cid}_mask2.nii", m2)
    return src


@pytest.mark.parametrize("rule,voxels", [("rater1", 18), ("rater2", 18), ("intersection", 8), ("union", 28)])
def test_isbi2015(isbi_source, tmp_path, rule, voxels):
    before = _digest(isbi_source)
    assert run(["convert", "isbi2015", "-i", str(isbi_source), "-d", "531", "--raw", str(tmp_path / "raw"),
                "--label", rule]) == 0
    assert _digest(isbi_source) == before
    root = tmp_path / "raw" / "Dataset531_ISBI2015"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "FLAIR", "1": "T2", "2": "PD", "3": "MPRAGE"} and ds["numTraining"] == 4
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [
        "training01_01.nii.gz", "training01_02.nii.gz", "training02_01.nii.gz", "training02_02.nii.gz"]
    lab, sp = read_image(root / "labelsTr" / "training02_01.nii.gz")
    assert lab.sum() == voxels and sp == pytest.approx((1.2, 1.0, 1.0))
    r2, _ = read_image(root / "ratersTr" / "rater2" / "training02_01.nii.gz")
    soft, _ = read_image(root / "softlabelsTr" / "training02_01.nii.gz")
    assert r2.sum() == 18 and sorted(np.unique(soft).tolist()) == [0.0, 0.5, 1.0] and (soft == 1).sum() == 8
    # the preprocessed FLAIR is channel 0
    flair, _ = read_image(isbi_source / "training02" / "preprocessed" / "training02_01_flair_pp.nii")
    assert np.array_equal(read_image(root / "imagesTr" / "training02_01_0000.nii.gz")[0], flair)


def test_isbi2015_geometry_mismatch_names_file(isbi_source, tmp_path):
    _write(isbi_source / "training01" / "masks" / "training01_02_mask2.nii", np.zeros((4, 8, 7), np.uint8))
    with pytest.raises(ValueError, match="training01_02_mask2.nii"):
        run(["convert", "isbi2015", "-i", str(isbi_source), "-d", "531", "--raw", str(tmp_path / "raw")])


@pytest.fixture
def msseg_source(tmp_path):
    src = tmp_path / "MSSEG" / "Training"
    rng = np.random.default_rng(1)
    m1, m2 = _masks()
    for center, patient in (("Center_01", "Patient_01"), ("Center_07", "Patient_02")):
        d = src / center / patient
        for mod in ("FLAIR", "T1", "T2", "DP", "GADO"):
            _write(d / "Preprocessed_Data" / f"{mod}_preprocessed.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
            _write(d / "Raw_Data" / f"{mod}.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
        for k in range(1, 8):
            _write(d / "Masks" / f"ManualSegmentation_{k}.nii.gz", m1 if k <= 4 else m2)
        _write(d / "Masks" / "Consensus.nii.gz", m1)
        _write(d / "Masks" / "Brain_Mask.nii.gz", np.ones((4, 8, 8), np.uint8))
    return src


def test_msseg2016(msseg_source, tmp_path):
    before = _digest(msseg_source)
    assert run(["convert", "msseg2016", "-i", str(msseg_source), "-d", "532", "--raw", str(tmp_path / "raw")]) == 0
    assert _digest(msseg_source) == before
    root = tmp_path / "raw" / "Dataset532_MSSEG2016"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T2", "3": "DP", "4": "GADO"} and ds["raters"] == 7
    assert sorted(p.name for p in (root / "ratersTr").iterdir()) == [f"rater{k}" for k in range(1, 8)]
    soft, _ = read_image(root / "softlabelsTr" / "Center_07_Patient_02.nii.gz")
    m1, m2 = _masks()
    assert np.allclose(soft, (4 * m1 + 3 * m2) / 7)
    lab, _ = read_image(root / "labelsTr" / "Center_01_Patient_01.nii.gz")
    assert np.array_equal(lab, m1)
    assert (root / "imagesTr" / "Center_01_Patient_01_0004.nii.gz").is_file()


def test_msseg2016_missing_and_nonbinary(msseg_source, tmp_path):
    _write(msseg_source / "Center_01" / "Patient_01" / "Masks" / "ManualSegmentation_3.nii.gz",
           np.full((4, 8, 8), 2, np.uint8))
    with pytest.raises(ValueError, match="ManualSegmentation_3.nii.gz: mask values must be in"):
        run(["convert", "msseg2016", "-i", str(msseg_source), "-d", "532", "--raw", str(tmp_path / "raw")])
    (msseg_source / "Center_01" / "Patient_01" / "Preprocessed_Data" / "GADO_preprocessed.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="GADO_preprocessed.nii.gz"):
        run(["convert", "msseg2016", "-i", str(msseg_source), "-d", "533", "--raw", str(tmp_path / "raw")])


def test_msseg2016_records_subject_and_centre(msseg_source, tmp_path):
    assert run(["convert", "msseg2016", "-i", str(msseg_source), "-d", "534", "--raw", str(tmp_path / "raw")]) == 0
    groups = json.loads((tmp_path / "raw" / "Dataset534_MSSEG2016" / "case_groups.json").read_text())
    assert groups == {"Center_01_Patient_01": {"subject": "Center_01_Patient_01", "site": "Center_01"},
                      "Center_07_Patient_02": {"subject": "Center_07_Patient_02", "site": "Center_07"}}
