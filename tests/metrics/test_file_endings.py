"""evaluate, operating-points and fuse on .nii.gz, .nii, .mha and .nrrd files (``--file-ending``): the same case
written in each format gives the same scores, worked out by hand below; the geometry checks hold in every format."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.data.fusion import fuse_folders
from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.metrics.operating_points import sweep

ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
SPACING_XYZ = (0.5, 1.0, 3.0)  # voxel volume 1.5 mm^3
ORIGIN = (10.0, -4.0, 2.5)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y swapped: not the identity


def _write(arr: np.ndarray, path, origin=ORIGIN) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(origin)
    img.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def _case():
    """(ref, pred, prob) of one case, arrays (z, y, x) of shape (6, 8, 10)."""
    ref = np.zeros((6, 8, 10), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # lesion A: 8 voxels
    ref[4, 5:7, 6:9] = 1  # lesion B: 6 voxels
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 2:4] = 1  # overlaps A in z 1-2, y 1-2, x 2: 4 voxels; 4 voxels outside
    pred[0, 7, 0] = 1  # a false-positive lesion of 1 voxel
    prob = np.where(pred > 0, np.float32(0.75), np.float32(0.05)).astype(np.float32)
    prob[4, 5, 6] = 0.3  # one voxel of lesion B above 0.2 only
    return ref, pred, prob


@pytest.fixture
def formats(tmp_path):
    ref, pred, prob = _case()
    for e in ENDINGS:
        _write(ref, tmp_path / e / "ref" / f"case1{e}")
        _write(pred, tmp_path / e / "pred" / f"case1{e}")
        _write(prob, tmp_path / e / "prob" / f"case1{e}")
    return tmp_path


@pytest.mark.parametrize("ending", ENDINGS)
def test_evaluate_same_scores_in_every_format(formats, ending, tmp_path):
    out = tmp_path / "r.json"
    assert run(["evaluate", "--ref", str(formats / ending / "ref"), "--pred", str(formats / ending / "pred"),
                "--file-ending", ending, "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["per_case"]["case1"]
    # by hand: TP 4, FP 4 + 1 = 5, FN (8 - 4) + 6 = 10 -> Dice 2*4 / (2*4 + 5 + 10) = 8/23
    assert (m["voxel_tp"], m["voxel_fp"], m["voxel_fn"]) == (4, 5, 10)
    assert m["dice"] == pytest.approx(8 / 23)
    # lesions: A found (any overlap), B missed; predicted: the shifted block (true) and the lone voxel (false)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 1, 1)
    assert m["ref_volume_mm3"] == pytest.approx(14 * 1.5) and m["pred_volume_mm3"] == pytest.approx(9 * 1.5)
    base = evaluate_folders(formats / ".nii.gz" / "ref", formats / ".nii.gz" / "pred", progress=False)
    assert json.dumps(res["per_case"], sort_keys=True) == json.dumps(base["per_case"], sort_keys=True)


@pytest.mark.parametrize("ending", (".mha", ".nrrd"))
def test_geometry_checks_in_every_format(formats, ending):
    ref, pred, _ = _case()
    _write(pred, formats / ending / "pred" / f"case1{ending}", origin=(11.0, -4.0, 2.5))  # moved 1 mm
    with pytest.raises(ValueError, match=f"origin mismatch: the prediction .*case1\\{ending}"):
        run(["evaluate", "--ref", str(formats / ending / "ref"), "--pred", str(formats / ending / "pred"),
             "--file-ending", ending, "-o", str(formats / "r.json")])
    # a file of another format in the folder is no case of this one (its wrong origin is never read)
    _write(pred, formats / ending / "pred" / f"case1{ending}")
    _write(pred, formats / ending / "pred" / "case1.nii.gz", origin=(0.0, 0.0, 0.0))
    res = evaluate_folders(formats / ending / "ref", formats / ending / "pred", file_ending=ending, progress=False)
    assert res["per_case"]["case1"]["voxel_tp"] == 4 and res["settings"]["predictions_without_reference"] == []


@pytest.mark.parametrize("ending", (".mha", ".nrrd"))
def test_operating_points_same_counts_as_nifti(formats, ending, tmp_path):
    out = tmp_path / "ops.json"
    assert run(["operating-points", "--ref", str(formats / ending / "ref"), "--prob", str(formats / ending / "prob"),
                "--thresholds", "0.2", "0.5", "--file-ending", ending, "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    base = sweep(formats / ".nii.gz" / "ref", formats / ".nii.gz" / "prob", thresholds=[0.2, 0.5], progress=False)
    at = {p["threshold"]: p for p in res["points"]}
    # threshold 0.5: the predicted mask above -> TP 4, FP 5, FN 10; threshold 0.2 adds the 0.3 voxel of B:
    # TP 5, FP 5, FN 9, and lesion B is found
    assert (at[0.5]["voxel_tp"], at[0.5]["voxel_fp"], at[0.5]["voxel_fn"]) == (4, 5, 10)
    assert (at[0.2]["voxel_tp"], at[0.2]["voxel_fp"], at[0.2]["voxel_fn"]) == (5, 5, 9)
    assert (at[0.5]["lesion_tp"], at[0.2]["lesion_tp"]) == (1, 2)
    assert json.dumps(res["points"], sort_keys=True) == json.dumps(base["points"], sort_keys=True)


@pytest.mark.parametrize("ending", (".mha", ".nrrd", ".nii"))
def test_fuse_in_every_format(tmp_path, ending):
    raters = []
    for k in range(3):
        a = np.zeros((4, 5, 6), np.uint8)
        a[1, 1, : k + 2] = 1  # rater k marks x 0..k+1 on one row
        raters.append(a)
        _write(a, tmp_path / f"r{k}" / f"c{ending}")
    assert run(["fuse", "--method", "majority", "--raters", *(str(tmp_path / f"r{k}") for k in range(3)), "-o",
                str(tmp_path / "fused"), "--file-ending", ending]) == 0
    assert [p.name for p in (tmp_path / "fused").iterdir()] == [f"c{ending}"]
    out = sitk.ReadImage(str(tmp_path / "fused" / f"c{ending}"))
    # majority of 3: x 0-2 marked by at least two raters (x 0,1 by all; x 2 by raters 1 and 2; x 3 by rater 2 only)
    expect = np.zeros((4, 5, 6), np.uint8)
    expect[1, 1, :3] = 1
    assert np.array_equal(sitk.GetArrayFromImage(out), expect)
    assert out.GetSpacing() == SPACING_XYZ and out.GetOrigin() == ORIGIN and out.GetDirection() == DIRECTION


def test_unsupported_ending_is_one_line_naming_the_option(formats):
    with pytest.raises(ValueError, match=r"--file-ending '\.png': not a supported image format"):
        evaluate_folders(formats / ".mha" / "ref", formats / ".mha" / "pred", file_ending=".png", progress=False)
    with pytest.raises(ValueError, match="--file-ending"):
        sweep(formats / ".mha" / "ref", formats / ".mha" / "prob", file_ending=".jpg", progress=False)
    with pytest.raises(ValueError, match="--file-ending"):
        fuse_folders("majority", [formats / ".mha" / "ref"], formats / "x", file_ending=".tif", progress=False)
