"""Consensus cascade: shared split, stage-2 inputs out of fold (leakage test), end to end on a tiny
two-time-point phantom with real nnU-Net (2 raters, 2 folds, 1 epoch of 2 iterations)."""
import json

import numpy as np
import pytest

from conftest import run_nnunet
from nnunet_ext.consensus import fold_of, kfold_splits
from nnunet_ext.io import read_geometry, read_image
from nnunet_ext.paths import nnunet_command, nnunet_env
from nnunet_ext.phantom import PhantomConfig, write_phantom_dataset

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


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    work = tmp_path_factory.mktemp("cascade")
    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1",
                "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
    # stage 1 is McGill's: LSR-weighted BCE with resolution FiLM (LSRFiLMTrainer)
    cfg = PhantomConfig(shape=(32, 32, 32), timepoints=2, raters=2, seed=4)
    src = write_phantom_dataset(env["nnUNet_raw"], SRC, 6, cfg, n_test=2, progress=False)
    r = cli(env, "consensus", "split-raters", "-d", SRC, "--folds", 2)
    assert "rater1: dataset 561" in r.stdout and "rater2: dataset 562" in r.stdout
    cli(env, "consensus", "train", "-d", SRC, "--stage", 1, "-c", "2d", "-tr", "LSRFiLMTrainer", "-device", "cpu",
        "-j", 2, "--cpus-per-task", 1)  # the local launcher runs two trainings at once
    return work, env, src


@pytest.mark.slow
def test_split_raters_datasets(cascade):
    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    for k, r in enumerate(("rater1", "rater2"), start=1):
        rds = work / "nnUNet_raw" / state["raters"][r]["name"]
        for case in ("phantom_000", "phantom_005"):
            assert np.array_equal(read_image(rds / "labelsTr" / f"{case}.nii.gz")[0],
                                  read_image(src / "ratersTr" / r / f"{case}.nii.gz")[0])
            assert (rds / "imagesTr" / f"{case}_0001.nii.gz").resolve() == (src / "imagesTr" / f"{case}_0001.nii.gz").resolve()
        # nnU-Net trained with our shared split
        pre = json.loads((work / "nnUNet_preprocessed" / state["raters"][r]["name"] / "splits_final.json").read_text())
        assert pre == state["splits"]


@pytest.mark.slow
def test_stage2_inputs_are_out_of_fold(cascade):
    """Leakage test: the stage-2 rater channels of each training case come from the fold model that held
    it out (by construction: provenance, the split nnU-Net used, and the values themselves)."""
    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    # drop one validation file so the re-prediction path is exercised too
    r1 = work / "nnUNet_results" / state["raters"]["rater1"]["name"] / "LSRFiLMTrainer__nnUNetPlans__2d"
    dropped = state["splits"][1]["val"][0]
    kept_npz = np.load(r1 / "fold_1" / "validation" / f"{dropped}.npz")["probabilities"][1]
    (r1 / "fold_1" / "validation" / f"{dropped}.npz").rename(work / "moved.npz")
    cli(env, "consensus", "build-stage2", "-d", SRC, "-device", "cpu")
    state = json.loads((src / "consensus.json").read_text())
    s2 = work / "nnUNet_raw" / state["stage2"]["name"]
    prov = json.loads((s2 / "stage2_provenance.json").read_text())
    folds = fold_of(state["splits"])
    assert set(prov) == set(folds) == {f"phantom_{i:03d}" for i in range(6)}
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
                mdir = work / "nnUNet_results" / state["raters"][rater]["name"] / "LSRFiLMTrainer__nnUNetPlans__2d"
                assert np.array_equal(channel, np.load(mdir / f"fold_{f}" / "validation" / f"{case}.npz")["probabilities"][1])
    # the stage-2 dataset is trained with the same split
    assert json.loads((work / "nnUNet_preprocessed" / state["stage2"]["name"] / "splits_final.json").read_text()) == state["splits"]


@pytest.mark.slow
def test_cascade_end_to_end(cascade, tmp_path):
    work, env, src = cascade
    state = json.loads((src / "consensus.json").read_text())
    if "stage2" not in state:
        cli(env, "consensus", "build-stage2", "-d", SRC, "-device", "cpu")
    cli(env, "consensus", "train", "-d", SRC, "--stage", 2, "-c", "2d", "-tr", "ExtBaselineTrainer", "-device", "cpu",
        "-j", 2, "--cpus-per-task", 1)
    out = tmp_path / "pred"
    r = cli(env, "consensus", "predict", "-d", SRC, "-i", src / "imagesTs", "-o", out, "-device", "cpu",
            "--keep-rater-predictions", "-j", "2")
    assert "[3/3] consensus model" in r.stdout
    for case in ("phantom_006", "phantom_007"):
        g = read_geometry(src / "imagesTs" / f"{case}_0000.nii.gz")
        assert read_geometry(out / f"{case}.nii.gz")["size"] == g["size"]
        for rater in ("rater1", "rater2"):
            assert (out / "raters" / rater / f"{case}.nii.gz").is_file()
    assert not (out / ".cascade").exists()
    r = cli(env, "consensus", "evaluate", "-d", SRC, "--pred", out, "-o", tmp_path / "ev.json")
    table = json.loads((tmp_path / "ev.json").read_text())["table"]
    assert set(table) == {"consensus model", "rater1 model", "rater2 model"}
    assert set(table["consensus model"]) == {"consensus", "rater1", "rater2"}
    n_with = sum(read_image(src / "labelsTs" / f"phantom_00{i}.nii.gz")[0].any() for i in (6, 7))
    assert table["consensus model"]["consensus"]["cases_with_lesions"] == n_with
    assert "lesion F1 / Dice" in r.stdout
    # wrong number of channels is a clear error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_0000.nii.gz").write_bytes((src / "imagesTs" / "phantom_006_0000.nii.gz").read_bytes())
    r = cli(env, "consensus", "predict", "-d", SRC, "-i", bad, "-o", tmp_path / "o2", "-device", "cpu", ok=False)
    assert r.returncode != 0 and "x_0001.nii.gz" in r.stderr and "needs 2 channels" in r.stderr


def test_errors_before_training(tmp_path):
    env = nnunet_env(tmp_path, n_proc=1)
    write_phantom_dataset(env["nnUNet_raw"], 570, 3, PhantomConfig(shape=(24, 24, 24), seed=1), progress=False)
    r = cli(env, "consensus", "split-raters", "-d", 570, ok=False)
    assert r.returncode != 0 and "ratersTr" in r.stderr
    r = cli(env, "consensus", "build-stage2", "-d", 570, ok=False)
    assert r.returncode != 0 and "split-raters" in r.stderr
