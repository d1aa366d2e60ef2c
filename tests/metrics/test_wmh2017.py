"""WMH 2017 converter on a fixture in the official layout, and the wmh2017 evaluation preset."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.io import read_image, write_image
from nnunet_ext.metrics.evaluate import evaluate_folders


def _img(arr, spacing=(0.96, 0.96, 3.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -5.0, 2.0))
    return img


@pytest.fixture
def wmh_source(tmp_path):
    """training/<site>/[<scanner>/]<id>/{wmh.nii.gz, pre/FLAIR.nii.gz, pre/T1.nii.gz} as in the release."""
    src = tmp_path / "training"
    rng = np.random.default_rng(0)
    for rel in ("Utrecht/0", "Singapore/50", "Amsterdam/GE3T/100"):
        d = src / rel
        (d / "pre").mkdir(parents=True)
        wmh = np.zeros((6, 16, 16), np.uint8)
        wmh[2, 4:7, 4:7] = 1
        wmh[3, 10:12, 10:12] = 2
        sitk.WriteImage(_img(wmh), str(d / "wmh.nii.gz"))
        sitk.WriteImage(_img(rng.random((6, 16, 16)).astype(np.float32)), str(d / "pre" / "FLAIR.nii.gz"))
        sitk.WriteImage(_img(rng.random((6, 16, 16)).astype(np.float32)), str(d / "pre" / "T1.nii.gz"))
        (d / "orig").mkdir()  # the release also has original-space images: ignored
    return src


def _digest(folder):
    return {p.relative_to(folder): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_layout_and_labels(wmh_source, tmp_path):
    before = _digest(wmh_source)
    assert run(["convert", "wmh2017", "-i", str(wmh_source), "-d", "521", "--raw", str(tmp_path / "raw")]) == 0
    assert _digest(wmh_source) == before  # source untouched
    root = tmp_path / "raw" / "Dataset521_WMH2017"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "WMH": 1, "ignore": 2} and ds["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert ds["numTraining"] == 3
    ids = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert ids == ["Amsterdam_GE3T_100.nii.gz", "Singapore_50.nii.gz", "Utrecht_0.nii.gz"]
    lab, sp = read_image(root / "labelsTr" / "Utrecht_0.nii.gz")
    assert sp == pytest.approx((3.0, 0.96, 0.96)) and (lab == 1).sum() == 9 and (lab == 2).sum() == 4
    flair = sitk.ReadImage(str(root / "imagesTr" / "Utrecht_0_0000.nii.gz"))
    assert flair.GetOrigin() == pytest.approx((10.0, -5.0, 2.0))
    assert (root / "imagesTr" / "Singapore_50_0001.nii.gz").is_file()


def test_convert_geometry_mismatch_names_file(wmh_source, tmp_path):
    sitk.WriteImage(_img(np.zeros((6, 16, 15), np.float32)), str(wmh_source / "Utrecht/0/pre/T1.nii.gz"))
    with pytest.raises(ValueError, match=r"Utrecht/0/pre/T1.nii.gz"):
        run(["convert", "wmh2017", "-i", str(wmh_source), "-d", "521", "--raw", str(tmp_path / "raw")])


def test_convert_missing_image_and_empty_source(wmh_source, tmp_path):
    (wmh_source / "Singapore/50/pre/FLAIR.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Singapore/50/pre/FLAIR.nii.gz"):
        run(["convert", "wmh2017", "-i", str(wmh_source), "-d", "521", "--raw", str(tmp_path / "raw")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no case folders"):
        run(["convert", "wmh2017", "-i", str(tmp_path / "empty"), "-d", "522", "--raw", str(tmp_path / "raw")])


def test_wmh2017_preset_masks_other_pathology(tmp_path):
    ref = np.zeros((6, 16, 16), np.uint8)
    ref[2, 4:7, 4:7] = 1  # 9 WMH voxels
    ref[3, 10:12, 10:12] = 2  # other pathology
    pred = np.zeros_like(ref)
    pred[2, 4:7, 4:7] = 1
    pred[3, 10:12, 10:12] = 1  # predicting the other-pathology region must not count as FP
    write_image(ref, (3.0, 1.0, 1.0), tmp_path / "ref" / "c.nii.gz")
    write_image(pred, (3.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    res = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="wmh2017", progress=False)["per_case"]["c"]
    assert res["dice"] == 1.0 and res["lesion_fp"] == 0 and res["lesion_f1"] == 1.0 and res["avd"] == 0.0
    # without the preset the reference is not binary: a clear error
    with pytest.raises(ValueError, match="expected a binary mask"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", progress=False)
    # empty reference and empty prediction after masking: recall 1 and precision 1 (WMH convention)
    ref2 = np.where(ref == 2, 2, 0).astype(np.uint8)
    write_image(ref2, (3.0, 1.0, 1.0), tmp_path / "ref" / "c.nii.gz")
    write_image((ref2 == 2).astype(np.uint8), (3.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    res = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="wmh2017", progress=False)["per_case"]["c"]
    assert (res["lesion_tpr"], res["lesion_ppv"], res["dice"]) == (1.0, 1.0, 1.0)


def test_inplane_surface_definition():
    from nnunet_ext.metrics.lesions import _surface_points, hd95

    block = np.zeros((5, 9, 9), bool)
    block[1:4, 2:7, 2:7] = True  # 3 slices of 5x5 = 75 voxels
    # 3D (6-neighbour) surface: all but the 1x3x3 core = 66; in-plane (WMH script): each slice's 16-voxel rim = 48
    assert len(_surface_points(block, (1, 1, 1))) == 66
    assert len(_surface_points(block, (1, 1, 1), inplane=True)) == 48
    assert hd95(block, block, inplane_surface=True) == 0.0


def test_convert_records_sites_and_split_by_site(wmh_source, tmp_path, monkeypatch):
    """case_groups.json: site = the first folder below the release root; `split --group-by site` then leaves
    one site out per fold."""
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    assert run(["convert", "wmh2017", "-i", str(wmh_source), "-d", "522"]) == 0
    groups = json.loads((raw / "Dataset522_WMH2017" / "case_groups.json").read_text())
    assert groups == {"Amsterdam_GE3T_100": {"subject": "Amsterdam_GE3T_100", "site": "Amsterdam"},
                      "Singapore_50": {"subject": "Singapore_50", "site": "Singapore"},
                      "Utrecht_0": {"subject": "Utrecht_0", "site": "Utrecht"}}
    assert run(["split", "-d", "522", "--group-by", "site", "-nfolds", "3"]) == 0
    s = json.loads((pre / "Dataset522_WMH2017" / "splits_final.json").read_text())
    assert sorted(v for f in s for v in f["val"]) == sorted(groups) and all(len(f["val"]) == 1 for f in s)
