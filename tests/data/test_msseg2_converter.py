"""MSSEG-2 converter on a fixture with the official folder layout and file names."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.io import read_image


def _write(path, arr, spacing=(0.5, 0.5, 0.5), origin=(0.0, 0.0, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def _digest(folder):
    return {p.relative_to(folder): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _patient(folder, name, lesion: bool, raters=True, label=True):
    rng = np.random.default_rng(len(name))
    p = folder / name
    _write(p / "flair_time01_on_middle_space.nii.gz", rng.random((6, 8, 8)).astype(np.float32))
    _write(p / "flair_time02_on_middle_space.nii.gz", rng.random((6, 8, 8)).astype(np.float32))
    cons = np.zeros((6, 8, 8), np.uint8)
    if lesion:
        cons[2:4, 2:4, 2:4] = 1
    if label:
        _write(p / "ground_truth.nii.gz", cons)
    if raters:
        for k in range(1, 5):
            r = cons.copy()
            if k == 4:
                r[:] = 0  # rater 4 saw no new lesion
            _write(p / f"ground_truth_expert{k}.nii.gz", r)


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "segmentation_challenge_miccai21" / "training"
    _patient(src, "013", lesion=True)
    _patient(src, "015", lesion=False)  # no new lesion: kept
    _patient(src, "099", lesion=False, raters=False, label=False)  # test patient without ground truth
    return src


def test_convert_msseg2(source, tmp_path):
    before = _digest(source)
    raw = tmp_path / "raw"
    assert run(["convert", "msseg2", "-i", str(source), "-d", "540", "--raw", str(raw)]) == 0
    root = raw / "Dataset540_MSSEG2"
    dj = json.loads((root / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "FLAIR_tp1", "1": "FLAIR_tp2"} and dj["numTraining"] == 2
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        "MSSEG2_013_0000.nii.gz", "MSSEG2_013_0001.nii.gz", "MSSEG2_015_0000.nii.gz", "MSSEG2_015_0001.nii.gz"]
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == ["MSSEG2_099_0000.nii.gz", "MSSEG2_099_0001.nii.gz"]
    lab, spacing = read_image(root / "labelsTr" / "MSSEG2_013.nii.gz")
    assert lab.sum() == 8 and np.allclose(spacing, 0.5)
    assert read_image(root / "labelsTr" / "MSSEG2_015.nii.gz")[0].sum() == 0  # empty case kept
    for k in range(1, 5):
        r = read_image(root / "ratersTr" / f"rater{k}" / "MSSEG2_013.nii.gz")[0]
        assert r.sum() == (0 if k == 4 else 8)
    soft = read_image(root / "softlabelsTr" / "MSSEG2_013.nii.gz")[0]
    assert soft.max() == pytest.approx(0.75)  # three of four raters
    tp2 = read_image(root / "imagesTr" / "MSSEG2_013_0001.nii.gz")[0]
    assert np.allclose(tp2, sitk.GetArrayFromImage(sitk.ReadImage(str(source / "013" / "flair_time02_on_middle_space.nii.gz"))))
    assert _digest(source) == before  # the source is never modified


def test_msseg2_bad_inputs(source, tmp_path):
    (source / "013" / "ground_truth_expert3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="ground_truth_expert3"):
        from nnunet_ext.dataset_conversion.msseg2 import convert

        convert(source, tmp_path / "raw", 541, progress=False)
    (source / "013" / "ground_truth_expert3.nii.gz").write_bytes((source / "013" / "ground_truth_expert2.nii.gz").read_bytes())
    _write(source / "015" / "flair_time02_on_middle_space.nii.gz", np.zeros((6, 8, 8), np.float32), origin=(1, 0, 0))
    with pytest.raises(ValueError, match="flair_time02"):
        convert(source, tmp_path / "raw2", 542, progress=False)
    with pytest.raises(ValueError, match="MSSEG-2 layout"):
        convert(tmp_path / "raw2", tmp_path / "raw3", 543, progress=False)


def test_msseg2_subtraction_channel_by_hand(source, tmp_path):
    """--subtraction: channel 2 = z(tp2) - z(tp1), each z-scored over its own nonzero voxels, 0 where either
    time point is 0; named noNorm so nnU-Net feeds it as written."""
    p = source / "020"
    # voxels 0..8 of a 1x3x3 image
    tp1 = np.array([0, 1, 1, 1, 1, 3, 3, 3, 3], np.float32).reshape(1, 3, 3)
    tp2 = np.array([2, 0, 2, 6, 2, 6, 6, 2, 6], np.float32).reshape(1, 3, 3)
    _write(p / "flair_time01_on_middle_space.nii.gz", tp1)
    _write(p / "flair_time02_on_middle_space.nii.gz", tp2)
    _write(p / "ground_truth.nii.gz", np.zeros((1, 3, 3), np.uint8))
    for k in range(1, 5):
        _write(p / f"ground_truth_expert{k}.nii.gz", np.zeros((1, 3, 3), np.uint8))
    raw = tmp_path / "raw"
    assert run(["convert", "msseg2", "-i", str(source), "-d", "544", "--raw", str(raw), "--subtraction"]) == 0
    root = raw / "Dataset544_MSSEG2"
    dj = json.loads((root / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "FLAIR_tp1", "1": "FLAIR_tp2", "2": "noNorm"}
    assert dj["subtraction"]["channel"] == 2
    # by hand: tp1's nonzero voxels are four 1s and four 3s -> mean 2, std 1 -> z1 = -1 (voxels 1-4), +1 (5-8);
    # tp2's nonzero voxels (all but voxel 1) are four 2s and four 6s -> mean 4, std 2 -> z2 = -1 (2), +1 (6).
    # voxel 0 (tp1 = 0) and voxel 1 (tp2 = 0) -> 0; voxel 3: +1 - (-1) = 2; voxel 7: -1 - (+1) = -2; others 0.
    sub, _ = read_image(root / "imagesTr" / "MSSEG2_020_0002.nii.gz")
    assert sub.dtype == np.float32
    assert np.allclose(sub.ravel(), [0, 0, 0, 2, 0, 0, 0, -2, 0], atol=1e-6)
    # the two time points are unchanged; every case has the channel, the test patient without ground truth too
    assert np.allclose(read_image(root / "imagesTr" / "MSSEG2_020_0001.nii.gz")[0], tp2)
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == [
        "MSSEG2_099_0000.nii.gz", "MSSEG2_099_0001.nii.gz", "MSSEG2_099_0002.nii.gz"]
    assert (root / "imagesTr" / "MSSEG2_013_0002.nii.gz").is_file()
    # the subject of each case (one case per patient) for `nnunet-ext split`
    assert json.loads((root / "case_groups.json").read_text())["MSSEG2_013"] == {"subject": "MSSEG2_013"}


def test_msseg2_subtraction_only_for_msseg2(source, tmp_path):
    with pytest.raises(NotImplementedError, match="--subtraction .* applies to msseg2, not wmh2017"):
        run(["convert", "wmh2017", "-i", str(source), "-d", "545", "--raw", str(tmp_path / "raw"), "--subtraction"])
