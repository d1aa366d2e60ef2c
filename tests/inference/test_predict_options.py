"""PredictOptions (nnunet_ext.inference.options): the prediction functions take one options object, a dict of it
(what a spawned task receives) or its fields as keywords; fields are checked when the object is made."""
import json
from dataclasses import asdict, replace

import pytest

from nnunet_ext.inference.options import PredictOptions, predict_options, refuse_unsupported


@pytest.mark.parametrize("fields, message", [
    ({"step_size": 0}, r"-step_size must be in \(0, 1\], got 0"),
    ({"step_size": 1.5}, r"-step_size must be in \(0, 1\], got 1.5"),
    ({"num_parts": 2, "part_id": 2}, "-part_id must be in 0..num_parts-1 and -num_parts >= 1, got -part_id 2 -num_parts 2"),
    ({"num_parts": 0}, "-part_id must be in 0..num_parts-1 and -num_parts >= 1, got -part_id 0 -num_parts 0"),
    ({"npp": 0}, "-npp and -nps must be >= 1 \\(processes\\), got -npp 0"),
    ({"nps": 1.5}, "-npp and -nps must be >= 1 \\(processes\\), got -nps 1.5"),
    ({"min_lesion_mm3": -1.0}, "min_lesion_mm3 must be a finite number >= 0, got -1.0"),
    ({"min_lesion_mm3": float("inf")}, "min_lesion_mm3 must be a finite number >= 0, got inf"),
    ({"threshold": 1.0}, r"threshold must be in \(0, 1\), got 1.0"),
    ({"lesion_table": True, "overwrite": False}, "lesion_table needs overwrite=True"),
])
def test_fields_are_checked_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PredictOptions(**fields)


def test_defaults_keywords_aliases_and_json_round_trip():
    o = PredictOptions()
    # the predictor's defaults before the options object: nnU-Net's step 0.5, TTA on, soft maps and masks
    # written, every case overwritten, one part, process counts left to each function (predict_cases: 2)
    assert (o.device, o.step_size, o.disable_tta, o.write_soft, o.write_mask, o.overwrite, o.num_parts,
            o.part_id) == ("cuda", 0.5, False, True, True, True, 1, 0)
    assert o.processes(2) == (2, 2) and replace(o, npp=3).processes(2) == (3, 2)
    from nnunet_ext.inference.predict import _ALIASES

    # nnunet-ext predict's older keywords: keep_probabilities -> save_probabilities, continue_prediction ->
    # not overwrite; fields given beside them win
    got = predict_options({"npp": 4}, {"keep_probabilities": True, "continue_prediction": True, "device": "cpu"},
                          "predict", _ALIASES)
    assert got == PredictOptions(device="cpu", npp=4, save_probabilities=True, overwrite=False)
    with pytest.raises(TypeError, match=r"predict_cases\(\) got unexpected keyword argument\(s\) \['n_proc'\]"):
        predict_options(None, {"n_proc": 2}, "predict_cases")
    # a spawned task gets the options as JSON (cluster.call.function_argv) and makes the same object of it
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.inference.predictor import predict_cases

    sent = PredictOptions(device="cpu", threshold=0.4, min_lesion_mm3=3.0, num_parts=2, part_id=1, npp=1, nps=1)
    argv = function_argv(predict_cases, model_dir="m", folds=[0], inputs="i", output_dir="o", options=asdict(sent))
    assert argv[-2] == "nnunet_ext.inference.predictor:predict_cases"
    assert predict_options(json.loads(argv[-1])["options"], {}, "predict_cases") == sent


def test_functions_refuse_unknown_keywords_and_fields_they_do_not_apply(tmp_path):
    from nnunet_ext.inference.ensemble import predict_ensemble, predict_selection
    from nnunet_ext.inference.predict import predict
    from nnunet_ext.inference.predictor import predict_cases
    from nnunet_ext.nnunet_adapter import ModelRef
    from nnunet_ext.workflows.consensus import predict_cascade

    ref = ModelRef("501", "2d")
    calls = {"predict_cases": lambda **k: predict_cases(tmp_path, [0], tmp_path, tmp_path / "o", **k),
             "predict_ensemble": lambda **k: predict_ensemble([tmp_path], [0], tmp_path, tmp_path / "o", **k),
             "predict_selection": lambda **k: predict_selection(tmp_path, tmp_path / "o", "501", **k),
             "predict_cascade": lambda **k: predict_cascade([], {"model_dir": tmp_path, "folds": [0]}, tmp_path,
                                                            tmp_path / "o", **k),
             "predict": lambda **k: predict(tmp_path, tmp_path / "o", ref, **k)}
    for name, call in calls.items():  # before any file is read
        with pytest.raises(TypeError, match=rf"{name}\(\) got unexpected keyword argument\(s\) \['colour'\]"):
            call(colour="red")
    # an ensemble averages softmax maps of unconditioned models: a cohort does not apply (before: TypeError)
    with pytest.raises(NotImplementedError, match="predict_ensemble with cohort='c0'"):
        predict_ensemble([tmp_path], [0], tmp_path, tmp_path / "o", threshold=0.5, min_lesion_mm3=0.0, cohort="c0")
    with pytest.raises(TypeError, match=r"predict_ensemble\(\) needs threshold and min_lesion_mm3"):
        predict_ensemble([tmp_path], [0], tmp_path, tmp_path / "o", threshold=0.5)
    with pytest.raises(NotImplementedError, match="predict_cascade with uncertainty=True"):
        predict_cascade([], {"model_dir": tmp_path, "folds": [0]}, tmp_path, tmp_path / "o", uncertainty=True)
    refuse_unsupported(PredictOptions(device="cpu"), ("device",), "f")  # a supported field: no error
    # a model and its fields at once is ambiguous
    with pytest.raises(TypeError, match=r"predict\(\) got model and its fields \['trainer'\]"):
        predict(tmp_path, tmp_path / "o", ref, trainer="X")


def test_predict_takes_the_model_as_an_object_its_json_or_the_earlier_keywords(tmp_path, monkeypatch):
    """The three ways of naming the model reach the same model folder: its absence is reported with the
    folder nnU-Net's layout gives (``$nnUNet_results/Dataset501_X/T__P__C``)."""
    from nnunet_ext.inference.predict import predict
    from nnunet_ext.nnunet_adapter import ModelRef

    (tmp_path / "results" / "Dataset501_X").mkdir(parents=True)
    (tmp_path / "raw" / "Dataset501_X").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    ref = ModelRef("501", "2d", "ExtBaselineTrainer", folds=[0])
    want = str(tmp_path / "results" / "Dataset501_X" / "ExtBaselineTrainer__nnUNetPlans__2d")
    for how in ({"model": ref}, {"model": ref.to_json()},
                {"dataset": "501", "configuration": "2d", "trainer": "ExtBaselineTrainer", "folds": [0]}):
        with pytest.raises(FileNotFoundError) as e:
            predict(tmp_path, tmp_path / "o", **how)
        assert want in str(e.value), (how, str(e.value))
    with pytest.raises(FileNotFoundError) as e:  # the positional form of earlier versions
        predict(tmp_path, tmp_path / "o", "501", "2d", "ExtBaselineTrainer", folds=[0])
    assert want in str(e.value)
