"""Conditioned trainers with real nnU-Net on a tiny phantom (1 epoch of 2 iterations on CPU): training with
nnU-Net's own validation, prediction through `nnunet-ext predict`, the refusal of nnUNetv2_predict, export
and import of the model zip, and norm-only fine-tuning of a new cohort."""
import json

import numpy as np
import pytest
import torch

from conftest import PLANNED_ID, run_nnunet
from nnunet_ext.core.io import read_geometry, read_image
from nnunet_ext.core.paths import nnunet_command
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

pytestmark = pytest.mark.slow  # real nnU-Net runs

DATASET, NEW_COHORT_DATASET = PLANNED_ID, 526


sh = run_nnunet  # real nnU-Net commands, in this process


@pytest.fixture(scope="module")
def planned(planned_phantom):
    """The shared planned phantom: 8 + 2 cases 32^3 in two cohorts (all / no_small) and two sites (1 and
    2 mm slices), planned 2d."""
    return planned_phantom


def train(planned, trainer, dataset=DATASET, fold="0", extra=()):
    work, env, root = planned
    sh([nnunet_command("nnUNetv2_train"), dataset, "2d", fold, "-tr", trainer, "-device", "cpu", *extra], env)
    return next((work / "nnUNet_results").glob(f"Dataset{dataset}_*")) / f"{trainer}__nnUNetPlans__2d"


def ext_predict(env, inp, out, trainer, *extra, ok=True, dataset=DATASET, folds=("0",)):
    return sh([nnunet_command("nnunet-ext"), "predict", "-i", inp, "-o", out, "-d", dataset, "-c", "2d", "-tr", trainer,
               "-f", *folds, "-device", "cpu", "-npp", "1", *extra], env, ok)


def export_and_reinstall(env, trainer, tmp_path):
    zip_path = tmp_path / f"{trainer}.zip"
    sh([nnunet_command("nnUNetv2_export_model_to_zip"), "-d", DATASET, "-o", zip_path, "-c", "2d", "-tr", trainer,
        "-f", "0"], env)
    env2 = dict(env, nnUNet_results=str(tmp_path / "results2"))
    sh([nnunet_command("nnUNetv2_install_pretrained_model_from_zip"), zip_path], env2)
    return env2


def test_scin_end_to_end(planned, tmp_path):
    work, env, root = planned
    out = train(planned, "SCINTrainer")
    fold = out / "fold_0"
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()  # the newest (names carry the time)
    assert "cohort0_all -> slot 0, cohort1_no_small -> slot 1" in log
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's validation ran with the condition
    settings = json.loads((fold / "nnunet_ext_settings.json").read_text())
    assert settings["cohort_table"] == {"cohort0_all": 0, "cohort1_no_small": 1}
    w = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    k = "encoder.stages.0.0.convs.0.norm.weight"
    assert not torch.equal(w[f"{k}.0"], w[f"{k}.1"])  # both cohorts trained their own norms
    assert torch.equal(w[f"{k}.2"], torch.ones_like(w[f"{k}.2"]))  # unused slots untouched

    preds = {}
    for cohort in ("cohort0_all", "cohort1_no_small"):
        preds[cohort] = tmp_path / cohort
        ext_predict(env, root / "imagesTs", preds[cohort], "SCINTrainer", "--cohort", cohort)
        summary = json.loads((preds[cohort] / "nnunet_ext_predict.json").read_text())
        assert summary["condition"] == "cohort" and summary["cohort"] == cohort
        for case in ("phantom_008", "phantom_009"):
            g = read_geometry(root / "imagesTs" / f"{case}_0000.nii.gz")
            assert read_geometry(preds[cohort] / f"{case}.nii.gz")["size"] == g["size"]
    soft = [read_image(preds[c] / "soft" / "phantom_008.nii.gz")[0] for c in preds]
    assert np.abs(soft[0] - soft[1]).max() > 0  # the cohort condition changes the output

    r = ext_predict(env, root / "imagesTs", tmp_path / "x", "SCINTrainer", ok=False)
    assert r.returncode != 0 and "pass --cohort NAME" in r.stderr and "cohort1_no_small" in r.stderr
    r = ext_predict(env, root / "imagesTs", tmp_path / "x", "SCINTrainer", "--cohort", "siteZ", ok=False)
    assert r.returncode != 0 and "unknown cohort 'siteZ'" in r.stderr
    r = sh([nnunet_command("nnUNetv2_predict"), "-i", root / "imagesTs", "-o", tmp_path / "plain", "-d", DATASET, "-c",
            "2d", "-f", "0", "-tr", "SCINTrainer", "-device", "cpu", "-npp", "1", "-nps", "1"], env, ok=False)
    assert r.returncode != 0 and "no condition was set" in r.stdout + r.stderr
    assert not list((tmp_path / "plain").glob("*.nii.gz"))

    env2 = export_and_reinstall(env, "SCINTrainer", tmp_path)
    ext_predict(env2, root / "imagesTs", tmp_path / "reinstalled", "SCINTrainer", "--cohort", "cohort1_no_small")
    a = read_image(preds["cohort1_no_small"] / "soft" / "phantom_009.nii.gz")[0]
    b = read_image(tmp_path / "reinstalled" / "soft" / "phantom_009.nii.gz")[0]
    assert np.array_equal(a, b)


