"""Challenge presets against hand-worked cases and an independent SimpleITK re-run of the WMH 2017 method.

WMH 2017: the organisers' evaluation.py (hjkuijf/wmhchallenge); MSSEG-2: current Anima
(animaSegPerfCAnalyzer.cxx); ISBI 2015: Carass et al. 2017.
"""
import math

import numpy as np
import pytest
import scipy.spatial
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.io import write_image
from nnunet_ext.metrics.anima import aggregate_msseg2, anima_detection, detected, overlap_table, \
    size_ordered_components
from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.metrics.isbi import inter_rater_raw_score, isbi_case, isbi_score, normalize
from nnunet_ext.metrics.lesions import hd95, surface_mask
from nnunet_ext.metrics.wmh2017 import binarize_prediction, prepare_case


# ------------------------------------------------------------------------------------------------ WMH 2017
def _square_minus_corner(shape=(5, 7, 7), z=1):
    m = np.zeros(shape, bool)
    m[z, 2:5, 2:5] = True
    m[z, 2, 2] = False  # 8 voxels; the centre (3, 3) has all 4 face neighbours but misses one corner
    return m


def test_wmh_border_is_3x3_inplane_on_1x1x3mm_scan():
    ref = _square_minus_corner()
    # organisers' border: the centre has an in-plane (8-neighbour) background voxel -> all 8 voxels are border
    assert surface_mask(ref, "wmh2017").sum() == 8
    # the 4-neighbour in-plane cross (our pre-issue-15 reading): the centre is inside
    assert surface_mask(ref, "face_inplane").sum() == 7
    # prediction: a column through the centre, one voxel per slice, slices 3 mm apart
    pred = np.zeros_like(ref)
    pred[:, 3, 3] = True
    spacing = (3.0, 1.0, 1.0)
    # WMH: pred -> ref border distances 0, 3, 3, 6, 9 -> 95th percentile 6 + 0.8 * 3 = 8.4;
    # ref border -> pred: 0, 1 x4, sqrt2 x3 -> sqrt2; HD95 = 8.4
    assert hd95(ref, pred, spacing, surface="wmh2017") == pytest.approx(8.4)
    # 4-neighbour border: 1, sqrt10, sqrt10, sqrt37, sqrt82 -> sqrt37 + 0.8 (sqrt82 - sqrt37)
    assert hd95(ref, pred, spacing, surface="face_inplane") == pytest.approx(math.sqrt(37) + 0.8 * (math.sqrt(82) - math.sqrt(37)))


def test_wmh_lesion_on_image_edge():
    ref = np.zeros((3, 6, 6), bool)
    ref[1, 0:3, 0:3] = True  # touches two image edges
    # outside the image is foreground: only the voxels next to row 3 / column 3 are border
    border = np.argwhere(surface_mask(ref, "wmh2017"))[:, 1:].tolist()
    assert sorted(map(tuple, border)) == [(0, 2), (1, 2), (2, 0), (2, 1), (2, 2)]
    pred = np.zeros_like(ref)
    pred[1, 0, 0] = True
    # pred -> ref: 2; ref -> pred: 2, 2, sqrt5, sqrt5, sqrt8 -> sqrt5 + 0.8 (sqrt8 - sqrt5)
    expected = math.sqrt(5) + 0.8 * (math.sqrt(8) - math.sqrt(5))
    assert hd95(ref, pred, (3.0, 1.0, 1.0), surface="wmh2017") == pytest.approx(expected)
    # outside = background (4-neighbour in-plane border, 8 voxels) gives 0 and sqrt5 + 0.65 (sqrt8 - sqrt5)
    assert hd95(ref, pred, (3.0, 1.0, 1.0), surface="face_inplane") == pytest.approx(
        math.sqrt(5) + 0.65 * (math.sqrt(8) - math.sqrt(5)))
    # a mask filling whole slices has no border under the organisers' definition (their script crashes): None
    assert hd95(np.ones((2, 4, 4), bool), np.ones((2, 4, 4), bool), surface="wmh2017") is None


