"""Challenge submissions: input layouts, `submission test` probes on hand-made entrypoints (timeout, fresh
output folder, read-only input, cleanup, clear errors), install() of a packaged model, and every challenge
layout built from a tiny phantom model and run through `nnunet-ext submission test` (slow).
safe_extract: tests/workflows/test_submission_archive.py; the container: tests/workflows/test_submission_docker.py."""
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_nnunet
from nnunet_ext.cli import run
from nnunet_ext.cli.main import main
from nnunet_ext.core.io import read_image, write_image
from nnunet_ext.core.paths import nnunet_command, nnunet_env
from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset
from nnunet_ext.workflows.submission import check_submission
from nnunet_ext.workflows.submission.runner import install
from nnunet_ext.workflows.submission.layouts import cases_for


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def test_layouts(tmp_path):
    _touch(tmp_path / "wmh" / "pre" / "FLAIR.nii.gz")
    _touch(tmp_path / "wmh" / "pre" / "T1.nii.gz")
    (c,) = cases_for("wmh2017", tmp_path / "wmh", tmp_path / "out", 2)
    assert [p.name for p in c.channels] == ["FLAIR.nii.gz", "T1.nii.gz"] and c.output.name == "result.nii.gz"
    for f in ("flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz"):
        _touch(tmp_path / "ms" / f)
    (c,) = cases_for("msseg2", tmp_path / "ms", tmp_path / "out", 2)
    assert c.reference.name.startswith("flair_time01") and c.output.name == "new_lesions.nii.gz"
    for mod in ("flair", "t2", "pd", "mprage"):
        _touch(tmp_path / "isbi" / f"test01_02_{mod}_pp.nii")
    (c,) = cases_for("isbi2015", tmp_path / "isbi", tmp_path / "out", 4)
    assert c.case_id == "test01_02" and [p.name.split("_")[2] for p in c.channels] == ["flair", "t2", "pd", "mprage"]
    with pytest.raises(FileNotFoundError, match="T1.nii.gz"):
        (tmp_path / "wmh" / "pre" / "T1.nii.gz").unlink()
        cases_for("wmh2017", tmp_path / "wmh", tmp_path / "out", 2)
    with pytest.raises(ValueError, match="channel"):
        _touch(tmp_path / "gen" / "a_0000.nii.gz")
        cases_for("generic", tmp_path / "gen", tmp_path / "out", 2)