def test_film_end_to_end(planned, tmp_path):
    work, env, root = planned
    out = train(planned, "ResolutionFiLMTrainer")
    assert (out / "fold_0" / "validation" / "summary.json").is_file()
    w = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    last = [v for k, v in w.items() if k.endswith(".mlp.2.weight")]
    assert last and any(v.abs().sum() > 0 for v in last)  # the spacing MLPs left their zero start
    pred = tmp_path / "film"
    ext_predict(env, root / "imagesTs", pred, "ResolutionFiLMTrainer")
    assert json.loads((pred / "nnunet_ext_predict.json").read_text())["condition"] == "spacing"
    assert {p.name for p in pred.glob("*.nii.gz")} == {"phantom_008.nii.gz", "phantom_009.nii.gz"}
    r = ext_predict(env, root / "imagesTs", tmp_path / "x", "ResolutionFiLMTrainer", "--cohort", "cohort0_all", ok=False)
    assert r.returncode != 0 and "--cohort applies to cohort-conditioned" in r.stderr
    r = sh([nnunet_command("nnUNetv2_predict"), "-i", root / "imagesTs", "-o", tmp_path / "plain", "-d", DATASET, "-c",
            "2d", "-f", "0", "-tr", "ResolutionFiLMTrainer", "-device", "cpu", "-npp", "1", "-nps", "1"], env, ok=False)
    assert r.returncode != 0 and "no condition was set" in r.stdout + r.stderr
    env2 = export_and_reinstall(env, "ResolutionFiLMTrainer", tmp_path)
    ext_predict(env2, root / "imagesTs", tmp_path / "reinstalled", "ResolutionFiLMTrainer")
    for case in ("phantom_008", "phantom_009"):
        assert np.array_equal(read_image(pred / "soft" / f"{case}.nii.gz")[0],
                              read_image(tmp_path / "reinstalled" / "soft" / f"{case}.nii.gz")[0])


def test_missing_cohort_fails_training(planned, tmp_path):
    work, env, root = planned
    cohorts = json.loads((root / "cohorts.json").read_text())
    try:
        (root / "cohorts.json").write_text(json.dumps({k: v for k, v in cohorts.items() if k != "phantom_003"}))
        r = sh([nnunet_command("nnUNetv2_train"), DATASET, "2d", "1", "-tr", "SCINTrainer", "-device", "cpu"], env, ok=False)
    finally:
        (root / "cohorts.json").write_text(json.dumps(cohorts))
    assert r.returncode != 0 and "have no cohort in" in r.stdout + r.stderr and "phantom_003" in r.stdout + r.stderr


@pytest.mark.heavy  # two trainings and predictions (about 35 s): CI's heavy part
def test_norm_only_fine_tuning_of_a_new_cohort(planned, tmp_path):
    work, env, root = planned
    pre = train(planned, "SCINTrainer") if not (
        work / "nnUNet_results" / root.name / "SCINTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth").exists() \
        else work / "nnUNet_results" / root.name / "SCINTrainer__nnUNetPlans__2d"
    ckpt = pre / "fold_0" / "checkpoint_final.pth"
    new = write_phantom_dataset(env["nnUNet_raw"], NEW_COHORT_DATASET, 3, PhantomConfig(shape=(32, 32, 32), seed=8),
                                n_test=1, progress=False)
    (new / "cohorts.json").write_text(json.dumps({f"phantom_{i:03d}": "newsite" for i in range(4)}))
    # nnU-Net's fine-tuning recipe: the target dataset uses the pretrained model's plans
    sh([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", NEW_COHORT_DATASET, "--no_pp", "-np", "2"], env)
    sh([nnunet_command("nnUNetv2_move_plans_between_datasets"), "-s", DATASET, "-t", NEW_COHORT_DATASET, "-sp",
        "nnUNetPlans", "-tp", "nnUNetPlans"], env)
    sh([nnunet_command("nnUNetv2_preprocess"), "-d", NEW_COHORT_DATASET, "-c", "2d", "-np", "2"], env)
    r = sh([nnunet_command("nnUNetv2_train"), NEW_COHORT_DATASET, "2d", "all", "-tr", "SCINNormFineTuneTrainer",
            "-device", "cpu"], env, ok=False)
    assert r.returncode != 0 and "-pretrained_weights" in r.stdout + r.stderr
    out = train(planned, "SCINNormFineTuneTrainer", NEW_COHORT_DATASET, "all", ("-pretrained_weights", ckpt))
    a = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    b = torch.load(out / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith((".weight.2", ".bias.2")) or k == "ext_condition.cohort_names" for k in changed)
    assert any(".seg_layers." in k for k in a)  # segmentation layers restored, not re-initialised
    settings = json.loads((out / "fold_all" / "nnunet_ext_settings.json").read_text())
    assert settings["cohort_table"] == {"cohort0_all": 0, "cohort1_no_small": 1, "newsite": 2}
    assert settings["fine_tuned_slots"] == [2]
    for cohort in ("newsite", "cohort0_all"):  # the fine-tuned model keeps every cohort's style
        ext_predict(env, new / "imagesTs", tmp_path / cohort, "SCINNormFineTuneTrainer", "--cohort", cohort,
                    dataset=NEW_COHORT_DATASET, folds=("all",))
        assert (tmp_path / cohort / "phantom_003.nii.gz").is_file()
