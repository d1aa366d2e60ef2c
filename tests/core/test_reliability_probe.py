"""Bad inputs of every verb, second round: prediction inputs, model contracts, selection files, fan-out
commands, converters, relative nnUNet_* folders, messages. Table-driven per verb (``PROBES``) in the style of
tests/core/test_reliability.py: exit status 2, one line naming the file or option, nothing written.

Models here are model *folders* (dataset.json, plans.json, a placeholder checkpoint): every check under test
runs before a checkpoint is loaded, so no training is needed. The CLI runs in-process (``run_cli``), as
``main()`` runs it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_reliability import _nan_image, _truncate, _write, cli, digest, one_line_error

MODEL = "ExtBaselineTrainer__nnUNetPlans__2d"
DS = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
      "file_ending": ".nii.gz"}


def _model(results: Path, dataset: str, name: str = MODEL) -> Path:
    m = results / dataset / name
    (m / "fold_0").mkdir(parents=True)
    (m / "dataset.json").write_text(json.dumps(DS))
    (m / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {"2d": {}}}))
    (m / "fold_0" / "checkpoint_final.pth").write_bytes(b"placeholder: never loaded by these tests")
    return m


def _image(path: Path, seed: int = 0, shape=(8, 12, 12)):
    _write(path, np.random.default_rng(seed).random(shape).astype(np.float32))


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """nnU-Net folders with a raw dataset 700 (one labelled case), model folders of datasets 700 and 701, and
    an input folder of two sound cases."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    raw, results = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_results"
    for ds in ("Dataset700_Probe", "Dataset701_Other"):
        (raw / ds).mkdir(parents=True)
        (raw / ds / "dataset.json").write_text(json.dumps(DS))
    _image(raw / "Dataset700_Probe" / "imagesTr" / "c1_0000.nii.gz", 9)
    _write(raw / "Dataset700_Probe" / "labelsTr" / "c1.nii.gz", np.zeros((8, 12, 12), np.uint8))
    model, other = _model(results, "Dataset700_Probe"), _model(results, "Dataset701_Other")
    imgs = tmp_path / "imgs"
    for k in (1, 2):
        _image(imgs / f"u{k}_0000.nii.gz", k)
    (tmp_path / "afile").write_text("x")
    return {"tmp": tmp_path, "raw": raw, "results": results, "model": model, "other": other, "imgs": imgs,
            "afile": tmp_path / "afile"}


PREDICT = ["predict", "-d", "700", "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", "0", "-device", "cpu"]
PSEUDO = ["pseudolabel", "-d", "700", "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", "0", "-device", "cpu"]


def _damage(imgs: Path, how: str) -> Path:
    """Damage the input folder one way; returns the file the message must name."""
    bad = imgs / "u2_0000.nii.gz"
    if how == "truncated":
        _image(bad, 2, (16, 16, 16))
        _truncate(bad)
    elif how == "nan":
        _nan_image(bad, (8, 12, 12))
    elif how == "2d":
        _write(bad, np.zeros((12, 12), np.float32))
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "extra channel":
        bad = imgs / "u2_0001.nii.gz"
        _image(bad, 5)
    elif how == "bad name":
        bad = imgs / "scan.nii.gz"
        _image(bad, 6)
    return bad


DAMAGES = {"truncated": "damaged gzip", "nan": "NaN/Inf", "2d": "3-D", "empty": "empty",
           "extra channel": "does not take", "bad name": "nnU-Net's naming"}


# ---------------------------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("how", list(DAMAGES))
def test_predict_checks_every_input_image_before_any_work(capsys, probe, how):
    """SimpleITK reads a truncated file's missing part and NaN voxels as 0: such an image was predicted as if
    sound (exit 0, fewer lesions). Now: one line naming the file, before the model is loaded, nothing written."""
    bad = _damage(probe["imgs"], how)
    out = probe["tmp"] / "pred"
    rc, err = cli(capsys, *PREDICT, "-i", probe["imgs"], "-o", out)
    assert rc == 2
    one_line_error(err, DAMAGES[how], bad.name)
    assert not out.exists()


