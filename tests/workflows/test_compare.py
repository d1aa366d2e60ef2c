"""nnunet-ext compare: bootstrap and report logic against hand-computed values; one real end-to-end comparison
(2 arms, 2d, 1 epoch of 2 iterations) with an interrupted-then-resumed run and the bad-input errors."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from nnunet_ext.workflows import compare as cmp
from nnunet_ext.workflows.compare import (CompareConfig, case_dice, choose_thresholds, difference_sentence, mask_counts,
                                          paired_differences, statistic_arrays, statistics_on_indices, summarise)


def _case(vtp, vfp, vfn, ref, pred, tp, fp, small_ref, small_tp, small_pred=0, small_fp=0):
    """Hand-made counts of one case; the small bin is '3-10', everything else in '11+'."""
    return {"voxel_tp": vtp, "voxel_fp": vfp, "voxel_fn": vfn, "ref_lesions": ref, "pred_lesions": pred,
            "lesion_tp": tp, "lesion_fn": ref - tp, "lesion_fp": fp,
            "bins": {"3-10": {"ref_lesions": small_ref, "pred_lesions": small_pred, "lesion_tp": small_tp,
                              "lesion_fn": small_ref - small_tp, "lesion_fp": small_fp},
                     "11+": {"ref_lesions": ref - small_ref, "pred_lesions": pred - small_pred,
                             "lesion_tp": tp - small_tp, "lesion_fn": ref - small_ref - tp + small_tp,
                             "lesion_fp": fp - small_fp}}}


# two arms on the same three cases
A = [_case(8, 2, 2, 4, 4, 3, 1, 2, 1), _case(0, 0, 0, 0, 0, 0, 0, 0, 0), _case(5, 5, 0, 2, 3, 2, 1, 1, 1)]
B = [_case(9, 1, 1, 4, 4, 4, 0, 2, 2), _case(0, 2, 0, 0, 1, 0, 1, 0, 0), _case(5, 0, 0, 2, 2, 2, 0, 1, 1)]


def test_mask_counts_and_case_dice():
    ref = np.zeros((1, 12, 12), bool)
    ref[0, 1:3, 1:3] = True          # lesion of 4 voxels (small bin 3-10)
    ref[0, 6:10, 6:10] = True        # lesion of 16 voxels
    pred = np.zeros_like(ref)
    pred[0, 1, 1] = True             # hits the small lesion with 1 voxel
    pred[0, 0, 10:12] = True         # a 2-voxel false positive
    c = mask_counts(ref, pred)
    assert (c["voxel_tp"], c["voxel_fp"], c["voxel_fn"]) == (1, 2, 19)
    assert (c["ref_lesions"], c["pred_lesions"], c["lesion_tp"], c["lesion_fn"], c["lesion_fp"]) == (2, 2, 1, 1, 1)
    assert c["bins"]["3-10"]["lesion_tp"] == 1 and c["bins"]["11-50"]["lesion_fn"] == 1
    assert case_dice(c) == pytest.approx(2 / 23)
    assert case_dice(_case(0, 0, 0, 0, 0, 0, 0, 0, 0)) == 1.0


def test_summarise_by_hand():
    s = summarise(A)
    assert s["dice_mean"] == pytest.approx((16 / 20 + 1.0 + 10 / 15) / 3)
    assert s["dice_pooled"] == pytest.approx(26 / (26 + 7 + 2))
    # pooled lesions: ref 6, tp 5; pred 7, fp 2 -> ppv 5/7
    assert s["lesion_tpr"] == pytest.approx(5 / 6) and s["lesion_fdr"] == pytest.approx(2 / 7)
    assert s["lesion_f1"] == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    assert s["bins"]["3-10"]["lesion_tpr"] == pytest.approx(2 / 3)
    assert s["bins"]["3-10"]["lesion_fdr"] is None  # no predicted small component


def test_choose_thresholds_ties_go_low():
    pts = [{"threshold": 0.1, "voxel_f1": 0.5, "lesion_f1": 0.2}, {"threshold": 0.3, "voxel_f1": 0.7, "lesion_f1": 0.6},
           {"threshold": 0.5, "voxel_f1": 0.7, "lesion_f1": 0.6}, {"threshold": 0.9, "voxel_f1": 0.1, "lesion_f1": 0.8}]
    assert choose_thresholds(pts) == {"segmentation_optimal": 1, "detection_optimal": 3, "gap": 0.6}
    with pytest.raises(ValueError):
        choose_thresholds([])


def test_statistics_on_explicit_resamples():
    a = statistic_arrays(A, "3-10")
    idx = np.array([[0, 1, 2], [0, 0, 0], [1, 1, 1], [2, 2, 1]])
    s = statistics_on_indices(a, idx)
    assert s["dice"] == pytest.approx([(0.8 + 1 + 2 / 3) / 3, 0.8, 1.0, (2 / 3 + 2 / 3 + 1) / 3])
    f1_all = 2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7)
    f1_00 = 2 * 0.75 * 0.75 / 1.5  # case 0 three times: tpr 9/12, ppv 9/12
    f1_22 = 2 * 1.0 * (4 / 6) / (1 + 4 / 6)  # case 2 twice + empty case: tpr 4/4, ppv 4/6
    assert s["lesion_f1"] == pytest.approx([f1_all, f1_00, 1.0, f1_22])  # empty case alone: WMH convention, F1 1
    assert s["small_lesion_tpr"][:2] == pytest.approx([2 / 3, 0.5])
    assert np.isnan(s["small_lesion_tpr"][2])  # no small reference lesion in that resample
    assert s["small_lesion_tpr"][3] == pytest.approx(1.0)


def test_paired_differences_constant_shift_and_zero():
    a = statistic_arrays(A, "3-10")
    idx = cmp.bootstrap_indices(3, 500, seed=1)
    same = paired_differences(a, a, idx)
    for m in cmp.CI_METRICS:
        assert same[m]["difference"] == 0 and same[m]["ci"] == [0.0, 0.0] and same[m]["excludes_zero"] is False
    shifted = {k: v.copy() for k, v in a.items()}
    shifted["dice"] = a["dice"] - 0.1  # every case 0.1 lower
    d = paired_differences(shifted, a, idx)["dice"]
    assert d["difference"] == pytest.approx(-0.1) and d["ci"] == pytest.approx([-0.1, -0.1])
    assert d["excludes_zero"] is True
    noise = {k: v.copy() for k, v in a.items()}
    noise["dice"] = a["dice"] - 1e-15  # rounding noise is not a difference
    assert paired_differences(noise, a, idx)["dice"]["excludes_zero"] is False
    b = statistic_arrays(B, "3-10")
    d = paired_differences(b, a, idx)
    assert d["small_lesion_tpr"]["difference"] == pytest.approx(1.0 - 2 / 3)
    lo, hi = d["small_lesion_tpr"]["ci"]
    assert lo <= d["small_lesion_tpr"]["difference"] <= hi
    # resamples drawn from only the empty case have no small lesion: counted, not used
    assert d["small_lesion_tpr"]["undefined_resamples"] == int(np.sum((idx == 1).all(1)))


def test_paired_differences_match_enumeration():
    """All 3^3 = 27 resamples of 3 cases, each once: percentiles of the enumerated differences."""
    a, b = statistic_arrays(A, "3-10"), statistic_arrays(B, "3-10")
    idx = np.array(np.meshgrid(*[range(3)] * 3)).reshape(3, -1).T
    d = paired_differences(b, a, idx)["dice"]
    diffs = np.array([np.mean([case_dice(B[i]) - case_dice(A[i]) for i in r]) for r in idx])
    assert d["ci"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    with pytest.raises(ValueError):
        paired_differences(b, {k: v[:2] for k, v in a.items()}, idx)


def test_difference_sentence():
    diffs = {"small_lesion_tpr": {"difference": 0.25, "ci": [0.05, 0.4], "excludes_zero": True},
             "lesion_f1": {"difference": 0.01, "ci": [-0.1, 0.1], "excludes_zero": False},
             "dice": {"difference": -0.02, "ci": [-0.05, 0.01], "excludes_zero": False}}
    s = difference_sentence("LSRDiceTrainer", "ExtBaselineTrainer", diffs, 10, 21, "3-10")
    assert s.startswith("LSRDiceTrainer minus ExtBaselineTrainer: small-lesion TPR (3-10 voxels) +0.250 "
                        "(95 % CI +0.050 to +0.400)")
    assert "excludes 0 for higher small-lesion TPR" in s and "21 reference lesions of 3-10 voxels)." in s
    assert "rough guide" in difference_sentence("X", "Y", diffs, 3, 5, "3-10")
    for m in diffs:
        diffs[m]["excludes_zero"] = False
    assert "every interval includes 0: no difference is shown on these 10 cases" in \
        difference_sentence("X", "Y", diffs, 10, 21, "3-10")


def test_config_validation():
    with pytest.raises(ValueError, match="at least two"):
        CompareConfig("1", "2d", ["A"]).validate()
    with pytest.raises(ValueError, match="twice"):
        CompareConfig("1", "2d", ["A", "A"]).validate()
    with pytest.raises(NotImplementedError):
        CompareConfig("1", "2d", ["A", "B"], folds=["all"]).validate()
    with pytest.raises(ValueError, match="go together"):
        CompareConfig("1", "2d", ["A", "B"], test_images="x").validate()
    with pytest.raises(ValueError, match="positive"):
        CompareConfig("1", "2d", ["A", "B"], epochs=0).validate()


def test_report_writers(tmp_path):
    """Markdown, PNG and table from a hand-made report (the writers only format what they are given)."""
    thresholds = [0.25, 0.5, 0.75]
    # C: every voxel right, but 3 false-positive components per case with lesions
    C = [_case(10, 0, 0, 4, 7, 4, 3, 2, 2), _case(0, 0, 0, 0, 0, 0, 0, 0, 0), _case(5, 0, 0, 2, 5, 2, 3, 1, 1)]
    recs = {f"c{i}": {"sweep": [A[i], C[i], B[i]], "argmax": A[i], "model": B[i]} for i in range(3)}
    s = cmp.arm_summary(recs, thresholds)
    ops = s["operating_points"]
    # voxel F1: A 26/35, C 1, B 28/32; lesion F1: A 0.769, C 2/3, B 12/13
    assert ops["segmentation_optimal"]["threshold"] == 0.5 and ops["segmentation_optimal"]["voxel_f1"] == 1.0
    assert ops["detection_optimal"]["threshold"] == 0.75
    assert ops["detection_optimal"]["lesion_f1"] == pytest.approx(2 * (6 / 7) / (1 + 6 / 7))
    assert s["threshold_gap"] == 0.25 and ops["model"] == summarise(B)
    report = {"dataset": "Dataset1_X", "configuration": "2d", "plans": "nnUNetPlans", "folds": [0], "eval_set": "test",
              "eval_set_description": "test", "n_cases": 3, "bins": ["3-10", "11+"],
              "reference_lesions": {"3-10": 3, "11+": 3}, "budget_description": "1 x 2", "device": "cpu",
              "split_file": "s.json", "split": {"0": {"train": ["a"], "val": ["b"]}}, "thresholds": thresholds,
              "bootstrap": {"resamples": 100, "seed": 0}, "notes": [], "commands": ["nnunet-ext compare ..."],
              "arms": {n: {"training": "reused", "stored_threshold": None, "postprocessing": None,
                           "operating_points": s["operating_points"], "threshold_gap": s["threshold_gap"],
                           "points": s["points"]} for n in ("Ref", "New")},
              "files": {"curves": str(tmp_path / "curves.png")}}
    idx = cmp.bootstrap_indices(3, 200, 0)
    a = statistic_arrays(s["_per_op"]["model"], "3-10")
    report["differences"] = {"New": {op: paired_differences(a, a, idx) for op in cmp.OPERATING_POINTS}}
    report["sentences"] = {"New": "New minus Ref: ..."}
    md = cmp.write_markdown(report, tmp_path / "r.md").read_text()
    assert "| `New` | segmentation-optimal threshold |" in md and "New minus Ref" in md
    assert cmp.plot_curves(report, tmp_path / "curves.png").stat().st_size > 10000
    assert "threshold gap (seg. vs det. optimum) 0.25" in cmp.format_table(report)


def test_check_test_set(tmp_path):
    from nnunet_ext.core.io import write_image

    img, lab = tmp_path / "img", tmp_path / "lab"
    write_image(np.zeros((4, 4, 4), np.float32), (1, 1, 1), img / "a_0000.nii.gz")
    write_image(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), lab / "a.nii.gz")
    assert cmp.check_test_set(img, lab, 1, ".nii.gz") == ["a"]
    write_image(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), lab / "b.nii.gz")
    with pytest.raises(ValueError, match="label.*without image"):
        cmp.check_test_set(img, lab, 1, ".nii.gz")
    write_image(np.zeros((4, 4, 5), np.float32), (1, 1, 1), img / "b_0000.nii.gz")
    with pytest.raises(ValueError, match="do not match the images.*size"):
        cmp.check_test_set(img, lab, 1, ".nii.gz")


# ---------------------------------------------------------------------------------------------------- end to end

DATASET = 513
ARMS = ["ExtBaselineTrainer", "FocalTverskyTrainer"]  # any two budget-honouring trainers


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from nnunet_ext.core.paths import nnunet_command, nnunet_env
    from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

    work = tmp_path_factory.mktemp("compare")
    env = nnunet_env(work, n_proc=2)
    root = write_phantom_dataset(env["nnUNet_raw"], DATASET, 6, PhantomConfig(shape=(32, 32, 32), empty_fraction=0.0,
                                                                             seed=5), n_test=2, progress=False)
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"],
                   env=env, check=True, capture_output=True)
    return work, env, root


@pytest.fixture
def nnunet_environ(phantom, monkeypatch):
    work, env, root = phantom
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(k, env[k])
    return work, env, root


def _cfg(root, out, **kw):
    base = dict(dataset=str(DATASET), configuration="2d", trainers=list(ARMS), folds=[0],
                test_images=str(root / "imagesTs"), test_labels=str(root / "labelsTs"), output=str(out), epochs=1,
                iterations=2, val_iterations=1, device="cpu", n_proc=2, n_bootstrap=200)
    base.update(kw)
    return CompareConfig(**base)


@pytest.mark.slow
def test_compare_bad_input_stops_before_training(nnunet_environ, tmp_path):
    work, env, root = nnunet_environ
    results = work / "nnUNet_results"
    split = work / "nnUNet_preprocessed" / f"Dataset{DATASET}_MSPhantom" / "splits_final.json"
    if split.exists():
        split.unlink()
    # no split yet: refused unless --create-split
    with pytest.raises(FileNotFoundError, match="missing split"):
        cmp.compare(_cfg(root, tmp_path / "r"))
    # unknown trainer (nnU-Net's own lookup)
    with pytest.raises(ValueError, match="unknown trainer.*NoSuchTrainerXyz"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", "NoSuchTrainerXyz"], create_split=True))
    # nnU-Net's own trainer cannot honour the budget
    with pytest.raises(NotImplementedError, match="ExtBaselineTrainer"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["nnUNetTrainer", "LSRDiceTrainer"], create_split=True))
    # a fold the split does not have
    with pytest.raises(ValueError, match="missing split: fold"):
        cmp.compare(_cfg(root, tmp_path / "r", folds=[7], create_split=True))
    # test labels that do not match the images
    bad = tmp_path / "labels"
    shutil.copytree(root / "labelsTs", bad)
    os.rename(bad / "phantom_006.nii.gz", bad / "phantom_099.nii.gz")
    with pytest.raises(ValueError, match="test labels do not match the images"):
        cmp.compare(_cfg(root, tmp_path / "r", test_labels=str(bad), create_split=True))
    assert not any(results.glob(f"Dataset{DATASET}_*/*/fold_0/checkpoint_*.pth")), "nothing may train"


@pytest.mark.slow
@pytest.mark.heavy
def test_compare_end_to_end_interrupted_and_resumed(nnunet_environ, tmp_path, monkeypatch, capsys):
    work, env, root = nnunet_environ
    out = tmp_path / "report"
    calls = []
    real = cmp.evaluate_arm

    def interrupt_on_second_arm(cfg, plan, trainer, where, thresholds):
        calls.append(trainer)
        if trainer == ARMS[1]:
            raise KeyboardInterrupt
        return real(cfg, plan, trainer, where, thresholds)

    monkeypatch.setattr(cmp, "evaluate_arm", interrupt_on_second_arm)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(_cfg(root, out, create_split=True))
    monkeypatch.setattr(cmp, "evaluate_arm", real)
    mdirs = {t: next(work.glob(f"nnUNet_results/Dataset{DATASET}_*")) / f"{t}__nnUNetPlans__2d" for t in ARMS}
    ck = {t: (mdirs[t] / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns for t in ARMS}
    pred_marker = out / "arms" / ARMS[0] / "test" / "compare_prediction.json"
    pred_time = pred_marker.stat().st_mtime_ns
    capsys.readouterr()

    report = cmp.compare(_cfg(root, out))  # the re-run continues: nothing retrained or re-predicted
    printed = capsys.readouterr().out
    assert "trained already" in printed and "reused" in printed and "prediction exists, reused" in printed
    assert {t: (mdirs[t] / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns for t in ARMS} == ck
    assert pred_marker.stat().st_mtime_ns == pred_time
    assert set(report["arms"]) == set(ARMS) and report["n_cases"] == 2
    for f in ("report.md", "report.json", "curves.png"):
        assert (out / f).is_file()
    saved = json.loads((out / "report.json").read_text())
    for t in ARMS:
        a = saved["arms"][t]
        assert set(a["operating_points"]) == set(cmp.OPERATING_POINTS)
        assert len(a["points"]) == len(saved["thresholds"])
        assert 0 <= a["operating_points"]["model"]["dice_mean"] <= 1
        assert a["threshold_gap"] == pytest.approx(abs(a["operating_points"]["segmentation_optimal"]["threshold"]
                                                       - a["operating_points"]["detection_optimal"]["threshold"]))
    d = saved["differences"][ARMS[1]]["model"]
    assert set(d) == set(cmp.CI_METRICS) and ARMS[1] + " minus " + ARMS[0] in saved["sentences"][ARMS[1]]
    assert any(f"nnUNetv2_train 513 2d 0 -tr {ARMS[1]}" in c for c in saved["commands"])
    assert saved["budget"] == {"epochs": 1, "iterations": 2, "val_iterations": 1}
    # the model output equals what nnunet-ext predict wrote (stored threshold / post-processing applied)
    from nnunet_ext.core.io import read_image
    from nnunet_ext.metrics.lesions import lesion_counts

    case = saved["cases"][0]
    ref = read_image(root / "labelsTs" / f"{case}.nii.gz")[0] == 1
    pred = read_image(out / "arms" / ARMS[1] / "test" / f"{case}.nii.gz")[0] == 1
    rec = json.loads((out / "arms" / ARMS[1] / "test_counts.json").read_text())["cases"][case]["model"]
    assert rec["lesion_tp"] == lesion_counts(ref, pred)["lesion_tp"]
    assert rec["voxel_tp"] == int((ref & pred).sum())

    # arms trained with a different budget / plans / split are refused before training
    with pytest.raises(ValueError, match="different budget"):
        cmp.compare(_cfg(root, out, epochs=3))
    plans = mdirs[ARMS[1]] / "plans.json"
    saved_plans = plans.read_text()
    p = json.loads(saved_plans)
    p["configurations"]["2d"]["batch_size"] += 1
    plans.write_text(json.dumps(p))
    try:
        with pytest.raises(ValueError, match="different plans"):
            cmp.compare(_cfg(root, out))
    finally:
        plans.write_text(saved_plans)
    val = mdirs[ARMS[1]] / "fold_0" / "validation"
    moved = next(val.glob("*.nii.gz"))
    os.rename(moved, val / "phantom_999.nii.gz")
    try:
        with pytest.raises(ValueError, match="different splits"):
            cmp.compare(_cfg(root, out))
    finally:
        os.rename(val / "phantom_999.nii.gz", moved)

    # --disable_tta: the mirrored predictions are not reused; both arms are predicted again without mirroring
    soft = out / "arms" / ARMS[0] / "test" / "soft" / f"{case}.nii.gz"
    mirrored = read_image(soft)[0]
    capsys.readouterr()
    report = cmp.compare(_cfg(root, out, disable_tta=True))
    printed = capsys.readouterr().out
    assert printed.count("predicted (2 test cases") == len(ARMS) and "prediction exists" not in printed
    assert report["mirroring"] is False and "without mirroring (--disable_tta)" in (out / "report.md").read_text()
    plain = read_image(soft)[0]
    assert plain.shape == mirrored.shape and np.abs(plain - mirrored).max() > 1e-4  # mirroring averages 4 passes


@pytest.mark.slow
@pytest.mark.heavy
def test_compare_cli_validation_folds(nnunet_environ, tmp_path):
    """The CLI on the validation fold (arms reused from the end-to-end test when it ran first)."""
    from nnunet_ext.cli import run

    work, env, root = nnunet_environ
    split = work / "nnUNet_preprocessed" / f"Dataset{DATASET}_MSPhantom" / "splits_final.json"
    extra = [] if split.exists() else ["--create-split"]
    os.environ.update({"NNUNET_EXT_VAL_ITERATIONS": "1"})
    try:
        assert run(["compare", "-d", str(DATASET), "-c", "2d", "-tr", *ARMS, "-f", "0", "--epochs", "1",
                    "--iterations", "2", "--val-iterations", "1", "-device", "cpu", "-o", str(tmp_path / "v"),
                    "--bootstrap", "200", *extra]) == 0
    finally:
        os.environ.pop("NNUNET_EXT_VAL_ITERATIONS", None)
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    val = json.loads(split.read_text())[0]["val"]
    assert rep["eval_set"] == "validation" and rep["cases"] == sorted(val)


def test_fdr_limited_point_by_hand():
    from nnunet_ext.workflows.compare import fdr_limited_point

    def pt(t, tpr, fdr, pred=5):
        return {"threshold": t, "lesion_tpr": tpr, "lesion_fdr": fdr, "pred_lesions": pred}

    # FDR <= 0.20 at thresholds 0.5 (TPR 0.7) and 0.7 (TPR 0.6): the higher TPR wins
    pts = [pt(0.1, 0.95, 0.5), pt(0.3, 0.8, 0.25), pt(0.5, 0.7, 0.2), pt(0.7, 0.6, 0.1)]
    assert fdr_limited_point(pts) == 2
    # equal TPR: the higher threshold (fewer false positives)
    assert fdr_limited_point([pt(0.5, 0.7, 0.2), pt(0.7, 0.7, 0.1)]) == 1
    # no point reaches FDR 0.20: the lowest FDR; an empty prediction (FDR undefined) counts as FDR 0
    assert fdr_limited_point([pt(0.1, 0.9, 0.6), pt(0.5, 0.5, 0.3)]) == 1
    assert fdr_limited_point([pt(0.1, 0.9, 0.6), pt(0.9, 0.0, None, pred=0)]) == 1
    assert fdr_limited_point(pts, limit=0.3) == 1
    with pytest.raises(ValueError, match="limit"):
        fdr_limited_point(pts, limit=0)


def test_paired_calibration_pools_ece_counts_and_averages_brier():
    """Hand-worked: ECE from pooled bin counts = sum_b |correct_b - conf_b| / N; Brier = mean over cases."""
    from nnunet_ext.workflows.compare import paired_calibration

    arm = [{"brier": 0.1, "count": [2, 2], "conf_sum": [1.2, 1.8], "correct": [1, 2]},
           {"brier": 0.3, "count": [1, 1], "conf_sum": [0.6, 0.9], "correct": [0, 1]}]
    ref = [{"brier": 0.2, "count": [2, 2], "conf_sum": [1.0, 2.0], "correct": [1, 2]},
           {"brier": 0.2, "count": [1, 1], "conf_sum": [0.5, 1.0], "correct": [0, 1]}]
    # arm pooled: count [3,3], conf [1.8,2.7], correct [1,3] -> (0.8 + 0.3) / 6 = 0.18333; Brier 0.2
    # reference pooled: conf [1.5,3.0], correct [1,3] -> (0.5 + 0) / 6 = 0.08333; Brier 0.2
    idx = np.array([[0, 1], [0, 0], [1, 1]])
    d = paired_calibration(arm, ref, idx)
    assert d["ece"]["arm"] == pytest.approx(1.1 / 6) and d["ece"]["reference"] == pytest.approx(0.5 / 6)
    assert d["ece"]["difference"] == pytest.approx(0.1)
    assert d["brier"]["difference"] == pytest.approx(0.0, abs=1e-12)
    # resamples: [0,1] -> 0.1; [0,0] -> arm 0.4*2/8 = 0.1, ref 0 -> 0.1; [1,1] -> arm 1.4/4 = 0.35, ref 1.0/4 = 0.25 -> 0.1
    assert d["ece"]["ci"] == pytest.approx([0.1, 0.1])
    # Brier: [0,0] -> 0.1 - 0.2 = -0.1; [1,1] -> 0.3 - 0.2 = +0.1
    assert d["brier"]["ci"][0] < 0 < d["brier"]["ci"][1]


def test_calibration_record_matches_the_thesis_ece_and_brier():
    """The record's pooled ECE equals metrics.soft.ece on the concatenated cases; Brier is the voxel MSE."""
    from nnunet_ext.metrics.soft import calibration_on_indices, calibration_record, ece

    rng = np.random.default_rng(3)
    p = [rng.random((4, 5, 6)) for _ in range(2)]
    ref = [rng.random((4, 5, 6)) > 0.6 for _ in range(2)]
    soft = [rng.random((4, 5, 6)) for _ in range(2)]
    recs = [calibration_record(a, b, c) for a, b, c in zip(p, ref, soft)]
    out = calibration_on_indices(recs, np.array([[0, 1]]))
    assert out["ece"][0] == pytest.approx(ece(np.concatenate(p), np.concatenate(ref)))
    assert out["brier"][0] == pytest.approx(np.mean([np.mean((a - c) ** 2) for a, c in zip(p, soft)]))


