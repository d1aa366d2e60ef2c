"""``nnunet-ext train`` (nnunet_ext.workflows.train): every (configuration, trainer, fold) a launcher task of
nnU-Net's own ``nnUNetv2_train ... --c``; finished folds skipped, cascade configurations after their previous
stage, ``nnUNetv2_find_best_configuration`` after the last fold; unknown trainers refused before any script.
The real run (a Slurm job array, a cancelled fold resumed, find-best as a dependent job) is at the end."""
import json
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from nnunet_ext.cluster.launcher import LauncherOptions, load_manifest, run_stages
from nnunet_ext.workflows.train import TrainOptions, train, train_stages

NAME = "Dataset599_Fake"
CONFIGS = {"2d": {"data_identifier": "nnUNetPlans_2d"},
           "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"},
           "3d_lowres": {"data_identifier": "nnUNetPlans_3d_lowres", "next_stage": "3d_cascade_fullres"},
           "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """nnU-Net's three folders with one planned (not really preprocessed) dataset."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(k, str(tmp_path / k))
    for k in ("NNUNET_EXT_NUM_EPOCHS", "NNUNET_EXT_ITERATIONS", "NNUNET_EXT_VAL_ITERATIONS"):
        monkeypatch.delenv(k, raising=False)
    pre = tmp_path / "nnUNet_preprocessed" / NAME
    for c in CONFIGS.values():
        if "data_identifier" in c:
            (pre / c["data_identifier"]).mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": CONFIGS}))
    return tmp_path


def _fold(root: Path, config: str, fold: int, trainer: str = "ExtBaselineTrainer") -> Path:
    d = root / "nnUNet_results" / NAME / f"{trainer}__nnUNetPlans__{config}" / f"fold_{fold}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _checkpoint(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:  # torch.save writes a zip archive
        z.writestr("data.pkl", b"x")


def test_options_are_checked():
    with pytest.raises(ValueError, match="-f x: a fold is a number"):
        TrainOptions("1", ["2d"], ["T"], ["x"])
    with pytest.raises(ValueError, match="-tr: T given twice"):
        TrainOptions("1", ["2d"], ["T", "T"])
    with pytest.raises(ValueError, match="-c: give at least one"):
        TrainOptions("1", [], ["T"])
    with pytest.raises(NotImplementedError, match="--then-find-best with fold 'all'"):
        TrainOptions("1", ["2d"], ["T"], ["all"], then_find_best=True)
    with pytest.raises(ValueError, match="--epochs must be a positive integer"):
        TrainOptions("1", ["2d"], ["T"], epochs=0)
    with pytest.raises(ValueError, match="trainer name '../x' is not a name"):
        TrainOptions("1", ["2d"], ["../x"])
    o = TrainOptions(1, ["2d"], ["T"], ["0", "all"], epochs=1, iterations=2)
    assert o.folds == [0, "all"] and o.budget() == {"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2"}
    assert TrainOptions(1, ["2d"], ["T"]).folds == [0, 1, 2, 3, 4]