@pytest.mark.parametrize("how", ["truncated", "nan"])
def test_pseudolabel_never_copies_an_unchecked_image(capsys, probe, how):
    bad = _damage(probe["imgs"], how)
    before = digest(probe["imgs"])
    rc, err = cli(capsys, *PSEUDO, "-i", probe["imgs"], "-o", "Dataset702_Student")
    assert rc == 2
    one_line_error(err, DAMAGES[how], bad.name)
    assert not (probe["raw"] / "Dataset702_Student").exists()  # nothing copied, no folder made
    assert digest(probe["imgs"]) == before


def test_pseudolabel_checks_the_labelled_cases_it_copies(capsys, probe):
    """The teacher's labelled cases are copied into the student dataset too: a damaged one is refused, not
    copied."""
    bad = probe["raw"] / "Dataset700_Probe" / "imagesTr" / "c1_0000.nii.gz"
    _nan_image(bad, (8, 12, 12))
    rc, err = cli(capsys, *PSEUDO, "-i", probe["imgs"], "-o", "Dataset702_Student")
    assert rc == 2
    one_line_error(err, "c1_0000.nii.gz", "NaN/Inf")
    assert not [p for p in (probe["raw"] / "Dataset702_Student").rglob("*.nii.gz")]


def test_check_prediction_inputs_by_hand(tmp_path):
    """Two channels: a case missing channel 1 is named with the missing file; channels on different grids
    are refused; a sound folder gives its number of cases."""
    from nnunet_ext.core.checks import check_prediction_inputs

    for c in ("a", "b"):
        _image(tmp_path / f"{c}_0000.nii.gz")
        _image(tmp_path / f"{c}_0001.nii.gz")
    assert check_prediction_inputs(str(tmp_path), ".nii.gz", 2) == 2
    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match="b_0001.nii.gz is missing"):
        check_prediction_inputs(str(tmp_path), ".nii.gz", 2)
    _image(tmp_path / "b_0001.nii.gz", shape=(8, 12, 13))
    with pytest.raises(ValueError, match="b_0001.nii.gz .size .13, 12, 8.*does not match.*b_0000"):
        check_prediction_inputs(str(tmp_path), ".nii.gz", 2)
    with pytest.raises(ValueError, match="has 1 channel file"):
        check_prediction_inputs([[tmp_path / "a_0000.nii.gz"]], ".nii.gz", 2)


# ---------------------------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("field,value", [("trainer", "SoftSegTrainer"), ("plans", "nnUNetPlans_native"),
                                         ("configuration", "3d_fullres")])
def test_contract_of_another_model_is_refused(capsys, probe, field, value):
    """A contract copied from a SoftSeg model (normalized ReLU, threshold 0.02) into an nnU-Net model folder
    was applied without a word."""
    from nnunet_ext.inference.contract import contract_path, load_contract

    c = {"version": 1, "activation": "normalized_relu", "threshold": 0.02, field: value}
    contract_path(probe["model"]).write_text(json.dumps(c))
    with pytest.raises(ValueError, match=f"written for {field} '{value}'"):
        load_contract(probe["model"], [0])
    rc, err = cli(capsys, *PREDICT, "-i", probe["imgs"], "-o", probe["tmp"] / "pred")
    assert rc == 2
    one_line_error(err, "nnunet_ext_model.json", value, MODEL)
    assert not (probe["tmp"] / "pred").exists()


def test_written_contract_records_its_folder(probe):
    from nnunet_ext.inference.contract import ModelContract, contract_path, load_contract, write_contract

    write_contract(probe["model"], ModelContract(trainer="ExtBaselineTrainer"))
    d = json.loads(contract_path(probe["model"]).read_text())
    assert (d["trainer"], d["plans"], d["configuration"]) == ("ExtBaselineTrainer", "nnUNetPlans", "2d")
    assert load_contract(probe["model"]).source == "file"
    with pytest.raises(ValueError, match="SoftSegTrainer"):
        write_contract(probe["model"], ModelContract(trainer="SoftSegTrainer"))


