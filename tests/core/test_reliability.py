"""Issue 16 (reliability), fast part: every command of phantom / fuse / convert / preprocess-soft /
consensus split-raters with bad inputs, bad arguments and overlapping outputs. Each test asserts the exit
status, a message naming the file or option, and untouched inputs (checksums before and after).

The CLI runs in-process through ``nnunet_ext.core.errors.run_cli`` (what ``main()`` does), so exit statuses
and messages are the real ones without the start-up cost of a subprocess."""
import gzip
import hashlib
import json
import pickle
import signal
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.errors import run_cli
from nnunet_ext.core.io import (ImageReadError, read_image, read_mask, read_npz, read_sitk, unique_tmp, write_image)


def cli(capsys, *args):
    """(exit status, stderr) of ``nnunet-ext ARGS`` as main() runs it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = run_cli(run, [str(a) for a in args])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    return rc, err


def digest(*folders):
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() or p.is_symlink():
                out[str(p)] = hashlib.md5(p.read_bytes()).hexdigest() if p.exists() else "dangling"
    return out


def one_line_error(err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnunet-ext: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _write(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), True)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_image(path, shape=(4, 6, 6)):
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    a[1, 2, 3] = np.nan
    _write(path, a)


# ---------------------------------------------------------------------------------------------- reader


def test_itk_reads_nan_and_truncation_as_zero_our_reader_does_not(tmp_path):
    p = tmp_path / "nan.nii.gz"
    _nan_image(p)
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))).any()  # ITK 5.4: NaN -> 0
    with pytest.raises(ImageReadError, match=r"nan.nii.gz: 1 NaN/Inf voxel"):
        read_image(p)
    arr, _ = read_image(p, allow_nonfinite=True)
    assert np.isnan(arr[1, 2, 3]) and np.isnan(arr).sum() == 1
    t = tmp_path / "t.nii.gz"
    _write(t, np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))
    _truncate(t)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(t))).size == 16 ** 3  # ITK: silently zero-filled
    with pytest.raises(ImageReadError, match=r"t.nii.gz: damaged gzip file"):
        read_sitk(t)
    u = tmp_path / "u.nii"
    _write(u, np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))
    _truncate(u)
    with pytest.raises(ImageReadError, match=r"u.nii: not a readable NIfTI"):
        read_sitk(u)
    m = tmp_path / "m.nii.gz"
    _write(m, np.zeros((4, 4, 4), np.uint8))
    _truncate(m)  # integer masks: the gzip check still fires
    with pytest.raises(ImageReadError, match="m.nii.gz"):
        read_mask(m)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_sitk(tmp_path / "empty.nii.gz")


def test_masks_0_255_and_bad_values(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[1:3] = 255
    _write(tmp_path / "m.nii.gz", a)
    arr, _ = read_mask(tmp_path / "m.nii.gz")
    assert arr.dtype == np.uint8 and set(np.unique(arr)) == {0, 1} and arr.sum() == 32
    a[0, 0, 0] = 7
    _write(tmp_path / "bad.nii.gz", a)
    with pytest.raises(ImageReadError, match=r"bad.nii.gz: mask values"):
        read_mask(tmp_path / "bad.nii.gz")


def test_npz_truncated_is_a_clean_error(tmp_path):
    p = tmp_path / "case.npz"
    np.savez_compressed(p, probabilities=np.random.default_rng(0).random((2, 8, 8, 8)).astype(np.float32))
    assert read_npz(p, "probabilities").shape == (2, 8, 8, 8)
    _truncate(p)
    with pytest.raises(ValueError, match=r"case.npz: damaged .npz"):
        read_npz(p, "probabilities")


def test_write_image_unique_tmp_and_no_leftover(tmp_path):
    a, b = unique_tmp(tmp_path / "x.nii.gz"), unique_tmp(tmp_path / "x.nii.gz")
    assert a != b and a.name.endswith("x.nii.gz") and str(__import__("os").getpid()) in a.name
    write_image(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), tmp_path / "x.nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(IsADirectoryError):
        write_image(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), tmp_path / "dir.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.nii.gz", "x.nii.gz"]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("exc,needle", [
    (PermissionError(13, "Permission denied", "/out/x.json"), "/out/x.json: permission denied"),
    (IsADirectoryError(21, "Is a directory", "/out/dir"), "/out/dir is a folder"),
    (NotADirectoryError(20, "Not a directory", "/file/x"), "/file/x: a part of this path is a file"),
    (zipfile.BadZipFile("File is not a zip file"), "damaged zip archive"),
    (pickle.UnpicklingError("invalid load key, 'x'."), "damaged checkpoint"),
    (RuntimeError("Exception thrown in SimpleITK ReadImage: /a/b.c:1:\nitk::ERROR: ImageFileReader(0x1): "
                  "Could not create IO object for reading file /x/y.nii"), "/x/y.nii"),
    (NotImplementedError("--label only applies to isbi2015"), "--label"),
])
def test_expected_errors_are_one_line_exit_2(capsys, exc, needle):
    def boom(argv):
        raise exc

    rc = run_cli(boom, [])
    err = capsys.readouterr().err
    assert rc == 2
    one_line_error(err, needle)


def test_debug_keeps_traceback_and_ctrl_c_is_130(capsys):
    def boom(argv):
        raise ValueError("bad thing")

    assert run_cli(boom, ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, []) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err

    def bug(argv):
        raise TypeError("oops")

    assert run_cli(bug, []) == 1
    assert "internal error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- phantom


PH = ["--shape", 16, 16, 16, "--cases", 2]


@pytest.mark.parametrize("args,needle", [
    (["--spacing", "nan", 1, 1], "--spacing"),
    (["--spacing", 1, 0, 1], "--spacing"),
    (["--spacing", 1, "inf", 1], "--spacing"),
    (["--cases", 100000000000], "--cases"),
    (["--cases", 0], "--cases"),
    (["--test-cases", -1], "--test-cases"),
    (["--shape", 100000, 100000, 100000], "--shape"),
    (["--shape", 8, 16, 16], "--shape"),
    (["--name", "../../escape"], "--name"),
    (["--name", "a/b"], "--name"),
    (["-d", 0], "-d/--dataset"),
    (["-d", 1000], "-d/--dataset"),
    (["--raters", 1000], "--raters"),
    (["--seed", -1], "--seed"),
    (["-np", 0], "--num-processes"),
    (["--site-spacing", 1, "nan", 1], "--site-spacing"),
    (["--difficulty", "nan"], "difficulty"),
])
def test_phantom_bad_arguments(capsys, tmp_path, args, needle):
    raw = tmp_path / "raw"
    argv = ["phantom", "-d", 531, *PH, "--raw", raw, *args]
    rc, err = cli(capsys, *argv)
    assert rc == 2
    one_line_error(err, needle)
    assert not raw.exists() or not any(raw.glob("Dataset*"))
    assert not (tmp_path / "escape").exists()


def test_phantom_refuses_existing_dataset_and_overwrite_leaves_no_stale_files(capsys, tmp_path):
    raw = tmp_path / "raw"
    assert cli(capsys, "phantom", "-d", 531, "--shape", 16, 16, 16, "--cases", 3, "--raters", 2, "--soft",
               "--raw", raw)[0] == 0
    root = raw / "Dataset531_MSPhantom"
    before = digest(root)
    rc, err = cli(capsys, "phantom", "-d", 531, "--shape", 16, 16, 16, "--cases", 2, "--seed", 1, "--raw", raw)
    assert rc == 2
    one_line_error(err, str(root), "--overwrite")
    assert digest(root) == before
    assert cli(capsys, "phantom", "-d", 531, "--shape", 16, 16, 16, "--cases", 2, "--seed", 1, "--raw", raw,
               "--overwrite")[0] == 0
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "lesions.json",
                                                      "phantom.json"]
    assert len(list((root / "labelsTr").iterdir())) == 2
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2
    assert not [p for p in raw.iterdir() if "staging" in p.name or ".old-" in p.name]
    # another name on the same id is refused, even with --overwrite
    rc, err = cli(capsys, "phantom", "-d", 531, *PH, "--name", "Other", "--raw", raw, "--overwrite")
    assert rc == 2 and "already used" in err


# ---------------------------------------------------------------------------------------------- fuse


@pytest.fixture
def raters(tmp_path):
    rng = np.random.default_rng(0)
    dirs = []
    for k in range(3):
        d = tmp_path / f"R{k + 1}"
        for c in ("case_001", "case_002"):
            _write(d / f"{c}.nii.gz", (rng.random((4, 6, 6)) > 0.6).astype(np.uint8))
        dirs.append(d)
    for c in ("case_001", "case_002"):
        _write(tmp_path / "img" / f"{c}_0000.nii.gz", rng.random((4, 6, 6)).astype(np.float32))
    return dirs


def test_fuse_output_equal_to_a_rater_is_refused(capsys, tmp_path, raters):
    before = digest(*raters)
    for out in (raters[0], tmp_path, raters[1] / "sub"):
        rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", out)
        assert rc == 2
        one_line_error(err, "-o/--output", str(out))
    rc, err = cli(capsys, "fuse", "--method", "soft_rim", "--raters", *raters, "--images", tmp_path / "img",
                  "-o", tmp_path / "img")
    assert rc == 2 and "img" in err
    assert digest(*raters) == before


def test_fuse_library_refuses_overlap_too(tmp_path, raters):
    from nnunet_ext.data.fusion import fuse_folders

    before = digest(*raters)
    with pytest.raises(ValueError, match="is also an input"):
        fuse_folders("union", raters, raters[0], progress=False)
    assert digest(*raters) == before


def test_fuse_empty_raters_and_bad_arguments(capsys, tmp_path, raters):
    empty = [tmp_path / "E1", tmp_path / "E2"]
    for d in empty:
        d.mkdir()
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *empty, "-o", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "no <case>.nii.gz masks", "E1")
    assert not (tmp_path / "out").exists()
    for extra, needle in ((["--radius-mm", "nan"], "--radius-mm"), (["--gamma", "nan"], "--gamma"),
                          (["--gamma", "2"], "--gamma"), (["--radius-mm", "-1"], "--radius-mm")):
        rc, err = cli(capsys, "fuse", "--method", "soft_rim", "--raters", *raters, "--images", tmp_path / "img",
                      "-o", tmp_path / "out", *extra)
        assert rc == 2
        one_line_error(err, needle)
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "--images", tmp_path / "img",
                  "-o", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "--images")
    for extra, needle in ((["--channel", "1"], "--channel"), (["--radius-mm", "2"], "--radius-mm"),
                          (["--gamma", "0.3"], "--gamma")):
        rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", tmp_path / "out", *extra)
        assert rc == 2
        one_line_error(err, needle)
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", raters[0], "--raters", tmp_path / "nope",
                  "-o", tmp_path / "out")
    assert rc == 2 and "nope" in err


@pytest.mark.parametrize("damage,needle", [("truncate", "damaged gzip"), ("nan", "NaN/Inf"), ("2d", "3-D"),
                                           ("values", "mask values"), ("origin", "geometry mismatch")])
def test_fuse_bad_masks_name_the_file(capsys, tmp_path, raters, damage, needle):
    bad = raters[1] / "case_002.nii.gz"
    if damage == "truncate":
        _truncate(bad)
    elif damage == "nan":
        _nan_image(bad)
    elif damage == "2d":
        for d in raters:
            _write(d / "case_002.nii.gz", np.zeros((6, 6), np.uint8))
        bad = raters[0] / "case_002.nii.gz"
    elif damage == "values":
        _write(bad, np.full((4, 6, 6), 3, np.uint8))
    else:
        _write(bad, np.zeros((4, 6, 6), np.uint8), origin=(5.0, 0.0, 0.0))
    before = digest(*raters)
    rc, err = cli(capsys, "fuse", "--method", "majority", "--raters", *raters, "-o", tmp_path / "out")
    assert rc == 2
    one_line_error(err, needle, bad.name)
    assert digest(*raters) == before
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.staging")]


def test_fuse_nan_image_for_soft_rim(capsys, tmp_path, raters):
    _nan_image(tmp_path / "img" / "case_001_0000.nii.gz")
    rc, err = cli(capsys, "fuse", "--method", "soft_rim", "--raters", *raters, "--images", tmp_path / "img",
                  "-o", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "case_001_0000.nii.gz", "NaN")


def test_fuse_refuses_non_empty_output_and_overwrite_replaces(capsys, tmp_path, raters):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.nii.gz").write_bytes(b"x")
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", out)
    assert rc == 2
    one_line_error(err, str(out), "--overwrite")
    assert (out / "stale.nii.gz").read_bytes() == b"x"
    assert cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_001.nii.gz", "case_002.nii.gz"]
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", tmp_path / "afile")
    assert rc == 2 and "afile" in err and "not a folder" in err
    rc, err = cli(capsys, "fuse", "--method", "union", "--raters", *raters, "-o", tmp_path / "afile" / "sub")
    assert rc == 2 and "afile" in err


def test_fuse_accepts_0_255_masks(capsys, tmp_path, raters):
    for d in raters:
        for p in d.iterdir():
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            _write(p, (a * 255).astype(np.uint8))
    assert cli(capsys, "fuse", "--method", "majority", "--raters", *raters, "-o", tmp_path / "out")[0] == 0
    arr, _ = read_image(tmp_path / "out" / "case_001.nii.gz")
    assert set(np.unique(arr)) <= {0, 1}


# ---------------------------------------------------------------------------------------------- convert


def _wmh(src, cid_path, shape=(4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    d = src / cid_path
    wmh = np.zeros(shape, np.uint8)
    wmh[(1,) * len(shape)] = 1
    _write(d / "wmh.nii.gz", wmh, spacing=(1.0,) * len(shape), origin=(0.0,) * len(shape))
    _write(d / "pre" / "FLAIR.nii.gz", rng.random(shape).astype(np.float32), spacing=(1.0,) * len(shape),
           origin=(0.0,) * len(shape))
    _write(d / "pre" / "T1.nii.gz", rng.random(shape).astype(np.float32), spacing=(1.0,) * len(shape),
           origin=(0.0,) * len(shape))


def test_wmh2017_train_test_id_collision(capsys, tmp_path):
    tr, ts = tmp_path / "training", tmp_path / "test"
    for rel in ("Utrecht/0", "Singapore/50"):
        _wmh(tr, rel)
    _wmh(ts, "Utrecht/0", seed=1)
    before = digest(tr, ts)
    rc, err = cli(capsys, "convert", "wmh2017", "-i", tr, "--test-input", ts, "-d", 521, "--raw", tmp_path / "raw")
    assert rc == 2
    one_line_error(err, "Utrecht_0", "both")
    assert digest(tr, ts) == before and not (tmp_path / "raw" / "Dataset521_WMH2017").exists()


@pytest.mark.parametrize("damage,needle", [("2d", "3-D"), ("truncate", "damaged gzip"), ("nan", "NaN/Inf"),
                                           ("label", "mask values")])
def test_wmh2017_bad_case(capsys, tmp_path, damage, needle):
    tr = tmp_path / "training"
    _wmh(tr, "Utrecht/0")
    if damage == "2d":
        _wmh(tr, "Utrecht/1", shape=(8, 8))
        bad = tr / "Utrecht/1/pre/FLAIR.nii.gz"
    elif damage == "truncate":
        _wmh(tr, "Utrecht/1")
        bad = tr / "Utrecht/1/pre/T1.nii.gz"
        _truncate(bad)
    elif damage == "nan":
        _wmh(tr, "Utrecht/1")
        bad = tr / "Utrecht/1/pre/FLAIR.nii.gz"
        _nan_image(bad, (4, 8, 8))
    else:
        _wmh(tr, "Utrecht/1")
        bad = tr / "Utrecht/1/wmh.nii.gz"
        _write(bad, np.full((4, 8, 8), 5, np.uint8))
    before = digest(tr)
    rc, err = cli(capsys, "convert", "wmh2017", "-i", tr, "-d", 521, "--raw", tmp_path / "raw")
    assert rc == 2
    one_line_error(err, needle, bad.name)
    assert digest(tr) == before
    assert not (tmp_path / "raw").exists() or not any(p.name.startswith("Dataset") for p in (tmp_path / "raw").iterdir())


def _isbi(src, masks=(1, 2), subj="training01", tp="01", value=1):
    rng = np.random.default_rng(0)
    cid = f"{subj}_{tp}"
    for mod in ("flair", "t2", "pd", "mprage"):
        _write(src / subj / "preprocessed" / f"{cid}_{mod}_pp.nii", rng.random((4, 8, 8)).astype(np.float32))
    for k in masks:
        m = np.zeros((4, 8, 8), np.uint8)
        m[1:3, 2:5, 2:5] = value
        _write(src / subj / "masks" / f"{cid}_mask{k}.nii", m)


def test_isbi2015_partial_masks_and_ignored_options(capsys, tmp_path):
    src = tmp_path / "isbi"
    _isbi(src)
    _isbi(src, masks=(1,), tp="02")
    before = digest(src)
    rc, err = cli(capsys, "convert", "isbi2015", "-i", src, "-d", 531, "--raw", tmp_path / "raw")
    assert rc == 2
    one_line_error(err, "training01_02_mask2.nii", "missing")
    rc, err = cli(capsys, "convert", "isbi2015", "-i", src, "-d", 531, "--raw", tmp_path / "raw", "--test-input", src)
    assert rc == 2
    one_line_error(err, "--test-input")
    assert digest(src) == before
    assert not (tmp_path / "raw" / "Dataset531_ISBI2015").exists()


def test_isbi2015_stray_file_0_255_masks(capsys, tmp_path):
    src = tmp_path / "isbi"
    _isbi(src, value=255)
    (src / "training01" / "preprocessed" / "training01_01_flair_pp.nii.bak").write_bytes(b"backup")
    with pytest.warns(UserWarning, match=r"skipping .*flair_pp.nii.bak"):
        rc, err = cli(capsys, "convert", "isbi2015", "-i", src, "-d", 531, "--raw", tmp_path / "raw")
    assert rc == 0, err
    lab, _ = read_image(tmp_path / "raw" / "Dataset531_ISBI2015" / "labelsTr" / "training01_01.nii.gz")
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == 18


def _msseg(src, raters=(1, 2, 3), patients=(("Center_01", "Patient_01"), ("Center_03", "Patient_02"))):
    rng = np.random.default_rng(2)
    for center, patient in patients:
        d = src / center / patient
        for mod in ("FLAIR", "T1", "T2", "DP", "GADO"):
            _write(d / "Preprocessed_Data" / f"{mod}_preprocessed.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
        for k in raters:
            m = np.zeros((4, 8, 8), np.uint8)
            m[1, 1:1 + k, 1] = 1  # rater k marks k voxels: its number can be read off the mask
            _write(d / "Masks" / f"ManualSegmentation_{k}.nii.gz", m)
        _write(d / "Masks" / "Consensus.nii.gz", np.zeros((4, 8, 8), np.uint8))


def test_msseg2016_rater_numbers_from_file_names(capsys, tmp_path):
    src = tmp_path / "msseg"
    _msseg(src, raters=(1, 2, 4))
    assert cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", tmp_path / "raw")[0] == 0
    root = tmp_path / "raw" / "Dataset532_MSSEG2016"
    assert sorted(p.name for p in (root / "ratersTr").iterdir()) == ["rater1", "rater2", "rater4"]
    for case in ("Center_01_Patient_01", "Center_03_Patient_02"):
        assert read_image(root / "ratersTr" / "rater4" / f"{case}.nii.gz")[0].sum() == 4


def test_msseg2016_patient_missing_a_rater_and_label_option(capsys, tmp_path):
    src = tmp_path / "msseg"
    _msseg(src)
    (src / "Center_03" / "Patient_02" / "Masks" / "ManualSegmentation_2.nii.gz").unlink()
    before = digest(src)
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", tmp_path / "raw")
    assert rc == 2
    one_line_error(err, "ManualSegmentation_2.nii.gz", "Patient_02")
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", tmp_path / "raw", "--label", "union")
    assert rc == 2
    one_line_error(err, "--label")
    assert digest(src) == before


def test_convert_name_escape_and_existing_dataset(capsys, tmp_path):
    src = tmp_path / "msseg"
    _msseg(src)
    raw = tmp_path / "raw"
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", raw, "--name", "../../escape")
    assert rc == 2
    one_line_error(err, "--name")
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", raw)[0] == 0
    before = digest(raw)
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 532, "--raw", raw)
    assert rc == 2
    one_line_error(err, "--overwrite")
    assert digest(raw) == before
    # the output (raw folder) inside the input
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 533, "--raw", src / "raw")
    assert rc == 2 and "--raw" in err
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, "convert", "msseg2016", "-i", src, "-d", 534, "--raw", tmp_path / "afile" / "raw")
    assert rc == 2 and "afile" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- split-raters


@pytest.fixture
def cascade_src(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name.split("_")[1] if name != "nnUNet_raw" else raw))
    src = raw / "Dataset560_Src"
    rng = np.random.default_rng(0)
    for c in ("c1", "c2", "c3", "c4"):
        _write(src / "imagesTr" / f"{c}_0000.nii.gz", rng.random((4, 6, 6)).astype(np.float32))
        _write(src / "labelsTr" / f"{c}.nii.gz", np.zeros((4, 6, 6), np.uint8))
        for r in ("rater1", "rater2"):
            m = np.zeros((4, 6, 6), np.uint8)
            m[1, 1:3, 1:3] = 255 if r == "rater2" else 1
            _write(src / "ratersTr" / r / f"{c}.nii.gz", m)
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
                                                  "numTraining": 4, "file_ending": ".nii.gz"}))
    return raw, src


def test_split_raters_idempotent_and_0_255(capsys, cascade_src):
    raw, src = cascade_src
    before = digest(src)
    assert cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)[0] == 0
    first = sorted(p.name for p in raw.iterdir() if p.name.startswith("Dataset"))
    assert first == ["Dataset560_Src", "Dataset561_Src_rater1", "Dataset562_Src_rater2"]
    lab, _ = read_image(raw / "Dataset562_Src_rater2" / "labelsTr" / "c1.nii.gz")
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == 4  # 0/255 -> 0/1
    snapshot = digest(raw / "Dataset561_Src_rater1", raw / "Dataset562_Src_rater2")
    assert cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)[0] == 0
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith("Dataset")) == first  # no second set
    assert digest(raw / "Dataset561_Src_rater1", raw / "Dataset562_Src_rater2") == snapshot
    assert {k: v for k, v in digest(src).items() if not k.endswith("consensus.json")} == before


@pytest.mark.parametrize("first_id", ["-5", "0", "1000"])
def test_split_raters_first_id_validated(capsys, cascade_src, first_id):
    raw, src = cascade_src
    rc, err = cli(capsys, "consensus", "split-raters", "-d", 560, "--first-id", first_id)
    assert rc == 2
    one_line_error(err, "--first-id")
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith("Dataset")) == ["Dataset560_Src"]


def test_split_raters_missing_image_no_dangling_links(capsys, cascade_src):
    raw, src = cascade_src
    (src / "imagesTr" / "c3_0000.nii.gz").unlink()
    rc, err = cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)
    assert rc == 2
    one_line_error(err, "c3_0000.nii.gz")
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith("Dataset")) == ["Dataset560_Src"]
    assert not [p for p in raw.rglob("*") if p.is_symlink() and not p.exists()]


def test_split_raters_bad_mask_is_refused_before_linking(capsys, cascade_src):
    raw, src = cascade_src
    _write(src / "ratersTr" / "rater1" / "c2.nii.gz", np.full((4, 6, 6), 3, np.uint8))
    rc, err = cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)
    assert rc == 2
    one_line_error(err, "rater1/c2.nii.gz")
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith("Dataset")) == ["Dataset560_Src"]


# ---------------------------------------------------------------------------------------------- preprocess-soft


@pytest.mark.parametrize("damage,needle", [("shape", "geometry mismatch"), ("origin", "geometry mismatch"),
                                           ("direction", "geometry mismatch"), ("2d", "-D"),
                                           ("truncate", "damaged gzip"), ("nan", "NaN/Inf"), ("range", "[0.0, 1.0]")])
def test_preprocess_soft_input_checks(tmp_path, damage, needle):
    from nnunet_ext.preprocessing.soft_preprocess import check_soft_file

    ds = tmp_path / "Dataset570_X"
    _write(ds / "labelsTr" / "c.nii.gz", np.zeros((4, 6, 6), np.uint8))
    soft = ds / "softlabelsTr" / "c.nii.gz"
    good = np.full((4, 6, 6), 0.5, np.float32)
    _write(soft, good)
    check_soft_file(soft, ds, "c", ".nii.gz")
    if damage == "shape":
        _write(soft, np.zeros((4, 6, 5), np.float32))
    elif damage == "origin":
        _write(soft, good, origin=(0.0, 3.0, 0.0))
    elif damage == "direction":
        img = sitk.GetImageFromArray(good)
        img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
        sitk.WriteImage(img, str(soft))
    elif damage == "2d":
        _write(soft, np.zeros((6, 6), np.float32))
    elif damage == "truncate":
        _write(soft, np.random.default_rng(0).random((4, 6, 6)).astype(np.float32))
        _truncate(soft)
    elif damage == "nan":
        bad = good.copy()
        bad[0, 0, 0] = np.nan
        _write(soft, bad)
    else:
        _write(soft, good * 3)
    with pytest.raises(ValueError, match=needle) as e:
        check_soft_file(soft, ds, "c", ".nii.gz")
    assert "softlabelsTr/c.nii.gz" in str(e.value)


@pytest.mark.parametrize("args,needle", [(["-d", "0"], "-d/--dataset"), (["-d", "../x"], "-d/--dataset"),
                                         (["-d", "570", "--raters", "--soft-dir", "x"], "--soft-dir"),
                                         (["-d", "570", "--soft-dir", "../../etc"], "--soft-dir")])
def test_preprocess_soft_bad_arguments(capsys, args, needle):
    rc, err = cli(capsys, "preprocess-soft", "-c", "2d", *args)
    assert rc == 2
    one_line_error(err, needle)


def test_check_output_not_input(tmp_path):
    from nnunet_ext.core.safety import check_output_not_input

    d = tmp_path / "ref"
    d.mkdir()
    (d / "case_005.nii.gz").write_bytes(b"x")
    for out in (d, d / "case_005.nii.gz", d / "new.json", tmp_path):
        with pytest.raises(ValueError, match="output"):
            check_output_not_input(out, [d, None])
    check_output_not_input(d / "new.json", [d], allow_inside=True)
    check_output_not_input(tmp_path / "res.json", [d])
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(ValueError, match="also an input"):
        check_output_not_input(tmp_path / "link", [d])


def test_split_raters_damaged_dataset_json(capsys, cascade_src):
    raw, src = cascade_src
    (src / "dataset.json").write_text('{"channel_names": {"0": "FLAIR"}, ')
    rc, err = cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)
    assert rc == 2
    one_line_error(err, "dataset.json", "not valid JSON")
    (src / "dataset.json").write_text('{"channel_names": {"0": "FLAIR"}}')
    rc, err = cli(capsys, "consensus", "split-raters", "-d", 560, "--folds", 2)
    assert rc == 2
    one_line_error(err, "dataset.json", "file_ending")


def test_phantom_raw_under_a_file(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, "phantom", "-d", 531, *PH, "--raw", tmp_path / "afile" / "raw")
    assert rc == 2
    one_line_error(err, "afile")
    assert (tmp_path / "afile").read_text() == "x"


def _sigterm_disposition(q):
    import signal

    q.put(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def test_forked_children_end_on_sigterm_again():
    """Our CLI turns SIGTERM into an exception for its own cleanup; processes forked from it (nnU-Net's
    fork pools) get the default action back, so that a pool's terminate() ends them (a worker blocked on
    the pool's queue lock otherwise kept nnU-Net's ``with Pool(...)`` waiting forever)."""
    import multiprocessing as mp
    import signal
    import time

    from nnunet_ext.core.safety import _terminated_handler, install_termination_handlers

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        install_termination_handlers()
        assert signal.getsignal(signal.SIGTERM) is _terminated_handler
        ctx = mp.get_context("fork")
        q = ctx.SimpleQueue()
        p = ctx.Process(target=_sigterm_disposition, args=(q,))
        p.start()
        p.join(30)
        assert q.get() is True
        t = time.monotonic()
        with ctx.Pool(3) as pool:  # leaving the block terminates the idle workers (SIGTERM)
            assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
        assert time.monotonic() - t < 30
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (root writes through permission bits, not through a read-only mount)."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({(r.stderr or r.stdout).strip()[:120]}): read-only "
                    f"outputs not tested")
    yield ro
    subprocess.run(["umount", str(ro)], check=False)


def test_read_only_outputs_are_one_clear_line(read_only_folder, tmp_path, capsys):
    src = tmp_path / "raw"
    rc, err = cli(capsys, "phantom", "-d", 541, "--cases", 2, "--shape", 24, 24, 24, "--raters", 2, "--raw", src)
    assert rc == 0, err
    labels = src / "Dataset541_MSPhantom" / "labelsTr"
    before = digest(src)
    ro = read_only_folder
    for args, path in ((["phantom", "-d", 542, "--cases", 2, "--shape", 24, 24, 24, "--raw", ro / "raw"], ro / "raw"),
                       (["evaluate", "--ref", labels, "--pred", labels, "-o", ro / "r.json"], ro),
                       (["operating-points", "--ref", labels, "--prob", labels, "-o", ro / "o.json"], ro),
                       (["fuse", "--method", "union", "--raters", *(src / "Dataset541_MSPhantom" / "ratersTr" / r
                                                                     for r in ("rater1", "rater2")), "-o", ro / "f"], ro)):
        rc, err = cli(capsys, *args)
        lines = [ln for ln in err.splitlines() if ln.startswith("nnunet-ext:")]
        assert rc == 2 and "Traceback" not in err and len(lines) == 1, (args[0], rc, err[-1500:])
        assert str(path) in lines[0] and "read-only file system" in lines[0], lines
    assert digest(src) == before and not any(ro.iterdir())