def _digest(root):
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _cli(capsys, *argv):
    """(exit code, stdout, stderr) of `nnunet-ext ARGV` run in-process through main(), called as from Python
    (argv given): the console path would leave SIGINT/SIGTERM ignored in this test process."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ------------------------------------------------------------------ submission test on hand-made entrypoints

WRITE_RESULT = (
    "import sys, pathlib, SimpleITK as sitk\n"
    "a = sys.argv; i, o = pathlib.Path(a[a.index('--input') + 1]), pathlib.Path(a[a.index('--output') + 1])\n"
    "img = sitk.ReadImage(str(i / 'pre' / 'FLAIR.nii.gz'))\n"
    "sitk.WriteImage(sitk.Cast(img > 1e9, sitk.sitkUInt8), str(o / 'result.nii.gz'))\n")


def _fake_submission(dest, entrypoint: str):
    dest.mkdir(parents=True)
    (dest / "submission.json").write_text(json.dumps({"challenge": "wmh2017", "n_channels": 2,
                                                       "file_ending": ".nii.gz"}))
    (dest / "entrypoint.py").write_text(entrypoint)
    return dest


@pytest.fixture
def wmh_input(tmp_path):
    inp = tmp_path / "in"
    img = np.zeros((8, 9, 10), np.float32)
    img[2:4, 3:5, 4:6] = 5
    write_image(img, (1.0, 1.0, 1.0), inp / "pre" / "FLAIR.nii.gz")
    write_image(img * 2, (1.0, 1.0, 1.0), inp / "pre" / "T1.nii.gz")
    return inp


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """TMPDIR of this test only, to see that `submission test` leaves no temporary folder behind."""
    t = tmp_path / "tmpdir"
    t.mkdir()
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return t


def test_fake_entrypoint_passes_and_cleans_up(tmp_path, wmh_input, private_tmp, monkeypatch, capsys):
    sub = _fake_submission(tmp_path / "sub", WRITE_RESULT)
    before = _digest(wmh_input)
    code, out, err = _cli(capsys, "submission", "test", sub, "--input", wmh_input)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "PASS" and "input untouched" in out
    assert list(private_tmp.iterdir()) == []  # input copy, model install, output: all removed
    assert _digest(wmh_input) == before


def test_entrypoint_writing_nothing_fails_even_over_old_outputs(tmp_path, wmh_input, monkeypatch, capsys):
    good = _fake_submission(tmp_path / "good", WRITE_RESULT)
    work = tmp_path / "w"
    assert _cli(capsys, "submission", "test", good, "--input", wmh_input, "--work", work)[0] == 0
    assert (work / "run_001" / "output" / "result.nii.gz").is_file()
    (work / "output").mkdir()  # outputs an older version of the command left at the old place
    shutil.copyfile(work / "run_001" / "output" / "result.nii.gz", work / "output" / "result.nii.gz")
    lazy = _fake_submission(tmp_path / "lazy", "print('did nothing')\n")
    code, out, _ = _cli(capsys, "submission", "test", lazy, "--input", wmh_input, "--work", work)
    assert code == 1 and "result.nii.gz written" in out and out.strip().splitlines()[-1] == "FAIL"
    assert "run_002" in out and not any((work / "run_002" / "output").iterdir())
    res = check_submission(lazy, wmh_input, work)
    assert not res.ok and res.run_dir == work / "run_003"


def test_timeout_kills_the_entrypoint_and_its_children(tmp_path, wmh_input, private_tmp, monkeypatch, capsys):
    marker = tmp_path / "child_alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time, pathlib\ntime.sleep(3)\npathlib.Path({str(marker)!r}).write_text('x')\n")
    sub = _fake_submission(tmp_path / "sub", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child)!r}])\n"
        "time.sleep(60)\n"))
    t = time.monotonic()
    code, out, _ = _cli(capsys, "submission", "test", sub, "--input", wmh_input, "--timeout", "1")
    assert code == 1 and "timed out after 1 s (killed)" in out
    assert time.monotonic() - t < 30
    time.sleep(4)
    assert not marker.exists()  # the whole process group was killed
    assert list(private_tmp.iterdir()) == []


def test_entrypoint_gets_a_read_only_copy_of_the_input(tmp_path, wmh_input, private_tmp, monkeypatch, capsys):
    sub = _fake_submission(tmp_path / "sub", WRITE_RESULT + (
        "import os\n"
        "f = i / 'pre' / 'FLAIR.nii.gz'\n"
        "print('writable' if os.access(f, os.W_OK) else 'read-only', oct(f.stat().st_mode & 0o777))\n"
        "if os.getuid() == 0:\n"
        "    f.write_bytes(b'overwritten')  # root ignores permission bits: the check must catch it\n"
        "else:\n"
        "    try:\n"
        "        f.write_bytes(b'overwritten')\n"
        "    except PermissionError:\n"
        "        (o / 'denied').write_text('x')\n"))
    before = _digest(wmh_input)
    work = tmp_path / "w"
    code, out, _ = _cli(capsys, "submission", "test", sub, "--input", wmh_input, "--work", work)
    log = (work / "run_001" / "entrypoint.log").read_text()
    assert "0o444" in log
    if os.getuid() == 0:
        assert code == 1 and "input untouched" in out and "changed its (read-only) input" in out
    else:
        assert code == 0 and (work / "run_001" / "output" / "denied").exists()
    assert _digest(wmh_input) == before  # the user's input is never touched
    assert list(private_tmp.iterdir()) == []


def test_deep_work_folder_and_multiprocessing(tmp_path, wmh_input, monkeypatch, capsys):
    """nnU-Net's predictor starts a multiprocessing Manager (an AF_UNIX socket in TMPDIR, < 108 bytes)."""
    sub = _fake_submission(tmp_path / "sub", "import multiprocessing\n"
                                            "if __name__ == '__main__':\n"
                                            "    multiprocessing.Manager().shutdown()\n" + WRITE_RESULT.replace("\n", "\n    ")
                           .replace("import sys", "    import sys", 1).rstrip() + "\n")
    work = tmp_path / ("w" * 60) / ("x" * 60)
    code, out, err = _cli(capsys, "submission", "test", sub, "--input", wmh_input, "--work", work)
    assert code == 0, out + err