def test_stages_skip_finished_folds_and_chain_cascade_and_find_best(fake, capsys):
    opts = TrainOptions("599", ["2d", "3d_lowres", "3d_cascade_fullres"], ["ExtBaselineTrainer"], [0, 1, 2, 3],
                        then_find_best=True, device="cpu", epochs=1)
    (_fold(fake, "2d", 1) / "checkpoint_latest.pth").write_bytes(b"x")  # interrupted
    (_fold(fake, "2d", 2) / "validation").mkdir()
    (_fold(fake, "2d", 2) / "validation" / "summary.json").write_text("{}")  # finished
    (_fold(fake, "2d", 3) / "checkpoint_final.pth").write_bytes(b"cut off")  # killed while saving: not a zip
    _checkpoint(_fold(fake, "3d_lowres", 0) / "checkpoint_final.pth")  # trained, validation missing
    plans = json.loads((fake / "nnUNet_preprocessed" / NAME / "nnUNetPlans.json").read_text())
    stages, states = train_stages(opts, NAME, plans, fake / "nnUNet_results", {"NNUNET_EXT_NUM_EPOCHS": "1"})
    assert [s.name for s in stages] == ["train", "train_cascade", "find_best"]
    assert [t.name for t in stages[0].tasks] == [f"{c}_ExtBaselineTrainer_fold{f}" for c in ("2d", "3d_lowres")
                                                 for f in range(4)]
    assert states["2d_ExtBaselineTrainer_fold0"] == "new" and states["2d_ExtBaselineTrainer_fold1"] == "continue"
    assert states["2d_ExtBaselineTrainer_fold2"] == "finished" and states["3d_lowres_ExtBaselineTrainer_fold0"] == "validate"
    assert states["2d_ExtBaselineTrainer_fold3"] == "new" and not (_fold(fake, "2d", 3) / "checkpoint_final.pth").exists()
    t = stages[0].tasks[1]
    assert t.argv[1:] == [NAME, "2d", "1", "-tr", "ExtBaselineTrainer", "-p", "nnUNetPlans", "-device", "cpu", "--c"]
    assert Path(t.argv[0]).name == "nnUNetv2_train" and t.env == {"NNUNET_EXT_NUM_EPOCHS": "1"}
    assert t.done == str(_fold(fake, "2d", 1) / "validation" / "summary.json")
    assert stages[1].after == ["train"] and len(stages[1].tasks) == 4
    fb = stages[2].tasks[0].argv
    assert Path(fb[0]).name == "nnUNetv2_find_best_configuration" and stages[2].after == ["train", "train_cascade"]
    # three models without --npz: nnU-Net cannot ensemble them
    assert fb[1:] == [NAME, "-c", "2d", "3d_lowres", "3d_cascade_fullres", "-tr", "ExtBaselineTrainer", "-p",
                      "nnUNetPlans", "-f", "0", "1", "2", "3", "--disable_ensembling"]
    # on Slurm: the unfinished folds as one array (2d fold 2 = index 2 is finished), cascade after it,
    # find-best after both
    run_stages(stages, fake / "wd", LauncherOptions("slurm", dry_run=True))
    out = capsys.readouterr().out
    assert re.search(r"JOB_train=\$\(sbatch --parsable --array=0-1,3-7 \S+train\.sbatch\)", out)
    assert re.search(r"JOB_train_cascade=\$\(sbatch --parsable --array=0-3 --dependency=afterok:\$JOB_train ", out)
    assert re.search(r"JOB_find_best=\$\(sbatch --parsable --array=0 "
                     r"--dependency=afterok:\$JOB_train:\$JOB_train_cascade ", out)


def test_cascade_alone_needs_its_previous_stage(fake):
    opts = TrainOptions("599", ["3d_cascade_fullres"], ["ExtBaselineTrainer"], [0])
    plans = json.loads((fake / "nnUNet_preprocessed" / NAME / "nnUNetPlans.json").read_text())
    with pytest.raises(FileNotFoundError, match="add -c 3d_lowres"):
        train_stages(opts, NAME, plans, fake / "nnUNet_results", {})
    (_fold(fake, "3d_lowres", 0).parent / "predicted_next_stage" / "3d_cascade_fullres").mkdir(parents=True)
    stages, _ = train_stages(opts, NAME, plans, fake / "nnUNet_results", {})
    assert [s.name for s in stages] == ["train"]


