"""Launcher (issue 18): the local launcher and the stage scripts without Slurm (fast), then a real
single-node Slurm (session fixture ``slurm_cluster`` in conftest.py): a tiny consensus cascade submitted as
chained job arrays with one fold cancelled mid-run and resumed, compared with the local launcher; pseudolabel
shards on Slurm compared with one local run."""
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from nnunet_ext.cluster import jobs
from nnunet_ext.core.io import read_image
from nnunet_ext.cluster.launcher import (LauncherOptions, Stage, Task, add_launcher_arguments, launcher_options, load_manifest,
                                         run_stages, stage_script)
from nnunet_ext.core.paths import nnunet_command, nnunet_env

SRC = 550


def sh(cmd: str) -> list[str]:
    return ["bash", "-c", cmd]


# ---------------------------------------------------------------------------------------------- no Slurm


def test_options_and_validation():
    import argparse

    p = argparse.ArgumentParser()
    add_launcher_arguments(p)
    o = launcher_options(p.parse_args(["--launcher", "slurm", "--partition", "gpu", "--gpus-per-task", "1",
                                       "--cpus-per-task", "8", "--mem", "48G", "--time", "1-00:00:00",
                                       "--sbatch-arg=--qos=long", "--sbatch-arg=--account=lab", "--dry-run"]))
    assert o == LauncherOptions("slurm", 1, "gpu", 1, 8, "48G", "1-00:00:00", ["--qos=long", "--account=lab"], True)
    assert launcher_options(p.parse_args([])) == LauncherOptions()
    with pytest.raises(NotImplementedError):
        LauncherOptions(launcher="local", partition="gpu")
    with pytest.raises(ValueError):
        LauncherOptions(launcher="pbs")
    with pytest.raises(ValueError):
        LauncherOptions(jobs=0)
    with pytest.raises(ValueError):
        run_stages([Stage("a", [Task("x y", ["true"])])], Path("/tmp/unused"), LauncherOptions())
    with pytest.raises(ValueError):
        run_stages([Stage("a", [Task("x", ["true"])], after=["b"])], Path("/tmp/unused"), LauncherOptions())
    with pytest.raises(ValueError):
        run_stages([Stage("a", [Task("x", ["true"]), Task("x", ["true"])])], Path("/tmp/unused"), LauncherOptions())


def test_script_is_readable_and_resubmittable(tmp_path):
    st = Stage("train", [Task("r1_fold0", ["nnUNetv2_train", "541", "2d", "0"], {"nnUNet_raw": "/data/raw x"},
                              done=str(tmp_path / "fold_0" / "checkpoint_final.pth"))], after=["prepare"])
    text = stage_script(st, tmp_path, LauncherOptions("slurm", partition="gpu", gpus_per_task=1, cpus_per_task=8,
                                                      mem="48G", time="10:00:00", sbatch_args=["--qos=long"]))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=48G", "#SBATCH --time=10:00:00", "#SBATCH --qos=long",
                 "  export nnUNet_raw='/data/raw x'", "  CMD=(nnUNetv2_train 541 2d 0)",
                 'export OMP_NUM_THREADS="$N" MKL_NUM_THREADS="$N" OPENBLAS_NUM_THREADS="$N"'):
        assert line in text.splitlines(), line
    assert "--dependency=afterok:<job ids of prepare>" in text
    r = subprocess.run(["bash", "-n", "-c", text])  # valid bash
    assert r.returncode == 0