# ------------------------------------------------------------------------------- an arm on another dataset

OTHER = 514  # a student-like dataset: other cases of the same phantom, same channel and file ending


def test_dataset_arm_names():
    from nnunet_ext.workflows import dataset_arm

    assert dataset_arm.parse("584:SoftDiceTrainer") == ("584", "SoftDiceTrainer")
    assert dataset_arm.parse("Dataset584_Student:SoftDiceTrainer") == ("Dataset584_Student", "SoftDiceTrainer")
    assert dataset_arm.parse("cascade:ExtBaselineTrainer") is None and dataset_arm.parse("LSRTrainer") is None
    with pytest.raises(ValueError, match="name the trainer after the dataset"):
        dataset_arm.parse("584:")
    assert cmp._arm_trainer("584:SoftDiceTrainer") == "SoftDiceTrainer" and cmp._arm_trainer("LSRTrainer") == "LSRTrainer"


@pytest.fixture(scope="module")
def other_dataset(phantom):
    from nnunet_ext.core.paths import nnunet_command
    from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

    work, env, root = phantom
    other = write_phantom_dataset(env["nnUNet_raw"], OTHER, 7, PhantomConfig(shape=(32, 32, 32), empty_fraction=0.0,
                                                                             seed=9), progress=False)
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(OTHER), "-c", "2d", "-np", "2"],
                   env=env, check=True, capture_output=True)
    return other


