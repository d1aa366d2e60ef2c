"""Consensus cascade: shared split, stage-2 inputs out of fold (leakage test), end to end on a tiny
two-time-point phantom with real nnU-Net (2 raters, 2 folds, 1 epoch of 2 iterations): McGill's system,
LSRFiLMTrainer at native resolution (nnUNetPlans_native) in both stages, and the whole cascade as one
submission."""
import json

import numpy as np
import pytest

from conftest import run_nnunet
from nnunet_ext.workflows.consensus import fold_of, kfold_splits
from nnunet_ext.core.io import read_geometry, read_image
from nnunet_ext.core.paths import nnunet_command, nnunet_env
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset

SRC = 560


def test_kfold_splits_partition_the_cases():
    cases = [f"c{i}" for i in range(7)]
    s = kfold_splits(cases, 3)
    assert len(s) == 3 and sorted(c for f in s for c in f["val"]) == cases
    for f in s:
        assert not set(f["train"]) & set(f["val"]) and sorted(f["train"] + f["val"]) == cases
    assert kfold_splits(cases, 3) == s  # deterministic
    assert set(fold_of(s)) == set(cases)
    with pytest.raises(ValueError):
        kfold_splits(cases, 8)
    with pytest.raises(ValueError):
        kfold_splits(cases, 1)


def cli(env, *args, ok=True):
    """``nnunet-ext ARGS`` in this process (its nnU-Net trainings and predictions still run as the launcher's
    own processes)."""
    return run_nnunet([nnunet_command("nnunet-ext"), *args], env, ok)


NATIVE_MODEL = "LSRFiLMTrainer__nnUNetPlans_native__2d"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    """McGill's MSSEG-2 system in one command: every rater dataset and the consensus dataset planned at
    native resolution and trained with LSR + resolution FiLM (stage 1 every fold of the 2-fold split, stage 2
    fold 0), on two sites of different voxel spacing."""
    work = tmp_path_factory.mktemp("cascade")
    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1",
                "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
    cfg = PhantomConfig(shape=(32, 32, 32), timepoints=2, raters=2, seed=4,
                        sites=((1.0, 1.0, 1.0), (1.25, 1.25, 2.0)))  # x y z
    src = write_phantom_dataset(env["nnUNet_raw"], SRC, 4, cfg, n_test=2, progress=False)
    r = cli(env, "consensus", "split-raters", "-d", SRC, "--folds", 2)
    assert "rater1: dataset 561" in r.stdout and "rater2: dataset 562" in r.stdout
    cli(env, "consensus", "train", "-d", SRC, "--stage", "all", "-c", "2d", "-p", "nnUNetPlans_native", "-tr",
        "LSRFiLMTrainer", "-f", 0, "-device", "cpu", "-np", 1, "-j", 2, "--cpus-per-task", 1)  # two trainings at once
    return work, env, src


@pytest.mark.slow
@pytest.mark.heavy  # the McGill cascade of the module fixture (about 125 s to train), shared with the other heavy tests here: CI's heavy part
def test_split_raters_datasets(cascade):
    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    for k, r in enumerate(("rater1", "rater2"), start=1):
        rds = work / "nnUNet_raw" / state["raters"][r]["name"]
        for case in ("phantom_000", "phantom_003"):
            assert np.array_equal(read_image(rds / "labelsTr" / f"{case}.nii.gz")[0],
                                  read_image(src / "ratersTr" / r / f"{case}.nii.gz")[0])
            assert (rds / "imagesTr" / f"{case}_0001.nii.gz").resolve() == (src / "imagesTr" / f"{case}_0001.nii.gz").resolve()
        # nnU-Net trained with our shared split
        pre = json.loads((work / "nnUNet_preprocessed" / state["raters"][r]["name"] / "splits_final.json").read_text())
        assert pre == state["splits"]


