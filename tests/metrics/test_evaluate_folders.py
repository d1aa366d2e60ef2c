"""Folder evaluation, operating-point sweep and their errors on small NIfTI files."""
import json

import numpy as np
import pytest

from nnunet_ext.cli import run
from nnunet_ext.core.io import write_image
from nnunet_ext.metrics.evaluate import evaluate_folders
from nnunet_ext.metrics.operating_points import sweep, write_sweep


def _ref():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 1  # 27 voxels
    ref[7, 7, 6:10] = 1  # 4 voxels
    return ref


@pytest.fixture
def folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = _ref()
    pred = np.zeros_like(ref)
    pred[1:4, 1:4, 1:4] = 1
    write_image(ref, (2.0, 1.0, 1.0), ref_dir / "case_a.nii.gz")
    write_image(pred, (2.0, 1.0, 1.0), pred_dir / "case_a.nii.gz")
    write_image(np.zeros_like(ref), (2.0, 1.0, 1.0), ref_dir / "case_b.nii.gz")
    write_image(np.zeros_like(ref), (2.0, 1.0, 1.0), pred_dir / "case_b.nii.gz")
    return ref_dir, pred_dir


def test_evaluate_folders_writes_json_and_csv(folders, tmp_path):
    ref_dir, pred_dir = folders
    out = tmp_path / "res" / "results.json"
    res = evaluate_folders(ref_dir, pred_dir, out, progress=False)
    saved = json.loads(out.read_text())
    a = saved["per_case"]["case_a"]
    assert a["dice"] == pytest.approx(54 / 58) and a["lesion_tp"] == 1 and a["lesion_fn"] == 1
    assert a["ref_volume_mm3"] == pytest.approx(31 * 2.0)
    assert saved["per_case"]["case_b"]["dice"] == 1.0
    assert saved["aggregate"]["mean"]["dice"] == pytest.approx((54 / 58 + 1) / 2)
    assert saved["aggregate"]["pooled"]["lesion_tpr"] == 0.5
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,dice,")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["case_a", "case_b", "mean", "pooled"]
    assert "bins.3-10.lesion_tpr" in csv_lines[0]
    assert res["aggregate"] == saved["aggregate"]


def test_missing_prediction_is_error_naming_file(folders):
    ref_dir, pred_dir = folders
    (pred_dir / "case_b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_b.nii.gz"):
        evaluate_folders(ref_dir, pred_dir, progress=False)
    res = evaluate_folders(ref_dir, pred_dir, allow_missing=True, progress=False)
    assert res["per_case"]["case_b"]["prediction_missing"] is True
    assert res["per_case"]["case_b"]["dice"] == 1.0  # empty reference, counted as empty prediction
    assert res["settings"]["missing_predictions"] == ["case_b"]


def test_shape_mismatch_names_file(folders):
    ref_dir, pred_dir = folders
    write_image(np.zeros((10, 10, 9), np.uint8), (2.0, 1.0, 1.0), pred_dir / "case_a.nii.gz")
    with pytest.raises(ValueError, match=r"shape mismatch: .*pred/case_a.nii.gz"):
        evaluate_folders(ref_dir, pred_dir, progress=False)


def test_spacing_mismatch_names_file(folders):
    ref_dir, pred_dir = folders
    write_image(np.zeros((10, 10, 10), np.uint8), (1.0, 1.0, 1.0), pred_dir / "case_b.nii.gz")
    with pytest.raises(ValueError, match=r"spacing mismatch: .*case_b.nii.gz"):
        evaluate_folders(ref_dir, pred_dir, progress=False)


def test_non_binary_mask_is_error_unless_label_selected(folders):
    ref_dir, pred_dir = folders
    multi = _ref() * 2
    write_image(multi, (2.0, 1.0, 1.0), pred_dir / "case_a.nii.gz")
    with pytest.raises(ValueError, match=r"pred/case_a.nii.gz: expected a binary mask"):
        evaluate_folders(ref_dir, pred_dir, progress=False)
    write_image(multi, (2.0, 1.0, 1.0), ref_dir / "case_a.nii.gz")
    res = evaluate_folders(ref_dir, pred_dir, label=2, progress=False)
    assert res["per_case"]["case_a"]["dice"] == 1.0