@pytest.mark.parametrize("member", ["../Dataset701_Other/" + MODEL, "/abs/" + MODEL, "..__nnUNetPlans__2d",
                                    "ExtBaselineTrainer__../../Dataset701_Other__2d"])
def test_selection_members_are_names_never_paths(capsys, probe, member):
    """A member name with '..' made predict load, and submission build package, another dataset's model."""
    sel = probe["results"] / "Dataset700_Probe" / "nnunet_ext_selection.json"
    sel.write_text(json.dumps({"best": {"members": [member], "folds": [0], "threshold": 0.5, "min_lesion_mm3": 0,
                                        "connectivity": 26}}))
    other = digest(probe["other"])
    rc, err = cli(capsys, "predict", "-i", probe["imgs"], "-o", probe["tmp"] / "pred", "-d", "700", "--selection",
                  "-device", "cpu")
    assert rc == 2
    one_line_error(err, str(sel), "not a")
    rc, err = cli(capsys, "submission", "build", "-d", "700", "--selection", "--challenge", "generic", "-o",
                  probe["tmp"] / "sub")
    assert rc == 2
    one_line_error(err, str(sel), "not a")
    assert not (probe["tmp"] / "pred").exists() and not (probe["tmp"] / "sub").exists()
    assert digest(probe["other"]) == other


def test_model_names_from_the_command_line_are_names(capsys, probe):
    rc, err = cli(capsys, "predict", "-i", probe["imgs"], "-o", probe["tmp"] / "pred", "-d", "700", "-c", "2d",
                  "-tr", "../Dataset701_Other/ExtBaselineTrainer", "-device", "cpu")
    assert rc == 2
    one_line_error(err, "trainer name", "not a name")


# ---------------------------------------------------------------------------------------------- item 3


@pytest.fixture
def cascade(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "nnUNet_raw"
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    src = raw / "Dataset560_Src"
    rng = np.random.default_rng(0)
    for c in ("c1", "c2", "c3", "c4"):
        _write(src / "imagesTr" / f"{c}_0000.nii.gz", rng.random((4, 6, 6)).astype(np.float32))
        _write(src / "labelsTr" / f"{c}.nii.gz", np.zeros((4, 6, 6), np.uint8))
        for r in ("rater1", "rater2"):
            _write(src / "ratersTr" / r / f"{c}.nii.gz", np.zeros((4, 6, 6), np.uint8))
    (src / "dataset.json").write_text(json.dumps({**DS, "numTraining": 4}))
    assert cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)[0] == 0
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.slow  # nnU-Net's trainer lookup of an unknown name imports every trainer module (~30 s on 2 busy cores)
def test_consensus_train_checks_before_writing_scripts(capsys, cascade):
    """`consensus train -tr NoSuchTrainer --launcher slurm --dry-run` wrote job scripts for a trainer that
    does not exist; a configuration nnU-Net never plans and a file as --workdir are refused as early."""
    jobs = cascade / "nnUNet_results" / "nnunet_ext_jobs"
    base = ["consensus", "train", "-d", 560, "--stage", "1", "--launcher", "slurm", "--dry-run"]
    rc, err = cli(capsys, *base, "-c", "2d", "-tr", "NoSuchTrainerXyz")
    assert rc == 2
    one_line_error(err, "-tr NoSuchTrainerXyz", "no trainer of that name")
    rc, err = cli(capsys, *base, "-c", "3d_foo", "-tr", "ExtBaselineTrainer")
    assert rc == 2
    one_line_error(err, "-c 3d_foo", "3d_fullres")
    rc, err = cli(capsys, *base, "-c", "2d", "-tr", "ExtBaselineTrainer", "--workdir", cascade / "afile" / "w")
    assert rc == 2
    one_line_error(err, "--workdir", "afile", "is a file")
    assert not jobs.exists()


