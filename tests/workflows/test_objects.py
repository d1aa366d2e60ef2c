"""Objects instead of command lines: model references (ModelRef) in the files the workflows write, the one
post-processing of the model contract, and lesion rules as one object (LesionRule) through the presets."""
import json

import numpy as np
import pytest

from nnunet_ext.nnunet_adapter import ModelRef


# ------------------------------------------------------------------------------------------ ModelRef


def test_model_ref_json_round_trip_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    ref = ModelRef("Dataset501_Phantom", "2d", "LSRTrainer", "nnUNetPlans", folds=[0, "1", "all"])
    # folds normalised as nnU-Net names them: integers, or "all"
    assert ref.folds == (0, 1, "all") and ref.checkpoint == "checkpoint_final.pth"
    d = ref.to_json()
    assert d == {"dataset": "Dataset501_Phantom", "configuration": "2d", "trainer": "LSRTrainer",
                 "plans": "nnUNetPlans", "folds": [0, 1, "all"], "checkpoint": "checkpoint_final.pth"}
    assert ModelRef.from_json(json.loads(json.dumps(d))) == ref
    # the one derivation: $nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>
    assert ref.folder(must_exist=False) == tmp_path / "res" / "Dataset501_Phantom" / "LSRTrainer__nnUNetPlans__2d"
    assert ref.folder(must_exist=False, results=tmp_path / "x") == \
        tmp_path / "x" / "Dataset501_Phantom" / "LSRTrainer__nnUNetPlans__2d"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        ref.folder()
    assert ModelRef.from_name("Dataset501_Phantom", "LSRTrainer__nnUNetPlans__2d", [0, 1, "all"]) == ref


@pytest.mark.parametrize("bad", [{"dataset": "D", "configuration": "2d", "trainer": "../x", "plans": "p"},
                                 {"dataset": "D", "configuration": "2d", "trainer": "T"},
                                 {"dataset": "D", "configuration": "2d", "trainer": "T", "plans": "p", "path": "/"}])
def test_model_ref_from_a_file_is_names_only(bad):
    with pytest.raises(ValueError, match="consensus.json"):
        ModelRef.from_json(bad, "consensus.json")


def _selection(path, members):
    best = {"model": " + ".join(m if isinstance(m, str) else m["trainer"] for m in members), "members": members,
            "threshold": 0.35, "min_lesion_mm3": 3.0, "connectivity": 26, "metric": "lesion_f1", "folds": [0, 1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "501", "best": best}))
    return path


def test_selection_file_old_and_new_formats_name_the_same_models(tmp_path, monkeypatch):
    from nnunet_ext.inference.ensemble import member_folders, read_selection

    res = tmp_path / "res"
    monkeypatch.setenv("nnUNet_results", str(res))
    names = ["LSRTrainer__nnUNetPlans__2d", "ExtBaselineTrainer__nnUNetPlans__2d"]
    for n in names:
        (res / "Dataset501_Phantom" / n).mkdir(parents=True)
    # a file of an earlier version: members are folder names of the dataset the command names
    old = read_selection(_selection(tmp_path / "old.json", names), "Dataset501_Phantom")
    refs = [ModelRef.from_name("Dataset501_Phantom", n, [0, 1]) for n in names]
    new = read_selection(_selection(tmp_path / "new.json", [r.to_json() for r in refs]))
    assert old["models"] == new["models"] == refs
    assert old["members"] == new["members"] == names
    assert member_folders(old) == member_folders(new) == [res / "Dataset501_Phantom" / n for n in names]
    with pytest.raises(ValueError, match="not a selection file"):  # a path where a name belongs
        read_selection(_selection(tmp_path / "bad.json", ["../../etc__nnUNetPlans__2d"]), "Dataset501_Phantom")