def test_local_launcher_failures_skips_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)  # unset: the launcher sets it from --cpus-per-task
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    flag = tmp_path / "fail_once"
    flag.write_text("")
    a = Stage("a", [Task(f"t{i}", sh(f"echo threads=$OMP_NUM_THREADS n=$nnUNet_def_n_proc v=$V; echo {i} > {out}/a{i}"),
                         {"V": "x y"}, done=str(out / f"a{i}")) for i in range(3)]
              + [Task("flaky", sh(f"if [ -e {flag} ]; then rm {flag}; echo broken >&2; exit 7; fi; echo ok > {out}/f"))])
    b = Stage("b", [Task("merge", sh(f"cat {out}/a0 {out}/a1 {out}/a2 {out}/f > {out}/b"))], after=["a"])
    wd = tmp_path / "wd"
    with pytest.raises(RuntimeError) as e:
        run_stages([a, b], wd, LauncherOptions(jobs=2, cpus_per_task=3))
    msg = str(e.value)
    assert "flaky" in msg and "exit code 7" in msg and str(wd / "a" / "logs" / "flaky.log") in msg and "stages b" in msg
    assert "broken" in (wd / "a" / "logs" / "flaky.log").read_text()
    assert "threads=3 n=3 v=x y" in (wd / "a" / "logs" / "t0.log").read_text()
    assert [(out / f"a{i}").is_file() for i in range(3)] == [True] * 3 and not (out / "b").exists()
    st = jobs.status(wd)
    assert st["stages"]["a"]["flaky"]["state"] == "failed" and st["stages"]["a"]["t1"]["state"] == "done"
    assert st["stages"]["b"]["merge"]["state"] == "not run"
    assert [x[1] for x in jobs.failed_tasks(st)] == ["flaky"]
    shown = jobs.format_status(st).splitlines()  # a failed task's row is followed by its log's last line
    row = next(k for k, ln in enumerate(shown) if ln.split()[:2] == ["flaky", "failed"])
    assert shown[row + 1].strip() == "broken"
    stamp = (out / "a0").stat().st_mtime_ns
    res = jobs.resume(wd)
    assert res["stages"]["a"] == {"ran": ["flaky"], "skipped": ["t0", "t1", "t2"]}
    assert res["stages"]["b"]["ran"] == ["merge"] and (out / "b").read_text().split() == ["0", "1", "2", "ok"]
    assert (out / "a0").stat().st_mtime_ns == stamp
    assert {r["state"] for rows in jobs.status(wd)["stages"].values() for r in rows.values()} == {"done"}
    # a task can be run by hand from its script; finished tasks exit at once
    r = subprocess.run(["bash", str(wd / "a" / "a.sbatch"), "0"], capture_output=True, text=True)
    assert r.returncode == 0 and "finished already" in r.stdout
    # dry run prints the scripts and runs nothing
    capsys.readouterr()
    res = run_stages([Stage("c", [Task("x", sh(f"touch {out}/c"))])], tmp_path / "wd2", LauncherOptions(dry_run=True))
    assert res == {"c": None} and "CMD=(bash -c" in capsys.readouterr().out and not (out / "c").exists()
    # ... and a task run by hand from the dry run's script (LSF, PBS, plain bash) shows in `jobs status`
    assert jobs.status(tmp_path / "wd2")["stages"]["c"]["x"]["state"] == "not run"
    subprocess.run(["bash", str(tmp_path / "wd2" / "c" / "c.sbatch"), "0"], check=True, capture_output=True)
    assert jobs.status(tmp_path / "wd2")["stages"]["c"]["x"]["state"] == "done" and (out / "c").exists()


def test_missing_done_file_is_a_failure(tmp_path):
    with pytest.raises(RuntimeError, match="is missing"):
        run_stages([Stage("a", [Task("t", ["true"], done=str(tmp_path / "never"))])], tmp_path / "wd", LauncherOptions())


# ---------------------------------------------------------------------------------------------- Slurm