def test_pseudolabel_fan_out_checks_before_writing_scripts(capsys, probe):
    jobs = probe["results"] / "nnunet_ext_jobs"
    base = ["-i", probe["imgs"], "-o", "Dataset702_Student", "--launcher", "slurm", "--dry-run"]
    rc, err = cli(capsys, "pseudolabel", "-d", "700", "-c", "2d", "-tr", "NoSuchTrainerXyz", *base)
    assert rc == 2
    one_line_error(err, "NoSuchTrainerXyz", "no trained model")
    rc, err = cli(capsys, *PSEUDO, "-f", "3", *base)
    assert rc == 2
    one_line_error(err, "fold_3", "-f")
    bad = _damage(probe["imgs"], "nan")
    rc, err = cli(capsys, *PSEUDO, *base)
    assert rc == 2
    one_line_error(err, bad.name, "NaN/Inf")
    assert not jobs.exists()


def test_relative_nnunet_folders_are_made_absolute_for_scripts(capsys, probe, monkeypatch):
    """Relative nnUNet_* folders were written into launcher scripts (and compare's links) as they were, so
    they pointed elsewhere from any other folder."""
    monkeypatch.chdir(probe["tmp"])
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, k)
    rc, err = cli(capsys, *PSEUDO, "-i", "imgs", "-o", "Dataset702_Student", "--launcher", "slurm", "--dry-run")
    assert rc == 0, err
    script = next((probe["results"] / "nnunet_ext_jobs").rglob("pseudolabel_parts.sbatch")).read_text()
    assert f"export nnUNet_raw={probe['raw']}" in script
    assert f"export nnUNet_results={probe['results']}" in script


def test_compare_validation_links_are_absolute_and_repaired(tmp_path, monkeypatch):
    """compare linked fold inputs to relative nnUNet_raw paths (dangling links); a report folder with such
    links stayed broken."""
    from nnunet_ext.workflows import compare as cmp

    monkeypatch.chdir(tmp_path)
    img = tmp_path / "raw" / "Dataset700_Probe" / "imagesTr" / "c1_0000.nii.gz"
    _image(img)
    report = tmp_path / "report"
    stale = report / "inputs" / "fold_0" / "c1_0000.nii.gz"
    stale.parent.mkdir(parents=True)
    os.symlink("raw/Dataset700_Probe/imagesTr/c1_0000.nii.gz", stale)  # what a run with relative paths left
    assert not stale.exists()
    plan = cmp._Plan("Dataset700_Probe", {}, Path("raw"), Path("pre"), Path("res"), report, ".nii.gz", 1,
                     [{"train": [], "val": ["c1"]}], {})
    d = cmp._validation_inputs(plan, 0, report)
    assert (d / "c1_0000.nii.gz").read_bytes() == img.read_bytes()
    assert os.readlink(d / "c1_0000.nii.gz") == str(img)


def test_resolve_nnunet_folders(tmp_path, monkeypatch):
    from nnunet_ext.core.paths import resolve_nnunet_folders

    monkeypatch.chdir(tmp_path)
    env = {"nnUNet_raw": "r", "nnUNet_results": str(tmp_path / "abs"), "nnUNet_extTrainer": "a:/b"}
    assert resolve_nnunet_folders(env) == {"nnUNet_raw": str(tmp_path / "r"),
                                           "nnUNet_extTrainer": f"{tmp_path / 'a'}:/b"}
    assert env["nnUNet_results"] == str(tmp_path / "abs")


# ---------------------------------------------------------------------------------------------- converters


def test_converter_keeps_a_case_whose_folder_is_a_link(capsys, tmp_path):
    """A case folder that is a symbolic link was dropped without a word ("Tr: 2/2" with one case missing)."""
    from test_reliability import _wmh

    tr = tmp_path / "training"
    _wmh(tr, "Utrecht/0")
    _wmh(tmp_path / "elsewhere", "case1", seed=1)
    os.symlink(tmp_path / "elsewhere" / "case1", tr / "Utrecht" / "1")
    rc, err = cli(capsys, "convert", "wmh2017", "-i", tr, "-d", 521, "--raw", tmp_path / "raw")
    assert rc == 0, err
    labels = tmp_path / "raw" / "Dataset521_WMH2017" / "labelsTr"
    assert sorted(p.name for p in labels.iterdir()) == ["Utrecht_0.nii.gz", "Utrecht_1.nii.gz"]


