"""The model contract (written by training, read by the one predictor) and the predictor's post-processing,
against hand-worked values; models without a contract file get one derived from their checkpoint."""
import json

import numpy as np
import pytest
import torch

from nnunet_ext.inference.contract import ModelContract, contract_path, load_contract, update_contract, write_contract
from nnunet_ext.inference.contract import postprocess, resolve_threshold


def remove_small_lesions(mask, spacing, min_mm3, connectivity=26):
    return postprocess(mask, spacing, {"min_lesion_mm3": min_mm3, "connectivity": connectivity})


def _old_model(tmp_path, kind=None, cohorts=(), activation=None):
    """A model folder as trained before contracts existed: checkpoint (+ threshold counts)."""
    m = tmp_path / "SCINTrainer__nnUNetPlans__2d"
    (m / "fold_0").mkdir(parents=True)
    w = {"conv.weight": torch.zeros(1)}
    if kind is not None:
        w["ext_condition.kind_code"] = torch.tensor([1 if kind == "spacing" else 2], dtype=torch.uint8)
    if cohorts:
        names = torch.zeros(8, 64, dtype=torch.uint8)
        for i, n in enumerate(cohorts):
            names[i, :len(n)] = torch.tensor(list(n.encode()), dtype=torch.uint8)
        w["ext_condition.cohort_names"] = names
    torch.save({"network_weights": w}, m / "fold_0" / "checkpoint_final.pth")
    if activation:
        (m / "fold_0" / "nnunet_ext_threshold.json").write_text(json.dumps({
            "thresholds": [round(0.05 * k, 2) for k in range(1, 20)], "tp": [5] * 19, "fp": [0] * 9 + [9] * 10,
            "fn": [0] * 19, "activation": activation}))
    return m


def test_derived_from_checkpoint_of_an_old_model(tmp_path):
    m = _old_model(tmp_path, "cohort", ("siteA", "siteB"), "normalized_relu")
    c = load_contract(m, [0])
    assert (c.source, c.condition, c.cohorts, c.activation, c.tta) == \
        ("derived", "cohort", ["siteA", "siteB"], "normalized_relu", "mean_logits")
    th, src = resolve_threshold(m, [0], c)
    # pooled counts: Dice 1 for thresholds 0.05..0.45, worse above; ties go to the one closest to 0.5
    assert th == 0.45 and "validation of folds [0]" in src
    plain = _old_model(tmp_path / "p")
    assert load_contract(plain, [0]).condition is None
    assert resolve_threshold(plain, [0], load_contract(plain, [0]))[0] is None  # argmax


def test_file_round_trip_and_update_keeps_other_fields(tmp_path):
    m = _old_model(tmp_path, "spacing")
    write_contract(m, ModelContract(condition="spacing", activation="softmax", trainer="SCINTrainer"))
    c = update_contract(m, [0], postprocessing={"min_lesion_mm3": 3.0}, threshold=0.3)
    again = load_contract(m, [0])
    assert again.source == "file" and again.condition == "spacing" and again.trainer == "SCINTrainer"
    assert again.postprocessing == {"min_lesion_mm3": 3.0, "connectivity": 26} and again.threshold == 0.3
    assert c.postprocessing == again.postprocessing
    assert resolve_threshold(m, [0], again) == (0.3, "model contract")
    assert resolve_threshold(m, [0], again, override=0.7) == (0.7, "given")
    with pytest.raises(ValueError, match="unknown model contract field 'colour'"):
        update_contract(m, [0], colour="red")
    with pytest.raises(ValueError, match="threshold must be in"):
        resolve_threshold(m, [0], again, override=1.5)


@pytest.mark.parametrize("field,value,match", [
    ("condition", "age", "condition must be one of"), ("activation", "sigmoid", "activation must be one of"),
    ("tta", "median", "tta must be one of"), ("threshold", 1.0, "threshold must be"),
    ("postprocessing", {"min_lesion_mm3": -1}, "min_lesion_mm3"), ("postprocessing", {"connectivity": 8}, "connectivity")])
def test_bad_contract_fields(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        write_contract(tmp_path, ModelContract(**{field: value}))
    assert not contract_path(tmp_path).exists()


def test_damaged_contract_file_names_the_file(tmp_path):
    contract_path(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="nnunet_ext_model.json: not valid JSON"):
        load_contract(tmp_path)


def test_remove_small_lesions_by_hand():
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[0, 0, 0] = 1                      # 1 voxel  = 2 mm^3 at spacing (2, 1, 1)
    mask[2, 2, 2:4] = 1                    # 2 voxels = 4 mm^3
    mask[3, 5, 5] = 1
    mask[0, 4, 0] = 1                      # alone, 2 mm^3
    out = remove_small_lesions(mask, (2.0, 1.0, 1.0), 3.0)
    assert out.sum() == 2 and out[2, 2, 2:4].all()
    np.testing.assert_array_equal(remove_small_lesions(mask, (2.0, 1.0, 1.0), 0.0), mask)
    # connectivity decides what a lesion is: two diagonal voxels are one 4 mm^3 lesion with 26, two with 6
    d = np.zeros((3, 3, 3), np.uint8)
    d[0, 0, 0] = d[1, 1, 1] = 1
    assert remove_small_lesions(d, (2.0, 1.0, 1.0), 3.0, connectivity=26).sum() == 2
    assert remove_small_lesions(d, (2.0, 1.0, 1.0), 3.0, connectivity=6).sum() == 0