def test_checks_before_any_script(fake, capsys):
    wd = fake / "wd"
    with pytest.raises(ValueError, match="-c 3d_midres: not a configuration of"):
        train(TrainOptions("599", ["3d_midres"], ["ExtBaselineTrainer"], [0], workdir=str(wd)))
    with pytest.raises(FileNotFoundError, match="nnUNetPlans_2d not found: run nnUNetv2_plan_and_preprocess"):
        (fake / "nnUNet_preprocessed" / NAME / "nnUNetPlans_2d").rmdir()
        train(TrainOptions("599", ["2d"], ["ExtBaselineTrainer"], [0], workdir=str(wd)))
    (fake / "nnUNet_preprocessed" / NAME / "nnUNetPlans_2d").mkdir()
    # nnU-Net's own lookup, run once here (a child process: seconds) and given to each call
    from nnunet_ext.core.paths import nnunet_env
    from nnunet_ext.nnunet_adapter import lookup_trainers

    names = ["ExtBaselineTrainer", "nnUNetTrainer", "NoSuchTrainerXyz"]
    found = lookup_trainers(names, nnunet_env(None))
    assert [found[n]["found"] for n in names] == [True, True, False]

    def lookup(asked, env):
        return {n: found[n] for n in asked}

    # an unknown trainer is refused, and nothing is written
    with pytest.raises(ValueError, match="-tr NoSuchTrainerXyz: no trainer of that name"):
        train(TrainOptions("599", ["2d"], ["ExtBaselineTrainer", "NoSuchTrainerXyz"], [0], workdir=str(wd)), lookup)
    assert not wd.exists()
    with pytest.raises(NotImplementedError, match="-tr nnUNetTrainer with --epochs"):
        train(TrainOptions("599", ["2d"], ["nnUNetTrainer"], [0], epochs=1, workdir=str(wd)), lookup)
    assert not wd.exists()
    res = train(TrainOptions("599", ["2d"], ["ExtBaselineTrainer"], [0, 1], epochs=1, iterations=2,
                             launcher=LauncherOptions("slurm", dry_run=True)), lookup)
    text = (Path(res["workdir"]) / "train" / "train.sbatch").read_text()
    assert Path(res["workdir"]).parent == fake / "nnUNet_results" / "nnunet_ext_jobs" / NAME
    assert "  export NNUNET_EXT_NUM_EPOCHS=1" in text and "  export NNUNET_EXT_ITERATIONS=2" in text
    assert "  unset NNUNET_EXT_VAL_ITERATIONS  #" in text and f"  export nnUNet_results={fake / 'nnUNet_results'}" in text
    assert res["folds"] == {"2d_ExtBaselineTrainer_fold0": "new", "2d_ExtBaselineTrainer_fold1": "new"}
    assert not (fake / "nnUNet_preprocessed" / NAME / "splits_final.json").exists()  # a dry run writes nothing else


# ---------------------------------------------------------------------------------------------- real Slurm