@pytest.mark.slow
@pytest.mark.heavy  # a second planned dataset and five checked compare runs (about 55 s): CI's heavy part
def test_dataset_arm_refusals(nnunet_environ, other_dataset, tmp_path):
    work, env, root = nnunet_environ
    arm = f"{OTHER}:ExtBaselineTrainer"
    split = work / "nnUNet_preprocessed" / other_dataset.name / "splits_final.json"
    if split.exists():
        split.unlink()
    # validation folds of two datasets are not the same cases
    with pytest.raises(NotImplementedError, match=f"validation-fold evaluation with the arm {arm}"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", arm], test_images=None,
                         test_labels=None, create_split=True))
    # the compared dataset itself, and a dataset that does not exist
    with pytest.raises(ValueError, match="is the compared dataset"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", f"{DATASET}:ExtBaselineTrainer"],
                         create_split=True))
    with pytest.raises(FileNotFoundError, match="dataset 515"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", "515:ExtBaselineTrainer"],
                         create_split=True))
    # the other dataset needs a split too (written only with --create-split)
    with pytest.raises(FileNotFoundError, match=f"missing split: .*{other_dataset.name}"):
        cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", arm]))
    assert not split.exists()
    # another channel count: the test images fit one dataset only
    ds_json = other_dataset / "dataset.json"
    saved = ds_json.read_text()
    d = json.loads(saved)
    d["channel_names"] = {"0": "FLAIR", "1": "T1"}
    ds_json.write_text(json.dumps(d))
    try:
        with pytest.raises(ValueError, match="has 2 channel\\(s\\).*1"):
            cmp.compare(_cfg(root, tmp_path / "r", trainers=["ExtBaselineTrainer", arm], create_split=True))
    finally:
        ds_json.write_text(saved)
    assert not any(work.glob(f"nnUNet_results/Dataset{OTHER}_*/*/fold_0/checkpoint_*.pth")), "nothing may train"