def test_failing_entrypoint_shows_its_last_lines(tmp_path, wmh_input, monkeypatch, capsys):
    sub = _fake_submission(tmp_path / "sub", "raise SystemExit('model.zip: something is wrong')\n")
    code, out, _ = _cli(capsys, "submission", "test", sub, "--input", wmh_input)
    assert code == 1 and "exit code 1: model.zip: something is wrong" in out


@pytest.mark.parametrize("case", ["no_json", "bad_json", "no_folder", "missing_input_file", "input_not_dir",
                                  "timeout_zero", "timeout_nan", "work_inside_input"])
def test_submission_test_argument_errors(tmp_path, wmh_input, monkeypatch, capsys, case):
    sub = _fake_submission(tmp_path / "sub", WRITE_RESULT)
    args = ["submission", "test", sub, "--input", wmh_input]
    expect = None
    if case == "no_json":
        (sub / "submission.json").unlink()
        expect = f"{sub / 'submission.json'} not found"
    elif case == "bad_json":
        (sub / "submission.json").write_text("{not json")
        expect = f"{sub / 'submission.json'}: not a valid submission.json"
    elif case == "no_folder":
        args[2] = tmp_path / "nope"
        expect = f"submission folder {tmp_path / 'nope'} not found"
    elif case == "missing_input_file":
        (wmh_input / "pre" / "T1.nii.gz").unlink()
        expect = f"expected input file {wmh_input / 'pre' / 'T1.nii.gz'} is missing"
    elif case == "input_not_dir":
        args[4] = wmh_input / "pre" / "FLAIR.nii.gz"
        expect = "is not a folder"
    elif case == "timeout_zero":
        args += ["--timeout", "0"]
        expect = "--timeout must be a finite number"
    elif case == "timeout_nan":
        args += ["--timeout", "nan"]
        expect = "--timeout must be a finite number"
    else:
        args += ["--work", wmh_input / "w"]
        expect = "overlaps the input"
    before = _digest(wmh_input)
    code, out, err = _cli(capsys, *args)
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _digest(wmh_input) == before and not (wmh_input / "w").exists()


# ------------------------------------------------------------------------------------- install()

def _fake_package(tmp_path, extras=True):
    """A submission folder with a model.zip (fake checkpoint) and model extras, as build writes them."""
    sub = tmp_path / "sub"
    (sub / "model_extras" / "fold_0").mkdir(parents=True)
    with zipfile.ZipFile(sub / "model.zip", "w") as z:
        z.writestr("Dataset521_X/T__P__2d/plans.json", "{}")
        z.writestr("Dataset521_X/T__P__2d/fold_0/checkpoint_final.pth", "weights")
    if extras:
        (sub / "model_extras" / "nnunet_ext_model.json").write_text('{"version": 1, "condition": "cohort"}')
        (sub / "model_extras" / "fold_0" / "nnunet_ext_threshold.json").write_text('{"tp": []}')
    cfg = {"dataset": "Dataset521_X", "trainer": "T", "plans": "P", "configuration": "2d", "folds": [0],
           "checkpoint": "checkpoint_final.pth"}
    return sub, cfg


