"""Voxel and lesion metrics against small volumes worked out by hand."""
import numpy as np
import pytest

from nnunet_ext.metrics.lesions import aggregate, case_metrics, hd95, lesion_counts, parse_bins


def vol(shape=(12, 12, 12)):
    return np.zeros(shape, bool)


def two_lesions():
    """Lesion A: 4 voxels (line), lesion B: 27 voxels (3x3x3 cube), far apart."""
    ref = vol()
    ref[1, 1, 1:5] = True
    ref[6:9, 6:9, 6:9] = True
    return ref


def test_missed_lesion():
    ref = two_lesions()
    pred = vol()
    pred[6:9, 6:9, 6:9] = True
    m = case_metrics(ref, pred)
    assert m["dice"] == pytest.approx(2 * 27 / (31 + 27))
    assert m["ppv"] == 1.0 and m["tpr"] == pytest.approx(27 / 31)
    assert m["avd"] == pytest.approx(4 / 31 * 100)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 1, 0)
    assert m["lesion_tpr"] == 0.5 and m["lesion_ppv"] == 1.0 and m["lesion_fdr"] == 0.0
    assert m["lesion_f1"] == pytest.approx(2 / 3)
    small, mid = m["bins"]["3-10"], m["bins"]["11-50"]
    assert (small["ref_lesions"], small["lesion_tp"], small["lesion_fn"]) == (1, 0, 1)
    assert small["lesion_tpr"] == 0.0 and small["lesion_ppv"] is None and small["lesion_f1"] == 0.0
    assert (mid["ref_lesions"], mid["lesion_tp"], mid["lesion_tpr"]) == (1, 1, 1.0)
    assert m["bins"]["51+"]["lesion_f1"] is None  # nothing of that size on either side


def test_split_lesion_counts_once_and_no_fp():
    ref = vol()
    ref[2, 2, 0:7] = True
    pred = vol()
    pred[2, 2, 0:3] = True
    pred[2, 2, 4:7] = True
    m = case_metrics(ref, pred)
    assert (m["ref_lesions"], m["pred_lesions"]) == (1, 2)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 0, 0)
    assert m["lesion_ppv"] == 1.0 and m["lesion_f1"] == 1.0
    assert m["dice"] == pytest.approx(2 * 6 / 13)


def test_merged_lesions_detect_both():
    ref = vol()
    ref[2, 2, 0:3] = True
    ref[2, 2, 4:7] = True
    pred = vol()
    pred[2, 2, 0:7] = True
    m = case_metrics(ref, pred)
    assert (m["ref_lesions"], m["pred_lesions"], m["lesion_tp"], m["lesion_fp"]) == (2, 1, 2, 0)
    assert m["lesion_tpr"] == 1.0