def test_find_files_visits_a_linked_loop_once(tmp_path):
    from nnunet_ext.data.raw import find_files

    (tmp_path / "a" / "Masks").mkdir(parents=True)
    (tmp_path / "a" / "Masks" / "Consensus.nii.gz").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a link back up: visited once, no endless walk
    os.symlink(tmp_path / "gone", tmp_path / "broken")
    with pytest.warns(UserWarning, match="broken symbolic link"):
        found = find_files(tmp_path, "Masks/Consensus.nii.gz")
    assert found == [tmp_path / "a" / "Masks" / "Consensus.nii.gz"]


# ---------------------------------------------------------------------------------------------- messages


def test_evaluate_takes_nii_predictions(capsys, tmp_path):
    """`.nii` predictions of `.nii.gz` references were reported missing."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    m = np.zeros((6, 8, 8), np.uint8)
    m[2:4, 2:4, 2:4] = 1  # one lesion of 8 voxels, predicted exactly: Dice 1, lesion TP 1
    _write(ref / "c1.nii.gz", m)
    _write(pred / "c1.nii", m)
    rc, err = cli(capsys, "evaluate", "--ref", ref, "--pred", pred, "-o", tmp_path / "r.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    case = res["per_case"]["c1"]
    assert case["dice"] == 1.0 and case["lesion_tp"] == 1 and not case["prediction_missing"]
    _write(pred / "c1.nii.gz", m)
    rc, err = cli(capsys, "evaluate", "--ref", ref, "--pred", pred, "-o", tmp_path / "r2.json")
    assert rc == 2
    one_line_error(err, "c1", "twice")


def test_operating_points_on_an_empty_reference_folder(capsys, tmp_path):
    """It ended in "internal error: TypeError", after writing a 0-case JSON."""
    (tmp_path / "ref").mkdir()
    prob = tmp_path / "prob"
    prob.mkdir()
    np.savez_compressed(prob / "c1.npz", probabilities=np.zeros((2, 4, 4, 4), np.float32))
    rc, err = cli(capsys, "operating-points", "--ref", tmp_path / "ref", "--prob", prob, "-o", tmp_path / "o.json")
    assert rc == 2
    one_line_error(err, "--ref", "no reference masks")
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.png").exists()


def test_damaged_jobs_json_names_the_file(capsys, tmp_path):
    (tmp_path / "jobs.json").write_text('{"version": 1, "stag')
    for args in (["jobs", "status", tmp_path], ["jobs", "resume", tmp_path]):
        rc, err = cli(capsys, *args)
        assert rc == 2
        one_line_error(err, str(tmp_path / "jobs.json"), "damaged")


def test_plan_native_refuses_a_configuration_before_writing(capsys, tmp_path, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    assert cli(capsys, "phantom", "-d", 533, "--cases", 2, "--shape", 16, 16, 16)[0] == 0
    rc, err = cli(capsys, "plan-native", "-d", 533, "-c", "3d_foo", "-np", 1)
    assert rc == 2
    one_line_error(err, "-c 3d_foo")
    assert not (tmp_path / "nnUNet_preprocessed").exists() or not any((tmp_path / "nnUNet_preprocessed").rglob("*.json"))


@pytest.mark.slow  # nnU-Net's fingerprint and planning run first (~30 s on 2 busy cores)
def test_plan_native_unplanned_lowres_leaves_no_plans_file(capsys, tmp_path, monkeypatch):
    """3d_lowres is planned only for large images: refused after planning, and the plans file is removed
    again (it did not exist before)."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    assert cli(capsys, "phantom", "-d", 533, "--cases", 2, "--shape", 16, 16, 16)[0] == 0
    rc, err = cli(capsys, "plan-native", "-d", 533, "-c", "3d_lowres", "-np", 1)
    assert rc == 2  # (nnU-Net's own progress bars come first on stderr)
    last = err.strip().splitlines()[-1]
    assert last.startswith("nnunet-ext: error:") and "3d_lowres" in last and "not planned" in last, err
    assert not list((tmp_path / "nnUNet_preprocessed").rglob("nnUNetPlans_native.json"))