TRAIN_ID = 597


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.slow
@pytest.mark.heavy
def test_train_on_slurm_resume_and_find_best(slurm_cluster, tmp_path):
    """2 folds of a tiny phantom as one Slurm array (ExtBaselineTrainer, 2 epochs x 2 iterations): fold 1
    starts from an interrupted run (checkpoint_latest.pth after epoch 1 of 2) and continues with --c, fold 0 is
    cancelled while it trains and resumed with `jobs resume`; nnUNetv2_find_best_configuration runs as a job
    that waits for the array (afterok), and again after the resumed fold."""
    from conftest import run_nnunet

    from nnunet_ext.cluster import jobs
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    env = nnunet_env(tmp_path, n_proc=1)
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "SLURM_CONF": str(slurm_cluster.conf),
                "NNUNET_EXT_NUM_EPOCHS": "50"})  # exported in the shell: --epochs is what the jobs get
    env.pop("NNUNET_EXT_ITERATIONS", None)
    env.pop("NNUNET_EXT_VAL_ITERATIONS", None)
    ext = nnunet_command("nnunet-ext")

    def cli(*args):
        r = subprocess.run([ext, *map(str, args)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    cli("phantom", "-d", TRAIN_ID, "--cases", 8, "--test-cases", 1, "--shape", 24, 24, 24, "--seed", 2)
    run_nnunet([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(TRAIN_ID), "-c", "2d", "-np", "1"], env)
    common = ["train", "-d", TRAIN_ID, "-c", "2d", "-tr", "ExtBaselineTrainer", "-device", "cpu",
              "--iterations", 2, "--val-iterations", 1]
    # fold 1, 1 epoch, here: then made into a run interrupted after epoch 1 of 2 (its checkpoint_final.pth is
    # what nnU-Net would have saved as checkpoint_latest.pth at that point)
    cli(*common, "-f", 1, "--epochs", 1)
    model = tmp_path / "nnUNet_results" / f"Dataset{TRAIN_ID}_MSPhantom" / "ExtBaselineTrainer__nnUNetPlans__2d"
    f1 = model / "fold_1"
    (f1 / "checkpoint_final.pth").rename(f1 / "checkpoint_latest.pth")
    subprocess.run(["rm", "-rf", str(f1 / "validation")], check=True)
    for log in f1.glob("training_log_*.txt"):
        log.rename(log.with_suffix(".first"))

    r = cli(*common, "-f", 0, 1, "--epochs", 2, "--then-find-best", "--launcher", "slurm", "--cpus-per-task", 1,
            "--mem", "2G")
    assert "2d_ExtBaselineTrainer_fold1: continues from checkpoint_latest.pth (--c)" in r.stdout
    assert "warning:" not in r.stderr  # the command asked for every budget variable it passes
    wd = Path(re.search(r"scripts, markers and logs: (\S+)", r.stdout).group(1))
    subs = load_manifest(wd)["submissions"]
    assert [s["stage"] for s in subs] == ["train", "find_best"] and subs[1]["dependency"] == [subs[0]["job_id"]]
    # cancel fold 0 once it trains
    log0 = wd / "train" / "logs" / "2d_ExtBaselineTrainer_fold0.log"
    _wait_for(lambda: log0.is_file() and "Epoch 0" in log0.read_text(), 900, "fold 0 did not start training")
    slurm_cluster.run("scancel", f"{subs[0]['job_id']}_0")
    st = _wait_for(lambda: (lambda s: s if s["stages"]["train"]["2d_ExtBaselineTrainer_fold1"]["state"] == "done"
                            and s["stages"]["train"]["2d_ExtBaselineTrainer_fold0"]["state"] == "failed" else None)(
        jobs.status(wd)), 900, "fold 1 did not finish / fold 0 not reported cancelled")
    assert st["stages"]["find_best"]["find_best"]["state"] == "blocked"
    _wait_for(lambda: subs[0]["job_id"] not in slurm_cluster.run("squeue", "-h", "-r", "-o", "%F").stdout.split(),
              300, "the training array did not leave the queue")
    r = cli("jobs", "resume", wd)
    st = jobs.wait(wd, poll=2, timeout=1200)
    assert {x["state"] for rows in st["stages"].values() for x in rows.values()} == {"done"}, jobs.format_status(st)
    again = load_manifest(wd)["submissions"][2:]
    assert [(s["stage"], s["indices"]) for s in again] == [("train", [0]), ("find_best", [0])]
    assert again[1]["dependency"] == [again[0]["job_id"]]
    # fold 1 continued at epoch 1 (nnU-Net's --c from checkpoint_latest.pth), it did not start over
    (log1,) = f1.glob("training_log_*.txt")
    text1 = log1.read_text()
    assert "Epoch 1" in text1 and "Epoch 0" not in text1
    # every applied budget override is in nnU-Net's training log: --epochs 2, not the shell's 50
    assert "NNUNET_EXT_NUM_EPOCHS=2 sets num_epochs = 2 (the trainer's own value: 1000)" in text1
    assert "NNUNET_EXT_VAL_ITERATIONS=1 sets num_val_iterations_per_epoch = 1" in text1
    settings = json.loads((model / "fold_0" / "nnunet_ext_settings.json").read_text())
    assert settings["budget_overrides_from_environment"] == {"num_epochs": 2, "num_iterations_per_epoch": 2,
                                                             "num_val_iterations_per_epoch": 1}
    assert (wd / "train" / "logs" / "2d_ExtBaselineTrainer_fold0.log").read_text().count(": start") == 2
    for f in (0, 1):
        assert (model / f"fold_{f}" / "checkpoint_final.pth").is_file()
    # find-best ran after the last fold, over both folds
    info = json.loads((tmp_path / "nnUNet_results" / f"Dataset{TRAIN_ID}_MSPhantom" /
                       "inference_information.json").read_text())
    assert info["folds"] == [0, 1]
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == "ExtBaselineTrainer"
    # the same call again: every fold and find-best are finished, nothing is submitted
    r = cli(*common, "-f", 0, 1, "--epochs", 2, "--then-find-best", "--launcher", "slurm")
    assert "nothing to submit" in r.stdout and r.stdout.count("finished, skipped") == 2
