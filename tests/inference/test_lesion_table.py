"""Per-lesion table and voxel entropy of `nnunet-ext predict --lesion-table --uncertainty`
(nnunet_ext.inference.lesion_table, nnunet_ext.inference.uncertainty): hand-worked values on a small
synthetic case, world coordinates against SimpleITK, and one end-to-end run through the command."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.inference.lesion_table import (CASE_COLUMNS, LESION_COLUMNS, Geometry, case_lesions, export_extras,
                                               index_to_world, write_lesion_tables)
from nnunet_ext.inference.uncertainty import binary_entropy, entropy, lesion_probability

# The synthetic case: array (z, y, x) = (4, 5, 6); spacing (x, y, z) = (0.5, 0.8, 2.0) mm, voxel volume 0.8 mm^3;
# origin (10, -20, 30); direction = rotation by 90 degrees about z (row-major: x axis -> world y, y axis -> -world x).
SHAPE = (4, 5, 6)
SPACING = (0.5, 0.8, 2.0)
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
# lesion 1 (first in z, y, x order): (1,1,1) p=0.9, (1,1,2) p=0.6, (1,2,1) p=0.75 -- an L of 3 voxels
# lesion 2: (2,4,5) p=0.5, (3,4,5) p=1.0 -- 2 voxels along z
LESION_1 = {(1, 1, 1): 0.9, (1, 1, 2): 0.6, (1, 2, 1): 0.75}
LESION_2 = {(2, 4, 5): 0.5, (3, 4, 5): 1.0}


def H(p):
    """Binary entropy in nats, written out (0 ln 0 = 0)."""
    return -sum(v * math.log(v) for v in (p, 1 - p) if v > 0)


def synthetic_case():
    p1 = np.zeros(SHAPE, np.float32)
    for (z, y, x), p in {**LESION_1, **LESION_2}.items():
        p1[z, y, x] = p
    p1[0, 0, 5] = 0.3  # lesion probability outside the mask: in no lesion's statistics
    mask = np.zeros(SHAPE, np.uint8)
    for z, y, x in {**LESION_1, **LESION_2}:
        mask[z, y, x] = 1
    prob = np.stack([1 - p1, p1])
    return prob, mask


def geometry():
    return Geometry(SPACING, ORIGIN, DIRECTION)


def sitk_world(index_xyz):
    """World point of a continuous index (x, y, z) by SimpleITK itself."""
    img = sitk.Image(SHAPE[2], SHAPE[1], SHAPE[0], sitk.sitkUInt8)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in index_xyz))


def test_entropy_by_hand():
    # H(0.9) = 0.9*0.1053605 + 0.1*2.3025851 = 0.3250830; H(0.5) = ln 2 = 0.6931472; H(0) = H(1) = 0
    prob = np.array([[0.1, 0.5, 1.0, 0.0], [0.9, 0.5, 0.0, 1.0]], np.float32)
    assert entropy(prob) == pytest.approx([0.3250830, 0.6931472, 0.0, 0.0], abs=1e-6)
    assert binary_entropy(np.float32([0.9, 0.5, 0.0, 1.0])) == pytest.approx([0.3250830, 0.6931472, 0, 0], abs=1e-6)
    # three classes (0.2, 0.3, 0.5): 0.2*1.6094379 + 0.3*1.2039728 + 0.5*0.6931472 = 1.0296530
    three = np.array([[0.2], [0.3], [0.5]], np.float32)
    assert entropy(three) == pytest.approx([1.0296530], abs=1e-6)
    # the lesion probability of a 3-class model is any foreground: 0.3 + 0.5
    assert lesion_probability(three) == pytest.approx([0.8], abs=1e-6)
    # a SoftSeg soft map Q: the entropy of (1 - Q, Q) is its binary entropy
    q = np.float32([0.0, 0.25, 0.75, 1.0])
    assert entropy(np.stack([1 - q, q])) == pytest.approx(binary_entropy(q), abs=1e-7)
    with pytest.raises(ValueError, match="prob"):
        entropy(np.ones((1, 3), np.float32))


def test_world_coordinates_against_simpleitk():
    idx_zyx = np.array([[1.0, 4 / 3, 4 / 3], [2.5, 4.0, 5.0], [0.0, 0.0, 0.0], [3.0, 4.0, 5.0]])
    ours = index_to_world(idx_zyx, geometry())
    for (z, y, x), w in zip(idx_zyx, ours):
        assert w == pytest.approx(sitk_world((x, y, z)), abs=1e-9)


def test_two_lesions_by_hand(tmp_path):
    prob, mask = synthetic_case()
    ent = entropy(prob)
    rows, case_row = case_lesions("c1", mask, lesion_probability(prob), ent, geometry(), connectivity=26)
    assert [r["lesion"] for r in rows] == [1, 2]
    a, b = rows
    # voxels and volume (0.5 * 0.8 * 2.0 = 0.8 mm^3 per voxel)
    assert (a["voxels"], b["voxels"]) == (3, 2)
    assert a["volume_mm3"] == pytest.approx(2.4) and b["volume_mm3"] == pytest.approx(1.6)
    # centroids: lesion 1 index (z, y, x) = (1, 4/3, 4/3) -> scaled (x, y, z) = (2/3, 16/15, 2) -> rotated
    # (-16/15, 2/3, 2) -> + origin = (8.933333, -19.333333, 32); lesion 2 (2.5, 4, 5) -> (2.5, 3.2, 5) ->
    # (-3.2, 2.5, 5) -> (6.8, -17.5, 35)
    assert (a["x_mm"], a["y_mm"], a["z_mm"]) == pytest.approx((10 - 16 / 15, -20 + 2 / 3, 32.0), abs=1e-6)
    assert (b["x_mm"], b["y_mm"], b["z_mm"]) == pytest.approx((6.8, -17.5, 35.0), abs=1e-6)
    # ... and SimpleITK's own transform of the same continuous indices (x, y, z)
    assert (a["x_mm"], a["y_mm"], a["z_mm"]) == pytest.approx(sitk_world((4 / 3, 4 / 3, 1.0)), abs=1e-6)
    assert (b["x_mm"], b["y_mm"], b["z_mm"]) == pytest.approx(sitk_world((5.0, 4.0, 2.5)), abs=1e-6)
    # probabilities: lesion 1 mean (0.9 + 0.6 + 0.75) / 3 = 0.75, max 0.9; lesion 2 mean 0.75, max 1.0
    assert (a["mean_probability"], a["max_probability"]) == pytest.approx((0.75, 0.9), abs=1e-6)
    assert (b["mean_probability"], b["max_probability"]) == pytest.approx((0.75, 1.0), abs=1e-6)
    # mean entropy: lesion 1 (H(0.9) + H(0.6) + H(0.75)) / 3 = (0.3250830 + 0.6730117 + 0.5623351) / 3 = 0.5201433;
    # lesion 2 (ln 2 + 0) / 2 = 0.3465736
    assert a["mean_entropy"] == pytest.approx(0.5201433, abs=2e-6)
    assert a["mean_entropy"] == pytest.approx((H(0.9) + H(0.6) + H(0.75)) / 3, abs=2e-6)
    assert b["mean_entropy"] == pytest.approx(0.3465736, abs=2e-6)
    assert case_row == {"case": "c1", "lesions": 2, "voxels": 5, "volume_mm3": pytest.approx(4.0)}

    # the same through the export step's helper (nnU-Net's case properties, as the predictor passes them)
    props = {"sitk_stuff": {"spacing": SPACING, "origin": ORIGIN, "direction": DIRECTION}}
    ent2, extra = export_extras("c1", prob, mask, props, connectivity=26)
    assert np.array_equal(ent2, ent) and extra["lesions"] == rows and extra["case_row"] == case_row

    # written as CSV (and read back as text)
    lesions_csv, cases_csv = write_lesion_tables(tmp_path, rows, [case_row])
    with open(lesions_csv) as f:
        back = list(csv.DictReader(f))
    assert tuple(back[0]) == LESION_COLUMNS and len(back) == 2
    assert back[0]["case"] == "c1" and back[0]["voxels"] == "3" and float(back[0]["volume_mm3"]) == pytest.approx(2.4)
    assert float(back[1]["z_mm"]) == pytest.approx(35.0) and float(back[1]["max_probability"]) == 1.0
    with open(cases_csv) as f:
        cases = list(csv.DictReader(f))
    assert tuple(cases[0]) == CASE_COLUMNS
    assert cases == [{"case": "c1", "lesions": "2", "voxels": "5", "volume_mm3": "4.0"}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_case_without_lesion_has_a_case_row_and_no_lesion_row(tmp_path):
    prob, mask = synthetic_case()
    rows, case_row = case_lesions("c1", mask, lesion_probability(prob), entropy(prob), geometry())
    empty_rows, empty_row = case_lesions("c0", np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32), None,
                                         geometry())
    assert empty_rows == [] and empty_row == {"case": "c0", "lesions": 0, "voxels": 0, "volume_mm3": 0.0}
    lesions_csv, cases_csv = write_lesion_tables(tmp_path, rows + empty_rows, [case_row, empty_row])
    with open(cases_csv) as f:
        cases = {r["case"]: r for r in csv.DictReader(f)}
    assert cases["c0"] == {"case": "c0", "lesions": "0", "voxels": "0", "volume_mm3": "0.0"}
    assert cases["c1"]["lesions"] == "2"
    with open(lesions_csv) as f:
        assert {r["case"] for r in csv.DictReader(f)} == {"c1"}
    # a table of empty cases only: the header line and nothing else
    write_lesion_tables(tmp_path / "only_empty", [], [empty_row])
    assert (tmp_path / "only_empty" / "lesions.csv").read_text() == ",".join(LESION_COLUMNS) + "\n"


def test_connectivity_of_the_contract_decides_what_one_lesion_is():
    # two voxels touching along an edge in the (y, x) plane: one lesion with 18- or 26-connectivity, two with 6
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 1, 1] = mask[1, 2, 2] = 1
    p = mask.astype(np.float32)
    assert case_lesions("c", mask, p, None, geometry(), 26)[1]["lesions"] == 1
    assert case_lesions("c", mask, p, None, geometry(), 18)[1]["lesions"] == 1
    rows, row = case_lesions("c", mask, p, None, geometry(), 6)
    assert row["lesions"] == 2 and [r["voxels"] for r in rows] == [1, 1] and rows[0]["mean_entropy"] == ""
    with pytest.raises(ValueError, match="connectivity"):
        case_lesions("c", mask, p, None, geometry(), 8)
    with pytest.raises(ValueError, match="probability shape"):
        case_lesions("c", mask, p[:2], None, geometry(), 26)


# ----------------------------------------------------------------------------------------------- end to end


def _same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


def _independent_lesions(mask_img: sitk.Image, soft_img: sitk.Image, ent_img: sitk.Image) -> list[tuple]:
    """(voxels, volume, centroid x, y, z, mean p, max p, mean H) per 26-connected component, by SimpleITK alone."""
    cc = sitk.ConnectedComponent(sitk.Cast(mask_img > 0, sitk.sitkUInt8), True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(cc)
    ps, hs = sitk.LabelStatisticsImageFilter(), sitk.LabelStatisticsImageFilter()
    ps.Execute(soft_img, cc)
    hs.Execute(ent_img, cc)
    vv = float(np.prod(mask_img.GetSpacing()))
    return sorted((shape.GetNumberOfPixels(k), shape.GetNumberOfPixels(k) * vv, *shape.GetCentroid(k), ps.GetMean(k),
                   ps.GetMaximum(k), hs.GetMean(k)) for k in shape.GetLabels())


def _check_outputs(pred, cases, soft_ref):
    """Per case: the entropy map's geometry is the mask's, it is the binary entropy of the soft map and ~0 where
    the soft map is ~0 or ~1, the soft map equals ``soft_ref`` (the flags change no prediction), and the
    lesion table's rows equal SimpleITK's components and statistics. Returns (lesions, near-certain voxels)."""
    with open(pred / "lesions.csv") as f:
        table = list(csv.DictReader(f))
    with open(pred / "cases.csv") as f:
        case_rows = {r["case"]: r for r in csv.DictReader(f)}
    assert sorted(case_rows) == cases
    n_lesions, near_certain = 0, 0
    for c in cases:
        mask_img = sitk.ReadImage(str(pred / f"{c}.nii.gz"))
        soft_img = sitk.ReadImage(str(pred / "soft" / f"{c}.nii.gz"))
        ent_img = sitk.ReadImage(str(pred / f"{c}_entropy.nii.gz"))
        assert ent_img.GetPixelID() == sitk.sitkFloat32
        _same_geometry(ent_img, mask_img)
        soft, ent = sitk.GetArrayFromImage(soft_img), sitk.GetArrayFromImage(ent_img)
        assert np.allclose(soft, soft_ref[c], atol=1e-6)
        # two-class softmax model: entropy = -q ln q - (1 - q) ln(1 - q) of the lesion probability q
        q = soft.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nan_to_num(q * np.log(q)) - np.nan_to_num((1 - q) * np.log(1 - q))
        assert np.allclose(ent, h, atol=1e-5)
        sure = (q < 1e-2) | (q > 1 - 1e-2)
        near_certain += int(sure.sum())
        if sure.any():  # zero-ish where p is ~0 or ~1: at most H(0.01) = 0.0560 nats (ln 2 = 0.693 at p = 0.5)
            assert ent[sure].max() <= H(1e-2) + 1e-5
        assert ent.max() <= math.log(2) + 1e-6
        # the table's rows against SimpleITK's components, shape and label statistics
        ours = sorted((int(r["voxels"]), float(r["volume_mm3"]), float(r["x_mm"]), float(r["y_mm"]),
                       float(r["z_mm"]), float(r["mean_probability"]), float(r["max_probability"]),
                       float(r["mean_entropy"])) for r in table if r["case"] == c)
        theirs = _independent_lesions(mask_img, soft_img, ent_img)
        assert len(ours) == len(theirs) == int(case_rows[c]["lesions"])
        for o, t in zip(ours, theirs):
            assert o == pytest.approx(t, abs=2e-5)
        assert int(case_rows[c]["voxels"]) == int((sitk.GetArrayFromImage(mask_img) > 0).sum())
        n_lesions += len(ours)
    return n_lesions, near_certain


@pytest.mark.slow
@pytest.mark.heavy  # a training and two predictions (about 25 s): CI's heavy part
def test_predict_uncertainty_and_lesion_table_end_to_end(planned_phantom, tmp_path):
    from conftest import PLANNED_ID, run_nnunet
    from nnunet_ext.core.paths import nnunet_command

    work, env, root = planned_phantom
    trainer = "LSRTrainer"  # cross-entropy with the class-prior output bias: probabilities near 0 from the start
    model = work / "nnUNet_results" / root.name / f"{trainer}__nnUNetPlans__2d"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():  # else another test trained it already
        run_nnunet([nnunet_command("nnUNetv2_train"), str(PLANNED_ID), "2d", "0", "-tr", trainer, "-device", "cpu"],
                   env)
    ext = nnunet_command("nnunet-ext")
    base = ["predict", "-i", str(root / "imagesTs"), "-d", str(PLANNED_ID)]
    model_args = ["-c", "2d", "-tr", trainer, "-f", "0", "-device", "cpu"]
    plain, pred, ens = tmp_path / "plain", tmp_path / "pred", tmp_path / "ensemble"
    run_nnunet([ext, *base, *model_args, "-o", str(plain)], env)
    cases = sorted(p.name[:-7] for p in (plain / "soft").glob("*.nii.gz"))
    assert len(cases) == 2
    soft_plain = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(plain / "soft" / f"{c}.nii.gz"))) for c in cases}
    # a threshold that makes some lesions of this briefly trained model: its 99.8th percentile
    th = float(np.clip(np.quantile(np.concatenate([s.ravel() for s in soft_plain.values()]), 0.998), 1e-3, 0.99))
    run_nnunet([ext, *base, *model_args, "-o", str(pred), "--uncertainty", "--lesion-table", "--threshold", repr(th)],
               env)
    summary = json.loads((pred / "nnunet_ext_predict.json").read_text())
    assert summary["cases"] == cases  # the entropy maps are not counted as cases
    assert "nats" in summary["uncertainty"]["definition"]
    n_lesions, near_certain = _check_outputs(pred, cases, soft_plain)
    assert near_certain > 0 and n_lesions > 0

    # an ensemble through --selection (the same model twice: the mean map is the model's own soft map)
    name = model.name
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"best": {"members": [name, name], "folds": [0], "threshold": th,
                                        "min_lesion_mm3": 0.0, "connectivity": 26, "metric": "test"}}))
    run_nnunet([ext, *base, "-device", "cpu", "--selection", str(sel), "-o", str(ens), "--uncertainty",
                "--lesion-table"], env)
    assert json.loads((ens / "nnunet_ext_predict.json").read_text())["cases"] == cases
    assert _check_outputs(ens, cases, soft_plain) == (n_lesions, near_certain)


def test_predict_options_parse():
    from nnunet_ext.cli import build_parser

    args = build_parser().parse_args(["predict", "-i", "in", "-o", "out", "-d", "1", "-c", "2d", "--uncertainty",
                                      "--lesion-table"])
    assert args.uncertainty and args.lesion_table
    args = build_parser().parse_args(["predict", "-i", "in", "-o", "out", "-d", "1", "-c", "2d"])
    assert not args.uncertainty and not args.lesion_table


def test_submission_names_its_entropy_maps_after_the_challenge_outputs():
    from pathlib import Path

    from nnunet_ext.workflows.submission.runner import _beside

    assert _beside(Path("/output/result.nii.gz"), "_entropy") == Path("/output/result_entropy.nii.gz")
    assert _beside(Path("/o/case1_mask.nii.gz"), "_entropy") == Path("/o/case1_mask_entropy.nii.gz")
    assert _beside(Path("/o/c.mha"), "_entropy") == Path("/o/c_entropy.mha")