# ---------------------------------------------------------------------------------------------- the table


def _wmh_source(tmp):
    from test_reliability import _wmh

    _wmh(tmp / "wmh", "Utrecht/0")
    return tmp / "wmh"


# (verb, arguments (a function of the probe fixture), what the one line must name)
PROBES = [
    ("phantom", lambda p: ["phantom", "-d", 531, "--cases", 2, "--shape", 16, 16, 16, "--raw", p["afile"]],
     ["afile", "is a file, not a folder"]),
    ("convert", lambda p: ["convert", "wmh2017", "-i", _wmh_source(p["tmp"]), "-d", 521, "--raw", p["afile"]],
     ["afile", "is a file, not a folder"]),
    ("compare", lambda p: ["compare", "-d", 700, "-c", "2d", "-tr", "ExtBaselineTrainer", "LSRTrainer", "-o",
                           p["afile"]], ["-o/--output", "afile", "is a file"]),
    ("submission build", lambda p: ["submission", "build", "-d", 700, "-c", "2d", "-tr", "ExtBaselineTrainer", "-f",
                                    0, "--challenge", "generic", "-o", p["afile"]], ["afile", "not a folder"]),
    ("submission test", lambda p: ["submission", "test", p["afile"], "--input", p["imgs"]], ["afile"]),
    ("predict", lambda p: [*PREDICT, "-i", p["afile"], "-o", p["tmp"] / "pred"], ["afile"]),
    ("predict -f", lambda p: [*PREDICT, "-f", 4, "-i", p["imgs"], "-o", p["tmp"] / "pred"], ["fold_4"]),
    ("pseudolabel -o", lambda p: [*PSEUDO, "-i", p["imgs"], "-o", "../escape"], ["-o", "DatasetXXX_Name"]),
    ("select", lambda p: ["select", "-d", 700, "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", 0],
     ["gt_segmentations", "nnUNetv2_plan_and_preprocess"]),
    ("split --csv", lambda p: ["split", "-d", 700, "--csv", p["tmp"] / "none.csv"], ["--csv", "none.csv"]),
    ("split --pattern", lambda p: ["split", "-d", 700, "--pattern", "("], ["--pattern", "regular expression"]),
    ("split -nfolds", lambda p: ["split", "-d", 700, "--pattern", "^(c)", "-nfolds", 1], ["-nfolds"]),
    ("evaluate", lambda p: ["evaluate", "--ref", p["imgs"], "--pred", p["afile"], "-o", p["tmp"] / "e.json"],
     ["afile"]),
    ("jobs", lambda p: ["jobs", "status", p["tmp"]], ["jobs.json", "not found"]),
]


@pytest.mark.parametrize("verb,args,needles", PROBES, ids=[v for v, _, _ in PROBES])
def test_bad_input_probe(capsys, probe, verb, args, needles):
    before = digest(probe["raw"], probe["results"], probe["imgs"])
    rc, err = cli(capsys, *args(probe))
    assert rc == 2, (verb, err)
    one_line_error(err, *needles)
    assert digest(probe["raw"], probe["results"], probe["imgs"]) == before
    assert probe["afile"].read_text() == "x"
    assert not (probe["tmp"] / "pred").exists() and not (probe["raw"] / "Dataset521_WMH2017").exists()


# ---------------------------------------------------------------------------------------------- stopping

NNUNET_EXT = str(Path(sys.executable).parent / "nnunet-ext")