def test_consensus_json_old_format_gives_the_models_the_new_one_stores():
    from nnunet_ext.workflows.consensus import _store_rater_models, consensus_model, rater_models

    old = {"n_folds": 2, "raters": {"r1": {"id": 541, "name": "Dataset541_X_r1"},
                                    "r2": {"id": 542, "name": "Dataset542_X_r2"}},
           "stage1": {"configuration": "2d", "trainer": "LSRTrainer", "plans": "nnUNetPlans", "folds": [0, 1]},
           "stage2": {"id": 543, "name": "Dataset543_X_consensus", "rater_order": ["r1", "r2"]},
           "stage2_training": {"configuration": "3d_fullres", "trainer": "ExtBaselineTrainer",
                               "plans": "nnUNetPlans", "folds": [0]}}
    expected = {"r1": ModelRef("Dataset541_X_r1", "2d", "LSRTrainer", "nnUNetPlans", (0, 1)),
                "r2": ModelRef("Dataset542_X_r2", "2d", "LSRTrainer", "nnUNetPlans", (0, 1))}
    assert rater_models(old) == expected
    assert consensus_model(old) == ModelRef("Dataset543_X_consensus", "3d_fullres", "ExtBaselineTrainer",
                                            "nnUNetPlans", (0,))
    new = json.loads(json.dumps(old))
    _store_rater_models(new, new["stage1"])
    new["models"]["consensus"] = consensus_model(old).to_json()
    new = json.loads(json.dumps(new))  # as written to and read from consensus.json
    assert rater_models(new) == expected and consensus_model(new) == consensus_model(old)
    # the stored reference wins over the settings once written
    new["models"]["consensus"]["folds"] = [0, 1]
    assert consensus_model(new).folds == (0, 1)


# ------------------------------------------------------------------------------------------ post-processing


def test_predictor_ensemble_and_selection_post_process_alike():
    from nnunet_ext.inference.ensemble import combine_soft_maps
    from nnunet_ext.inference.predictor import final_mask
    from nnunet_ext.metrics.lesions import label_components
    from nnunet_ext.workflows.selection import candidate_mask

    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 per voxel
    soft = np.zeros((4, 8, 8), np.float32)
    soft[0, 0, 0] = 0.9               # 1 voxel = 2 mm^3 < 3 mm^3: removed
    soft[2, 3, 3:6] = 0.8             # 3 voxels = 6 mm^3: kept
    soft[3, 7, 7] = 0.4               # below the threshold
    soft[1, 6, 0:2] = 0.6             # 2 voxels = 4 mm^3: kept (>= 3)
    expected = np.zeros(soft.shape, np.uint8)
    expected[2, 3, 3:6] = 1
    expected[1, 6, 0:2] = 1
    pp = {"min_lesion_mm3": 3.0, "connectivity": 26}
    by_predictor = final_mask(soft, None, 0.5, spacing, pp)
    by_ensemble = combine_soft_maps([soft], spacing, 0.5, 3.0, 26)[1]
    by_selection = candidate_mask(soft, 0.5, spacing, 3.0, 26)
    by_selection_reused = candidate_mask(soft, 0.5, spacing, 3.0, 26, labels=label_components(soft >= 0.5, 26))
    for got in (by_predictor, by_ensemble, by_selection, by_selection_reused):
        np.testing.assert_array_equal(got.astype(np.uint8), expected)
    # exactly the minimum size is kept (removed: smaller); 0 keeps everything
    np.testing.assert_array_equal(final_mask(soft, None, 0.5, spacing, {"min_lesion_mm3": 4.0, "connectivity": 26}),
                                  expected)
    assert final_mask(soft, None, 0.5, spacing, {"min_lesion_mm3": 0.0, "connectivity": 26}).sum() == 6


def test_no_reimplementation_of_the_size_filter():
    from pathlib import Path

    import nnunet_ext

    root = Path(nnunet_ext.__file__).parent
    for rel in ("inference/predictor.py", "inference/ensemble.py", "workflows/selection.py"):
        text = (root / rel).read_text()
        assert "remove_small_lesions" not in text and "bincount" not in text, rel


# ------------------------------------------------------------------------------------------ LesionRule


def _case(tmp_path):
    from nnunet_ext.core.io import write_image

    ref = np.zeros((3, 8, 8), np.uint8)
    pred = np.zeros((3, 8, 8), np.uint8)
    ref[1, 1, 1:5] = 1        # a reference lesion of 4 voxels
    pred[1, 1, 1:3] = 1       # covered by 2 of them (50 %)
    ref[1, 6, 6] = 1          # a 1-voxel reference lesion, missed
    write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / "a.nii.gz")
    write_image(pred, (1.0, 1.0, 1.0), tmp_path / "pred" / "a.nii.gz")
    return tmp_path / "ref", tmp_path / "pred"


