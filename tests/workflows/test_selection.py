"""Validation-fold lesion summaries and lesion-aware selection on hand-made nnU-Net folders (no training:
the folders hold what nnUNetv2_train --npz writes)."""
import json

import numpy as np
import pytest

from nnunet_ext.cli import run
from nnunet_ext.core.io import write_image
from nnunet_ext.metrics.validation import SUMMARY_FILE, write_fold_lesion_metrics
from nnunet_ext.workflows.selection import select

SHAPE = (6, 12, 12)


def _case():
    """Reference: one 27-voxel lesion. Probabilities: 0.4 on the lesion (argmax misses it) and 0.9 on a
    2-voxel speck elsewhere (a false positive at argmax)."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    p = np.zeros(SHAPE, np.float32)
    p[ref == 1] = 0.4
    p[5, 9, 8:10] = 0.9
    return ref, p


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    res, pre = tmp_path / "results", tmp_path / "pre"
    monkeypatch.setenv("nnUNet_results", str(res))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    md = res / "Dataset901_Sel" / "ExtBaselineTrainer__nnUNetPlans__2d"
    gt = pre / "Dataset901_Sel" / "gt_segmentations"
    for f, cases in ((0, ["a", "b"]), (1, ["c"])):
        val = md / f"fold_{f}" / "validation"
        val.mkdir(parents=True)
        for c in cases:
            ref, p = _case()
            write_image(ref, (1.0, 1.0, 1.0), gt / f"{c}.nii.gz")
            np.savez_compressed(val / f"{c}.npz", probabilities=np.stack([1 - p, p]))
            write_image((p >= 0.5).astype(np.uint8), (1.0, 1.0, 1.0), val / f"{c}.nii.gz")  # nnU-Net's argmax
    (md / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "lesion": 1}}))
    return md, gt


def test_fold_lesion_summary_beside_nnunet_summary(nnunet_folders):
    md, gt = nnunet_folders
    res = write_fold_lesion_metrics(md / "fold_0", gt)
    assert sorted(res["per_case"]) == ["a", "b"]
    pooled = json.loads((md / "fold_0" / "validation" / SUMMARY_FILE).read_text())["aggregate"]["pooled"]
    # argmax: the lesion is missed and the speck is a false positive in both cases
    assert (pooled["lesion_tp"], pooled["lesion_fn"], pooled["lesion_fp"], pooled["lesion_f1"]) == (0, 2, 2, 0.0)
    with pytest.raises(ValueError, match="unknown option"):
        write_fold_lesion_metrics(md / "fold_0", gt, min_size=3)
    with pytest.raises(FileNotFoundError, match="validation"):
        write_fold_lesion_metrics(md / "fold_7", gt)


def test_cli_lesion_metrics(nnunet_folders, capsys):
    md, _ = nnunet_folders
    assert run(["lesion-metrics", "-d", "901", "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", "0", "1",
                "--detection", "voxels>=3 or fraction>0.5", "--connectivity", "18"]) == 0
    assert (md / "fold_1" / "validation" / SUMMARY_FILE).is_file()
    s = json.loads((md / "fold_1" / "validation" / SUMMARY_FILE).read_text())["settings"]
    assert s["connectivity"] == 18 and s["detection"] == "voxels>=3 or fraction>0.5"
    assert "fold 1: 1 cases" in capsys.readouterr().out


def test_select_threshold_and_min_size_on_validation(nnunet_folders):
    md, _ = nnunet_folders
    res = select(dataset=901, configurations=["2d"], trainers=["ExtBaselineTrainer"], folds=[0, 1], progress=False)
    b = res["best"]
    # every threshold <= 0.4 finds the lesion; a minimum size of 3 mm3 or more removes the 2-voxel speck;
    # ties: threshold closest to 0.5, then the smallest size
    assert (b["threshold"], b["min_lesion_mm3"], b["lesion_f1"]) == (0.4, 3.0, 1.0)
    assert res["argmax"]["lesion_f1"] == 0.0 and res["n_validation_cases"] == 3
    contract = json.loads((md / "nnunet_ext_model.json").read_text())
    assert contract["threshold"] == 0.4
    assert contract["postprocessing"] == {"min_lesion_mm3": 3.0, "connectivity": 26}
    assert json.loads((md.parent / "nnunet_ext_selection.json").read_text())["best"]["threshold"] == 0.4


def test_select_without_npz_says_how_to_make_them(nnunet_folders, capsys):
    md, _ = nnunet_folders
    for p in (md / "fold_1" / "validation").glob("*.npz"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"--val --npz"):
        select(dataset=901, configurations=["2d"], trainers=["ExtBaselineTrainer"], folds=[0, 1], progress=False)
    from nnunet_ext.cli.main import main

    with pytest.raises(SystemExit) as e:  # the console entry point: one line naming the folder, exit != 0
        main(["select", "-d", "901", "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", "0", "1"])
    assert e.value.code != 0 and "fold_1/validation" in capsys.readouterr().err
    with pytest.raises(ValueError, match="metric"):
        select(dataset=901, configurations=["2d"], trainers=["ExtBaselineTrainer"], folds=[0], metric="auc")


def test_select_output_never_lands_on_a_model_or_the_references(nnunet_folders):
    md, gt = nnunet_folders
    ck = md / "fold_0" / "checkpoint_final.pth"
    ck.write_bytes(b"weights")
    for out, match in ((ck, "ending in .json"), (md / "fold_0" / "sel.json", "lies inside the input"),
                       (gt / "sel.json", "lies inside the input"), (md.parent, "ending in .json")):
        with pytest.raises(ValueError, match=match):
            select(dataset=901, configurations=["2d"], trainers=["ExtBaselineTrainer"], folds=[0, 1], progress=False,
                   output=out, write_contract=False)
    assert ck.read_bytes() == b"weights" and not (md / "fold_0" / "sel.json").exists()


def test_predict_arguments_are_checked_before_anything_is_written(tmp_path, capsys):
    from nnunet_ext.cli import run
    from nnunet_ext.core.errors import run_cli

    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "901", "-c", "2d"]
    for extra, needle in ((["--threshold", "nan"], "--threshold must be finite"),
                          (["--threshold", "1.5"], "--threshold must lie strictly between 0 and 1"),
                          (["--min-lesion-mm3", "-3"], "--min-lesion-mm3 must be >= 0"),
                          (["-np", "0"], "-np/--num-processes must be in 1..256"),
                          (["-device", "gpu0"], "-device must be cpu, cuda")):
        assert run_cli(run, base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()