@pytest.mark.slow
@pytest.mark.heavy  # the McGill cascade of the module fixture (about 125 s to train), shared with the other heavy tests here: CI's heavy part
def test_stage_all_plans_every_dataset_at_native_resolution_and_trains_it(cascade):
    """`consensus train --stage all -p nnUNetPlans_native`: both rater datasets and the stage-2 dataset have
    native plans (2d marked native) and native preprocessed cases, and every model was trained on them."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_ext.preprocessing.native import NATIVE_KEY

    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    assert state["stage1"]["plans"] == "nnUNetPlans_native" and state["stage1"]["trainer"] == "LSRFiLMTrainer"
    assert state["stage2_training"]["plans"] == "nnUNetPlans_native" and state["stage2_training"]["folds"] == [0]
    names = [state["raters"]["rater1"]["name"], state["raters"]["rater2"]["name"], state["stage2"]["name"]]
    for name, folds, n_ch in zip(names, ([0, 1], [0, 1], [0]), (2, 2, 4)):  # stage 2: + one channel per rater
        pre = work / "nnUNet_preprocessed" / name
        plans = json.loads((pre / "nnUNetPlans_native.json").read_text())
        assert plans["configurations"]["2d"][NATIVE_KEY] is True
        data = pre / plans["configurations"]["2d"]["data_identifier"]
        # hand-worked: the phantom's 32 mm head is 32^3 voxels of 1 mm on site A (even cases) and 16 x 26 x 26
        # voxels of 2 x 1.25 x 1.25 mm on site B (odd cases; 32 / 1.25 = 25.6 -> 26), z y x, no zero voxel to
        # crop. nnU-Net's 2d plan resamples in-plane to the median spacing, median(1, 1.25, 1, 1.25)
        # = 1.125 mm: 32 -> round(32 / 1.125) = 28 and 26 -> round(26 * 1.25 / 1.125) = 29 voxels. At native
        # resolution every case keeps its own grid: (32, 32, 32) and (16, 26, 26).
        loader = infer_dataset_class(str(data))(str(data))
        for i in range(4):
            x, _, _, props = loader.load_case(f"phantom_{i:03d}")
            assert tuple(x.shape) == ((n_ch, 32, 32, 32) if i % 2 == 0 else (n_ch, 16, 26, 26)), (name, i, x.shape)
            assert list(props["spacing"]) == ([1.0, 1.0, 1.0] if i % 2 == 0 else [2.0, 1.25, 1.25])
        mdir = work / "nnUNet_results" / name / NATIVE_MODEL
        assert [f for f in folds if (mdir / f"fold_{f}" / "checkpoint_final.pth").is_file()] == folds
        assert (mdir / "plans.json").is_file() and json.loads((mdir / "plans.json").read_text())["configurations"]["2d"][NATIVE_KEY]
    # stage 2 reads the rater models' out-of-fold probabilities: 2 image channels + 2 rater channels
    dj = json.loads((work / "nnUNet_raw" / state["stage2"]["name"] / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "FLAIR_tp1", "1": "FLAIR_tp2", "2": "noNorm", "3": "noNorm"}


@pytest.mark.slow
@pytest.mark.heavy  # the McGill cascade of the module fixture (about 125 s to train), shared with the other heavy tests here: CI's heavy part
def test_stage2_inputs_are_out_of_fold(cascade):
    """Leakage test: the stage-2 rater channels of each training case come from the fold model that held
    it out (by construction: provenance, the split nnU-Net used, and the values themselves)."""
    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    # drop one validation file so the re-prediction path is exercised too
    r1 = work / "nnUNet_results" / state["raters"]["rater1"]["name"] / NATIVE_MODEL
    dropped = state["splits"][1]["val"][0]
    kept_npz = np.load(r1 / "fold_1" / "validation" / f"{dropped}.npz")["probabilities"][1]
    (r1 / "fold_1" / "validation" / f"{dropped}.npz").rename(work / "moved.npz")
    cli(env, "consensus", "build-stage2", "-d", SRC, "-device", "cpu")
    state = json.loads((src / "consensus.json").read_text())
    s2 = work / "nnUNet_raw" / state["stage2"]["name"]
    prov = json.loads((s2 / "stage2_provenance.json").read_text())
    folds = fold_of(state["splits"])
    assert set(prov) == set(folds) == {f"phantom_{i:03d}" for i in range(4)}
    dj = json.loads((s2 / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "FLAIR_tp1", "1": "FLAIR_tp2", "2": "noNorm", "3": "noNorm"}
    for case, per_rater in prov.items():
        for i, (rater, p) in enumerate(sorted(per_rater.items())):
            f = p["fold"]
            assert f == folds[case] and case not in state["splits"][f]["train"]
            assert f"fold_{f}" in p["model"]
            channel = read_image(s2 / "imagesTr" / f"{case}_{2 + i:04d}.nii.gz")[0]
            if case == dropped and rater == "rater1":
                assert p["source"] == "re-predicted"
                # the same held-out model, predicted again (here in-process, there in the trainer's own process with
                # other thread counts: float32 sums in another order, seen to differ by 2e-3 at one voxel of 32^3)
                assert np.abs(channel - kept_npz).max() < 1e-2 and np.abs(channel - kept_npz).mean() < 1e-4
            else:
                assert p["source"] == "validation npz"
                mdir = work / "nnUNet_results" / state["raters"][rater]["name"] / NATIVE_MODEL
                assert np.array_equal(channel, np.load(mdir / f"fold_{f}" / "validation" / f"{case}.npz")["probabilities"][1])
    # the stage-2 dataset is trained with the same split
    assert json.loads((work / "nnUNet_preprocessed" / state["stage2"]["name"] / "splits_final.json").read_text()) == state["splits"]


@pytest.mark.slow
@pytest.mark.heavy  # the McGill cascade of the module fixture (about 125 s to train), shared with the other heavy tests here: CI's heavy part
def test_cascade_end_to_end(cascade, tmp_path):
    work, env, src = cascade
    out = tmp_path / "pred"
    r = cli(env, "consensus", "predict", "-d", SRC, "-i", src / "imagesTs", "-o", out, "-device", "cpu",
            "--keep-rater-predictions", "-j", "2")
    assert "[3/3] consensus model" in r.stdout
    for case in ("phantom_004", "phantom_005"):
        g = read_geometry(src / "imagesTs" / f"{case}_0000.nii.gz")
        assert read_geometry(out / f"{case}.nii.gz")["size"] == g["size"]
        for rater in ("rater1", "rater2"):
            assert (out / "raters" / rater / f"{case}.nii.gz").is_file()
    assert not (out / ".cascade").exists()
    r = cli(env, "consensus", "evaluate", "-d", SRC, "--pred", out, "-o", tmp_path / "ev.json")
    table = json.loads((tmp_path / "ev.json").read_text())["table"]
    assert set(table) == {"consensus model", "rater1 model", "rater2 model"}
    assert set(table["consensus model"]) == {"consensus", "rater1", "rater2"}
    n_with = sum(read_image(src / "labelsTs" / f"phantom_00{i}.nii.gz")[0].any() for i in (4, 5))
    assert table["consensus model"]["consensus"]["cases_with_lesions"] == n_with
    assert "lesion F1 / Dice" in r.stdout
    # wrong number of channels is a clear error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_0000.nii.gz").write_bytes((src / "imagesTs" / "phantom_004_0000.nii.gz").read_bytes())
    r = cli(env, "consensus", "predict", "-d", SRC, "-i", bad, "-o", tmp_path / "o2", "-device", "cpu", ok=False)
    assert r.returncode != 0 and "x_0001.nii.gz" in r.stderr and "needs 2 channels" in r.stderr


@pytest.mark.slow
@pytest.mark.heavy  # compare trains a fold, predicts both arms and consensus predict runs once more
def test_cascade_as_a_compare_arm(cascade, tmp_path):
    """``compare -tr LSRFiLMTrainer cascade:LSRFiLMTrainer``: the trained cascade is reused (same budget), the
    single model trains on the consensus split, the cascade arm's masks are what ``consensus predict`` writes
    and its lesion counts match an independent count (scipy's 26-connected components)."""
    from scipy import ndimage

    work, env, src = cascade
    cli(env, "plan-native", "-d", SRC, "-c", "2d")
    arms = ["LSRFiLMTrainer", "cascade:LSRFiLMTrainer"]
    cmp = tmp_path / "cmp"
    r = cli(env, "compare", "-d", SRC, "-c", "2d", "-p", "nnUNetPlans_native", "-tr", *arms, "-f", 0, "--epochs", 1,
            "--iterations", 2, "--val-iterations", 1, "-device", "cpu", "-np", 1, "--test-images", src / "imagesTs",
            "--test-labels", src / "labelsTs", "--disable_tta", "--bootstrap", 200, "-o", cmp)
    assert "cascade:LSRFiLMTrainer: trained already, reused" in r.stdout and "wrote the consensus split" in r.stdout
    state = json.loads((src / "consensus.json").read_text())
    split = json.loads((work / "nnUNet_preprocessed" / src.name / "splits_final.json").read_text())
    assert split == state["splits"]
    rep = json.loads((cmp / "report.json").read_text())
    model = rep["arms"]["cascade:LSRFiLMTrainer"]["model"]["cascade"]
    assert [m["name"] for m in model["raters"]] == ["rater1", "rater2"] and model["consensus"]["folds"] == [0]
    assert [m["folds"] for m in model["raters"]] == [[0, 1], [0, 1]]
    assert rep["arms"]["LSRFiLMTrainer"]["training"].startswith("trained now (folds [0])")
    ref = tmp_path / "consensus_predict"
    cli(env, "consensus", "predict", "-d", SRC, "-i", src / "imagesTs", "-o", ref, "-device", "cpu", "--disable_tta")
    counts = json.loads((cmp / "arms" / "cascade_LSRFiLMTrainer" / "test_counts.json").read_text())["cases"]
    assert sorted(counts) == ["phantom_004", "phantom_005"]
    t = rep["thresholds"][0]
    for case, rec in counts.items():
        pred = cmp / "arms" / "cascade_LSRFiLMTrainer" / "test"
        mask = read_image(pred / f"{case}.nii.gz")[0]
        assert np.array_equal(mask, read_image(ref / f"{case}.nii.gz")[0])
        soft = read_image(pred / "soft" / f"{case}.nii.gz")[0]
        assert soft.max() > 0 and np.array_equal(soft, read_image(ref / "soft" / f"{case}.nii.gz")[0])
        lab, n = ndimage.label(read_image(src / "labelsTs" / f"{case}.nii.gz")[0] == 1, np.ones((3, 3, 3)))
        hit = len(set(np.unique(lab[(mask == 1) & (lab > 0)])))
        assert (rec["model"]["ref_lesions"], rec["model"]["lesion_tp"]) == (n, hit)
        # the sweep reads the consensus model's soft map: its components at the lowest threshold
        assert rec["sweep"][0]["pred_lesions"] == ndimage.label(soft >= t, np.ones((3, 3, 3)))[1]


def test_cascade_arm_refusals(tmp_path, monkeypatch):
    """A cascade arm needs the consensus split, a test set, one split for every arm and one stage trainer."""
    from nnunet_ext.workflows.cascade_arm import check

    env = nnunet_env(tmp_path, n_proc=1)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    cfg = PhantomConfig(shape=(24, 24, 24), timepoints=2, raters=2, seed=1)
    write_phantom_dataset(env["nnUNet_raw"], 575, 4, cfg, progress=False)
    split_file = tmp_path / "nnUNet_preprocessed" / "Dataset575_MSPhantom" / "splits_final.json"
    with pytest.raises(ValueError, match="split-raters"):
        check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [0], {}, None, True, split_file)
    cli(env, "consensus", "split-raters", "-d", 575, "-nfolds", 2)
    with pytest.raises(NotImplementedError, match="validation-fold evaluation with the arm cascade:ExtBaselineTrainer"):
        check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [0], {}, None, False, split_file)
    with pytest.raises(ValueError, match="name the trainer"):
        check("cascade:", 575, "2d", "nnUNetPlans", [0], {}, None, True, split_file)
    c = check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [0, 1], {}, None, True, split_file)
    assert not c.trained and json.loads(split_file.read_text()) == c.state["splits"]  # written for every arm
    with pytest.raises(ValueError, match="fold"):
        check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [2], {}, None, True, split_file)
    split_file.write_text(json.dumps(list(reversed(c.state["splits"]))))
    with pytest.raises(ValueError, match="arms with different splits"):
        check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [0], {}, None, True, split_file)
    split_file.write_text(json.dumps(c.state["splits"]))
    state_file = tmp_path / "nnUNet_raw" / "Dataset575_MSPhantom" / "consensus.json"
    state = json.loads(state_file.read_text())
    state["stage1"] = {"configuration": "2d", "trainer": "LSRTrainer", "plans": "nnUNetPlans"}
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="a dataset holds one cascade"):
        check("cascade:ExtBaselineTrainer", 575, "2d", "nnUNetPlans", [0], {}, None, True, split_file)