def test_cli_evaluate_bad_input_exit_code(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    (pred_dir / "case_a.nii.gz").unlink()
    with pytest.raises(FileNotFoundError):
        run(["evaluate", "--ref", str(ref_dir), "--pred", str(pred_dir), "-o", str(tmp_path / "r.json")])
    assert run(["evaluate", "--ref", str(ref_dir), "--pred", str(pred_dir), "-o", str(tmp_path / "r.json"),
                "--allow-missing", "--bins", "1-5,6+", "--connectivity", "6"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_case"]["case_a"]["bins"]) == {"1-5", "6+"} and res["settings"]["connectivity"] == 6


def _prob_case(tmp_path):
    """Big lesion at p=0.9, small lesion at p=0.3, an 8-voxel false positive at p=0.6."""
    ref = _ref()
    prob = np.zeros((2,) + ref.shape, np.float32)
    prob[1][1:4, 1:4, 1:4] = 0.9
    prob[1][7, 7, 6:10] = 0.3
    prob[1][6:8, 0:2, 0:2] = 0.6
    prob[0] = 1 - prob[1]
    write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / "c1.nii.gz")
    (tmp_path / "prob").mkdir()
    np.savez_compressed(tmp_path / "prob" / "c1.npz", probabilities=prob)
    return tmp_path / "ref", tmp_path / "prob"


def test_operating_points_hand_computed(tmp_path):
    ref_dir, prob_dir = _prob_case(tmp_path)
    res = sweep(ref_dir, prob_dir, thresholds=[0.8, 0.2, 0.5], progress=False)
    assert res["thresholds"] == [0.2, 0.5, 0.8]
    p02, p05, p08 = res["points"]
    assert (p02["lesion_tp"], p02["lesion_fp"]) == (2, 1) and p02["lesion_f1"] == pytest.approx(0.8)
    assert (p05["lesion_tp"], p05["lesion_fp"]) == (1, 1) and p05["lesion_f1"] == pytest.approx(0.5)
    assert (p08["lesion_tp"], p08["lesion_fp"]) == (1, 0) and p08["lesion_f1"] == pytest.approx(2 / 3)
    assert p02["voxel_f1"] == pytest.approx(62 / 70) and p05["voxel_f1"] == pytest.approx(54 / 66)
    assert p08["voxel_f1"] == pytest.approx(54 / 58)
    assert p05["voxel_fdr"] == pytest.approx(8 / 35) and p05["voxel_tpr"] == pytest.approx(27 / 31)
    assert p05["bins"]["3-10"]["lesion_tpr"] == 0.0 and p02["bins"]["3-10"]["lesion_tpr"] == 1.0
    assert p05["bins"]["3-10"]["lesion_fdr"] == 1.0  # the 8-voxel FP is the only 3-10 prediction
    assert res["best_segmentation"]["threshold"] == 0.8 and res["best_detection"]["threshold"] == 0.2
    assert res["threshold_gap"] == pytest.approx(0.6)


def test_operating_points_png(tmp_path):
    ref_dir, prob_dir = _prob_case(tmp_path)
    res = sweep(ref_dir, prob_dir, progress=False)
    write_sweep(res, tmp_path / "ops.json", tmp_path / "ops.png")
    png = (tmp_path / "ops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    assert json.loads((tmp_path / "ops.json").read_text())["best_detection"]["threshold"] == \
        res["best_detection"]["threshold"]


def test_operating_points_rejects_bad_probabilities(tmp_path):
    ref_dir, prob_dir = _prob_case(tmp_path)
    np.savez_compressed(prob_dir / "c1.npz", probabilities=np.full((2, 10, 10, 10), 1.5, np.float32))
    with pytest.raises(ValueError, match="c1.npz: probabilities must be finite and in"):
        sweep(ref_dir, prob_dir, progress=False)
    np.savez_compressed(prob_dir / "c1.npz", probabilities=np.zeros((2, 10, 10, 9), np.float32))
    with pytest.raises(ValueError, match="shape mismatch"):
        sweep(ref_dir, prob_dir, progress=False)
    with pytest.raises(ValueError, match="thresholds"):
        sweep(ref_dir, prob_dir, thresholds=[0.0, 0.5], progress=False)


def test_soft_metrics_by_hand():
    from nnunet_ext.metrics.soft import brier, calibration_counts, ece_from_counts, ipe, soft_dice, volume_pearson

    p = np.array([0.9, 0.6, 0.2, 0.0])
    s = np.array([1.0, 0.5, 0.5, 0.0])
    assert soft_dice(p, s) == pytest.approx(2 * (0.9 + 0.3 + 0.1) / (1.7 + 2.0))
    assert brier(p, s) == pytest.approx((0.01 + 0.01 + 0.09 + 0) / 4)
    h = lambda q: 0.0 if q in (0.0, 1.0) else -(q * np.log(q) + (1 - q) * np.log(1 - q))  # noqa: E731
    assert ipe(p, s) == pytest.approx(np.mean([abs(h(a) - h(b)) for a, b in zip(p, s)]), abs=1e-9)
    ref = np.array([1, 1, 0, 0])
    # confidences 0.9, 0.6, 0.8, 1.0 -> bins (10 over [0.5, 1]) 8, 2, 6, 9; all four predictions correct
    c = calibration_counts(p, ref)
    assert [i for i, n in enumerate(c["count"]) if n] == [2, 6, 8, 9]
    # ECE = 1/4 (|1-0.6| + |1-0.8| + |1-0.9| + |1-1|) = 0.175
    assert ece_from_counts(c) == pytest.approx(0.175)
    assert volume_pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and volume_pearson([1], [2]) is None


def test_evaluate_with_probabilities_and_soft_reference(tmp_path):
    ref_dir, prob_dir = _prob_case(tmp_path)
    pred = (np.load(prob_dir / "c1.npz")["probabilities"][1] >= 0.5).astype(np.uint8)
    write_image(pred, (1.0, 1.0, 1.0), tmp_path / "pred" / "c1.nii.gz")
    write_image(_ref().astype(np.float32) * 0.8, (1.0, 1.0, 1.0), tmp_path / "soft" / "c1.nii.gz")
    assert run(["evaluate", "--ref", str(ref_dir), "--pred", str(tmp_path / "pred"), "--prob", str(prob_dir),
                "--soft-ref", str(tmp_path / "soft"), "-o", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    c = res["per_case"]["c1"]
    p = np.load(prob_dir / "c1.npz")["probabilities"][1].astype(np.float64)
    s = _ref() * 0.8
    assert c["soft_dice"] == pytest.approx(2 * (p * s).sum() / (p.sum() + s.sum()), rel=1e-5)
    assert c["brier"] == pytest.approx(((p - s) ** 2).mean(), rel=1e-5) and c["ipe_voxelwise"] > 0
    assert res["aggregate"]["pooled"]["ece"] == pytest.approx(c["ece"])
    assert (tmp_path / "r.reliability.png").stat().st_size > 10000


def _cli(capsys, *args):
    from nnunet_ext.core.errors import run_cli

    rc = run_cli(run, [str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return rc, (lines[-1] if lines else "")


def _digest(*folders):
    import hashlib

    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def test_geometry_values_labels_thresholds_and_outputs_are_checked(folders, tmp_path, capsys):
    """Issue 16's silent cases: each is now exit 2 with one line naming the file or option, inputs untouched."""
    import SimpleITK as sitk

    ref_dir, pred_dir = folders
    ref = sitk.ReadImage(str(ref_dir / "case_a.nii.gz"))
    bad = {}
    for what, change in (("origin", lambda im: im.SetOrigin((5.0, 0.0, 0.0))),
                         ("direction", lambda im: im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)))):
        d = tmp_path / f"pred_{what}"
        d.mkdir()
        for case in ("case_a", "case_b"):
            im = sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))
            change(im)
            sitk.WriteImage(im, str(d / f"{case}.nii.gz"), True)
        bad[what] = d
    prob = tmp_path / "prob"  # NIfTI probability maps and soft references on another spacing
    soft = tmp_path / "soft"
    for case in ("case_a", "case_b"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_dir / f"{case}.nii.gz"))).astype(np.float32)
        write_image(arr * 0.9, (1.0, 1.0, 1.0), prob / f"{case}.nii.gz")
        write_image(arr * 0.5, (1.0, 1.0, 1.0), soft / f"{case}.nii.gz")
    good_prob = tmp_path / "good_prob"
    for case in ("case_a", "case_b"):
        im = sitk.Cast(sitk.ReadImage(str(ref_dir / f"{case}.nii.gz")), sitk.sitkFloat32)
        good_prob.mkdir(exist_ok=True)
        sitk.WriteImage(im, str(good_prob / f"{case}.nii.gz"), True)
    before = _digest(tmp_path)
    out = tmp_path / "out" / "r.json"
    for args, needle in (
            (["evaluate", "--ref", ref_dir, "--pred", bad["origin"], "-o", out], "origin mismatch: the prediction"),
            (["evaluate", "--ref", ref_dir, "--pred", bad["direction"], "-o", out], "direction mismatch"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "--prob", prob, "-o", out],
             "spacing mismatch: the probability map"),
            (["operating-points", "--ref", ref_dir, "--prob", prob, "-o", out], "spacing mismatch: the probability map"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "--prob", good_prob, "--soft-ref", soft, "-o", out],
             "soft/case_a.nii.gz has spacing"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "--label", 7, "-o", out], "--label 7: no reference"),
            (["operating-points", "--ref", ref_dir, "--prob", good_prob, "--label", 7, "-o", out], "--label 7"),
            (["operating-points", "--ref", ref_dir, "--prob", good_prob, "--thresholds", "nan", "-o", out],
             "--thresholds must be finite"),
            (["operating-points", "--ref", ref_dir, "--prob", good_prob, "--thresholds", 0.5, 1, "-o", out],
             "--thresholds must lie strictly between 0 and 1"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "--soft-ref", soft, "-o", out], "--soft-ref without --prob"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "-o", ref_dir / "case_a.nii.gz"], "lies inside the input"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "-o", pred_dir / "r.json"], "lies inside the input"),
            (["operating-points", "--ref", ref_dir, "--prob", good_prob, "-o", out, "--png", good_prob / "c.png"],
             "lies inside the input")):
        rc, line = _cli(capsys, *args)
        assert rc == 2 and line.startswith("nnunet-ext: error:") and needle in line, (args[0], needle, rc, line)
    assert _digest(tmp_path) == before and not out.exists()
    # soft references: same grid, values outside [0, 1] named with the file
    soft2 = tmp_path / "soft2"
    for case in ("case_a", "case_b"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_dir / f"{case}.nii.gz"))).astype(np.float32)
        write_image(arr * 1.5, (2.0, 1.0, 1.0), soft2 / f"{case}.nii.gz")
    rc, line = _cli(capsys, "evaluate", "--ref", ref_dir, "--pred", pred_dir, "--prob", good_prob, "--soft-ref", soft2,
                    "-o", out)
    assert rc == 2 and "soft2/case_a.nii.gz: soft reference values must be finite and in [0, 1]" in line, line