def test_lesion_rule_through_a_preset_equals_the_explicit_options(tmp_path):
    from nnunet_ext.metrics.evaluate import PRESETS, evaluate_folders
    from nnunet_ext.metrics.lesions import LesionRule

    explicit = LesionRule(connectivity=18, detection="voxels>=3 or fraction>0.5", counting="prediction",
                          bins="1-2,3-10,11-50,51+")
    assert LesionRule.preset("nichyporuk") == explicit == PRESETS["nichyporuk"].lesion_rule()
    assert LesionRule.from_json(json.loads(json.dumps(explicit.to_json()))) == explicit
    ref, pred = _case(tmp_path)
    by_preset = evaluate_folders(ref, pred, preset="nichyporuk", progress=False)
    by_rule = evaluate_folders(ref, pred, rule=explicit, progress=False)
    assert by_preset["per_case"] == by_rule["per_case"] and by_preset["aggregate"] == by_rule["aggregate"]
    m = by_rule["per_case"]["a"]
    # 2 covered voxels of 4: neither >= 3 voxels nor > 50 % -> the predicted lesion is an FP and both
    # reference lesions are missed (TP 0, FP 1, FN 2)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 1, 2)
    # WMH 2017: any overlap detects: TP 1 (of 2 reference lesions), FP 0
    wmh = evaluate_folders(ref, pred, rule=PRESETS["wmh2017"].lesion_rule(), progress=False)["per_case"]["a"]
    assert (wmh["lesion_tp"], wmh["lesion_fp"], wmh["lesion_fn"]) == (1, 0, 1)
    with pytest.raises(ValueError, match="not both"):
        evaluate_folders(ref, pred, rule=explicit, connectivity=26, progress=False)


def test_sweep_takes_the_rule_object(tmp_path):
    from nnunet_ext.metrics.lesions import LesionRule
    from nnunet_ext.metrics.operating_points import sweep

    ref, pred = _case(tmp_path)
    explicit = LesionRule(connectivity=18, detection="voxels>=3 or fraction>0.5", counting="prediction",
                          bins=((1, 2), (3, 10), (11, 50), (51, None)))
    a = sweep(ref, pred, [0.5], preset="nichyporuk", progress=False)
    b = sweep(ref, pred, [0.5], rule=explicit, progress=False)
    assert a["points"] == b["points"]
    assert (b["points"][0]["lesion_tp"], b["points"][0]["lesion_fp"]) == (0, 1)


# ------------------------------------------------------------------------------------------ launcher tasks


def test_pseudolabel_tasks_call_the_functions_not_the_command_line(tmp_path, monkeypatch):
    import sys

    from nnunet_ext.workflows.pseudolabel import PseudolabelOptions, merge_parts, pseudolabel, pseudolabel_stages

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    teacher = ModelRef("Dataset501_Phantom", "2d", "LSRTrainer", folds=(0, 1))
    options = PseudolabelOptions(alpha=0.5, ignore_uncertain=True, device="cpu")
    parts, merge = pseudolabel_stages(teacher, tmp_path / "unl", "Dataset602_Student", options, 2)
    assert [t.name for t in parts.tasks] == ["part0of2", "part1of2"] and merge.after == ["pseudolabel_parts"]
    for k, task in enumerate(parts.tasks):
        assert task.argv[:4] == [sys.executable, "-m", "nnunet_ext.cluster.call",
                                 "nnunet_ext.workflows.pseudolabel:pseudolabel"]
        kwargs = json.loads(task.argv[4])
        assert kwargs == {"teacher": teacher.to_json(), "unlabeled_dir": str((tmp_path / "unl").resolve()),
                          "output_dataset": "Dataset602_Student", "options": {**kwargs["options"]},
                          "num_parts": 2, "part_id": k}
        assert PseudolabelOptions(**kwargs["options"]) == options  # the task gets the same options back
    assert merge.tasks[0].argv[3] == "nnunet_ext.workflows.pseudolabel:merge_parts"
    assert json.loads(merge.tasks[0].argv[4]) == {"output_dataset": "Dataset602_Student", "num_parts": 2}
    assert callable(pseudolabel) and callable(merge_parts)
