"""MSSEG-style (Anima) lesion detection: hand-worked cases for each rule, the preset and its summary."""
import json

import numpy as np
import pytest

from nnunet_ext.core.io import write_image
from nnunet_ext.metrics.anima import anima_detection, detected, overlap_table
from nnunet_ext.metrics.evaluate import evaluate_folders


def cube(shape, corner, size):
    m = np.zeros(shape, bool)
    z, y, x = corner
    m[z:z + size[0], y:y + size[1], x:x + size[2]] = True
    return m


S = (20, 20, 20)


def test_exact_match_is_perfect():
    ref = cube(S, (2, 2, 2), (3, 3, 3)) | cube(S, (10, 10, 10), (2, 2, 2))
    r = anima_detection(ref, ref.copy(), (1, 1, 1))
    assert (r["ref_lesions"], r["pred_lesions"], r["tp_ref"], r["tp_pred"]) == (2, 2, 2, 2)
    assert r["lesion_f1"] == 1.0


@pytest.mark.parametrize("size,expected", [((5, 1, 1), False), ((3, 1, 2), True)])
def test_alpha_coverage_must_exceed_ten_percent(size, expected):
    ref = cube(S, (0, 0, 0), (5, 5, 2))  # 50 voxels
    pred = cube(S, (0, 0, 0), size)  # inside the lesion: 5 voxels = 10 % (not more), 6 voxels = 12 %
    r = anima_detection(ref, pred, (1, 1, 1))
    assert r["tp_ref"] == int(expected)
    # roles swapped: the predicted lesion is covered wholly, but the reference lesion it hits lies 88-90 %
    # outside the prediction (> beta 70 %), so the predicted lesion is not a true positive
    assert r["tp_pred"] == 0 and r["lesion_ppv"] == 0.0


def test_beta_prediction_mostly_outside_does_not_detect():
    ref = cube(S, (5, 5, 5), (2, 2, 2))  # 8 voxels
    pred = cube(S, (5, 5, 5), (2, 2, 10))  # 40 voxels, 8 inside: 80 % outside > beta 70 %
    r = anima_detection(ref, pred, (1, 1, 1))
    assert r["tp_ref"] == 0 and r["tp_pred"] == 1  # the reference lesion covers > 10 % of it... but 100 % of the
    # reference lesion lies inside the prediction, so with roles swapped the predicted lesion is detected
    pred2 = cube(S, (5, 5, 5), (2, 2, 6))  # 24 voxels, 16 outside = 67 % <= 70 %
    assert anima_detection(ref, pred2, (1, 1, 1))["tp_ref"] == 1


def test_gamma_only_components_until_65_percent_count():
    # reference lesion of 40 voxels; predicted A covers 30 of it (clean), B covers 10 and is mostly outside
    ref = cube(S, (0, 0, 0), (2, 2, 10))
    a = cube(S, (0, 0, 0), (2, 2, 7)) & ref  # 28 voxels inside
    b = cube(S, (0, 0, 8), (2, 2, 2)) | cube(S, (0, 0, 10), (2, 2, 8))  # 8 inside + 32 outside = 80 % outside
    table = overlap_table(*_lab(ref), *_lab(a | b))
    # A accounts for 28/36 = 78 % >= 65 % of the overlap: B is never examined -> detected
    assert detected(table, 0.1, 0.7, 0.65)[0]
    # with gamma 0.9, B must be examined too and its 80 % outside fails the lesion
    assert not detected(table, 0.1, 0.7, 0.9)[0]


def _lab(m):
    import cc3d

    lab, n = cc3d.connected_components(m.astype(np.uint8), connectivity=6, return_N=True)
    return lab, n


def test_six_connectivity_and_minimum_volume():
    pred = np.zeros(S, bool)
    pred[2, 2, 2:4] = True
    pred[3, 3, 2:4] = True  # diagonal neighbour: a separate 6-connected component (2 voxels each)
    big = cube(S, (10, 10, 10), (2, 2, 1))  # 4 voxels = 4 mm3 > 3
    r = anima_detection(np.zeros(S, bool), pred | big, (1, 1, 1))
    assert r["pred_lesions"] == 1 and r["fp_lesions"] == 1 and r["fp_volume_mm3"] == 4.0  # 2-voxel ones dropped
    # with 0.5 mm3 voxels, components of floor(3/0.5)+1 = 7 voxels or more survive
    r = anima_detection(np.zeros(S, bool), big, (0.5, 1, 1))
    assert r["min_lesion_voxels"] == 7 and r["pred_lesions"] == 0


def test_undefined_ratios_and_bad_input():
    ref = cube(S, (2, 2, 2), (3, 3, 3))
    r = anima_detection(ref, np.zeros(S, bool), (1, 1, 1))
    # current Anima: an empty prediction has PPV 0 and F1 0 (not undefined)
    assert r["lesion_sensitivity"] == 0.0 and r["lesion_ppv"] == 0.0 and r["lesion_f1"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        anima_detection(ref, ref[:-1], (1, 1, 1))
    with pytest.raises(ValueError):
        anima_detection(ref, ref, (1, 1, 1), alpha=0.0)


def test_preset_msseg2(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_a = cube(S, (2, 2, 2), (3, 3, 3)) | cube(S, (12, 12, 12), (2, 2, 2))
    pred_a = cube(S, (2, 2, 2), (3, 3, 3))  # finds one of two: sens 0.5, ppv 1
    pred_b = cube(S, (5, 5, 5), (2, 2, 2))  # case without new lesions: one FP lesion of 8 mm3
    for d, a, b in ((ref_dir, ref_a, np.zeros(S, bool)), (pred_dir, pred_a, pred_b)):
        write_image(a.astype(np.uint8), (1, 1, 1), d / "a.nii.gz")
        write_image(b.astype(np.uint8), (1, 1, 1), d / "b.nii.gz")
    res = evaluate_folders(ref_dir, pred_dir, tmp_path / "r.json", preset="msseg2", progress=False)
    agg = res["aggregate"]["msseg2"]
    assert res["settings"]["connectivity"] == 6
    assert agg["cases_with_lesions"] == 1 and agg["cases_without_lesions"] == 1
    assert agg["lesion_f1_mean"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert agg["dice_mean"] == pytest.approx(2 * 27 / (35 + 27))
    assert agg["fp_lesions_mean"] == 1 and agg["fp_volume_mm3_mean"] == 8.0
    assert json.loads((tmp_path / "r.json").read_text())["per_case"]["a"]["msseg2"]["tp_ref"] == 1