def test_errors_before_training(tmp_path):
    env = nnunet_env(tmp_path, n_proc=1)
    write_phantom_dataset(env["nnUNet_raw"], 570, 3, PhantomConfig(shape=(24, 24, 24), seed=1), progress=False)
    r = cli(env, "consensus", "split-raters", "-d", 570, ok=False)
    assert r.returncode != 0 and "ratersTr" in r.stderr
    r = cli(env, "consensus", "build-stage2", "-d", 570, ok=False)
    assert r.returncode != 0 and "split-raters" in r.stderr


@pytest.mark.slow
@pytest.mark.heavy  # the McGill cascade trained (module fixture) and packaged as one submission
def test_cascade_submission_passes_and_predicts_like_consensus_predict(cascade, tmp_path):
    """`submission build --consensus`: the whole native cascade as one msseg2 submission (every rater model
    with the folds of the shared split, the consensus model with its trained fold); `submission test` passes
    on one patient and its new-lesion mask equals `consensus predict` on the same two images."""
    import shutil
    import zipfile

    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    case = "phantom_005"  # site B: 16 x 26 x 26 voxels of 2 x 1.25 x 1.25 mm, not the plans' median spacing
    one, patient = tmp_path / "one", tmp_path / "patient"
    one.mkdir()
    patient.mkdir()
    for k, name in enumerate(("flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz")):
        shutil.copyfile(src / "imagesTs" / f"{case}_{k:04d}.nii.gz", one / f"{case}_{k:04d}.nii.gz")
        shutil.copyfile(src / "imagesTs" / f"{case}_{k:04d}.nii.gz", patient / name)
    cli(env, "consensus", "predict", "-d", SRC, "-i", one, "-o", tmp_path / "pred", "-device", "cpu", "-np", 1)

    sub = tmp_path / "sub"
    cli(env, "submission", "build", "-d", SRC, "--consensus", "--challenge", "msseg2", "-o", sub)
    cfg = json.loads((sub / "submission.json").read_text())
    assert cfg["cascade"]["source"] == src.name and cfg["n_channels"] == 2 and cfg["condition"] == "spacing"
    assert [m["name"] for m in cfg["cascade"]["raters"]] == state["stage2"]["rater_order"] == ["rater1", "rater2"]
    # hand-worked: what each archive must hold -- fold 0 of the consensus model (trained with -f 0), folds 0
    # and 1 of each rater model (the shared 2-fold split), all trained with LSRFiLMTrainer on the native plans
    res = work / "nnUNet_results"
    for zname, extras, ds, folds in (("model.zip", "model_extras", state["stage2"]["name"], [0]),
                                     ("model_1.zip", "model_extras_1", state["raters"]["rater1"]["name"], [0, 1]),
                                     ("model_2.zip", "model_extras_2", state["raters"]["rater2"]["name"], [0, 1])):
        names = zipfile.ZipFile(sub / zname).namelist()
        assert all(n.startswith(f"{ds}/{NATIVE_MODEL}/") for n in names), names[:3]
        assert sorted(n for n in names if n.endswith("checkpoint_final.pth")) == [
            f"{ds}/{NATIVE_MODEL}/fold_{f}/checkpoint_final.pth" for f in folds]
        contract = res / ds / NATIVE_MODEL / "nnunet_ext_model.json"
        assert (sub / extras / "nnunet_ext_model.json").read_bytes() == contract.read_bytes()

    r = cli(env, "submission", "test", sub, "--input", patient, "--work", tmp_path / "w")
    assert r.stdout.strip().splitlines()[-1] == "PASS" and "FAIL" not in r.stdout, r.stdout
    got = read_image(tmp_path / "w" / "run_001" / "output" / "new_lesions.nii.gz")[0]
    expected = read_image(tmp_path / "pred" / f"{case}.nii.gz")[0]
    assert got.shape == (16, 26, 26) and np.array_equal(got, (expected == 1).astype(got.dtype))

    # refusals: one line, exit 2, nothing written
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**state, "source": {"id": 999, "name": "Dataset999_Other"}}))
    for argv, msg in ((["--consensus", str(other), "--challenge", "msseg2"], "is the cascade of Dataset999_Other"),
                      (["--consensus", "--challenge", "isbi2015"], "isbi2015 provides 4 input images per case"),
                      (["--consensus", str(tmp_path / "none.json"), "--challenge", "msseg2"], "none.json not found")):
        r = cli(env, "submission", "build", "-d", SRC, *argv, "-o", tmp_path / "no", ok=False)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob(".no.staging-*"))


