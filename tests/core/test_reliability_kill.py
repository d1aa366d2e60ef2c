"""Issue 16 (reliability), processes: SIGINT / SIGTERM / SIGKILL at random points of phantom, fuse, convert
and preprocess-soft, and two processes on the same output.

After a kill the target is either untouched (the previous dataset, or none) or complete; nothing stale is
left that a later run would trust (staging folders of SIGKILLed runs are removed by the next run); a re-run
gives files byte-identical to a clean run. Runs as real subprocesses of the ``nnunet-ext`` console script.
The quick ones run by default; the full signal x command matrix is ``slow``; pseudolabel's (a teacher is trained
first) is ``heavy`` (``.ci/run`` runs it after the README's test command)."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

NNUNET_EXT = str(Path(sys.executable).parent / "nnunet-ext")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
EXPECTED_RC = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}


def digest(folder: Path) -> dict:
    """Relative path -> md5 of every file below ``folder`` (lock files excluded: they hold a pid)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def leftovers(folder: Path) -> list[str]:
    """Staging folders and temporary files anywhere below ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if ".staging-" in p.name or ".old-" in p.name
                  or p.name.startswith(".tmp_"))


def start(args, env=None):
    return subprocess.Popen([NNUNET_EXT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def run_ok(args, env=None):
    r = subprocess.run([NNUNET_EXT, *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def kill_after(args, sig: str, delay: float, env=None, started=None, group: bool = False):
    """Start ``nnunet-ext ARGS``, send ``sig`` after ``delay`` s (counted from when ``started()`` first holds,
    if given: a loaded machine can take longer than ``delay`` just to start Python); returns (rc, stderr).
    ``group``: to the command's whole process group, as a terminal's Ctrl-C. The output pipes close only
    when every process holding them (the command's workers too) has ended: a worker left running after its
    parent was killed makes this time out."""
    p = subprocess.Popen([NNUNET_EXT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=group)
    if started is not None:
        t0 = time.time()
        while not started() and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
    time.sleep(delay)
    if p.poll() is None:
        (os.killpg if group else os.kill)(p.pid, SIGNALS[sig])
    out, err = p.communicate(timeout=120)
    return p.returncode, err


def check_killed(rc, err, sig):
    assert rc in (0, EXPECTED_RC[sig]), (rc, err[-2000:])
    if sig != "SIGKILL":
        assert "Traceback" not in err, err[-3000:]
        if rc != 0:
            assert ("interrupted" if sig == "SIGINT" else "terminated") in err


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


PHANTOM = ["--cases", 16, "--shape", 24, 24, 24, "--raters", 2, "--soft"]


@pytest.fixture(scope="module")
def phantom_reference(tmp_path_factory):
    """A clean run of seed 1 (the byte-identical reference)."""
    raw = tmp_path_factory.mktemp("ref") / "seed1"
    run_ok(["phantom", "-d", 531, *PHANTOM, "--seed", 1, "--raw", raw])
    return digest(raw / "Dataset531_MSPhantom")


def _phantom_kill(tmp_path, phantom_reference, sig, delay, workers=1, must_interrupt=False):
    raw = tmp_path / "raw"
    root = raw / "Dataset531_MSPhantom"
    run_ok(["phantom", "-d", 531, *PHANTOM, "--seed", 0, "--raw", raw])
    old = digest(root)
    assert old and old != phantom_reference
    rc, err = kill_after(["phantom", "-d", 531, *PHANTOM, "--seed", 1, "--raw", raw, "--overwrite", "-np", workers],
                         sig, delay if not must_interrupt else 0.0,  # at once: a loaded machine may finish 0.2 s later
                         started=(lambda: any(".staging-" in q.name for q in raw.iterdir())) if must_interrupt else None)
    check_killed(rc, err, sig)
    if must_interrupt:
        assert rc == EXPECTED_RC[sig], "the run finished before the signal: make it longer"
    # the old dataset or the complete new one, never a mixture (a signal that arrives after the new dataset was
    # swapped in, while the old one is being removed, ends the run with the new one in place)
    assert digest(root) == phantom_reference if rc == 0 else digest(root) in (old, phantom_reference)
    if sig != "SIGKILL":
        assert leftovers(raw) == []
    run_ok(["phantom", "-d", 531, *PHANTOM, "--seed", 1, "--raw", raw, "--overwrite"])
    assert digest(root) == phantom_reference
    assert leftovers(raw) == []


def test_ctrl_c_while_the_command_starts_is_130_without_traceback(tmp_path):
    """Ctrl-C while the command is still importing (nnunet_ext.cli._console handles it from its first line; before
    that only Python's own start-up runs, about 20 ms here): exit status 130 and one line, or the command had
    finished. On a loaded machine Python's own start-up (its ``site`` module, then finding the package for the
    console script's import line) can take longer than the first delays; an interrupt there comes before any
    line of ``_console`` runs, is Python's (its traceback has no ``_console.py`` frame) and is not counted, but
    at least one delay must reach the package."""
    reached = 0
    for delay in (0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.6, 0.9):
        p = start(["phantom", "-d", 533, "--cases", 2, "--shape", 24, 24, 24, "--raw", tmp_path / "raw",
                   "--overwrite"])
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        if "init_import_site" in err or ("Traceback" in err and "_console.py" not in err):
            continue  # interrupted inside Python's start-up, before the entry point's first line
        reached += 1
        assert p.returncode in (0, 130) and "Traceback" not in err, (delay, p.returncode, err[-2000:])
        if p.returncode == 130:
            assert err.strip().splitlines()[-1] == "nnunet-ext: interrupted", err
    if not reached:
        pytest.skip("every interrupt landed in Python's own start-up (machine too loaded to reach the package)")


def test_phantom_sigint_keeps_the_old_dataset(tmp_path, phantom_reference):
    _phantom_kill(tmp_path, phantom_reference, "SIGINT", 0.7, must_interrupt=True)


@pytest.mark.slow
def test_phantom_is_byte_identical_across_workers(tmp_path, phantom_reference):
    raw = tmp_path / "raw"
    run_ok(["phantom", "-d", 531, *PHANTOM, "--seed", 1, "--raw", raw, "-np", 2])
    assert digest(raw / "Dataset531_MSPhantom") == phantom_reference


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("trial", range(2))
def test_phantom_killed_at_random_points(tmp_path, phantom_reference, sig, trial):
    rng = random.Random(f"{sig}{trial}")
    _phantom_kill(tmp_path, phantom_reference, sig, rng.uniform(0.3, 1.6), workers=rng.choice((1, 2)))


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_phantom_workers_end_with_their_parent(tmp_path, sig):
    raw = tmp_path / "raw"
    p = start(["phantom", "-d", 531, "--cases", 40, "--shape", 32, 32, 32, "--raw", raw, "-np", 2])
    kids = []
    t0 = time.time()
    while time.time() - t0 < 30 and len(kids) < 2:
        kids = children(p.pid)
        time.sleep(0.1)
    assert len(kids) >= 2, "workers did not start"
    os.kill(p.pid, SIGNALS[sig])
    p.communicate(timeout=60)
    t0 = time.time()
    while time.time() - t0 < 10 and any(alive(k) for k in kids):
        time.sleep(0.1)
    assert not any(alive(k) for k in kids), "orphaned workers"
    assert not (raw / "Dataset531_MSPhantom").exists()
    if sig == "SIGTERM":
        assert leftovers(raw) == []


# ---------------------------------------------------------------------------------------------- fuse


@pytest.fixture(scope="module")
def fuse_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuse")
    run_ok(["phantom", "-d", 532, "--cases", 12, "--shape", 24, 24, 24, "--raters", 3, "--raw", base / "raw"])
    ds = base / "raw" / "Dataset532_MSPhantom"
    raters = [ds / "ratersTr" / f"rater{k}" for k in (1, 2, 3)]
    args = ["fuse", "--method", "inter_soft_union_rim", "--raters", *raters, "--images", ds / "imagesTr"]
    run_ok([*args, "-o", base / "ref"])
    return base, ds, args, digest(base / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(SIGNALS))
def test_fuse_killed_at_random_points(tmp_path, fuse_setup, sig):
    base, ds, args, ref = fuse_setup
    inputs = digest(ds)
    out = tmp_path / "fused"
    rc, err = kill_after([*args, "-o", out], sig, random.Random(sig).uniform(0.4, 1.5))
    check_killed(rc, err, sig)
    assert digest(out) in ({}, ref)
    if sig != "SIGKILL":
        assert leftovers(tmp_path) == []
    run_ok([*args, "-o", out, "--overwrite"])
    assert digest(out) == ref and leftovers(tmp_path) == [] and digest(ds) == inputs


@pytest.mark.slow
def test_two_fuse_runs_on_one_output(tmp_path, fuse_setup):
    base, ds, args, ref = fuse_setup
    out = tmp_path / "fused"
    procs = [start([*args, "-o", out]) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    rcs = sorted(rc for rc, _ in results)
    assert rcs[0] == 0 and rcs[1] in (0, 2), results
    for rc, err in results:
        if rc == 2:
            assert "another nnunet-ext run" in err or "--overwrite" in err, err
    assert digest(out) == ref and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- convert


def _wmh_source(src: Path, n: int = 10, shape=(24, 32, 32)):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / "Utrecht" / str(i)
        (d / "pre").mkdir(parents=True, exist_ok=True)
        wmh = (rng.random(shape) > 0.97).astype(np.uint8)
        for name, arr in (("wmh.nii.gz", wmh), ("pre/FLAIR.nii.gz", rng.random(shape).astype(np.float32)),
                          ("pre/T1.nii.gz", rng.random(shape).astype(np.float32))):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.96, 0.96, 3.0))
            sitk.WriteImage(img, str(d / name), True)


@pytest.fixture(scope="module")
def wmh_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("wmh")
    _wmh_source(base / "training")
    run_ok(["convert", "wmh2017", "-i", base / "training", "-d", 521, "--raw", base / "refraw"])
    return base, digest(base / "refraw" / "Dataset521_WMH2017")




@pytest.mark.slow
@pytest.mark.parametrize("sig", list(SIGNALS))
def test_convert_killed_at_random_points(tmp_path, wmh_setup, sig):
    base, ref = wmh_setup
    src = base / "training"
    inputs = digest(src)
    raw = tmp_path / "raw"
    rc, err = kill_after(["convert", "wmh2017", "-i", src, "-d", 521, "--raw", raw], sig,
                         random.Random(sig).uniform(0.4, 1.2))
    check_killed(rc, err, sig)
    assert digest(raw / "Dataset521_WMH2017") in ({}, ref)
    if sig != "SIGKILL":
        assert leftovers(raw) == []
    run_ok(["convert", "wmh2017", "-i", src, "-d", 521, "--raw", raw, "--overwrite"])
    assert digest(raw / "Dataset521_WMH2017") == ref and leftovers(raw) == [] and digest(src) == inputs


@pytest.mark.slow
def test_two_convert_runs_on_one_dataset(tmp_path, wmh_setup):
    base, ref = wmh_setup
    raw = tmp_path / "raw"
    procs = [start(["convert", "wmh2017", "-i", base / "training", "-d", 521, "--raw", raw]) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        assert rc in (0, 2), err
        if rc == 2:
            assert "another nnunet-ext run" in err or "--overwrite" in err, err
    assert digest(raw / "Dataset521_WMH2017") == ref and leftovers(raw) == []


def test_two_phantom_runs_on_one_id_different_names(tmp_path):
    raw = tmp_path / "raw"
    procs = [start(["phantom", "-d", 533, "--cases", 4, "--shape", 16, 16, 16, "--name", n, "--raw", raw])
             for n in ("A", "B")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert len(list(raw.glob("Dataset533_*"))) == 1  # never two datasets with one id


def test_concurrent_write_image_never_corrupts(tmp_path):
    """Two processes writing the same file many times: it always reads back as one writer's whole image
    (the old shared ``.tmp_<name>`` let one writer rename the other's half-written file)."""
    code = (
        "import sys, numpy as np\n"
        "from nnunet_ext.core.io import write_image\n"
        "v = int(sys.argv[1])\n"
        "a = np.full((32, 64, 64), v, np.float32) + np.arange(64, dtype=np.float32)\n"
        "for _ in range(25):\n"
        "    write_image(a, (1, 1, 1), sys.argv[2])\n")
    target = tmp_path / "x.nii.gz"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(v), str(target)]) for v in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    from nnunet_ext.core.io import read_image

    arr, _ = read_image(target)
    assert np.allclose(arr - np.arange(64), 1) or np.allclose(arr - np.arange(64), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


# ---------------------------------------------------------------------------------------------- preprocess-soft


@pytest.fixture(scope="module")
def soft_setup(tmp_path_factory):
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    work = tmp_path_factory.mktemp("soft")
    env = nnunet_env(work, n_proc=1)
    run_ok(["phantom", "-d", 570, "--cases", 6, "--shape", 24, 24, 24, "--soft"], env=env)
    r = subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", "570", "-c", "2d", "-np", "1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    run_ok(["preprocess-soft", "-d", 570, "-c", "2d"], env=env)
    out = work / "nnUNet_preprocessed" / "Dataset570_MSPhantom" / "nnUNetPlans_2d" / "nnunet_ext_soft"
    return work, env, out, digest(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(SIGNALS))
def test_preprocess_soft_killed_at_random_points(soft_setup, sig):
    work, env, out, ref = soft_setup
    raw = work / "nnUNet_raw"
    inputs = digest(raw)
    rc, err = kill_after(["preprocess-soft", "-d", 570, "-c", "2d", "--overwrite"], sig,
                         random.Random(sig).uniform(2.0, 5.0), env=env)
    check_killed(rc, err, sig)
    # whatever is there is either a complete map or not there; the manifest only lists finished maps
    manifest = json.loads((out / "sources.json").read_text()) if (out / "sources.json").is_file() else {}
    for case in manifest:
        assert digest(out).get(f"{case}.b2nd") == ref[f"{case}.b2nd"]
    run_ok(["preprocess-soft", "-d", 570, "-c", "2d"], env=env)
    assert digest(out) == ref and leftovers(out) == [] and digest(raw) == inputs


@pytest.mark.slow
def test_preprocess_soft_does_not_trust_a_stale_map(soft_setup):
    work, env, out, ref = soft_setup
    (out / "phantom_001.b2nd").write_bytes((out / "phantom_000.b2nd").read_bytes())  # wrong content
    (out / ".tmp_999_dead_phantom_002.b2nd").write_bytes(b"half")
    src = work / "nnUNet_raw" / "Dataset570_MSPhantom" / "softlabelsTr" / "phantom_001.nii.gz"
    os.utime(src)  # the source changed since the map was made
    run_ok(["preprocess-soft", "-d", 570, "-c", "2d"], env=env)
    d = digest(out)
    assert d["phantom_001.b2nd"] == ref["phantom_001.b2nd"] and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- pseudolabel


@pytest.fixture(scope="module")
def pseudo_setup(tmp_path_factory):
    """A tiny teacher (1 epoch x 2 iterations) and 14 unlabeled 32^3 cases; a clean pseudolabel run of them
    is the byte-identical reference."""
    from conftest import run_nnunet
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    work = tmp_path_factory.mktemp("pseudo")
    env = nnunet_env(work, n_proc=1)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1"})
    run_ok(["phantom", "-d", 580, "--cases", 5, "--test-cases", 14, "--shape", 32, 32, 32, "--seed", 4], env=env)
    run_nnunet([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", "580", "-c", "2d", "-np", "1"], env)
    run_nnunet([nnunet_command("nnUNetv2_train"), "580", "2d", "0", "-tr", "ExtBaselineTrainer", "-device", "cpu"], env)
    unl = work / "nnUNet_raw" / "Dataset580_MSPhantom" / "imagesTs"
    args = ["pseudolabel", "-d", 580, "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", 0, "-i", unl, "--tst", 0,
            "-device", "cpu"]
    run_ok([*args, "-o", "Dataset581_Reference"], env=env)
    ref = digest(work / "nnUNet_raw" / "Dataset581_Reference")
    assert sum(k.startswith("labelsTr/") for k in ref) == 5 + 14
    return work, env, args, ref


@pytest.mark.slow
@pytest.mark.heavy  # a teacher is trained first: with the concurrency test about 3 minutes, in CI's heavy part
@pytest.mark.parametrize("sig", list(SIGNALS) + ["SIGINT to the group"])
def test_pseudolabel_killed_at_random_points(pseudo_setup, sig):
    """Killed anywhere (also inside nnU-Net's export workers' writes), a re-run with the same options gives
    the clean run's files byte for byte; no dataset.json (nnU-Net's sign of a complete dataset) while cases
    are missing, and no temporary file left."""
    work, env, args, ref = pseudo_setup
    raw = work / "nnUNet_raw"
    inputs = digest(raw / "Dataset580_MSPhantom")
    group = sig.endswith("group")
    name = f"Dataset{590 + (3 if group else list(SIGNALS).index(sig))}_Killed"
    sig = "SIGINT" if group else sig
    student = raw / name
    progress = student / ".nnunet_ext_progress"
    rc, err = kill_after([*args, "-o", name], sig, random.Random(name).uniform(0.5, 4.0), env=env,
                         started=lambda: progress.is_dir() and any(progress.glob("phantom_*.json")), group=group)
    check_killed(rc, err, sig)  # no traceback, from the command or any of its workers
    if rc != 0:
        done = {p.stem for p in progress.glob("phantom_*.json")}
        assert not (student / "dataset.json").exists() and len(done) < 14
        for case in done:  # a case marked done is complete and final
            assert digest(student).get(f"labelsTr/{case}.nii.gz", "dropped") == ref.get(f"labelsTr/{case}.nii.gz", "dropped")
    r = run_ok([*args, "-o", name], env=env)
    assert digest(student) == ref, r.stdout[-2000:]
    assert leftovers(student) == [] and digest(raw / "Dataset580_MSPhantom") == inputs


@pytest.mark.slow
@pytest.mark.heavy
def test_two_pseudolabel_runs_on_one_student(pseudo_setup):
    work, env, args, ref = pseudo_setup
    procs = [start([*args, "-o", "Dataset595_Twice"], env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        assert rc in (0, 2), err[-2000:]
        if rc == 2:
            assert "being written by another nnunet-ext run" in err, err
    student = work / "nnUNet_raw" / "Dataset595_Twice"
    assert digest(student) == ref and leftovers(student) == []


# ---------------------------------------------------------------------------------------------- compare


def _ours(marker: str) -> list[int]:
    """Processes (not zombies) whose environment holds ``marker`` (this test's own nnUNet_results folder):
    the command, its guards, nnUNetv2_train and every worker they started."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes() and alive(int(d.name)):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _training_started(results: Path) -> bool:
    return any(results.glob("Dataset*/*__nnUNetPlans__2d/fold_0/training_log_*.txt"))


def _comparable(report: dict) -> dict:
    """A report without what differs between two runs on the same models: times, file paths, the commands
    (they name the report folder), whether an arm was trained by this run, notes about a split written."""
    r = {k: v for k, v in report.items() if k not in ("seconds", "files", "commands", "notes")}
    r["arms"] = {a: {k: v for k, v in arm.items() if k != "training"} for a, arm in report["arms"].items()}
    return r


@pytest.mark.slow
@pytest.mark.heavy  # two 1-epoch x 2-iteration 2d trainings (one of them twice) and three predictions per arm
def test_compare_killed_during_training(tmp_path, planned_phantom):
    """SIGKILL of `nnunet-ext compare` while nnU-Net trains: within 10 s no process of the run is left (not
    nnUNetv2_train, not its data-loader workers); the same command then continues (the interrupted fold is
    trained again) and writes the report an uninterrupted run writes on the same trained models (another
    report folder: every step from the checks to the report, training reused)."""
    from conftest import PLANNED_ID
    from nnunet_ext.core.paths import nnunet_env

    work, planned_env, root = planned_phantom
    w = tmp_path / "w"
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):  # a private copy: its own split and models
        shutil.copytree(Path(planned_env[k]) / root.name, w / k / root.name)
    env = nnunet_env(w, n_proc=1)
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
    results = Path(env["nnUNet_results"])
    split = w / "nnUNet_preprocessed" / root.name / "splits_final.json"
    args = ["compare", "-d", PLANNED_ID, "-c", "2d", "-tr", "ExtBaselineTrainer", "FocalTverskyTrainer", "-f", 0,
            "--epochs", 1, "--iterations", 2, "--val-iterations", 1, "-device", "cpu", "-np", 1, "--bootstrap", 200]
    args += [] if split.exists() else ["--create-split"]
    t0 = time.time()
    p = subprocess.Popen([NNUNET_EXT, *map(str, args), "-o", str(tmp_path / "report")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not _training_started(results):
        assert p.poll() is None, p.communicate()[0][-3000:]
        assert time.time() - t0 < 600, "training did not start"
        time.sleep(0.2)
    assert any(b"nnUNetv2_train" in _cmdline(q) for q in _ours(str(results)))
    p.kill()
    p.communicate(timeout=60)
    t_kill = time.time()
    while _ours(str(results)) and time.time() - t_kill < 10:
        time.sleep(0.1)
    left = _ours(str(results))
    for q in left:
        os.kill(q, signal.SIGKILL)
    assert not left, [_cmdline(q)[:200] for q in left]
    assert not (tmp_path / "report" / "report.json").exists()

    run_ok([*args, "-o", tmp_path / "report"], env=env)  # the same command continues
    resumed = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all("trained now" in a["training"] for a in resumed["arms"].values())  # the killed fold: trained again
    run_ok([*args, "-o", tmp_path / "report2"], env=env)  # an uninterrupted run on the same models
    fresh = json.loads((tmp_path / "report2" / "report.json").read_text())
    assert all("reused" in a["training"] for a in fresh["arms"].values())
    assert _comparable(resumed) == _comparable(fresh)
    assert resumed["n_cases"] == len(json.loads(split.read_text())[0]["val"])
    print(f"compare killed during training, resumed, compared: {time.time() - t0:.0f} s")