def cli(env, *args, ok=True):
    r = subprocess.run([nnunet_command("nnunet-ext"), *map(str, args)], env=env, capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def tiny_cascade_env(root: Path, slurm_conf: str | None = None) -> dict:
    env = nnunet_env(root, n_proc=1)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1",
                "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    cli(env, "phantom", "-d", SRC, "--cases", 8, "--test-cases", 2, "--raters", 2, "--shape", 32, 32, 32, "--seed", 3)
    cli(env, "consensus", "split-raters", "-d", SRC, "--folds", 2)
    return env


TRAIN = ["consensus", "train", "-d", SRC, "--stage", "all", "-c", "2d", "-tr", "ExtBaselineTrainer", "-device", "cpu",
         "-np", 1]


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def cascades(slurm_cluster, tmp_path_factory):
    """The same tiny cascade (2 raters x 2 folds, 1 epoch x 2 iterations, then build-stage2 and 2 stage-2
    folds) trained by the local launcher and on Slurm; on Slurm one stage-1 fold is cancelled mid-run
    (scancel), the rest of its array finishes, the later stages stay blocked, and `jobs resume` re-submits it."""
    t0 = time.time()
    local_root, slurm_root = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("onslurm")
    env_l = tiny_cascade_env(local_root)
    env_s = tiny_cascade_env(slurm_root, str(slurm_cluster.conf))
    local = subprocess.Popen([nnunet_command("nnunet-ext"), *map(str, TRAIN)], env=env_l, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    r = cli(env_s, *TRAIN, "--launcher", "slurm", "--cpus-per-task", 1, "--mem", "2G")
    submit_s = time.time() - t0
    wd = Path(re.search(r"scripts, markers and logs: (\S+)", r.stdout).group(1))
    ids = dict(kv.split("=") for kv in re.search(r"submitted (.*)", r.stdout).group(1).split(", "))
    assert list(ids) == ["stage1_prepare", "stage1_train", "stage1_record", "build_stage2", "stage2_prepare",
                         "stage2_train", "stage2_record"]
    # cancel the first stage-1 fold that is really training
    train_dir = wd / "stage1_train"

    def training_task():
        for log in sorted((train_dir / "logs").glob("*_fold*.log")):
            if "Epoch 0" in log.read_text():
                return log.stem
    victim = _wait_for(training_task, 900, "no stage-1 fold started training")
    index = [t["name"] for t in load_manifest(wd)["stages"][1]["tasks"]].index(victim)
    slurm_cluster.run("scancel", f"{ids['stage1_train']}_{index}")
    def stage1_ended():  # every element of the stage-1 array has left the queue
        q = slurm_cluster.run("squeue", "-h", "-r", "-o", "%F").stdout.split()
        return ids["stage1_train"] not in q
    _wait_for(stage1_ended, 1800, "stage 1 did not end after scancel")
    st = jobs.status(wd)
    status_text = cli(env_s, "jobs", "status", wd, ok=False)
    r = cli(env_s, "jobs", "resume", wd)
    resumed = r.stdout
    st_end = jobs.wait(wd, poll=2, timeout=1800)
    slurm_s = time.time() - t0
    out_l, _ = local.communicate(timeout=1800)
    assert local.returncode == 0, out_l[-3000:]
    timing = {"submit_s": submit_s, "slurm_total_s": slurm_s, "total_s": time.time() - t0}
    print(f"slurm cascade timing: {timing}")
    return {"local": local_root, "slurm": slurm_root, "env_s": env_s, "env_l": env_l, "wd": wd, "ids": ids,
            "victim": victim, "victim_index": index, "status_after_kill": st, "status_text": status_text,
            "resume_out": resumed, "status_end": st_end, "timing": timing}


def _tree(root: Path, sub: str) -> set[str]:
    """Relative file names below ``root/sub``, nnU-Net's timestamped training logs normalised."""
    out = set()
    for p in (root / sub).rglob("*"):
        if p.is_file() or p.is_symlink():
            rel = str(p.relative_to(root))
            out.add(re.sub(r"training_log_[0-9_]+\.txt$", "training_log.txt", rel))
    return out


@pytest.mark.slow
@pytest.mark.heavy
def test_slurm_cascade_kill_and_resume(cascades):
    c = cascades
    st, wd = c["status_after_kill"], c["wd"]
    # the cancelled fold is reported with its log, the other folds finished, later stages wait
    row = st["stages"]["stage1_train"][c["victim"]]
    assert row["state"] == "failed" and "SIGTERM" in row["reason"] and row["log"].endswith(f"{c['victim']}.log")
    others = {n: r["state"] for n, r in st["stages"]["stage1_train"].items() if n != c["victim"]}
    assert set(others.values()) == {"done"} and len(others) == 3
    assert st["stages"]["stage2_train"]["consensus_fold0"]["state"] == "blocked"
    assert c["status_text"].returncode == 1 and c["victim"] in c["status_text"].stdout
    # resume: only the cancelled fold is re-submitted in stage 1, the blocked stages again after it
    subs = load_manifest(wd)["submissions"]
    again = [s for s in subs[7:]]
    assert [s["stage"] for s in again] == ["stage1_train", "stage1_record", "build_stage2", "stage2_prepare",
                                           "stage2_train", "stage2_record"]
    assert again[0]["indices"] == [c["victim_index"]] and again[1]["dependency"] == [again[0]["job_id"]]
    assert again[0]["dependency"] == [] and again[2]["dependency"] == [again[1]["job_id"]]
    assert "cancelled pending tasks" in c["resume_out"]
    for name in others:
        assert (wd / "stage1_train" / "logs" / f"{name}.log").read_text().count("=== " + name + ": start") == 1
    assert (wd / "stage1_train" / "logs" / f"{c['victim']}.log").read_text().count(": start") == 2
    assert {r["state"] for rows in c["status_end"]["stages"].values() for r in rows.values()} == {"done"}
    # afterok chaining: every later array was submitted with a dependency on the one before
    first = {s["stage"]: s for s in subs[:7]}
    assert first["stage1_train"]["dependency"] == [first["stage1_prepare"]["job_id"]]
    assert first["stage2_train"]["dependency"] == [first["stage2_prepare"]["job_id"]]
    # the scripts are plain bash with #SBATCH lines, re-submittable by hand
    text = (wd / "stage1_train" / "stage1_train.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=1" in text and "#SBATCH --mem=2G" in text and "--npz" in text
    assert "export NNUNET_EXT_ITERATIONS=2" in text and "export nnUNet_results=" in text


@pytest.mark.slow
@pytest.mark.heavy
def test_slurm_cascade_same_files_and_provenance_as_local(cascades):
    loc, slu = cascades["local"], cascades["slurm"]
    for sub in ("nnUNet_results/Dataset551_MSPhantom_rater1", "nnUNet_results/Dataset552_MSPhantom_rater2",
                "nnUNet_results/Dataset553_MSPhantom_consensus", "nnUNet_raw/Dataset553_MSPhantom_consensus",
                "nnUNet_preprocessed/Dataset553_MSPhantom_consensus"):
        assert _tree(loc, sub) == _tree(slu, sub), sub
    # the killed fold left no second set of files behind (its training logs aside)
    assert _tree(slu, "nnUNet_results/Dataset551_MSPhantom_rater1")

    def norm(p: Path, root: Path):
        return json.loads(p.read_text().replace(str(root), "ROOT"))

    for f in ("nnUNet_raw/Dataset550_MSPhantom/consensus.json", "nnUNet_raw/Dataset553_MSPhantom_consensus/stage2_provenance.json",
              "nnUNet_raw/Dataset553_MSPhantom_consensus/dataset.json"):
        assert norm(loc / f, loc) == norm(slu / f, slu), f
    state = json.loads((slu / "nnUNet_raw/Dataset550_MSPhantom/consensus.json").read_text())
    assert state["stage2_training"]["folds"] == [0, 1] and state["stage1"]["trainer"] == "ExtBaselineTrainer"


@pytest.mark.slow
@pytest.mark.heavy
def test_pseudolabel_shards_on_slurm_equal_one_local_run(cascades):
    env = cascades["env_s"]
    root = cascades["slurm"]
    common = ["pseudolabel", "-d", 551, "-c", "2d", "-tr", "ExtBaselineTrainer", "-f", 0, 1, "-i",
              root / "nnUNet_raw" / "Dataset550_MSPhantom" / "imagesTs", "--tst", 0, "-device", "cpu"]
    one = {**env, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}  # the same thread count as each Slurm task
    cli(one, *common, "-o", "Dataset554_One")
    r = cli(env, *common, "-o", "Dataset555_Shards", "--launcher", "slurm", "-num_parts", 2, "--cpus-per-task", 1)
    wd = Path(re.search(r"scripts, markers and logs: (\S+)", r.stdout).group(1))
    st = jobs.wait(wd, poll=1, timeout=900)
    assert {r["state"] for rows in st["stages"].values() for r in rows.values()} == {"done"}, jobs.format_status(st)
    a, b = root / "nnUNet_raw" / "Dataset554_One", root / "nnUNet_raw" / "Dataset555_Shards"
    pa, pb = json.loads((a / "provenance.json").read_text()), json.loads((b / "provenance.json").read_text())
    assert pa == pb and sorted(pa["cases"]) == ["phantom_008", "phantom_009"]
    assert json.loads((a / "dataset.json").read_text()) == json.loads((b / "dataset.json").read_text())
    # the per-shard lock files and provenance parts are named after the shard count; everything else is the same
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*")  # noqa: E731
                             if p.is_file() and "provenance_part" not in p.name and p.suffix != ".lock")
    assert names(a) == names(b)
    assert [p.name for p in sorted((a / ".nnunet_ext_progress").glob("*.lock"))] == ["part0of1.lock"]
    assert [p.name for p in sorted((b / ".nnunet_ext_progress").glob("*.lock"))] == ["part0of2.lock", "part1of2.lock"]
    for sub in ("labelsTr", "confidenceTr", "lesionmapTr"):
        for f in sorted((a / sub).glob("*.nii.gz")):
            assert np.array_equal(read_image(f)[0], read_image(b / sub / f.name)[0]), f
    assert [p.name for p in sorted(b.glob("provenance_part*"))] == ["provenance_part0of2.json", "provenance_part1of2.json"]


@pytest.mark.slow
def test_slurm_scancel_blocks_the_chain_and_resume_reruns_only_that_task(slurm_cluster, tmp_path):
    """Shell tasks (seconds): a cancelled array element blocks every later stage (transitively), `status`
    says so with the log path, `resume` re-submits that element and the later stages only."""
    out, flag = tmp_path / "out", tmp_path / "second_attempt"
    out.mkdir()
    a = Stage("a", [Task("quick", sh(f"echo q > {out}/quick"), done=str(out / "quick")),
                    Task("slow", sh(f"if [ -e {flag} ]; then :; else touch {flag}; sleep 120; fi; echo s > {out}/slow"),
                         done=str(out / "slow"))])
    b = Stage("b", [Task("b", sh(f"cat {out}/quick {out}/slow > {out}/b"))], after=["a"])
    c = Stage("c", [Task("c", sh(f"cp {out}/b {out}/c"))], after=["b"])
    wd = tmp_path / "wd"
    ids = run_stages([a, b, c], wd, LauncherOptions("slurm", cpus_per_task=1))
    assert set(ids) == {"a", "b", "c"} and all(ids.values())
    _wait_for(lambda: flag.exists() and (out / "quick").exists(), 300, "tasks did not start")
    slurm_cluster.run("scancel", f"{ids['a']}_1")
    st = _wait_for(lambda: (lambda s: s if s["stages"]["a"]["slow"]["state"] == "failed" else None)(jobs.status(wd)),
                   120, "cancelled task not reported")
    assert "SIGTERM" in st["stages"]["a"]["slow"]["reason"] and st["stages"]["a"]["slow"]["log"].endswith("slow.log")
    assert st["stages"]["a"]["quick"]["state"] == "done"
    assert st["stages"]["b"]["b"]["state"] == "blocked" and st["stages"]["c"]["c"]["state"] == "blocked"
    stamp = (out / "quick").stat().st_mtime_ns
    res = jobs.resume(wd)
    assert res["stages"]["a"] and res["stages"]["b"] and res["stages"]["c"]
    st = jobs.wait(wd, poll=1, timeout=300)
    assert {r["state"] for rows in st["stages"].values() for r in rows.values()} == {"done"}, jobs.format_status(st)
    assert (out / "c").read_text().split() == ["q", "s"] and (out / "quick").stat().st_mtime_ns == stamp
    subs = load_manifest(wd)["submissions"]
    assert [(s["stage"], s["indices"]) for s in subs[3:]] == [("a", [1]), ("b", [0]), ("c", [0])]
    assert subs[4]["dependency"] == [subs[3]["job_id"]] and subs[5]["dependency"] == [subs[4]["job_id"]]


@pytest.mark.slow
@pytest.mark.heavy
def test_consensus_predict_on_slurm_equals_local(cascades, tmp_path):
    env, root = cascades["env_s"], cascades["slurm"]
    images = root / "nnUNet_raw" / "Dataset550_MSPhantom" / "imagesTs"
    cli(env, "consensus", "predict", "-d", SRC, "-i", images, "-o", tmp_path / "local", "-device", "cpu",
        "--keep-rater-predictions", "-np", 1)
    r = cli(env, "consensus", "predict", "-d", SRC, "-i", images, "-o", tmp_path / "slurm", "-device", "cpu",
            "--keep-rater-predictions", "-np", 1, "--launcher", "slurm", "--cpus-per-task", 2, "-j", 2)
    wd = Path(re.search(r"scripts, markers and logs: (\S+)", r.stdout).group(1))
    assert wd == tmp_path / "slurm" / ".nnunet_ext_jobs"
    st = jobs.wait(wd, poll=1, timeout=900)
    assert st["stages"]["consensus_predict"]["predict"]["state"] == "done", jobs.format_status(st)
    for case in ("phantom_008", "phantom_009"):
        for sub in ("", "raters/rater1/", "raters/rater2/"):
            assert np.array_equal(read_image(tmp_path / "local" / f"{sub}{case}.nii.gz")[0],
                                  read_image(tmp_path / "slurm" / f"{sub}{case}.nii.gz")[0]), sub + case
