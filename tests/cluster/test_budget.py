"""Training budgets reach a launcher task only when the command asked for them (nnunet_ext.core.budget): a
budget exported in the submitting shell is unset in the job scripts, with one printed warning; and what
the trainers print and log when they apply one."""
import os
import subprocess

from nnunet_ext.cluster.launcher import LauncherOptions, Stage, Task, run_stages, stage_script, task_env


def _echo(name: str, env: dict | None = None) -> Task:
    return Task(name, ["bash", "-c", 'echo "e=${NNUNET_EXT_NUM_EPOCHS:-unset} i=${NNUNET_EXT_ITERATIONS:-unset}"'],
                env or {})


def test_shell_budget_is_dropped_unless_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NNUNET_EXT_NUM_EPOCHS", "7")  # a stray export in the user's shell
    monkeypatch.setenv("NNUNET_EXT_ITERATIONS", "9")
    stage = Stage("train", [_echo("stray"), _echo("asked", {"NNUNET_EXT_NUM_EPOCHS": "1"})])
    wd = tmp_path / "wd"
    run_stages([stage], wd, LauncherOptions())
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "NNUNET_EXT_NUM_EPOCHS=7" in err and "NNUNET_EXT_ITERATIONS=9" in err
    log = lambda t: (wd / "train" / "logs" / f"{t}.log").read_text()  # noqa: E731
    # the local launcher hands its whole environment on (as sbatch does by default): the script unsets
    assert "e=unset i=unset" in log("stray")
    assert "e=1 i=unset" in log("asked")  # the task's own budget, and nothing of the shell's beside it
    text = (wd / "train" / "train.sbatch").read_text()
    assert "  unset NNUNET_EXT_NUM_EPOCHS NNUNET_EXT_ITERATIONS NNUNET_EXT_VAL_ITERATIONS" in text
    assert "  unset NNUNET_EXT_ITERATIONS NNUNET_EXT_VAL_ITERATIONS" in text
    # a task re-run by hand from a shell that exports a budget (a hand re-submission) gets none either
    for f in (wd / "train" / "status").glob("*.exit"):
        f.unlink()
    env = {**os.environ, "NNUNET_EXT_NUM_EPOCHS": "5"}
    subprocess.run(["bash", str(wd / "train" / "train.sbatch"), "0"], env=env, check=True, capture_output=True)
    assert log("stray").count("e=unset i=unset") == 2


def test_task_env_passes_the_shell_budget_only_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("NNUNET_EXT_VAL_ITERATIONS", "3")
    monkeypatch.setenv("nnUNet_raw", "/data/raw")
    env = task_env({"X": "1"})
    assert "NNUNET_EXT_VAL_ITERATIONS" not in env and env["nnUNet_raw"] == "/data/raw" and env["X"] == "1"
    assert capsys.readouterr().out == ""
    env = task_env(budget_from_shell=True)
    assert env["NNUNET_EXT_VAL_ITERATIONS"] == "3"
    assert "training budget from this shell, passed to the jobs: NNUNET_EXT_VAL_ITERATIONS=3" in capsys.readouterr().out
    # no budget in the shell: no warning, and every task's branch still unsets the three variables
    monkeypatch.delenv("NNUNET_EXT_VAL_ITERATIONS")
    text = stage_script(Stage("s", [_echo("t")]), "/tmp/wd", LauncherOptions("slurm"))
    assert "  unset NNUNET_EXT_NUM_EPOCHS NNUNET_EXT_ITERATIONS NNUNET_EXT_VAL_ITERATIONS  #" in text
