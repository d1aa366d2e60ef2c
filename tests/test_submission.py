"""Challenge submissions: safe archive extraction, input layouts, and every challenge layout built from a
tiny phantom model and run through `nnunet-ext submission test`."""
import json
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from nnunet_ext.cli import run
from nnunet_ext.io import read_image, write_image
from nnunet_ext.paths import nnunet_command, nnunet_env
from nnunet_ext.phantom import PhantomConfig, write_phantom_dataset
from nnunet_ext.submission import check_submission, safe_extract
from nnunet_ext.submission.layouts import cases_for


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_safe_extract_refuses_traversal(tmp_path, member):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("ok/file.txt", "fine")
        f.writestr(member, "evil")
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(ValueError, match="refusing|outside"):
        safe_extract(z, target)
    assert not any(target.rglob("*")) and not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_symlink(tmp_path):
    z = tmp_path / "link.zip"
    info = zipfile.ZipInfo("model/link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(z, "w") as f:
        f.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        safe_extract(z, tmp_path / "t")


def test_safe_extract_normal(tmp_path):
    z = tmp_path / "ok.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("Dataset001_X/fold_0/a.txt", "A")
    assert safe_extract(z, tmp_path / "t") == ["Dataset001_X/fold_0/a.txt"]
    assert (tmp_path / "t" / "Dataset001_X" / "fold_0" / "a.txt").read_text() == "A"


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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny 2-channel (two time points) and 4-channel phantom models, 1 epoch of 2 iterations each."""
    work = tmp_path_factory.mktemp("sub")
    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1"})
    write_phantom_dataset(env["nnUNet_raw"], 521, 5, PhantomConfig(shape=(32, 32, 32), timepoints=2, seed=8),
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
    for d in ("521", "522"):
        subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", d, "-c", "2d", "-np", "2"], env=env,
                       check=True, capture_output=True)
        subprocess.run([nnunet_command("nnUNetv2_train"), d, "2d", "0", "-tr", "LSRTrainer", "-device", "cpu"], env=env,
                       check=True, capture_output=True)
    return work, env


def _build(models, dataset, challenge, out):
    work, env = models
    r = subprocess.run([nnunet_command("nnunet-ext"), "submission", "build", "-d", dataset, "-c", "2d", "-tr",
                        "LSRTrainer", "-f", "0", "--challenge", challenge, "-o", str(out)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


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


@pytest.mark.parametrize("challenge,dataset,output", [("generic", "521", "phantom_005.nii.gz"),
                                                      ("wmh2017", "521", "result.nii.gz"),
                                                      ("msseg2", "521", "new_lesions.nii.gz"),
                                                      ("isbi2015", "522", "test01_01_mask.nii.gz")])
def test_challenge_layouts_build_and_pass(models, tmp_path, capsys, challenge, dataset, output):
    sub = _build(models, dataset, challenge, tmp_path / "sub")
    for f in ("model.zip", "Dockerfile", "entrypoint.py", "README.md", "submission.json",
              "vendor/nnunet_ext/trainers/ext_lsr.py", "model_extras/fold_0/nnunet_ext_settings.json"):
        assert (sub / f).is_file(), f
    docker = (sub / "Dockerfile").read_text()
    assert "USER submitter" in docker and "nnunetv2==" in docker and "torch==" in docker
    assert "--network none" in (sub / "README.md").read_text()
    inp = _challenge_input(models, challenge, tmp_path / "in")
    assert run(["submission", "test", str(sub), "--input", str(inp), "--work", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed.splitlines()[-1] and "FAIL" not in printed
    out = tmp_path / "w" / "output" / output
    ref = next(p for p in sorted(inp.rglob("*.nii.gz")))
    assert read_image(out)[0].shape == read_image(ref)[0].shape


def test_geometry_mismatch_is_caught(models, tmp_path, capsys):
    sub = _build(models, "521", "wmh2017", tmp_path / "sub")
    # an entrypoint that writes the right names but loses the origin
    (sub / "entrypoint.py").write_text(
        "import sys, SimpleITK as sitk, pathlib\n"
        "a = sys.argv; i, o = pathlib.Path(a[a.index('--input') + 1]), pathlib.Path(a[a.index('--output') + 1])\n"
        "o.mkdir(parents=True, exist_ok=True)\n"
        "img = sitk.ReadImage(str(i / 'pre' / 'FLAIR.nii.gz'))\n"
        "out = sitk.Cast(img > 1e9, sitk.sitkUInt8); out.SetOrigin((5.0, 5.0, 5.0))\n"
        "sitk.WriteImage(out, str(o / 'result.nii.gz'))\n")
    inp = _challenge_input(models, "wmh2017", tmp_path / "in")
    ok, rows = check_submission(sub, inp, tmp_path / "w")
    assert not ok and [r["check"] for r in rows if not r["ok"]] == ["origin = reference"]
    assert run(["submission", "test", str(sub), "--input", str(inp), "--work", str(tmp_path / "w2")]) == 1


def test_build_refuses_channel_mismatch(models, tmp_path):
    work, env = models
    r = subprocess.run([nnunet_command("nnunet-ext"), "submission", "build", "-d", "522", "-c", "2d", "-tr", "LSRTrainer",
                        "-f", "0", "--challenge", "wmh2017", "-o", str(tmp_path / "s")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "wmh2017 provides 2 input images per case" in r.stderr
