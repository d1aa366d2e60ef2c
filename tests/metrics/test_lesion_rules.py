"""Detection rules, size bins (voxels, mm3, half-open), the one lesion-rate helper, SoftSeg calibration:
values worked out by hand."""
import math

import numpy as np
import pytest

from nnunet_ext.metrics.lesions import (RULE_PRESETS, DetectionRule, case_metrics, lesion_counts, lesion_rates,
                                        parse_bins, parse_detection, remove_small_lesions)
from nnunet_ext.metrics.soft import (ece_probability_bins, entropy_abs_error, image_entropy, ipe_voxelwise,
                                     probability_calibration_counts, probability_reliability_diagram)


def _four_lesions():
    """Reference lesions (lines along x, far apart) and how many of their voxels the prediction covers:
    L1 10 voxels / 3 covered, L2 4 / 2, L3 4 / 3, L4 2 / 2."""
    ref = np.zeros((9, 9, 16), bool)
    pred = np.zeros_like(ref)
    for z, (size, cov) in zip((0, 2, 4, 6), ((10, 3), (4, 2), (4, 3), (2, 2))):
        ref[z, 4, 0:size] = True
        pred[z, 4, 0:cov] = True
    return ref, pred


def test_three_voxels_or_more_than_half():
    ref, pred = _four_lesions()
    m = lesion_counts(ref, pred, connectivity=18, detection="voxels>=3 or fraction>0.5")
    # L1: 3 voxels -> yes; L2: 2 voxels and exactly 50 % (not > 50 %) -> no; L3: yes; L4: 100 % -> yes
    assert (m["ref_lesions"], m["lesion_tp"], m["lesion_fn"]) == (4, 3, 1)
    assert m["lesion_tpr"] == 0.75
    assert lesion_counts(ref, pred, detection="voxels>=3")["lesion_tp"] == 2  # L1, L3
    assert lesion_counts(ref, pred, detection="fraction>0.5")["lesion_tp"] == 2  # L3, L4
    assert lesion_counts(ref, pred, detection="fraction>=50%")["lesion_tp"] == 3  # L2, L3, L4
    assert lesion_counts(ref, pred, detection="voxels>=2 and fraction>=0.5")["lesion_tp"] == 3
    assert lesion_counts(ref, pred)["lesion_tp"] == 4  # any overlap (WMH)


def test_sixty_percent_rule_and_legacy_min_overlap():
    ref = np.zeros((3, 3, 12), bool)
    ref[1, 1, 0:5] = True  # 5 voxels
    pred = np.zeros_like(ref)
    pred[1, 1, 0:3] = True  # 60 %
    assert lesion_counts(ref, pred, detection=RULE_PRESETS["focal_tversky"]["detection"])["lesion_tp"] == 1
    pred[1, 1, 2] = False  # 40 %
    assert lesion_counts(ref, pred, detection="fraction>=0.6")["lesion_tp"] == 0
    assert lesion_counts(ref, pred, min_overlap=0.4)["lesion_tp"] == 1  # ceil(0.4 * 5) = 2 voxels covered


def test_symmetric_rule_for_predicted_components():
    ref = np.zeros((3, 3, 20), bool)
    ref[1, 1, 0:3] = True
    pred = np.zeros_like(ref)
    pred[1, 1, 2:12] = True  # 10-voxel component touching the lesion with 1 voxel (10 %)
    assert lesion_counts(ref, pred)["lesion_fp"] == 0  # touches: not FP (WMH)
    assert lesion_counts(ref, pred, detection="voxels>=3 or fraction>0.5", symmetric=True)["lesion_fp"] == 1


def test_bad_rules_are_value_errors():
    for bad in ("voxels=>3", "fraction>1.5", "voxels>=3 or fraction>0.5 and voxels>1", "size>3", "voxels>=3%"):
        with pytest.raises(ValueError, match="detection rule"):
            parse_detection(bad)
    with pytest.raises(ValueError):
        DetectionRule((("fraction", ">=", 0.5),), combine="xor")


def test_half_open_and_mm3_bins():
    bins = parse_bins("[0,10),[10,400),[400,1000),[1000,inf)")
    assert bins == RULE_PRESETS["focal_tversky"]["bins"]
    ref = np.zeros((4, 12, 12), bool)
    ref[0, 0, 0:10] = True  # 10 voxels: [10, 400), not [0, 10)
    ref[2, 5, 0:9] = True  # 9 voxels: [0, 10)
    m = lesion_counts(ref, ref, bins=bins)
    assert m["bins"]["[0,10)"]["ref_lesions"] == 1 and m["bins"]["[10,400)"]["ref_lesions"] == 1
    # 1 x 1 x 3 mm voxels (3 mm3): 30 mm3 and 27 mm3
    mm = lesion_counts(ref, ref, bins=parse_bins("[0,28),[28,inf)"), size_unit="mm3", spacing=(3.0, 1.0, 1.0))
    assert mm["bins"]["[0,28)"]["ref_lesions"] == 1 and mm["bins"]["[28,inf)"]["ref_lesions"] == 1
    assert parse_bins("3-10,11-50,51+") == ((3, 10), (11, 50), (51, None))
    with pytest.raises(ValueError):
        parse_bins("[10,5)")
    with pytest.raises(ValueError):
        lesion_counts(ref, ref, size_unit="mm3")  # needs spacing