def test_install_puts_contract_and_fold_extras_beside_the_folds(tmp_path):
    sub, cfg = _fake_package(tmp_path)
    results = tmp_path / "results"
    mdir = install(sub, results, cfg)
    assert mdir == results / "Dataset521_X" / "T__P__2d"
    assert (mdir / "nnunet_ext_model.json").read_text() == '{"version": 1, "condition": "cohort"}'
    assert (mdir / "fold_0" / "nnunet_ext_threshold.json").is_file()
    assert (mdir / "fold_0" / "checkpoint_final.pth").read_text() == "weights"
    assert sorted(p.name for p in results.iterdir()) == ["Dataset521_X"]  # no staging folder left
    # a second call on the installed (read-only) model writes nothing
    stamp = {p: p.stat().st_mtime_ns for p in mdir.rglob("*")}
    for p in [results, *results.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        assert install(sub, results, cfg) == mdir
    finally:
        for p in [results, *results.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert stamp == {p: p.stat().st_mtime_ns for p in mdir.rglob("*")}
    # a half installed model (extras missing, e.g. an interrupted older install) is replaced as a whole
    (mdir / "nnunet_ext_model.json").unlink()
    (mdir / "stale.txt").write_text("stale")
    install(sub, results, cfg)
    assert (mdir / "nnunet_ext_model.json").is_file() and not (mdir / "stale.txt").exists()


def test_install_refuses_unsafe_or_incomplete_zip(tmp_path):
    sub, cfg = _fake_package(tmp_path)
    with zipfile.ZipFile(sub / "model.zip", "w") as z:
        z.writestr("Dataset521_X/T__P__2d/fold_0/checkpoint_final.pth", "w")
        z.writestr("../escape.txt", "evil")
    results = tmp_path / "results"
    with pytest.raises(ValueError, match="model.zip: refusing path with '..'"):
        install(sub, results, cfg)
    assert not (tmp_path / "escape.txt").exists() and list(results.iterdir()) == []
    with zipfile.ZipFile(sub / "model.zip", "w") as z:
        z.writestr("Dataset521_X/T__P__2d/plans.json", "{}")
    with pytest.raises(ValueError, match="has no Dataset521_X/T__P__2d/fold_0/checkpoint_final.pth"):
        install(sub, results, cfg)
    assert list(results.iterdir()) == []


# ------------------------------------------------------------------ real models (slow: nnU-Net training)

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny 2-channel (two time points, two cohorts) and 4-channel phantom models, 1 epoch of 2 iterations:
    LSRTrainer on both, SCINTrainer and ResolutionFiLMTrainer on the first."""
    work = tmp_path_factory.mktemp("sub")
    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1"})
    write_phantom_dataset(env["nnUNet_raw"], 521, 5, PhantomConfig(shape=(32, 32, 32), timepoints=2, seed=8,
                                                                   cohorts=("all", "no_small")),
                          n_test=1, progress=False)
    four = write_phantom_dataset(env["nnUNet_raw"], 522, 5, PhantomConfig(shape=(32, 32, 32), seed=9), n_test=1,
                                 progress=False)
    for split in ("imagesTr", "imagesTs"):  # four channels: FLAIR and three altered copies
        for p in sorted((four / split).glob("*_0000.nii.gz")):
            img, sp = read_image(p)
            for k in (1, 2, 3):
                write_image(img * (1 + 0.1 * k), sp, p.with_name(p.name.replace("_0000", f"_{k:04d}")))
    ds = json.loads((four / "dataset.json").read_text())
    ds["channel_names"] = {"0": "FLAIR", "1": "T2", "2": "PD", "3": "MPRAGE"}
    (four / "dataset.json").write_text(json.dumps(ds))
    for d, trainers in (("521", ("LSRTrainer", "SCINTrainer", "ResolutionFiLMTrainer")), ("522", ("LSRTrainer",))):
        run_nnunet([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", d, "-c", "2d", "-np", "2"], env)
        for tr in trainers:
            run_nnunet([nnunet_command("nnUNetv2_train"), d, "2d", "0", "-tr", tr, "-device", "cpu"], env)
    return work, env


def _build(models, dataset, challenge, out, trainer="LSRTrainer", extra=(), ok=True):
    work, env = models
    r = run_nnunet([nnunet_command("nnunet-ext"), "submission", "build", "-d", dataset, "-c", "2d", "-tr",
                        trainer, "-f", "0", "--challenge", challenge, "-o", str(out), *extra], env, ok)
    return out if ok else r


def _model_dir(models, dataset, trainer="LSRTrainer"):
    res = models[0] / "nnUNet_results"
    return next(res.glob(f"Dataset{dataset}_*")) / f"{trainer}__nnUNetPlans__2d"


def _challenge_input(models, challenge, dest):
    raw = models[0] / "nnUNet_raw"
    if challenge == "generic":
        shutil.copytree(raw / "Dataset521_MSPhantom" / "imagesTs", dest)
    elif challenge in ("wmh2017", "msseg2"):
        src = raw / "Dataset521_MSPhantom" / "imagesTs"
        names = {"wmh2017": ("pre/FLAIR.nii.gz", "pre/T1.nii.gz"),
                 "msseg2": ("flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz")}[challenge]
        for k, n in enumerate(names):
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f"phantom_005_{k:04d}.nii.gz", dest / n)
    else:
        src = raw / "Dataset522_MSPhantom" / "imagesTs"
        dest.mkdir(parents=True)
        for k, mod in enumerate(("flair", "t2", "pd", "mprage")):
            shutil.copyfile(src / f"phantom_005_{k:04d}.nii.gz", dest / f"test01_01_{mod}_pp.nii.gz")
    return dest


@pytest.mark.slow
@pytest.mark.heavy  # the trained models of the module fixture (about 95 s to build), shared with the other heavy tests here: CI's heavy part
@pytest.mark.parametrize("challenge,dataset,output", [("generic", "521", "phantom_005.nii.gz"),
                                                      ("wmh2017", "521", "result.nii.gz"),
                                                      ("msseg2", "521", "new_lesions.nii.gz"),
                                                      ("isbi2015", "522", "test01_01_mask.nii.gz")])
def test_challenge_layouts_build_and_pass(models, tmp_path, capsys, challenge, dataset, output):
    mdir = _model_dir(models, dataset)
    model_before = _digest(mdir)
    sub = _build(models, dataset, challenge, tmp_path / "sub")
    assert _digest(mdir) == model_before  # build reads the model, never writes it
    for f in ("model.zip", "Dockerfile", ".dockerignore", "entrypoint.py", "README.md", "submission.json",
              "requirements.txt", "vendor/nnunet_ext/trainers/__init__.py", "model_extras/nnunet_ext_model.json",
              "model_extras/fold_0/nnunet_ext_settings.json"):
        assert (sub / f).is_file(), f
    from nnunet_ext.core.paths import trainers_path

    assert {p.name for p in trainers_path().glob("*.py")} <= {p.name for p in (sub / "vendor/nnunet_ext/trainers").glob("*.py")}
    for j in (mdir / "fold_0").glob("nnunet_ext_*.json"):  # every per-fold extra is packaged, byte for byte
        assert (sub / "model_extras" / "fold_0" / j.name).read_bytes() == j.read_bytes()
    if (mdir / "nnunet_ext_model.json").is_file():
        assert (sub / "model_extras" / "nnunet_ext_model.json").read_bytes() == (mdir / "nnunet_ext_model.json").read_bytes()
    docker = (sub / "Dockerfile").read_text()
    assert "USER submitter" in docker and "ARG BASE_IMAGE=python:3" in docker and "FROM ${BASE_IMAGE}" in docker
    reqs = (sub / "requirements.txt").read_text().split()
    assert any(r.startswith("nnunetv2==") for r in reqs) and any(r.startswith("torch==") for r in reqs)
    cfg = json.loads((sub / "submission.json").read_text())
    assert cfg["cohort"] is None and cfg["condition"] is None
    assert "--network none" in (sub / "README.md").read_text()
    inp = _challenge_input(models, challenge, tmp_path / "in")
    inp_before = _digest(inp)
    assert run(["submission", "test", str(sub), "--input", str(inp), "--work", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == "PASS" and "FAIL" not in printed
    out = tmp_path / "w" / "run_001" / "output" / output
    ref = next(p for p in sorted(inp.rglob("*.nii.gz")))
    assert read_image(out)[0].shape == read_image(ref)[0].shape
    assert _digest(inp) == inp_before


@pytest.mark.slow
@pytest.mark.heavy  # the trained models of the module fixture (about 95 s to build), shared with the other heavy tests here: CI's heavy part
def test_geometry_mismatch_is_caught(models, tmp_path, capsys):
    sub = _build(models, "521", "wmh2017", tmp_path / "sub")
    # an entrypoint that writes the right names but loses the origin
    (sub / "entrypoint.py").write_text(
        "import sys, SimpleITK as sitk, pathlib\n"
        "a = sys.argv; i, o = pathlib.Path(a[a.index('--input') + 1]), pathlib.Path(a[a.index('--output') + 1])\n"
        "img = sitk.ReadImage(str(i / 'pre' / 'FLAIR.nii.gz'))\n"
        "out = sitk.Cast(img > 1e9, sitk.sitkUInt8); out.SetOrigin((5.0, 5.0, 5.0))\n"
        "sitk.WriteImage(out, str(o / 'result.nii.gz'))\n")
    inp = _challenge_input(models, "wmh2017", tmp_path / "in")
    res = check_submission(sub, inp, tmp_path / "w")
    assert not res.ok and [r["check"] for r in res.rows if not r["ok"]] == ["origin = reference"]
    assert run(["submission", "test", str(sub), "--input", str(inp), "--work", str(tmp_path / "w2")]) == 1


@pytest.mark.slow
@pytest.mark.heavy  # the trained models of the module fixture (about 95 s to build), shared with the other heavy tests here: CI's heavy part
def test_build_refusals(models, tmp_path):
    mdir = _model_dir(models, "522")
    before = _digest(mdir)
    r = _build(models, "522", "wmh2017", tmp_path / "s", ok=False)
    assert r.returncode == 2 and "wmh2017 provides 2 input images per case" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    r = _build(models, "522", "isbi2015", tmp_path / "full", ok=False)
    assert r.returncode == 2 and f"-o {tmp_path / 'full'} exists and is not empty" in r.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    r = _build(models, "522", "isbi2015", mdir / "sub", ok=False)
    assert r.returncode == 2 and "overlaps the model folder" in r.stderr
    r = _build(models, "522", "isbi2015", tmp_path / "s", extra=("-chk", "../x.pth"), ok=False)
    assert r.returncode == 2 and "-chk" in r.stderr
    r = _build(models, "522", "isbi2015", tmp_path / "s", extra=("--cohort", "cohort0_all"), ok=False)
    assert r.returncode == 2 and "--cohort cohort0_all with LSRTrainer" in r.stderr and "SCIN" in r.stderr
    for r in [r]:
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]
    assert _digest(mdir) == before


@pytest.mark.slow
@pytest.mark.heavy  # the trained models of the module fixture (about 95 s to build), shared with the other heavy tests here: CI's heavy part
def test_scin_model_is_packaged_with_its_cohort(models, tmp_path):
    mdir = _model_dir(models, "521", "SCINTrainer")
    r = _build(models, "521", "wmh2017", tmp_path / "s", trainer="SCINTrainer", ok=False)
    assert r.returncode == 2 and "pass --cohort NAME" in r.stderr and "cohort1_no_small" in r.stderr
    r = _build(models, "521", "wmh2017", tmp_path / "s", trainer="SCINTrainer", extra=("--cohort", "siteZ"), ok=False)
    assert r.returncode == 2 and "--cohort 'siteZ': unknown cohort" in r.stderr
    sub = _build(models, "521", "wmh2017", tmp_path / "sub", trainer="SCINTrainer", extra=("--cohort", "cohort1_no_small"))
    cfg = json.loads((sub / "submission.json").read_text())
    assert cfg["cohort"] == "cohort1_no_small" and cfg["condition"] == "cohort"
    contract = json.loads((sub / "model_extras" / "nnunet_ext_model.json").read_text())
    assert contract["condition"] == "cohort" and "cohort1_no_small" in contract["cohorts"]
    installed = install(sub, tmp_path / "results", cfg)
    assert json.loads((installed / "nnunet_ext_model.json").read_text()) == contract
    for j in (mdir / "fold_0").glob("nnunet_ext_*.json"):
        assert (installed / "fold_0" / j.name).read_bytes() == j.read_bytes()


@pytest.mark.slow
@pytest.mark.heavy  # the trained models of the module fixture (about 95 s to build), shared with the other heavy tests here: CI's heavy part
@pytest.mark.parametrize("trainer,cohort", [("SCINTrainer", "cohort1_no_small"), ("ResolutionFiLMTrainer", None)])
def test_conditioned_submission_predicts_like_nnunet_ext_predict(models, tmp_path, trainer, cohort):
    extra = ("--cohort", cohort) if cohort else ()
    sub = _build(models, "521", "wmh2017", tmp_path / "sub", trainer=trainer, extra=extra)
    inp = _challenge_input(models, "wmh2017", tmp_path / "in")
    res = check_submission(sub, inp, tmp_path / "w")
    assert res.ok, res.log_tail
    work, env = models  # the same case through `nnunet-ext predict` (the one predictor): the same mask
    run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(work / "nnUNet_raw" / "Dataset521_MSPhantom" /
                        "imagesTs"), "-o", str(tmp_path / "pred"), "-d", "521", "-c", "2d", "-tr", trainer, "-f", "0",
                        "-device", "cpu", *extra], env)
    a = read_image(res.run_dir / "output" / "result.nii.gz")[0]
    assert np.array_equal(a, read_image(tmp_path / "pred" / "phantom_005.nii.gz")[0] == 1)


@pytest.mark.slow
@pytest.mark.heavy  # ~50 s on 2 idle cores (two validations, four predictions, a submission run): CI's heavy part
def test_selected_ensemble_predicts_and_packages_with_its_threshold_and_min_size(models, tmp_path, capsys):
    """`select` on two real models' validation probabilities, its ensemble row taken as the choice; then
    `predict --selection` and an ensemble submission both give the mean of the members' soft maps at the
    selection's threshold without lesions under its minimum size (recomputed here from each member's own
    `nnunet-ext predict` output)."""
    from nnunet_ext.metrics.lesions import remove_small_lesions

    work, env = models
    members = ("LSRTrainer", "ResolutionFiLMTrainer")
    for tr in members:  # nnU-Net's validation probabilities (what select scores)
        run_nnunet([nnunet_command("nnUNetv2_train"), "521", "2d", "0", "-tr", tr, "-device", "cpu", "--val",
                    "--npz"], env)
    sel = tmp_path / "selection.json"
    run_nnunet([nnunet_command("nnunet-ext"), "select", "-d", "521", "-c", "2d", "-tr", *members, "-f", "0",
                "--no-contract", "--thresholds", "0.2", "0.35", "--min-sizes-mm3", "0", "3", "-o", str(sel)], env)
    res = json.loads(sel.read_text())
    pair = max((r for r in res["table"] if len(r["members"]) == 2 and r["min_lesion_mm3"] > 0),
               key=lambda r: (r["score"], r["threshold"]))
    res["best"] = dict(pair, connectivity=26, folds=[0])  # the ensemble branch, whatever won on this tiny model
    sel.write_text(json.dumps(res))
    t, mm3 = pair["threshold"], pair["min_lesion_mm3"]
    images = work / "nnUNet_raw" / "Dataset521_MSPhantom" / "imagesTs"
    soft = []
    for tr in members:
        run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(tmp_path / tr), "-d", "521",
                    "-c", "2d", "-tr", tr, "-f", "0", "-device", "cpu"], env)
        soft.append(read_image(tmp_path / tr / "soft" / "phantom_005.nii.gz")[0].astype(np.float64))
    mean = (soft[0] + soft[1]) / 2
    spacing = read_image(images / "phantom_005_0000.nii.gz")[1]
    expected = remove_small_lesions(mean >= t, spacing, mm3, 26)
    assert 0 < expected.sum() < (mean >= t).sum() or mm3 == 0 or expected.sum() == (mean >= t).sum()

    r = run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(tmp_path / "ens"), "-d",
                    "521", "--selection", str(sel), "-device", "cpu"], env)
    assert "selection" in r.stdout and f"threshold {t}" in r.stdout, r.stdout
    got = read_image(tmp_path / "ens" / "phantom_005.nii.gz")[0]
    assert np.array_equal(got == 1, expected)
    np.testing.assert_allclose(read_image(tmp_path / "ens" / "soft" / "phantom_005.nii.gz")[0], mean, atol=1e-6)
    summary = json.loads((tmp_path / "ens" / "nnunet_ext_predict.json").read_text())
    assert summary["threshold"] == t and summary["postprocessing"]["min_lesion_mm3"] == mm3
    assert not list(tmp_path.glob(".ens.ensemble-*"))  # members' private folder removed

    # --threshold overrides the selection's
    run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(tmp_path / "ens09"), "-d",
                "521", "--selection", str(sel), "--threshold", "0.9", "--min-lesion-mm3", "0", "-device", "cpu"], env)
    assert np.array_equal(read_image(tmp_path / "ens09" / "phantom_005.nii.gz")[0] == 1, mean >= 0.9)

    # the submission of the selection: both members packaged, the same mask
    run_nnunet([nnunet_command("nnunet-ext"), "submission", "build", "-d", "521", "--selection", str(sel),
                "--challenge", "generic", "-o", str(tmp_path / "sub")], env)
    cfg = json.loads((tmp_path / "sub" / "submission.json").read_text())
    assert [m["trainer"] for m in cfg["ensemble"]["members"]] == list(members)
    assert (tmp_path / "sub" / "model_1.zip").is_file() and cfg["ensemble"]["threshold"] == t
    chk = check_submission(tmp_path / "sub", images, tmp_path / "w")
    assert chk.ok, chk.log_tail
    assert np.array_equal(read_image(chk.run_dir / "output" / "phantom_005.nii.gz")[0] == 1, expected)

    # refusals: one line, exit 2, nothing written
    for argv, msg in ((["-c", "2d"], "--selection chooses the model(s) and folds; drop -c"),
                      (["-tr", "LSRTrainer"], "drop -tr")):
        r = run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(tmp_path / "no"),
                        "-d", "521", "--selection", str(sel), *argv], env, ok=False)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(tmp_path / "no"), "-d",
                    "521", "--selection", str(tmp_path / "missing.json")], env, ok=False)
    assert r.returncode == 2 and "missing.json not found" in r.stderr and "run `nnunet-ext select`" in r.stderr
    r = run_nnunet([nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(images / "x"), "-d",
                    "521", "--selection", str(sel)], env, ok=False)
    assert r.returncode == 2 and "lies inside the input" in r.stderr
    assert not (tmp_path / "no").exists() and not (images / "x").exists()
