"""Rater fusion against small arrays worked out by hand; STAPLE against SimpleITK; folder fusion errors."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.data.fusion import ball, fuse, soft_rim, staple
from nnunet_ext.core.io import read_image, write_image

# three raters on 6 voxels (a 1x1x6 volume):   voxel: 0 1 2 3 4 5
R = [np.array([1, 1, 1, 0, 0, 0]), np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 0, 1, 0])]
R = [r.reshape(1, 1, 6).astype(np.uint8) for r in R]


@pytest.mark.parametrize("method,expected", [
    ("majority", [1, 1, 0, 0, 0, 0]),  # votes 3 2 1 1 1 0 of 3
    ("intersection", [1, 0, 0, 0, 0, 0]),
    ("union", [1, 1, 1, 1, 1, 0]),
    ("mean", [1, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 0]),
    ("inter_soft_union", [1, 0.5, 0.5, 0.5, 0.5, 0]),
])
def test_fusion_by_hand(method, expected):
    out = fuse(method, R)
    assert np.allclose(out.ravel(), expected)
    assert out.dtype == (np.float32 if method in ("mean", "inter_soft_union") else np.uint8)


def test_majority_tie_is_background():
    two = [np.array([[[1, 1, 0]]], np.uint8), np.array([[[1, 0, 0]]], np.uint8)]
    assert fuse("majority", two).ravel().tolist() == [1, 0, 0]


def test_inter_soft_union_gamma():
    assert np.allclose(fuse("inter_soft_union", R, gamma=0.3).ravel(), [1, 0.3, 0.3, 0.3, 0.3, 0])


def test_staple_matches_simpleitk():
    rng = np.random.default_rng(0)
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    raters = [np.where(rng.random(truth.shape) < 0.1, 1 - truth, truth).astype(np.uint8) for _ in range(4)]
    ref = sitk.GetArrayFromImage(sitk.STAPLE([sitk.GetImageFromArray(r) for r in raters], 1.0))
    assert np.allclose(staple(raters, soft=True), ref, atol=1e-6)
    assert np.array_equal(staple(raters), (ref >= 0.5).astype(np.uint8))
    assert (staple(raters) == truth).mean() > 0.95  # recovers the truth from noisy raters


def test_ball_anisotropic():
    b = ball(1.0, (3.0, 1.0, 1.0))  # 1 mm: no neighbour along z (3 mm away), the 4 in-plane face neighbours
    assert b.shape == (1, 3, 3) and b.sum() == 5
    assert ball(1.5, (1.0, 1.0, 1.0)).sum() == 19  # centre + 6 faces + 12 edges (sqrt 2 <= 1.5)


def test_soft_rim_by_hand():
    mask = np.zeros((1, 1, 7), np.uint8)
    mask[0, 0, 2:5] = 1  # lesion voxels 2,3,4 with intensities 10, 20, 30: mean 20
    image = np.array([[[50, 25, 10, 20, 30, 15, 99]]], np.float32)
    out = soft_rim(mask, image, spacing=(1, 1, 1), radius_mm=1.0, gamma=0.5)
    # rim = voxels 1 and 5; voxel 1 (25 > 20) gets gamma, voxel 5 (15) does not; 0 and 6 are outside the rim
    assert out.ravel().tolist() == [0, 0.5, 1, 1, 1, 0, 0]
    # with 2 mm the rim reaches voxels 0 and 6 (50 and 99 are brighter than the lesion)
    out2 = soft_rim(mask, image, spacing=(1, 1, 1), radius_mm=2.0, gamma=0.4)
    assert np.allclose(out2.ravel(), [0.4, 0.4, 1, 1, 1, 0, 0.4])


def test_soft_rim_uses_each_lesions_own_mean():
    mask = np.zeros((1, 1, 9), np.uint8)
    mask[0, 0, 1] = 1  # dark lesion (intensity 10)
    mask[0, 0, 7] = 1  # bright lesion (intensity 100)
    image = np.array([[[20, 10, 20, 0, 0, 0, 50, 100, 50]]], np.float32)
    out = soft_rim(mask, image, radius_mm=1.0)
    assert out.ravel().tolist() == [0.5, 1, 0.5, 0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("call,match", [
    (lambda: fuse("nope", R), "unknown fusion method"),
    (lambda: fuse("soft_rim", R), "needs the image"),
    (lambda: fuse("inter_soft_union", R, gamma=2.0), "gamma"),
    (lambda: soft_rim(R[0], np.zeros((1, 1, 5))), "shape"),
    (lambda: ball(0.0, (1, 1, 1)), "radius"),
])
def test_fuse_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_binary_and_shape_mismatch():
    with pytest.raises(ValueError, match="binary"):
        fuse("union", [R[0] * 2])
    with pytest.raises(ValueError, match="shape"):
        fuse("union", [R[0], np.zeros((1, 1, 5), np.uint8)])


@pytest.fixture
def rater_dirs(tmp_path):
    dirs = []
    for k, r in enumerate(R):
        d = tmp_path / f"rater{k + 1}"
        write_image(r, (2.0, 1.0, 1.0), d / "case1.nii.gz")
        dirs.append(d)
    write_image(np.arange(6, dtype=np.float32).reshape(1, 1, 6), (2.0, 1.0, 1.0), tmp_path / "img" / "case1_0000.nii.gz")
    return dirs


def test_fuse_cli_keeps_geometry(rater_dirs, tmp_path):
    assert run(["fuse", "--method", "majority", "--raters", *map(str, rater_dirs), "-o", str(tmp_path / "out")]) == 0
    arr, sp = read_image(tmp_path / "out" / "case1.nii.gz")
    assert arr.ravel().tolist() == [1, 1, 0, 0, 0, 0] and sp == (2.0, 1.0, 1.0)
    assert run(["fuse", "--method", "soft_rim", "--raters", *map(str, rater_dirs), "--images", str(tmp_path / "img"),
                "-o", str(tmp_path / "rim")]) == 0
    rim, _ = read_image(tmp_path / "rim" / "case1.nii.gz")
    assert rim.ravel().tolist() == [1, 1, 0.5, 0, 0, 0]  # voxel 2 (intensity 2 > lesion mean 0.5) is the rim


def test_fuse_cli_geometry_mismatch_names_files(rater_dirs, tmp_path):
    write_image(R[1], (1.0, 1.0, 1.0), rater_dirs[1] / "case1.nii.gz")
    with pytest.raises(ValueError, match=r"geometry mismatch: .*rater2/case1.nii.gz"):
        run(["fuse", "--method", "union", "--raters", *map(str, rater_dirs), "-o", str(tmp_path / "out")])


def test_fuse_cli_missing_case_names_folder(rater_dirs, tmp_path):
    write_image(R[0], (2.0, 1.0, 1.0), rater_dirs[0] / "case2.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"rater2 has no case2.nii.gz"):
        run(["fuse", "--method", "union", "--raters", *map(str, rater_dirs), "-o", str(tmp_path / "out")])


def test_soft_rim_core_is_strict_majority_intersection_for_two_raters():
    a = np.zeros((1, 1, 9), np.uint8)
    b = np.zeros_like(a)
    a[0, 0, 3:6] = 1
    b[0, 0, 4:7] = 1
    img = np.zeros((1, 1, 9), np.float32)
    out = fuse("soft_rim", [a, b], gamma=0.5, image=img)
    # two raters: majority (more than half) = intersection = voxels 4, 5; the dark rim gets 0
    assert out.ravel().tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]


def _isur_case():
    """3 x 3 x 9 volume (z, y, x), masks on the middle row (z=1, y=1):
    rater A x = 3..5, rater B x = 4..6 -> intersection x = 4, 5 (one lesion, FLAIR mean (4 + 4)/2 = 4);
    disagreement x = 3, 6. The 1 mm ball at 1 mm spacing is the 6-neighbourhood, so the dilation of the
    *intersection* is (1,1,3), (1,1,6) and the 4 lateral neighbours of x = 4 and of x = 5 (10 voxels).
    Bright (10 > 4) among them: (0,1,4), (0,1,5) -> gamma; (1,1,3), (1,1,6) (intensity 4, not brighter) are
    gamma as disagreement voxels. Not in the dilation although bright: (1,1,2) (2 mm from x = 4) and
    (0,1,3), (0,1,6) (sqrt 2 mm) -> 0 (a rim around the union would have given them gamma)."""
    a = np.zeros((3, 3, 9), np.uint8)
    b = np.zeros_like(a)
    a[1, 1, 3:6] = 1
    b[1, 1, 4:7] = 1
    img = np.zeros((3, 3, 9), np.float32)
    img[1, 1, 3:7] = 4.0
    img[1, 1, 2] = 10.0
    img[0, 1, 3:7] = 10.0
    img[1, 1, 7] = 1.0  # rim, darker than the lesion: 0
    return a, b, img


def test_inter_soft_union_rim_by_hand():
    a, b, img = _isur_case()
    g = 0.3
    out = fuse("inter_soft_union_rim", [a, b], gamma=g, image=img)
    assert out.dtype == np.float32
    want = np.zeros(a.shape, np.float32)
    want[1, 1, 4:6] = 1  # intersection
    want[1, 1, 3] = want[1, 1, 6] = g  # disagreement
    want[0, 1, 4:6] = g  # bright voxels of the 1 mm dilation of the intersection
    np.testing.assert_array_equal(out, want)
    assert out[1, 1, 2] == 0 and out[0, 1, 3] == 0 and out[0, 1, 6] == 0  # bright, but not next to the intersection
    # one rater: equals soft_rim of that rater
    assert np.array_equal(fuse("inter_soft_union_rim", [a], gamma=g, image=img),
                          fuse("soft_rim", [a], gamma=g, image=img))


def test_inter_soft_union_rim_cli(tmp_path):
    a, b, img = _isur_case()
    for k, m in enumerate((a, b), 1):
        write_image(m, (1.0, 1.0, 1.0), tmp_path / f"r{k}" / "c.nii.gz")
    write_image(img, (1.0, 1.0, 1.0), tmp_path / "img" / "c_0000.nii.gz")
    assert run(["fuse", "--method", "inter_soft_union_rim", "--raters", str(tmp_path / "r1"), str(tmp_path / "r2"),
                "--images", str(tmp_path / "img"), "--gamma", "0.5", "-o", str(tmp_path / "out")]) == 0
    out, _ = read_image(tmp_path / "out" / "c.nii.gz")
    assert (out == 1).sum() == 2 and (out == 0.5).sum() == 4
    with pytest.raises(ValueError, match="needs --images"):
        run(["fuse", "--method", "inter_soft_union_rim", "--raters", str(tmp_path / "r1"), "-o", str(tmp_path / "o2")])


def _isur_anisotropic():
    """3 x 3 x 11 volume (z, y, x) at spacing (2, 1, 0.5) mm, masks on the row z=1, y=1:
    rater A x = 4..6, rater B x = 5..7 -> intersection x = 5, 6 (FLAIR 4 and 6: lesion mean 5);
    disagreement x = 4, 7. The 1 mm ball at this spacing holds the offsets (0, dy, dx) with
    (dy * 1)^2 + (dx * 0.5)^2 <= 1: dx in -2..2 at dy = 0, dy = +-1 at dx = 0, nothing in z (2 mm).
    Dilation of the intersection: x = 3, 4, 7, 8 on the row and (1, 0|2, 5|6)."""
    a = np.zeros((3, 3, 11), np.uint8)
    b = np.zeros_like(a)
    a[1, 1, 4:7] = 1
    b[1, 1, 5:8] = 1
    img = np.zeros(a.shape, np.float32)
    img[1, 1, 5], img[1, 1, 6] = 4.0, 6.0
    img[1, 1, 3] = 9.0  # 1 mm (2 voxels in x) from x = 5, brighter than 5 -> gamma
    img[1, 1, 8] = 2.0  # in the dilation but darker -> 0
    img[1, 1, 9] = 9.0  # 1.5 mm from x = 6: outside the ball -> 0
    img[0, 1, 5] = 9.0  # 2 mm away in z: outside -> 0
    img[1, 0, 5] = 9.0  # 1 mm away in y: inside, bright -> gamma
    img[1, 0, 4] = 9.0  # dy = 1, dx = -1: 1 + 0.25 > 1 mm^2 -> outside -> 0
    img[1, 2, 6] = 5.0  # inside, equal to the mean (not brighter) -> 0
    want = lambda g: _put(a.shape, {(1, 1, 5): 1, (1, 1, 6): 1, (1, 1, 4): g, (1, 1, 7): g,  # noqa: E731
                                     (1, 1, 3): g, (1, 0, 5): g})
    return a, b, img, want


def _put(shape, values):
    out = np.zeros(shape, np.float32)
    for k, v in values.items():
        out[k] = v
    return out


def test_inter_soft_union_rim_anisotropic_by_hand():
    a, b, img, want = _isur_anisotropic()
    out = fuse("inter_soft_union_rim", [a, b], gamma=0.5, image=img, spacing=(2.0, 1.0, 0.5))
    np.testing.assert_array_equal(out, want(0.5))
    # radius 2 mm: dx in -4..4 at dy = 0 (x = 1..10 around x = 5, 6), so x = 9 (9 > 5) now gets gamma too;
    # z (2 mm away, 0 in y and x) joins: (0, 1, 5) = 9 -> gamma
    big = fuse("inter_soft_union_rim", [a, b], gamma=0.25, image=img, spacing=(2.0, 1.0, 0.5), radius_mm=2.0)
    assert big[1, 1, 9] == 0.25 and big[0, 1, 5] == 0.25 and big[1, 0, 4] == 0.25  # (1 + 0.25 <= 4 mm^2)
    assert big[1, 1, 8] == 0 and big[1, 2, 6] == 0 and big[1, 1, 5] == 1


def test_inter_soft_union_rim_cli_anisotropic_defaults(tmp_path):
    """Through the command with the paper's defaults (gamma 0.5, 1 mm): the spacing comes from the
    NIfTI header (x, y, z) = (0.5, 1, 2)."""
    a, b, img, want = _isur_anisotropic()
    for k, m in enumerate((a, b), 1):
        write_image(m, (2.0, 1.0, 0.5), tmp_path / f"r{k}" / "c.nii.gz")
    write_image(img, (2.0, 1.0, 0.5), tmp_path / "img" / "c_0000.nii.gz")
    assert run(["fuse", "--method", "inter_soft_union_rim", "--raters", str(tmp_path / "r1"), str(tmp_path / "r2"),
                "--images", str(tmp_path / "img"), "-o", str(tmp_path / "out")]) == 0
    out, spacing = read_image(tmp_path / "out" / "c.nii.gz")
    assert tuple(spacing) == (2.0, 1.0, 0.5)
    np.testing.assert_array_equal(out, want(0.5))