def test_one_rate_helper_conventions():
    assert lesion_rates(0, 0, 0, 0, "wmh") == {"lesion_tpr": 1.0, "lesion_ppv": 1.0, "lesion_fdr": 0.0, "lesion_f1": 1.0}
    assert lesion_rates(0, 0, 0, 3, "wmh")["lesion_f1"] == 0.0  # TPR 1, PPV 0
    assert lesion_rates(0, 0, 0, 0, "bin")["lesion_f1"] is None
    assert lesion_rates(1, 2, 0, 0, "bin") == {"lesion_tpr": 0.5, "lesion_ppv": None, "lesion_fdr": None,
                                               "lesion_f1": pytest.approx(2 / 3)}
    assert lesion_rates(0, 0, 0, 1, "anima") == {"lesion_tpr": None, "lesion_ppv": 0.0, "lesion_fdr": 1.0,
                                                 "lesion_f1": 0.0}
    assert lesion_rates(2, 4, 1, 1, "anima")["lesion_f1"] == pytest.approx(2 * 0.5 / 1.5)
    with pytest.raises(ValueError):
        lesion_rates(3, 2, 0, 0)


def test_remove_small_lesions_by_volume():
    m = np.zeros((3, 6, 12), bool)
    m[1, 1, 0:2] = True  # 2 voxels = 6 mm3 at 1 x 1 x 3 mm
    m[1, 4, 0:4] = True  # 4 voxels = 12 mm3
    out = remove_small_lesions(m, (3.0, 1.0, 1.0), 12.0)
    assert out.sum() == 4 and out[1, 4, 0:4].all()  # exactly 12 mm3 is kept (removed: < 12)
    assert remove_small_lesions(m, (3.0, 1.0, 1.0), 0).sum() == 6
    with pytest.raises(ValueError):
        remove_small_lesions(m, (1, 1, 1), -1)


def test_case_metrics_with_lsr_preset_rule():
    ref, pred = _four_lesions()
    p = RULE_PRESETS["lsr"]
    m = case_metrics(ref, pred, connectivity=p["connectivity"], detection=p["detection"], counting=p["counting"])
    # predicted lesions (3, 2, 3, 2 voxels): the 2 voxels in L2 are neither >= 3 nor > 50 % of it -> FP;
    # TP 3, FP 1, FN 1 (L2): F1 = 6 / (6 + 1 + 1)
    assert m["lesion_tp"] == 3 and m["lesion_fp"] == 1 and m["lesion_f1"] == pytest.approx(0.75)


def test_ece_probability_bins_ten_bins_on_unit_interval(tmp_path):
    p = np.array([0.05, 0.15, 0.95, 0.85, 1.0])
    ref = np.array([0, 1, 1, 1, 1])
    c = probability_calibration_counts(p, ref)
    assert c["count"] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 2]  # 1.0 falls in the last bin [0.9, 1]
    # gaps: 0.05, 0.85, 0.15 and, in the last bin (mean p 0.975, freq 1), 0.025 for 2 voxels
    assert ece_probability_bins(p, ref) == pytest.approx((0.05 + 0.85 + 0.15 + 2 * 0.025) / 5)
    assert ece_probability_bins(p, p) == pytest.approx(0.0, abs=1e-12)  # a soft target equal to p: calibrated
    png = probability_reliability_diagram(c, tmp_path / "rel.png", "test")
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError):
        probability_calibration_counts(p, ref, n_bins=0)
    with pytest.raises(ValueError):
        probability_calibration_counts(p + 1, ref)


def test_image_entropy_mae_differs_from_voxelwise():
    p = np.array([0.5, 0.0])
    s = np.array([0.0, 0.5])
    assert image_entropy(p) == pytest.approx(math.log(2))  # summed over voxels (SoftSeg thesis eq. 5.1)
    assert entropy_abs_error(p, s) == pytest.approx(0.0)  # same whole-image uncertainty
    assert ipe_voxelwise(p, s) == pytest.approx(math.log(2))  # but at other voxels
    assert entropy_abs_error(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(2 * math.log(2), abs=1e-9)