def test_stage_all_tasks_call_functions_and_train_every_stage1_fold(tmp_path):
    """`consensus train --stage all -f 0`: stage 1 trains every fold of the split (stage 2's inputs are out
    of fold), stage 2 fold 0; prepare, record and build-stage2 are our functions spawned with their
    arguments (python -m nnunet_ext.cluster.call), not our command line parsed again."""
    import sys

    from conftest import nnunet_paths
    from nnunet_ext.workflows.consensus import train_stages

    env = nnunet_env(tmp_path, n_proc=1)
    write_phantom_dataset(env["nnUNet_raw"], 575, 4, PhantomConfig(shape=(16, 16, 16), raters=2, seed=2),
                          progress=False)
    cli(env, "consensus", "split-raters", "-d", 575, "-nfolds", 2)  # raters -> datasets 576, 577
    with nnunet_paths(env):
        stages = train_stages("575", "all", "2d", "LSRFiLMTrainer", "nnUNetPlans_native", folds=[0], device="cpu",
                              n_proc=1)
    by = {s.name: s for s in stages}
    assert list(by) == ["stage1_prepare", "stage1_train", "stage1_record", "build_stage2", "stage2_prepare",
                        "stage2_train", "stage2_record"]
    assert [t.name for t in by["stage1_train"].tasks] == ["rater1_fold0", "rater1_fold1", "rater2_fold0", "rater2_fold1"]
    assert [t.name for t in by["stage2_train"].tasks] == ["consensus_fold0"]
    assert by["stage2_train"].tasks[0].argv[1:3] == ["578", "2d"]  # the next free id after 575-577

    def call(stage, k=0):
        argv = by[stage].tasks[k].argv
        assert argv[:3] == [sys.executable, "-m", "nnunet_ext.cluster.call"] and len(argv) == 5, argv
        return argv[3], json.loads(argv[4])

    assert call("stage1_prepare", 1) == ("nnunet_ext.workflows.consensus:prepare", {
        "dataset": "575", "stage": 1, "configuration": "2d", "plans": "nnUNetPlans_native", "raters": ["rater2"],
        "n_proc": 1})
    assert call("stage2_prepare") == ("nnunet_ext.workflows.consensus:prepare", {
        "dataset": "575", "stage": 2, "configuration": "2d", "plans": "nnUNetPlans_native", "n_proc": 1})
    assert call("stage1_record") == ("nnunet_ext.workflows.consensus:record_training", {
        "dataset": "575", "stage": 1, "configuration": "2d", "trainer": "LSRFiLMTrainer",
        "plans": "nnUNetPlans_native", "folds": [0, 1]})
    assert call("stage2_record")[1]["folds"] == [0]
    assert call("build_stage2") == ("nnunet_ext.workflows.consensus:build_stage2", {
        "dataset": "575", "configuration": "2d", "trainer": "LSRFiLMTrainer", "plans": "nnUNetPlans_native",
        "stage2_id": 578, "device": "cpu", "n_proc": 1})
    assert not any("nnunet-ext" in a for s in stages for t in s.tasks for a in t.argv)