def test_false_positive_component():
    ref = two_lesions()
    pred = ref.copy()
    pred[10, 10, 9:11] = True
    m = case_metrics(ref, pred)
    assert (m["lesion_tp"], m["lesion_fp"], m["pred_lesions"]) == (2, 1, 3)
    assert m["lesion_ppv"] == pytest.approx(2 / 3) and m["lesion_fdr"] == pytest.approx(1 / 3)
    assert m["lesion_f1"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    # a 2-voxel FP is below every size bin: counted in the totals only
    assert sum(b["lesion_fp"] for b in m["bins"].values()) == 0


@pytest.mark.parametrize("connectivity,expected", [(26, 1), (18, 2), (6, 2)])
def test_connectivity_diagonal_neighbours(connectivity, expected):
    ref = vol()
    ref[3, 3, 3] = ref[4, 4, 4] = True  # corner neighbours: joined only under 26-connectivity
    m = lesion_counts(ref, ref, connectivity=connectivity)
    assert m["ref_lesions"] == expected


def test_connectivity_edge_neighbours():
    ref = vol()
    ref[3, 3, 3] = ref[3, 4, 4] = True  # edge neighbours: joined under 18 and 26
    assert [lesion_counts(ref, ref, connectivity=c)["ref_lesions"] for c in (6, 18, 26)] == [2, 1, 1]


@pytest.mark.parametrize("min_overlap,detected", [(0.0, 1), (0.3, 1), (0.31, 0), (0.5, 0)])
def test_min_overlap(min_overlap, detected):
    ref = vol()
    ref[5, 5, 0:10] = True  # 10 voxels
    pred = vol()
    pred[5, 5, 0:3] = True  # covers 3 of them
    m = lesion_counts(ref, pred, min_overlap=min_overlap)
    assert m["lesion_tp"] == detected and m["lesion_fn"] == 1 - detected
    assert m["lesion_fp"] == 0  # the component touches the lesion, so it is never a false positive


def test_both_empty():
    m = case_metrics(vol(), vol())
    assert (m["dice"], m["ppv"], m["tpr"], m["avd"], m["hd95"]) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert (m["lesion_tpr"], m["lesion_ppv"], m["lesion_f1"]) == (1.0, 1.0, 1.0)
    assert m["fp_volume_mm3"] == 0.0


def test_empty_reference_reports_false_positives():
    pred = vol()
    pred[0:2, 0:2, 0:2] = True
    pred[8, 8, 8:11] = True
    m = case_metrics(vol(), pred, spacing=(2.0, 1.0, 0.5))
    assert m["dice"] == 0.0 and m["ppv"] == 0.0 and m["tpr"] is None and m["avd"] is None and m["hd95"] is None
    assert (m["lesion_fp"], m["lesion_tpr"], m["lesion_ppv"]) == (2, 1.0, 0.0)
    assert m["fp_volume_mm3"] == pytest.approx(11 * 1.0)


def test_empty_prediction():
    m = case_metrics(two_lesions(), vol())
    assert m["dice"] == 0.0 and m["ppv"] is None and m["tpr"] == 0.0 and m["avd"] == 100.0 and m["hd95"] is None
    assert (m["lesion_tpr"], m["lesion_ppv"], m["lesion_f1"]) == (0.0, 1.0, 0.0)


def test_hd95_anisotropic_single_voxels():
    ref, pred = vol(), vol()
    ref[0, 0, 0] = True
    pred[2, 0, 0] = True
    assert hd95(ref, pred, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(ref, pred, spacing=(1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_hd95_percentile_of_directed_distances():
    ref, pred = vol(), vol()
    ref[0, 0, 0] = True
    pred[0, 0, 1] = pred[0, 0, 3] = True
    # pred->ref distances 0.5 and 1.5 mm: 95th percentile (linear) = 0.5 + 0.95 * 1.0 = 1.45
    # ref->pred distance 0.5 mm; HD95 is the larger directed value
    assert hd95(ref, pred, spacing=(1.0, 1.0, 0.5)) == pytest.approx(1.45)


def test_hd95_uses_surfaces_only():
    ref = vol()
    ref[2:7, 2:7, 2:7] = True  # 5^3 cube; its centre voxel is not on the surface
    pred = ref.copy()
    assert hd95(ref, pred) == 0.0
    pred[4, 4, 7] = True  # one voxel sticking out of the face z=6
    # pred surface: the cube's 98 surface voxels minus (4,4,6), which the bump makes interior, plus the bump;
    # each direction has 97 distances of 0 and one of 1 mm
    d = np.zeros(98)
    d[-1] = 1.0
    assert hd95(ref, pred) == pytest.approx(np.percentile(d, 95))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        case_metrics(vol((4, 4, 4)), vol((4, 4, 5)))


@pytest.mark.parametrize("bad", [0, 5])
def test_bad_connectivity(bad):
    with pytest.raises(ValueError, match="connectivity"):
        lesion_counts(vol(), vol(), connectivity=bad)


def test_bad_min_overlap():
    with pytest.raises(ValueError, match="min_overlap"):
        lesion_counts(vol(), vol(), min_overlap=1.5)


@pytest.mark.parametrize("text,expected", [("3-10,11-50,51+", ((3, 10), (11, 50), (51, None))), ("1-2", ((1, 2),))])
def test_parse_bins(text, expected):
    assert parse_bins(text) == expected


@pytest.mark.parametrize("text", ["3-", "a-b", "10-3", "0-4"])
def test_parse_bins_rejects(text):
    with pytest.raises(ValueError, match="bin"):
        parse_bins(text)


def test_aggregate_mean_skips_undefined_and_pools_counts():
    ref = two_lesions()
    pred = vol()
    pred[6:9, 6:9, 6:9] = True
    per_case = {"a": case_metrics(ref, pred), "b": case_metrics(vol(), vol()), "c": case_metrics(ref, vol())}
    agg = aggregate(per_case)
    assert agg["n_cases"] == 3
    assert agg["mean"]["dice"] == pytest.approx((54 / 58 + 1.0 + 0.0) / 3)
    assert agg["mean"]["hd95"] is not None and agg["mean"]["n_undefined"]["hd95"] == 1
    pooled = agg["pooled"]
    assert (pooled["ref_lesions"], pooled["lesion_tp"], pooled["lesion_fn"]) == (4, 1, 3)
    assert pooled["lesion_tpr"] == 0.25
    assert pooled["dice"] == pytest.approx(2 * 27 / (2 * 27 + 0 + 35))
    assert pooled["bins"]["3-10"]["ref_lesions"] == 2 and pooled["bins"]["3-10"]["lesion_tp"] == 0
