"""`nnunet-ext split`: folds that keep every subject (or site) whole, nnU-Net's splits_final.json; the
converters' case_groups.json; pseudo-labelled cases only ever in training."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import run
from nnunet_ext.core.errors import run_cli
from nnunet_ext.workflows.splits import check_splits, grouped_splits


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in dirs.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return dirs


def _raw_dataset(raw, name, cases, groups=None, channels=1):
    """A raw dataset as far as a split needs it: dataset.json and the imagesTr names."""
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in cases:
        for k in range(channels):
            (root / "imagesTr" / f"{c}_{k:04d}.nii.gz").write_bytes(b"")
        (root / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}, "labels": {"background": 0,
                                                  "lesion": 1}, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    if groups is not None:
        (root / "case_groups.json").write_text(json.dumps(groups))
    return root


def _cli(argv, capsys):
    """(exit status, stdout, stderr) of the console command."""
    rc = run_cli(run, argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- the folds


def test_grouped_splits_balanced_by_hand():
    # groups A (4 cases), B (3), C (2), D (1), 3 folds. Largest first, each to the fold with the fewest cases:
    # A -> fold 0 (sizes 4,0,0), B -> fold 1 (4,3,0), C -> fold 2 (4,3,2), D -> fold 2 (fewest: 2) -> (4,3,3).
    groups = {**{f"a{i}": "A" for i in range(4)}, **{f"b{i}": "B" for i in range(3)}, "c0": "C", "c1": "C", "d0": "D"}
    for seed in (0, 12345):  # distinct sizes: no tie for the seed to break
        s = grouped_splits(groups, 3, seed)
        assert [f["val"] for f in s] == [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"], ["c0", "c1", "d0"]]
        assert s[0]["train"] == ["b0", "b1", "b2", "c0", "c1", "d0"]
        assert s[2]["train"] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    with pytest.raises(ValueError, match="4 subject"):
        grouped_splits(groups, 5)


def test_one_case_per_subject_is_nnunets_own_split():
    # every case its own subject: nothing to keep together, the file is what nnUNetv2_train writes
    # (independently: sklearn's KFold(5, shuffle=True, random_state=12345) over the sorted ids)
    from sklearn.model_selection import KFold

    ids = [f"case_{i:02d}" for i in range(12)]
    expect = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]}
              for tr, va in KFold(5, shuffle=True, random_state=12345).split(ids)]
    assert grouped_splits({c: c for c in ids}, 5, 12345) == expect


def test_pseudo_labelled_cases_train_only_by_hand():
    # labelled: s1 (x1, x2), s2 (y1), s3 (z1); pseudo-labelled p1 (subject s2) and p2 (unknown subject).
    # groups s1 (2 cases) first -> fold 0; s2, s3 (1 case each) -> folds 1 and 2 in the seed's order.
    # p1 joins every fold's train list except the one validating s2; p2 joins all three.
    s = grouped_splits({"x1": "s1", "x2": "s1", "y1": "s2", "z1": "s3"}, 3, 12345, {"p1": "s2", "p2": "p2"})
    assert s[0] == {"train": ["p1", "p2", "y1", "z1"], "val": ["x1", "x2"]}
    fold_s2 = [k for k in (1, 2) if s[k]["val"] == ["y1"]][0]
    other = 3 - fold_s2
    assert s[fold_s2] == {"train": ["p2", "x1", "x2", "z1"], "val": ["y1"]}
    assert s[other] == {"train": ["p1", "p2", "x1", "x2", "y1"], "val": ["z1"]}
    assert all(not {"p1", "p2"} & set(f["val"]) for f in s)


def test_check_splits_names_the_leak():
    groups = {"t01_1": "t01", "t01_2": "t01", "t02_1": "t02"}
    leaky = [{"train": ["t01_1", "t02_1"], "val": ["t01_2"]}]
    with pytest.raises(ValueError, match="fold 0 leaks subject t01: case t01_1 is in train, case t01_2 in val"):
        check_splits(leaky, groups, groups)
    with pytest.raises(ValueError, match="fold 0 validates on the pseudo-labelled case t02_1"):
        check_splits([{"train": ["t01_1", "t01_2"], "val": ["t02_1"]}], groups, groups, pseudo={"t02_1"})
    with pytest.raises(ValueError, match="fold 0 names case t03_1, which is not a training case"):
        check_splits([{"train": ["t03_1"], "val": ["t02_1"]}], groups, groups)


# ---------------------------------------------------------------------------------------------- converters


def _img(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


@pytest.fixture
def isbi_three_subjects(tmp_path):
    """ISBI 2015 training layout: training01 with 3 time points, training02 and training03 with 2."""
    src = tmp_path / "ISBI" / "training"
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[1, 1:3, 1:3] = 1
    for subj, n in (("training01", 3), ("training02", 2), ("training03", 2)):
        for tp in range(1, n + 1):
            cid = f"{subj}_{tp:02d}"
            for mod in ("flair", "t2", "pd", "mprage"):
                _img(src / subj / "preprocessed" / f"{cid}_{mod}_pp.nii", rng.random((2, 4, 4)).astype(np.float32))
            for k in (1, 2):
                _img(src / subj / "masks" / f"{cid}_mask{k}.nii", mask)
    return src


def test_isbi2015_split_keeps_subjects_whole(isbi_three_subjects, nnunet_dirs, capsys):
    raw, pre = nnunet_dirs["nnUNet_raw"], nnunet_dirs["nnUNet_preprocessed"]
    assert run(["convert", "isbi2015", "-i", str(isbi_three_subjects), "-d", "531"]) == 0
    root = raw / "Dataset531_ISBI2015"
    cases = ["training01_01", "training01_02", "training01_03", "training02_01", "training02_02",
             "training03_01", "training03_02"]
    groups = json.loads((root / "case_groups.json").read_text())
    assert groups == {c: {"subject": c[:10]} for c in cases}
    # today's behaviour, nnU-Net's random 5-fold split of these 7 cases, puts a subject on both sides
    from nnunet_ext.nnunet_adapter import crossval_splits

    with pytest.raises(ValueError, match="leaks subject training0"):
        check_splits(crossval_splits(cases, 5), {c: c[:10] for c in cases}, cases)
    # subjects from case_groups.json, no extra input. training01 (3 cases) -> fold 0; training02 and
    # training03 (2 each) -> folds 1 and 2 in the seed's order
    rc, out, err = _cli(["split", "-d", "531", "-nfolds", "3"], capsys)
    assert rc == 0, err
    s = json.loads((pre / "Dataset531_ISBI2015" / "splits_final.json").read_text())
    assert s[0] == {"val": cases[:3], "train": cases[3:]}
    assert sorted(map(tuple, (s[1]["val"], s[2]["val"]))) == [tuple(cases[3:5]), tuple(cases[5:])]
    for f in s:
        assert sorted(f["train"] + f["val"]) == cases
    assert "fold 0: 4 train, 3 val; val subjects: training01" in out
    # the same from a pattern and from a CSV
    rc, out, err = _cli(["split", "-d", "531", "-nfolds", "3", "--pattern", r"^(training\d+)_"], capsys)
    assert rc == 0 and "already holds this split" in out, err
    csv = root.parent / "subjects.csv"
    csv.write_text("case,subject\n" + "".join(f"{c},{c[:10]}\n" for c in cases) + "test01_01,test01\n")
    rc, out, err = _cli(["split", "-d", "Dataset531_ISBI2015", "-nfolds", "3", "--csv", str(csv)], capsys)
    assert rc == 0 and "already holds this split" in out, err
    rc, out, err = _cli(["split", "-d", "531", "--check"], capsys)
    assert rc == 0 and "no subject on both sides of a fold" in out, err


def test_split_bad_input_one_line_naming_the_case(isbi_three_subjects, nnunet_dirs, capsys):
    pre = nnunet_dirs["nnUNet_preprocessed"] / "Dataset531_ISBI2015" / "splits_final.json"
    assert run(["convert", "isbi2015", "-i", str(isbi_three_subjects), "-d", "531"]) == 0
    # a pattern that matches no case
    rc, out, err = _cli(["split", "-d", "531", "--pattern", r"^(patient\d+)"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "matches no case (e.g. case training01_01)" in err, err
    # ... or not every case
    rc, out, err = _cli(["split", "-d", "531", "--pattern", r"^(training0[12])_"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "does not match case training03_01" in err, err
    # a CSV missing a case
    csv = nnunet_dirs["nnUNet_raw"] / "subjects.csv"
    csv.write_text("case,subject\ntraining01_01,s1\ntraining01_02,s1\ntraining01_03,s1\ntraining02_01,s2\n")
    rc, out, err = _cli(["split", "-d", "531", "--csv", str(csv)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "has no row for case training02_02" in err, err
    assert not pre.exists()  # nothing written
    # too few subjects for the folds
    rc, out, err = _cli(["split", "-d", "531"], capsys)
    assert rc == 2 and "3 subject(s) cannot make 5 folds" in err and "-nfolds 3" in err, err
    # an existing split that leaks a subject: --check refuses it, naming the case
    pre.parent.mkdir(parents=True)
    pre.write_text(json.dumps([{"train": ["training01_01", "training02_01", "training02_02"],
                                "val": ["training01_02", "training01_03", "training03_01", "training03_02"]}]))
    rc, out, err = _cli(["split", "-d", "531", "--check"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "fold 0 leaks subject training01: case training01_01 is in train, case training01_02 in val" in err
    # a split that differs from the user's file is refused unless --overwrite
    rc, out, err = _cli(["split", "-d", "531", "-nfolds", "3"], capsys)
    assert rc == 2 and "already exists and differs from this split; pass --overwrite" in err, err
    rc, out, err = _cli(["split", "-d", "531", "-nfolds", "3", "--overwrite"], capsys)
    assert rc == 0 and len(json.loads(pre.read_text())) == 3, err
    # options --check would ignore
    rc, out, err = _cli(["split", "-d", "531", "--check", "-nfolds", "3"], capsys)
    assert rc == 2 and "drop -nfolds" in err


def test_raw_split_file_is_kept_in_step(nnunet_dirs, capsys):
    """nnU-Net's planning copies a raw splits_final.json into the preprocessed folder and stops when the two
    differ: `split` writes both."""
    cases = [f"c{i}" for i in range(6)]
    root = _raw_dataset(nnunet_dirs["nnUNet_raw"], "Dataset550_Pairs", cases, {c: {"subject": f"s{int(c[1]) // 2}"}
                                                                                for c in cases})
    old = [{"train": cases[2:], "val": cases[:2]}]
    (root / "splits_final.json").write_text(json.dumps(old))
    rc, out, err = _cli(["split", "-d", "550", "-nfolds", "3"], capsys)
    assert rc == 2 and f"{root / 'splits_final.json'} already exists and differs" in err, err
    rc, out, err = _cli(["split", "-d", "550", "-nfolds", "3", "--overwrite"], capsys)
    assert rc == 0, err
    new = json.loads((root / "splits_final.json").read_text())
    assert new == json.loads((nnunet_dirs["nnUNet_preprocessed"] / "Dataset550_Pairs" / "splits_final.json").read_text())
    # three subjects of two cases, three folds: one subject (both its cases) per fold
    assert sorted(tuple(f["val"]) for f in new) == [("c0", "c1"), ("c2", "c3"), ("c4", "c5")]


# ---------------------------------------------------------------------------------------------- students


def test_student_split_pseudo_labels_train_only(nnunet_dirs, capsys):
    from nnunet_ext.workflows.pseudolabel import student_split

    raw = nnunet_dirs["nnUNet_raw"]
    labelled = ["t01_01", "t01_02", "t02_01", "t02_02", "t03_01"]
    teacher = _raw_dataset(raw, "Dataset560_Teacher", labelled, {c: {"subject": c[:3]} for c in labelled})
    student = _raw_dataset(raw, "Dataset561_Student", labelled + ["u_a", "u_b"])
    (student / "provenance.json").write_text(json.dumps({"kept": ["u_a", "u_b"], "dropped": ["u_c"]}))
    f = student_split(student, teacher, ".nii.gz", progress=False)
    assert f == student / "splits_final.json"
    s = json.loads(f.read_text())
    # 3 labelled subjects -> 3 folds (fewer than 5 subjects). t01, t02 (2 cases) before t03 (1): the seed
    # orders t01/t02 into folds 0 and 1, t03 (1 case) -> fold 2. The pseudo-labels: every train list, no val.
    assert len(s) == 3 and s[2]["val"] == ["t03_01"]
    assert sorted(tuple(x["val"]) for x in s[:2]) == [("t01_01", "t01_02"), ("t02_01", "t02_02")]
    for x in s:
        assert {"u_a", "u_b"} <= set(x["train"]) and not {"u_a", "u_b"} & set(x["val"])
        assert sorted(x["train"] + x["val"]) == sorted(labelled + ["u_a", "u_b"])
    groups = json.loads((student / "case_groups.json").read_text())
    assert groups["u_a"] == {"pseudo_labelled": True} and groups["t02_01"] == {"subject": "t02"}
    # `split` on the student keeps them in training by itself; a subject pattern that puts u_a with t03
    # keeps u_a out of the fold that validates t03
    rc, out, err = _cli(["split", "-d", "561", "-nfolds", "3", "--pattern", r"^(t\d+|u)_", "--overwrite"], capsys)
    assert rc == 0, err
    s = json.loads((student / "splits_final.json").read_text())  # the raw file is kept in step
    assert s == json.loads((nnunet_dirs["nnUNet_preprocessed"] / "Dataset561_Student" / "splits_final.json").read_text())
    for x in s:
        assert {"u_a", "u_b"} <= set(x["train"]) and not {"u_a", "u_b"} & set(x["val"])
    # a split that validates on a pseudo-label is refused, naming the case
    bad = [{"train": labelled, "val": ["u_a", "u_b"]}]
    (nnunet_dirs["nnUNet_preprocessed"] / "Dataset561_Student" / "splits_final.json").write_text(json.dumps(bad))
    rc, out, err = _cli(["split", "-d", "561", "--check", "--pattern", r"^(t\d+|u)_"], capsys)
    assert rc == 2 and "validates on the pseudo-labelled case u_a" in err, err
    # student_split keeps a user's valid split, refuses an invalid one
    (student / "splits_final.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="validates on the pseudo-labelled case u_a"):
        student_split(student, teacher, ".nii.gz", progress=False)


def test_sharded_student_is_finished_only_when_every_part_has_written(nnunet_dirs):
    """Two shards run at once: part 1's cases are all predicted (their progress files exist) but its
    provenance is not yet written when part 0 ends. Part 0 must not write the split then -- it would not know
    part 1's pseudo-labels and put them in validation lists -- and part 1's end writes it from both parts."""
    from nnunet_ext.workflows.pseudolabel import _finish, merge_parts

    raw = nnunet_dirs["nnUNet_raw"]
    labelled = ["t01", "t02", "t03"]
    teacher = _raw_dataset(raw, "Dataset564_Teacher", labelled)
    student = _raw_dataset(raw, "Dataset565_Student", labelled + ["u_a", "u_b", "u_c", "u_d"])
    (student / "dataset.json").unlink()
    # the teacher's model folder holds its dataset.json: here the teacher's raw folder stands in for it
    head = {"teacher": {"model": str(teacher), "dataset": teacher.name}, "parameters": {"ignore_uncertain": False}}
    kept = {"kept": True, "decision": "kept"}
    (student / "provenance_part0of2.json").write_text(json.dumps({**head, "cases": {"u_a": kept, "u_c": kept}}))
    assert _finish(student, 2, progress=False) is None
    assert not (student / "dataset.json").exists() and not (student / "splits_final.json").exists()
    with pytest.raises(FileNotFoundError, match="1 of 2 part"):
        merge_parts(student.name, 2)
    (student / "provenance_part1of2.json").write_text(json.dumps({**head, "cases": {"u_b": kept, "u_d": kept}}))
    merged = _finish(student, 2, progress=False)
    assert merged["kept"] == ["u_a", "u_b", "u_c", "u_d"]
    assert json.loads((student / "dataset.json").read_text())["numTraining"] == 7
    split = json.loads((student / "splits_final.json").read_text())
    assert sorted(v for f in split for v in f["val"]) == labelled  # 3 subjects: 3 folds of one case each
    for f in split:
        assert {"u_a", "u_b", "u_c", "u_d"} <= set(f["train"])
    # the other part finishing at the same moment writes the same files again, and agrees with them
    assert _finish(student, 2, progress=False) == merged
    assert json.loads((student / "splits_final.json").read_text()) == split


def test_student_without_labelled_subjects_gets_no_split(nnunet_dirs):
    from nnunet_ext.workflows.pseudolabel import student_split

    raw = nnunet_dirs["nnUNet_raw"]
    teacher = _raw_dataset(raw, "Dataset562_Teacher", ["a"])
    student = _raw_dataset(raw, "Dataset563_Student", ["u_a", "u_b"])  # --no-labeled
    (student / "provenance.json").write_text(json.dumps({"kept": ["u_a", "u_b"]}))
    assert student_split(student, teacher, ".nii.gz", progress=False) is None
    assert not (student / "splits_final.json").exists()