# a task that starts a worker of its own (as nnUNetv2_train starts data-loader workers) and writes both pids
_TASK = ("import os, subprocess, sys, time\n"
         "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
         "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {w.pid}')\n"
         "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
         "time.sleep(300)\n")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(path: Path, proc, timeout: float = 60) -> list[int]:
    t0 = time.time()
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the task did not start"
        time.sleep(0.05)
    return [int(x) for x in path.read_text().split()]


def _gone_within(pids, seconds: float = 10.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    for p in pids:  # leave nothing behind, whatever the test says
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return False


def _manifest(workdir: Path, pids: Path) -> None:
    from dataclasses import asdict

    from nnunet_ext.cluster.launcher import LauncherOptions

    workdir.mkdir()
    task = {"name": "train_fold0", "argv": [sys.executable, "-c", _TASK, str(pids)], "env": {}, "done": None}
    (workdir / "jobs.json").write_text(json.dumps({
        "version": 1, "launcher": "local", "options": asdict(LauncherOptions()), "created": "now",
        "stages": [{"name": "train", "after": [], "script": str(workdir / "train" / "train.sbatch"), "tasks": [task]}],
        "submissions": []}))


@pytest.mark.parametrize("sig,rc", [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_launcher_tasks_end_with_the_command(tmp_path, sig, rc):
    """The local launcher (what compare, consensus train and pseudolabel -j run their trainings with): after
    Ctrl-C, SIGTERM or SIGKILL of the command, its task and the task's own worker are gone within 10 s (a
    SIGKILLed command left nnUNetv2_train and its workers running; Ctrl-C waited for the training to end)."""
    work, pids = tmp_path / "w", tmp_path / "pids"
    _manifest(work, pids)
    p = subprocess.Popen([NNUNET_EXT, "jobs", "resume", str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    task_pids = _wait_for(pids, p)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=60)
    assert p.returncode == rc, err
    assert _gone_within(task_pids), f"task processes {task_pids} still running after {sig} of the command"
    if sig != "SIGKILL":
        assert "Traceback" not in err


def test_run_logged_children_end_with_a_killed_parent(tmp_path):
    """The processes compare, consensus and the demo start for prediction (run_logged): SIGKILL of the
    command leaves none of them running."""
    pids = tmp_path / "pids"
    driver = ("import os, sys\nfrom pathlib import Path\nfrom nnunet_ext.core.paths import run_logged\n"
              f"run_logged([sys.executable, '-c', {_TASK!r}, {str(pids)!r}], dict(os.environ), "
              f"Path({str(tmp_path / 'log')!r}))\n")
    p = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    task_pids = _wait_for(pids, p)
    p.kill()
    p.wait(timeout=60)
    assert _gone_within(task_pids)


def test_submission_test_entrypoint_ends_with_a_killed_command(tmp_path):
    """SIGKILL of `submission test` left the entrypoint running (it had a session of its own)."""
    sub, inp, pids = tmp_path / "sub", tmp_path / "in", tmp_path / "pids"
    sub.mkdir()
    (sub / "submission.json").write_text(json.dumps({"challenge": "generic", "n_channels": 1,
                                                     "file_ending": ".nii.gz"}))
    (sub / "entrypoint.py").write_text(f"import sys\nsys.argv = ['x', {str(pids)!r}]\nexec({_TASK!r})\n")
    _image(inp / "c1_0000.nii.gz")
    p = subprocess.Popen([NNUNET_EXT, "submission", "test", str(sub), "--input", str(inp), "--timeout", "300"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    task_pids = _wait_for(pids, p)
    p.kill()
    p.communicate(timeout=60)
    assert _gone_within(task_pids)


def test_guard_exit_status_and_dead_parent(tmp_path):
    """The guard passes the command's exit status on (128 + signal when a signal ended it) and refuses to
    start a command for a parent that has gone already."""
    from nnunet_ext.core import guard

    assert subprocess.run(guard.guarded([sys.executable, "-c", "raise SystemExit(3)"])).returncode == 3
    assert subprocess.run(guard.guarded([sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"])).returncode == 143
    assert subprocess.run(guard.guarded(["true"], parent=1)).returncode == 137