def test_wmh_binarisation_of_predictions():
    f = np.array([-1.0, 0.0, 0.4, 0.5, 0.7, 2.0, 1000.0, 1000.5], np.float32)
    assert binarize_prediction(f).tolist() == [False, False, False, True, True, True, True, False]
    u8 = np.array([0, 1, 2, 232, 233, 255], np.uint8)  # SimpleITK casts the upper bound 1000 to uint8: 232
    assert binarize_prediction(u8).tolist() == [False, True, True, True, False, False]
    i16 = np.array([0, 1, 2, 1000, 1001], np.int16)
    assert binarize_prediction(i16).tolist() == [False, True, True, True, False]
    ref = np.array([[[0, 1, 2, 2]]], np.uint8)
    pred = np.array([[[0.7, 0.9, 0.9, 0.2]]], np.float32)
    wmh, p = prepare_case(ref, pred)
    assert wmh.tolist() == [[[False, True, False, False]]] and p.tolist() == [[[True, True, False, False]]]


def test_wmh_preset_float_prediction_file(tmp_path):
    ref = np.zeros((4, 10, 10), np.uint8)
    ref[1, 2:5, 2:5] = 1
    ref[2, 7:9, 7:9] = 2
    pred = np.full(ref.shape, 0.4, np.float32)  # below 0.5 everywhere ...
    pred[1, 2:5, 2:5] = 0.7  # ... except on the lesion
    pred[2, 7:9, 7:9] = 0.9  # other pathology: masked out
    write_image(ref, (3.0, 1.0, 1.0), tmp_path / "ref" / "c.nii.gz")
    write_image(pred, (3.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    m = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="wmh2017", progress=False)["per_case"]["c"]
    assert (m["dice"], m["hd95"], m["avd"], m["lesion_tpr"], m["lesion_f1"]) == (1.0, 0.0, 0.0, 1.0, 1.0)
    # another spacing in the prediction's header: the organisers copy the reference's geometry and score it
    pred2 = np.zeros(ref.shape, np.float32)
    pred2[1, 2:5, 2:4] = 0.7  # 6 of 9 voxels
    write_image(pred2, (1.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    m = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="wmh2017", progress=False)["per_case"]["c"]
    assert m["dice"] == pytest.approx(12 / 15) and m["avd"] == pytest.approx(100 / 3)
    write_image(pred, (3.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    # without the preset a float prediction is not a binary mask: a clear error naming the file
    write_image((ref == 1).astype(np.uint8), (3.0, 1.0, 1.0), tmp_path / "ref" / "c.nii.gz")
    with pytest.raises(ValueError, match="pred/c.nii.gz: expected a binary mask"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", progress=False)


def _organisers_method(ref_img, pred_img):
    """The organisers' procedure re-done with SimpleITK filters (independent of our numpy code)."""
    pred_img.CopyInformation(ref_img)
    test = sitk.BinaryThreshold(ref_img, 0.5, 1.5, 1, 0)
    keep = sitk.BinaryThreshold(ref_img, 1.5, 2.5, 0, 1)
    masked = sitk.Mask(pred_img, keep)
    if "integer" in masked.GetPixelIDTypeAsString():
        res = sitk.BinaryThreshold(masked, 1, 1000, 1, 0)
    else:
        res = sitk.BinaryThreshold(masked, 0.5, 1000, 1, 0)
    t, r = sitk.GetArrayFromImage(test).ravel(), sitk.GetArrayFromImage(res).ravel()
    out = {"dice": 2.0 * np.sum(t & r) / (t.sum() + r.sum())}
    border = lambda im: np.transpose(np.flipud(np.nonzero(sitk.GetArrayFromImage(  # noqa: E731
        sitk.Subtract(im, sitk.BinaryErode(im, (1, 1, 0)))))))
    pts = lambda idx: [test.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx]  # noqa: E731
    tp, rp = pts(border(test)), pts(border(res))
    d1 = scipy.spatial.KDTree(tp).query(rp)[0]
    d2 = scipy.spatial.KDTree(rp).query(tp)[0]
    out["hd95"] = max(np.percentile(d1, 95), np.percentile(d2, 95))
    out["avd"] = abs(float(t.sum()) - float(r.sum())) / float(t.sum()) * 100
    cc = sitk.ConnectedComponentImageFilter()
    cc.SetFullyConnected(True)
    ct = cc.Execute(test)
    n_wmh = len(np.unique(sitk.GetArrayFromImage(ct))) - 1
    recall = (len(np.unique(sitk.GetArrayFromImage(sitk.Multiply(ct, sitk.Cast(res, sitk.sitkUInt32))))) - 1) / n_wmh
    cr = cc.Execute(res)
    n_det = len(np.unique(sitk.GetArrayFromImage(cr))) - 1
    prec = 1.0 if n_det == 0 else (len(np.unique(sitk.GetArrayFromImage(
        sitk.Multiply(cr, sitk.Cast(test, sitk.sitkUInt32))))) - 1) / n_det
    out["lesion_tpr"] = recall
    out["lesion_f1"] = 0.0 if prec + recall == 0 else 2 * prec * recall / (prec + recall)
    return out


def test_wmh_preset_equals_independent_simpleitk_rerun(tmp_path):
    rng = np.random.default_rng(15)
    compared = 0
    for k in range(12):
        shape = (int(rng.integers(3, 6)), int(rng.integers(8, 14)), int(rng.integers(8, 14)))
        from scipy import ndimage

        ref = (ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.55).astype(np.float32)  # lesions touch edges
        ref[(rng.random(shape) > 0.93) & (ref == 0)] = 2.0  # other pathology
        noisy = ndimage.gaussian_filter(rng.random(shape), 1.0)
        if k % 3 == 0:
            pred = noisy.astype(np.float32) + 0.05  # float prediction, thresholded at 0.5
        elif k % 3 == 1:
            pred = (noisy > 0.52).astype(np.uint8) * 2  # integer label 2
        else:
            pred = (noisy > 0.5).astype(np.uint8)
        spacing_xyz = (float(rng.choice([0.9, 1.0])), 1.0, float(rng.choice([1.0, 3.0])))
        ref_img, pred_img = sitk.GetImageFromArray(ref), sitk.GetImageFromArray(pred)
        ref_img.SetSpacing(spacing_xyz)
        pred_img.SetSpacing(spacing_xyz)
        wmh, p = prepare_case(ref, pred)
        if not wmh.any() or not p.any() or not surface_mask(p, "wmh2017").any():
            continue  # cases their script cannot score
        sitk.WriteImage(ref_img, str(tmp_path / "ref.nii.gz"))
        sitk.WriteImage(pred_img, str(tmp_path / "pred.nii.gz"))
        theirs = _organisers_method(sitk.ReadImage(str(tmp_path / "ref.nii.gz")), sitk.ReadImage(str(tmp_path / "pred.nii.gz")))
        (tmp_path / f"r{k}").mkdir()
        (tmp_path / f"p{k}").mkdir()
        (tmp_path / "ref.nii.gz").rename(tmp_path / f"r{k}" / "c.nii.gz")
        (tmp_path / "pred.nii.gz").rename(tmp_path / f"p{k}" / "c.nii.gz")
        ours = evaluate_folders(tmp_path / f"r{k}", tmp_path / f"p{k}", preset="wmh2017", progress=False)["per_case"]["c"]
        for key, v in theirs.items():
            assert ours[key] == pytest.approx(v, abs=1e-9), (k, key)
        compared += 1
    assert compared >= 8


# ------------------------------------------------------------------------------------------------ Anima
S = (7, 12, 16)


def _line_case(big_at_raster_end: bool):
    """One reference lesion: a 14-voxel line along x. Four predicted components cover 3, 3, 2 and 2 of its
    voxels (TP 10: weights 0.3, 0.3, 0.2, 0.2); one of the 2-voxel ones (C) has 10 voxels outside the
    lesion (10/12 > beta), the other (D) 2 (2/4 <= beta). ``big_at_raster_end``: C after D in raster order."""
    ref = np.zeros(S, bool)
    ref[3, 5, 0:14] = True
    pred = np.zeros(S, bool)
    pred[3, 5, 0:3] = pred[3, 6, 0] = True  # A: 3 in, 1 out
    pred[3, 5, 4:7] = pred[3, 6, 4] = True  # B: 3 in, 1 out
    c, d = (slice(11, 13), slice(8, 10)) if big_at_raster_end else (slice(8, 10), slice(11, 13))
    pred[3, 5, c] = True
    pred[3, 6:11, c] = True  # C: 2 in, 10 out
    pred[3, 5, d] = pred[3, 6, d] = True  # D: 2 in, 2 out
    return ref, pred


def test_anima_walk_bound_is_the_other_images_label_count():
    ref, pred = _line_case(big_at_raster_end=False)
    # walk: A (w 0.3), B (0.6 < gamma), then C (C comes first in raster and in size order): 10/12 > 0.7 -> missed.
    # The pre-2021 bound (the reference's own label count, 2) stopped after A and B: detected.
    r = anima_detection(ref, pred, (1, 1, 1))
    assert (r["ref_lesions"], r["pred_lesions"], r["tp_ref"]) == (1, 4, 0)
    assert r["lesion_sensitivity"] == 0.0


def test_anima_ties_follow_size_ordered_labels():
    ref, pred = _line_case(big_at_raster_end=True)
    lab, n = size_ordered_components(pred, 4)
    assert n == 4 and int((lab == 1).sum()) == 12  # the 12-voxel component is label 1 although last in raster
    # C and D tie at overlap 2: the larger C is walked first -> missed (raster order would walk D: detected)
    r = anima_detection(ref, pred, (1, 1, 1))
    assert r["tp_ref"] == 0
    table = overlap_table(*size_ordered_components(ref, 4), lab, n)
    raster_order = table[:, [0, 2, 3, 4, 1]]  # the same table with C moved behind D
    assert detected(table, 0.1, 0.7, 0.65).tolist() == [False]
    assert detected(raster_order, 0.1, 0.7, 0.65).tolist() == [True]


def test_anima_empty_prediction_scores_zero():
    ref = np.zeros(S, bool)
    ref[1:4, 1:4, 1:4] = True
    r = anima_detection(ref, np.zeros(S, bool), (1, 1, 1))
    assert (r["lesion_sensitivity"], r["lesion_ppv"], r["lesion_f1"]) == (0.0, 0.0, 0.0)
    tiny = np.zeros(S, bool)
    tiny[5, 9, 1:3] = True  # a prediction of only sub-threshold components is empty too
    assert anima_detection(ref, tiny, (1, 1, 1))["lesion_ppv"] == 0.0


def test_anima_subthreshold_reference_is_a_case_with_lesions(tmp_path):
    ref = np.zeros(S, bool)
    ref[1, 1, 1:3] = True  # 2 mm3 <= 3 mm3: dropped, but the reference is not empty
    pred = np.zeros(S, bool)
    pred[4:6, 6:8, 6:8] = True  # one 8-voxel lesion
    r = anima_detection(ref, pred, (1, 1, 1))
    assert r["ref_empty"] is False and r["ref_lesions"] == 0 and r["pred_lesions"] == 1
    # Anima: sensitivity 0/0 (NaN -> None), PPV 0/1, F1 0 (NaN + 0 > 0 is false)
    assert (r["lesion_sensitivity"], r["lesion_ppv"], r["lesion_f1"]) == (None, 0.0, 0.0)
    for d, a in (("ref", ref), ("pred", pred)):
        write_image(a.astype(np.uint8), (1, 1, 1), tmp_path / d / "c.nii.gz")
    res = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="msseg2", progress=False)
    agg = res["aggregate"]["msseg2"]
    assert (agg["cases_with_lesions"], agg["cases_without_lesions"]) == (1, 0)
    assert agg["lesion_f1_mean"] == 0.0 and agg["dice_mean"] == 0.0 and agg["lesion_sensitivity_mean"] is None
    assert aggregate_msseg2(res["per_case"]) == agg


def test_anima_reads_float_masks_truncated():
    ref = np.zeros(S, np.float32)
    ref[1:4, 1:4, 1:4] = 1.0
    pred = np.where(ref > 0, 0.7, 0.0).astype(np.float32)  # 0.7 -> 0 as unsigned short: empty prediction
    assert anima_detection(ref, pred, (1, 1, 1))["pred_lesions"] == 0
    assert anima_detection(ref, pred * 2, (1, 1, 1))["tp_ref"] == 1  # 1.4 -> 1


# ------------------------------------------------------------------------------------------------ ISBI 2015
def _isbi_cases():
    a_ref = np.zeros((6, 10, 10), bool)
    a_ref[1:3, 1:3, 1:3] = True  # 8-voxel lesion
    a_ref[4, 7, 2:5] = True  # 3-voxel lesion
    a_pred = np.zeros_like(a_ref)
    a_pred[1:3, 1:3, 1:3] = True  # finds the cube
    a_pred[4, 1, 7:9] = True  # 2-voxel false positive
    b_ref = np.zeros((6, 10, 10), bool)
    b_ref[2:4, 5:7, 5:7] = True
    return (a_ref, a_pred), (b_ref, b_ref.copy())


def test_isbi_score_hand_worked():
    (a_ref, a_pred), (b_ref, b_pred) = _isbi_cases()
    a = isbi_case(a_ref, a_pred)
    assert a["dice"] == pytest.approx(16 / 21) and a["ppv"] == pytest.approx(0.8)
    assert (a["ltpr"], a["lfpr"]) == (0.5, 0.5)
    b = isbi_case(b_ref, b_pred)
    assert (b["dice"], b["ppv"], b["ltpr"], b["lfpr"]) == (1.0, 1.0, 1.0, 0.0)
    s = isbi_score({"r1": {"a": a, "b": b}}, inter_rater_raw=0.8)
    # volumes ref (11, 8), pred (10, 8): correlation 1; case a: (16/21)/8 + 0.8/8 + 0.5/4 + 0.5/4 + 1/4
    raw_a = (16 / 21) / 8 + 0.1 + 0.125 + 0.125 + 0.25
    assert s["per_rater"]["r1"]["corr"] == pytest.approx(1.0)
    assert s["raw"] == pytest.approx((raw_a + 1.0) / 2)
    assert s["normalized"] == pytest.approx(100 - 10 * (1 - (raw_a + 1) / 2) / 0.2)
    assert normalize(0.8, 0.8) == pytest.approx(90.0) and normalize(1.0, 0.8) == 100.0
    # identical raters: every component perfect and volume correlation 1 -> raw 1
    same = {"a": (a_ref, (1, 1, 1)), "b": (b_ref, (1, 1, 1))}
    assert inter_rater_raw_score(same, same) == pytest.approx(1.0)
    # one case only: the volume correlation is undefined and counts 0 -> raw 0.75
    assert isbi_score({"r1": {"b": b}})["raw"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        normalize(0.9, 1.0)


def test_isbi_preset_and_cli(tmp_path):
    (a_ref, a_pred), (b_ref, b_pred) = _isbi_cases()
    for d, a, b in (("ref", a_ref, b_ref), ("pred", a_pred, b_pred)):
        write_image(a.astype(np.uint8), (1, 1, 1), tmp_path / d / "a.nii.gz")
        write_image(b.astype(np.uint8), (1, 1, 1), tmp_path / d / "b.nii.gz")
    assert run(["evaluate", "--preset", "isbi2015", "--ref", str(tmp_path / "ref"), "--pred", str(tmp_path / "pred"),
                "-o", str(tmp_path / "r.json"), "--isbi-rater-score", "0.8"]) == 0
    import json

    agg = json.loads((tmp_path / "r.json").read_text())["aggregate"]["isbi2015"]
    raw_a = (16 / 21) / 8 + 0.1 + 0.125 + 0.125 + 0.25
    assert agg["raw"] == pytest.approx((raw_a + 1) / 2) and agg["normalized"] == pytest.approx(
        100 - 10 * (1 - (raw_a + 1) / 2) / 0.2)


def test_isbi_lesions_are_26_connected_as_jhu_lesion_metrics():
    """JHU's lesion_metrics labels lesions with skimage's default (full) connectivity: two voxels touching
    only at a corner are one lesion. A prediction hitting one of them detects that one lesion (LTPR 1);
    with 18-connectivity they would be two lesions and LTPR 1/2."""
    ref = np.zeros((5, 5, 5), np.uint8)
    ref[1, 1, 1] = ref[2, 2, 2] = 1
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = 1
    c = isbi_case(ref, pred)
    assert (c["ref_lesions"], c["ltpr"], c["lfpr"]) == (1, 1.0, 0.0)
    assert isbi_case(ref, pred, connectivity=18)["ltpr"] == 0.5