def test_function_call_process_and_its_errors(tmp_path):
    """python -m nnunet_ext.cluster.call: the function runs with its JSON arguments; a function outside the package
    or an expected error is one line and exit status 2."""
    import subprocess
    import sys

    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.core.safety import atomic_write_text

    env = nnunet_env(tmp_path, n_proc=1)
    r = subprocess.run(function_argv(atomic_write_text, path=str(tmp_path / "a.txt"), text="written"), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "a.txt").read_text() == "written", r.stderr
    for ref, kwargs, msg in (("os:getcwd", {}, "a module-level function of nnunet_ext"),
                             ("nnunet_ext.workflows.consensus:load_state", {"dataset": "998"}, "dataset 998 not found")):
        r = subprocess.run([sys.executable, "-m", "nnunet_ext.cluster.call", ref, json.dumps(kwargs)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_consensus_submission_refuses_model_options(tmp_path):
    env = nnunet_env(tmp_path, n_proc=1)
    for extra, flag in ((["-tr", "LSRTrainer"], "-tr"), (["-f", "0"], "-f"), (["--selection"], "--selection")):
        r = cli(env, "submission", "build", "-d", 560, "--consensus", *extra, "--challenge", "msseg2", "-o",
                tmp_path / "s", ok=False)
        assert r.returncode == 2 and f"--consensus chooses the models and folds; drop {flag}" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_fold_validation_without_any_lesion_is_scored(tmp_path):
    """A fold whose validation cases hold no new lesion and whose model predicts none (MSSEG-2 patients
    without new lesions, a model after a few iterations): the end-of-training lesion metrics are written,
    not an error that fails the training; an explicit --label that nothing holds is still refused."""
    from nnunet_ext.core.io import write_image
    from nnunet_ext.metrics.validation import write_fold_lesion_metrics

    gt, val = tmp_path / "gt", tmp_path / "fold_0" / "validation"
    for c in ("a", "b"):
        write_image(np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 1.0), gt / f"{c}.nii.gz")
        write_image(np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 1.0), val / f"{c}.nii.gz")
    res = write_fold_lesion_metrics(tmp_path / "fold_0", gt)
    p = res["aggregate"]["pooled"]  # hand-worked: no lesion anywhere -> nothing found, missed or false
    assert (p["ref_lesions"], p["pred_lesions"], p["lesion_tp"], p["lesion_fn"], p["lesion_fp"]) == (0, 0, 0, 0, 0)
    assert (val / "lesion_summary.json").is_file()
    with pytest.raises(ValueError, match="--label 1: no reference"):
        write_fold_lesion_metrics(tmp_path / "fold_0", gt, label=1)


def test_sigterm_reaching_a_fork_child_before_its_hook_ends_it():
    """A pool worker forked by a prediction that gets the pool's terminate() SIGTERM before its at-fork hook
    has put SIGTERM's default action back (a loaded machine; it hung `consensus predict -j 2`): the signal
    waits, blocked, and then ends the worker. Simulated deterministically: a hook registered before ours
    sends SIGTERM to the new child first."""
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
            "from nnunet_ext.core import safety\n"
            "safety.install_termination_handlers()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(3)\n"
            "    os._exit(0)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else 'exited', signal.pthread_sigmask(signal.SIG_BLOCK, []))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["15", "set()"], r.stdout + r.stderr  # killed by SIGTERM; parent's mask as before
