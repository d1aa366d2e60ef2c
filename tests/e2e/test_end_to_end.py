"""Real nnU-Net on a tiny phantom: planning, 1 epoch of 2 iterations on CPU, prediction, our evaluation.
nnU-Net's commands run in this process (conftest.run_nnunet); every trainer's data path is also covered by
test_compositions (two real training steps each), so only representative trainers train end to end here;
the others are marked heavy."""
import json
import pickle

import blosc2
import numpy as np
import pytest

from conftest import PLANNED_ID, run_nnunet
from nnunet_ext.cli import run
from nnunet_ext.core.io import read_geometry, read_image, write_image
from nnunet_ext.preprocessing.maps import read_map
from nnunet_ext.core.paths import nnunet_command, nnunet_env
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

pytestmark = pytest.mark.slow  # real nnU-Net runs

DATASET = PLANNED_ID
TEST_CASES = ("phantom_008", "phantom_009")


@pytest.fixture(scope="module")
def planned(planned_phantom):
    """The shared planned phantom (conftest.planned_phantom): 8 + 2 cases 32^3 with soft labels and 2
    raters, planned 2d and 3d_fullres."""
    return planned_phantom


def train_and_predict(planned, trainer: str):
    """Train ``trainer`` 1 epoch (2 iterations) on fold 0, predict the test cases with probabilities."""
    work, env, root = planned
    run_nnunet([nnunet_command("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    out = next((work / "nnUNet_results").glob(f"Dataset{DATASET}_*")) / f"{trainer}__nnUNetPlans__2d"
    pred = work / f"pred_{trainer}"
    run_nnunet([nnunet_command("nnUNetv2_predict"), "-i", str(root / "imagesTs"), "-o", str(pred), "-d",
                        str(DATASET), "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "--save_probabilities",
                        "-npp", "1", "-nps", "1"], env)
    return out, pred


def test_baseline_trainer_end_to_end(planned, tmp_path):
    work, env, root = planned
    out, pred = train_and_predict(planned, "ExtBaselineTrainer")
    assert (out / "fold_0" / "checkpoint_final.pth").is_file()
    # lesion-wise validation metrics beside nnU-Net's summary.json, written by our trainers
    lesion = json.loads((out / "fold_0" / "validation" / "lesion_summary.json").read_text())
    nn_summary = json.loads((out / "fold_0" / "validation" / "summary.json").read_text())
    assert lesion["aggregate"]["n_cases"] == len(nn_summary["metric_per_case"])
    settings = json.loads((out / "fold_0" / "nnunet_ext_settings.json").read_text())
    assert settings["num_epochs"] == 1 and settings["num_iterations_per_epoch"] == 2
    assert settings["budget_overrides_from_environment"]["num_epochs"] == 1
    # nnU-Net's own end-of-training validation ran
    assert (out / "fold_0" / "validation" / "summary.json").is_file()
    for case in TEST_CASES:
        g_img = read_geometry(root / "imagesTs" / f"{case}_0000.nii.gz")
        g_pred = read_geometry(pred / f"{case}.nii.gz")
        assert g_pred["size"] == g_img["size"] and np.allclose(g_pred["spacing"], g_img["spacing"])
        probs = np.load(pred / f"{case}.npz")["probabilities"]
        assert probs.shape == (2,) + tuple(reversed(g_img["size"]))
    assert run(["evaluate", "--ref", str(root / "labelsTs"), "--pred", str(pred), "-o", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_case"]) == set(TEST_CASES)
    ref_lesions = sum(len(v) for k, v in json.loads((root / "lesions.json").read_text()).items()
                      if k in res["per_case"])
    assert res["aggregate"]["pooled"]["ref_lesions"] == ref_lesions
    assert run(["operating-points", "--ref", str(root / "labelsTs"), "--prob", str(pred), "-o",
                str(tmp_path / "ops.json")]) == 0
    ops = json.loads((tmp_path / "ops.json").read_text())
    assert len(ops["points"]) == len(ops["thresholds"]) and (tmp_path / "ops.png").stat().st_size > 10000


@pytest.mark.parametrize("trainer", ["LSRTrainer", pytest.param("LSRDiceTrainer", marks=pytest.mark.heavy),
                                     pytest.param("FocalTverskyTrainer", marks=pytest.mark.heavy)])
def test_method_trainers_end_to_end(planned, trainer, tmp_path):
    work, env, root = planned
    out, pred = train_and_predict(planned, trainer)
    settings = json.loads((out / "fold_0" / "nnunet_ext_settings.json").read_text())
    assert settings["trainer"] == trainer
    if trainer.startswith("LSR"):
        assert settings["loss_parameters"] == {"alpha": 4.0, "beta": 4.0}
        sizes = next((work / "nnUNet_preprocessed").glob(f"Dataset{DATASET}_*")) / "nnUNetPlans_2d" / \
            "nnunet_ext_lesion_sizes_cc18"
        split = json.loads((sizes.parent.parent / "splits_final.json").read_text())[0]
        assert sorted(p.stem for p in sizes.glob("*.b2nd")) == sorted(split["train"])
        case = split["train"][0]
        size_map = read_map(sizes, case)
        lesions = json.loads((root / "lesions.json").read_text())[case]
        # same grid as the raw data here (isotropic 1 mm): the map holds each lesion's size on its voxels
        assert sorted(set(np.unique(size_map)) - {0}) == sorted({r["voxels"] for r in lesions})
    if trainer == "LSRTrainer":  # cross-entropy alone: output bias from the class fractions, stored threshold
        fractions = settings["output_bias"]["class_fractions"]
        assert settings["output_bias"]["bias"][1] == pytest.approx(np.log(fractions[1] / fractions[0]), abs=1e-5)
        th = json.loads((out / "fold_0" / "nnunet_ext_threshold.json").read_text())
        assert th["best_threshold"] in th["thresholds"] and th["activation"] == "softmax"
    if trainer == "FocalTverskyTrainer":
        assert settings["loss_parameters"]["a"] == 0.7
    assert run(["evaluate", "--ref", str(root / "labelsTs"), "--pred", str(pred), "-o", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["aggregate"]["n_cases"] == 2 and 0.0 <= res["aggregate"]["mean"]["dice"] <= 1.0


def test_lsr_trainer_resumes_with_c(planned):
    """--c continues an LSRTrainer run from its checkpoint (nnU-Net finds the class by name again)."""
    work, env, root = planned
    env = dict(env, NNUNET_EXT_NUM_EPOCHS="1")
    cmd = [nnunet_command("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", "LSRTrainer", "-device", "cpu"]
    if not (work / "nnUNet_results" / root.name / "LSRTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth").is_file():
        run_nnunet(cmd, env)  # else test_method_trainers_end_to_end trained it (1 epoch)
    env["NNUNET_EXT_NUM_EPOCHS"] = "2"
    r = run_nnunet(cmd + ["--c"], env)
    assert "Epoch 1" in r.stdout and "Epoch 0\n" not in r.stdout


def test_preprocess_soft_and_soft_trainers(planned, tmp_path):
    work, env, root = planned
    run_nnunet([nnunet_command("nnunet-ext"), "preprocess-soft", "-d", str(DATASET), "-c", "2d"], env)
    pre = next((work / "nnUNet_preprocessed").glob(f"Dataset{DATASET}_*")) / "nnUNetPlans_2d"
    stored = read_map(pre / "nnunet_ext_soft", "phantom_000")
    raw_soft, _ = read_image(root / "softlabelsTr" / "phantom_000.nii.gz")
    seg = np.asarray(blosc2.open(str(pre / "phantom_000_seg.b2nd"), mode="r")[:])[0]
    assert stored.dtype == np.uint8 and stored.shape == seg.shape
    # 2d plan at the raw spacing: the stored map is the raw soft map cropped to nnU-Net's bounding box, in 1/255 steps
    props = pickle.load(open(pre / "phantom_000.pkl", "rb"))
    crop = raw_soft[tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])]
    assert np.abs(stored / 255.0 - crop).max() <= 0.5 / 255 + 1e-6
    assert ((stored > 0) & (stored < 255)).any()
    stored = {}
    # (SoftSeg's normalized-ReLU output and its stored threshold: test_compositions_e2e, SoftSegRandomRaterTrainer)
    for trainer in ("SoftDiceTrainer",):
        out, pred = train_and_predict(planned, trainer)
        assert (out / "fold_0" / "checkpoint_final.pth").is_file()
        assert len(list(pred.glob("*.nii.gz"))) == 2
        th = json.loads((out / "fold_0" / "nnunet_ext_threshold.json").read_text())
        assert len(th["dice"]) == 19 and th["best_threshold"] in th["thresholds"]
        assert th["activation"] == "softmax"
        stored[trainer] = th["best_threshold"]
    # nnunet-ext predict applies the stored threshold and writes soft maps in the input geometry
    ours = tmp_path / "soft_pred"
    run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(root / "imagesTs"), "-o", str(ours),
                        "-d", str(DATASET), "-c", "2d", "-tr", "SoftDiceTrainer", "-f", "0", "-device", "cpu"], env)
    summary = json.loads((ours / "nnunet_ext_predict.json").read_text())
    assert summary["threshold"] == stored["SoftDiceTrainer"] and summary["folds"] == [0]
    for case in TEST_CASES:
        soft, _ = read_image(ours / "soft" / f"{case}.nii.gz")
        mask, _ = read_image(ours / f"{case}.nii.gz")
        assert soft.dtype == np.float32 and np.array_equal(mask, (soft >= summary["threshold"]).astype(mask.dtype))
        assert read_geometry(ours / f"{case}.nii.gz")["size"] == read_geometry(root / "imagesTs" / f"{case}_0000.nii.gz")["size"]
    assert not list(ours.glob("*.npz"))


def test_preprocess_raters(planned):
    work, env, root = planned
    run_nnunet([nnunet_command("nnunet-ext"), "preprocess-soft", "-d", str(DATASET), "-c", "2d", "--raters"], env)
    pre = next((work / "nnUNet_preprocessed").glob(f"Dataset{DATASET}_*")) / "nnUNetPlans_2d"
    assert sorted(p.name for p in (pre / "nnunet_ext_raters").iterdir()) == ["rater1", "rater2"]
    stored = read_map(pre / "nnunet_ext_raters" / "rater2", "phantom_001")
    raw, _ = read_image(root / "ratersTr" / "rater2" / "phantom_001.nii.gz")
    props = pickle.load(open(pre / "phantom_001.pkl", "rb"))
    crop = raw[tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])]
    assert np.array_equal(stored >= 128, crop > 0)
    # training on these rater masks: test_compositions (RandomRaterTrainer, two real steps) and
    # test_compositions_e2e (SoftSegRandomRaterTrainer, nnUNetv2_train end to end)


def test_lsr_model_find_best_configuration_export_and_install(planned, tmp_path):
    """nnU-Net's find_best_configuration, export to zip and install from zip work for LSRTrainer models."""
    work, env, root = planned
    out = work / "nnUNet_results" / root.name / "LSRTrainer__nnUNetPlans__2d"
    if not (out / "fold_0" / "checkpoint_final.pth").is_file():
        train_and_predict(planned, "LSRTrainer")
    run_nnunet([nnunet_command("nnUNetv2_find_best_configuration"), str(DATASET), "-c", "2d", "-tr",
                        "LSRTrainer", "-f", "0", "--disable_ensembling", "-np", "1"], env)
    info = json.loads((out.parent / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == "LSRTrainer"
    zip_path = tmp_path / "model.zip"
    run_nnunet([nnunet_command("nnUNetv2_export_model_to_zip"), "-d", str(DATASET), "-o", str(zip_path), "-c", "2d",
                    "-tr", "LSRTrainer", "-f", "0"], env)
    env2 = dict(env, nnUNet_results=str(tmp_path / "results2"))
    run_nnunet([nnunet_command("nnUNetv2_install_pretrained_model_from_zip"), str(zip_path)], env2)
    pred_a, pred_b = tmp_path / "a", tmp_path / "b"
    for e, p in ((env, pred_a), (env2, pred_b)):
        run_nnunet([nnunet_command("nnUNetv2_predict"), "-i", str(root / "imagesTs"), "-o", str(p), "-d",
                            str(DATASET), "-c", "2d", "-f", "0", "-tr", "LSRTrainer", "-device", "cpu", "-npp", "1",
                            "-nps", "1"], e)
    for case in TEST_CASES:
        assert np.array_equal(read_image(pred_a / f"{case}.nii.gz")[0], read_image(pred_b / f"{case}.nii.gz")[0])


def test_lsr_with_ignore_label(tmp_path):
    """A dataset with nnU-Net's ignore label: LSR sizes cover lesions only, training and prediction run."""
    env = nnunet_env(tmp_path, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1"})
    root = write_phantom_dataset(env["nnUNet_raw"], 512, 6, PhantomConfig(shape=(32, 32, 32), empty_fraction=0.0,
                                                                             seed=7), progress=False)
    for lab_path in (root / "labelsTr").iterdir():
        lab, sp = read_image(lab_path)
        lab = lab.copy()
        lab[:, :, :6] = np.where(lab[:, :, :6] == 0, 2, lab[:, :, :6])  # left strip unannotated
        write_image(lab, sp, lab_path)
    ds = json.loads((root / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "lesion": 1, "ignore": 2}
    (root / "dataset.json").write_text(json.dumps(ds))
    run_nnunet([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", "512", "-c", "2d", "-np", "2"], env)
    run_nnunet([nnunet_command("nnUNetv2_train"), "512", "2d", "0", "-tr", "LSRTrainer", "-device", "cpu"], env)
    pre = tmp_path / "nnUNet_preprocessed" / "Dataset512_MSPhantom" / "nnUNetPlans_2d"
    case = sorted((pre / "nnunet_ext_lesion_sizes_cc18").glob("*.b2nd"))[0].stem
    sizes = read_map(pre / "nnunet_ext_lesion_sizes_cc18", case)
    seg = np.asarray(blosc2.open(str(pre / f"{case}_seg.b2nd"), mode="r")[:])[0]
    assert (seg == 2).any() and np.all(sizes[seg == 2] == 0) and np.all((sizes > 0) == (seg == 1))


def _pseudo(env, root, out_name, *extra):
    return run_nnunet([nnunet_command("nnunet-ext"), "pseudolabel", "-d", str(DATASET), "-c", "2d", "-tr",
                           "ExtBaselineTrainer", "-f", "0", "-i", str(root / "imagesTs"), "-o", out_name, "--tst", "0",
                           "-device", "cpu", *extra], env, ok=False)


@pytest.mark.heavy  # pseudo-labelling run, killed, resumed and sharded (about 50 s): CI's heavy part
def test_pseudolabel_student_shards_and_resume(planned, tmp_path):
    work, env, root = planned
    if not (work / "nnUNet_results" / root.name / "ExtBaselineTrainer__nnUNetPlans__2d" / "fold_0" /
            "checkpoint_final.pth").is_file():
        train_and_predict(planned, "ExtBaselineTrainer")
    r = _pseudo(env, root, "Dataset513_Student", "--soft-rim", "0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    student = work / "nnUNet_raw" / "Dataset513_Student"
    ds = json.loads((student / "dataset.json").read_text())
    prov = json.loads((student / "provenance.json").read_text())
    assert sorted(prov["cases"]) == list(TEST_CASES) and prov["kept"] == list(TEST_CASES)
    assert ds["numTraining"] == 8 + 2 and prov["parameters"] == {"alpha": 0.3, "vpt": 0.3, "tst": 0.0,
                                                                   "ignore_uncertain": False, "soft_rim_gamma": 0.5,
                                                                   "soft_rim_mm": 1.0}
    # soft labels: the labeled cases keep the teacher dataset's, the pseudo-labels get theirs + a soft rim
    for k in range(8):
        assert np.array_equal(read_image(student / "softlabelsTr" / f"phantom_{k:03d}.nii.gz")[0],
                              read_image(root / "softlabelsTr" / f"phantom_{k:03d}.nii.gz")[0])
    m, _ = read_image(student / "lesionmapTr" / "phantom_008.nii.gz")
    lab, _ = read_image(student / "labelsTr" / "phantom_008.nii.gz")
    omega, _ = read_image(student / "confidenceTr" / "phantom_008.nii.gz")
    assert np.array_equal(lab, (m >= 0.5).astype(lab.dtype)) and omega.min() >= np.exp(-0.3 * np.log(2)) - 1e-5
    soft, _ = read_image(student / "softlabelsTr" / "phantom_008.nii.gz")
    assert set(np.unique(soft)) <= {0.0, 0.5, 1.0} and np.array_equal(soft == 1, lab == 1)
    if lab.any():
        from scipy import ndimage

        rim = ndimage.binary_dilation(lab == 1, ndimage.generate_binary_structure(3, 1)) & (lab == 0)
        assert np.all(soft[(soft == 0.5)] == 0.5) and np.all(rim[soft == 0.5])  # the rim lies 1 voxel around
    assert (student / "imagesTr" / "phantom_008_0000.nii.gz").is_file() and (student / "labelsTr" / "phantom_000.nii.gz").is_file()
    # the student's split (raw folder, copied by nnU-Net's planning): the 8 labelled cases (each its own
    # subject: the teacher has no case_groups.json) in nnU-Net's own 5 folds, the 2 pseudo-labels added to
    # every training list and to no validation list
    from nnunet_ext.nnunet_adapter import crossval_splits

    split = json.loads((student / "splits_final.json").read_text())
    assert split == [{"train": sorted(f["train"] + list(TEST_CASES)), "val": f["val"]}
                     for f in crossval_splits([f"phantom_{k:03d}" for k in range(8)], 5)]
    # two shards give the same dataset as one run; a part that finishes leaves the other part's scratch
    # folder alone (shards run at the same time: part 1 may still be predicting into it)
    shards = work / "nnUNet_raw" / "Dataset514_Shards"
    busy = shards / ".nnunet_ext_scratch" / "part1of2" / "in_use.npz"
    busy.parent.mkdir(parents=True)
    busy.write_bytes(b"part 1 is writing")
    for part in ("0", "1"):
        r = _pseudo(env, root, "Dataset514_Shards", "-num_parts", "2", "-part_id", part)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        if part == "0":
            assert busy.read_bytes() == b"part 1 is writing"
    assert not (shards / ".nnunet_ext_scratch").exists()  # the last part removes the empty scratch parent
    assert json.loads((shards / "provenance.json").read_text())["cases"].keys() == prov["cases"].keys()
    for case in TEST_CASES:
        assert np.array_equal(read_image(shards / "labelsTr" / f"{case}.nii.gz")[0],
                              read_image(student / "labelsTr" / f"{case}.nii.gz")[0])
    # an interrupted run (case 009 unfinished, a half-written temporary file of it left) continues: only that
    # case is redone, its stale files are not trusted
    (student / ".nnunet_ext_progress" / "phantom_009.json").unlink()
    (student / "labelsTr" / "phantom_009.nii.gz").unlink()
    (student / "imagesTr" / ".tmp_999999_phantom_009_0000.nii.gz").write_bytes(b"half")
    (student / "confidenceTr" / "phantom_009.nii.gz").write_bytes(b"stale")
    # ... but only with the same options: other options would mix two filters in one dataset
    r = _pseudo(env, root, "Dataset513_Student")
    assert r.returncode == 2 and "was started with other options (parameters" in r.stderr, r.stderr
    r = _pseudo(env, root, "Dataset513_Student", "--soft-rim", "0.5")
    assert r.returncode == 0 and "2 cases, 1 already done" in r.stdout, r.stdout + r.stderr
    assert not list(student.rglob(".tmp_*")) and read_image(student / "confidenceTr" / "phantom_009.nii.gz")[0].size
    assert np.array_equal(read_image(student / "labelsTr" / "phantom_009.nii.gz")[0],
                          read_image(shards / "labelsTr" / "phantom_009.nii.gz")[0])
    # the student trains on its soft labels with nnU-Net's own commands
    run_nnunet([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", "513", "-c", "2d", "-np", "2"], env)
    assert json.loads((work / "nnUNet_preprocessed" / "Dataset513_Student" / "splits_final.json").read_text()) == split
    run_nnunet([nnunet_command("nnunet-ext"), "preprocess-soft", "-d", "513", "-c", "2d"], env)
    run_nnunet([nnunet_command("nnUNetv2_train"), "513", "2d", "0", "-tr", "SoftDiceTrainer", "-device", "cpu"], env)
    log = "".join(p.read_text() for p in (work / "nnUNet_results" / "Dataset513_Student" /
                                          "SoftDiceTrainer__nnUNetPlans__2d" / "fold_0").glob("training_log_*.txt"))
    # fold 0 of 8 labelled cases validates on 2; it trains on the other 6 and both pseudo-labels
    assert "Using splits from existing split file" in log and "This split has 8 training and 2 validation" in log


def test_pseudolabel_rejects_wrong_channels(planned, tmp_path):
    work, env, root = planned
    bad = tmp_path / "unl"
    bad.mkdir()
    img, sp = read_image(root / "imagesTs" / "phantom_008_0000.nii.gz")
    write_image(img, sp, bad / "x_0000.nii.gz")
    write_image(img, sp, bad / "x_0001.nii.gz")
    r = run_nnunet([nnunet_command("nnunet-ext"), "pseudolabel", "-d", str(DATASET), "-c", "2d", "-tr",
                        "ExtBaselineTrainer", "-i", str(bad), "-o", "Dataset515_Bad", "-device", "cpu"], env, ok=False)
    assert r.returncode == 2 and "case x in" in r.stderr and "channels [0, 1]" in r.stderr