def test_output_paths_2d_masks_and_damaged_npz_are_one_clear_line(folders, tmp_path, capsys):
    import shutil

    ref_dir, pred_dir = folders
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    two_d = tmp_path / "two_d"
    write_image(np.zeros((10, 10), np.uint8), (1.0, 1.0), two_d / "case_a.nii.gz")
    write_image(np.zeros((10, 10), np.uint8), (1.0, 1.0), two_d / "case_b.nii.gz")
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez_compressed(npz / "case_a.npz", probabilities=np.zeros((2, 10, 10, 10), np.float32))
    (npz / "case_a.npz").write_bytes((npz / "case_a.npz").read_bytes()[:100])
    shutil.copy(npz / "case_a.npz", npz / "case_b.npz")
    for args, needle in (
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "-o", tmp_path / "adir"], "adir is a folder; give a file"),
            (["evaluate", "--ref", ref_dir, "--pred", pred_dir, "-o", tmp_path / "afile" / "r.json"],
             "afile is a file, not a folder"),
            (["operating-points", "--ref", ref_dir, "--prob", npz, "-o", tmp_path / "o.json"],
             "case_a.npz: damaged .npz file"),
            (["evaluate", "--ref", two_d, "--pred", two_d, "-o", tmp_path / "r.json"],
             "two_d/case_a.nii.gz: a 2-D image"),
            (["evaluate", "--ref", two_d, "--pred", two_d, "--preset", "wmh2017", "-o", tmp_path / "r.json"],
             "two_d/case_a.nii.gz: a 2-D image")):
        rc, line = _cli(capsys, *args)
        assert rc == 2 and line.startswith("nnunet-ext: error:") and needle in line, (needle, rc, line)