@pytest.mark.slow
@pytest.mark.heavy
def test_dataset_arm_end_to_end(nnunet_environ, other_dataset, tmp_path, capsys):
    """An arm trained on another dataset: trained there on that dataset's split with the same budget, predicted on
    the compared dataset's test cases through the model contract, reused on a re-run."""
    from scipy import ndimage

    from nnunet_ext.core.io import read_image
    from nnunet_ext.inference.predict import predict

    work, env, root = nnunet_environ
    arm = f"{OTHER}:ExtBaselineTrainer"
    out = tmp_path / "report"
    report = cmp.compare(_cfg(root, out, trainers=["ExtBaselineTrainer", arm], create_split=True))
    mdir = work / "nnUNet_results" / other_dataset.name / "ExtBaselineTrainer__nnUNetPlans__2d"
    assert (mdir / "fold_0" / "checkpoint_final.pth").is_file()
    split = json.loads((work / "nnUNet_preprocessed" / other_dataset.name / "splits_final.json").read_text())
    val = sorted(p.name[:-7] for p in (mdir / "fold_0" / "validation").glob("*.nii.gz"))
    assert val == sorted(split[0]["val"])  # trained on its own dataset's fold 0
    assert cmp.trained_budget(mdir / "fold_0")["iterations"] == 2
    assert report["arms"][arm]["model"]["dataset"] == other_dataset.name
    split_file = work / "nnUNet_preprocessed" / other_dataset.name / "splits_final.json"
    assert f"{arm} trains on fold(s) [0] of its own dataset's split, {split_file}" in report["notes"]
    assert any(c.startswith(f"NNUNET_EXT_NUM_EPOCHS=1 NNUNET_EXT_ITERATIONS=2 NNUNET_EXT_VAL_ITERATIONS=1 "
                            f"nnUNetv2_train {other_dataset.name} 2d 0 -tr ExtBaselineTrainer")
               for c in report["commands"]), report["commands"]
    # the arm's masks are what the other dataset's model predicts, and its counts are scipy's
    direct = tmp_path / "direct"
    predict(str(root / "imagesTs"), str(direct), dataset=str(OTHER), configuration="2d", trainer="ExtBaselineTrainer",
            folds=[0], options={"device": "cpu", "save_probabilities": True})
    counts = json.loads((out / "arms" / f"{OTHER}_ExtBaselineTrainer" / "test_counts.json").read_text())["cases"]
    for case in report["cases"]:
        mine = read_image(out / "arms" / f"{OTHER}_ExtBaselineTrainer" / "test" / f"{case}.nii.gz")[0]
        assert np.array_equal(mine, read_image(direct / f"{case}.nii.gz")[0])
        ref = read_image(root / "labelsTs" / f"{case}.nii.gz")[0] == 1
        lab, n = ndimage.label(ref, np.ones((3, 3, 3)))
        hit = {int(v) for v in np.unique(lab[mine == 1]) if v}
        assert counts[case]["model"]["ref_lesions"] == n and counts[case]["model"]["lesion_tp"] == len(hit)
    capsys.readouterr()
    cmp.compare(_cfg(root, out, trainers=["ExtBaselineTrainer", arm]))
    printed = capsys.readouterr().out
    assert f"{arm}: fold(s) [0] trained already" in printed and printed.count("prediction exists, reused") == 2
