"""Trainer discovery through nnU-Net's own lookup, from an editable and from a real wheel install."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ext.cli import run
from nnunet_ext.core.paths import nnunet_env, trainers_path

REPO = Path(__file__).resolve().parents[2]

LOOKUP = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
          "import sys; c = f(sys.argv[1]); print('FOUND', c.__module__, c.__name__)")


def _lookup(name, env, cwd):
    return subprocess.run([sys.executable, "-c", LOOKUP, name], env=env, cwd=cwd, capture_output=True, text=True)


def test_trainers_path_cli(capsys):
    assert run(["trainers-path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == trainers_path() and (printed / "ext_baseline.py").is_file()


@pytest.mark.slow  # two child processes importing nnU-Net
def test_nnunet_finds_our_trainer(tmp_path):
    env = nnunet_env(tmp_path)
    r = _lookup("ExtBaselineTrainer", env, tmp_path)
    assert "FOUND nnunet_ext.training.base ExtBaselineTrainer" in r.stdout, r.stdout + r.stderr
    r = _lookup("NoSuchTrainerXyz", env, tmp_path)
    assert r.returncode != 0 and "Could not find requested nnunet trainer" in r.stderr


def test_nnunet_env_keeps_user_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/data/raw")
    monkeypatch.setenv("nnUNet_extTrainer", "/my/trainers")
    monkeypatch.delenv("nnUNet_results", raising=False)
    env = nnunet_env(tmp_path)
    assert env["nnUNet_raw"] == "/data/raw"
    assert env["nnUNet_results"] == str((tmp_path / "nnUNet_results").resolve())
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [str(trainers_path()), "/my/trainers"]


@pytest.mark.slow  # builds and installs a wheel
def test_wheel_install_trainers_path(tmp_path):
    """Build a real wheel, install it into an empty target folder, and let nnU-Net find the trainer there."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("nnunet_ext-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", "from nnunet_ext.cli.main import main; main()", "trainers-path"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    path = Path(r.stdout.strip())
    assert path == (target / "nnunet_ext" / "trainers").resolve()
    assert (path / "ext_baseline.py").is_file()
    env["nnUNet_extTrainer"] = str(path)
    r = _lookup("ExtBaselineTrainer", env, tmp_path)
    assert "FOUND nnunet_ext.training.base ExtBaselineTrainer" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", "import nnunet_ext; print(nnunet_ext.__file__)"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()).is_relative_to(target)


@pytest.mark.parametrize("var,value", [("NNUNET_EXT_NUM_EPOCHS", "0"), ("NNUNET_EXT_ITERATIONS", "x")])
def test_budget_override_rejects_bad_values(var, value):
    from nnunet_ext.training.base import apply_budget_overrides

    class T:
        pass

    with pytest.raises(ValueError, match=var):
        apply_budget_overrides(T(), {var: value})


def test_budget_override_sets_attributes():
    from nnunet_ext.training.base import apply_budget_overrides

    class T:
        num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch = 1000, 250, 50

    t = T()
    applied = apply_budget_overrides(t, {"NNUNET_EXT_NUM_EPOCHS": "3", "NNUNET_EXT_VAL_ITERATIONS": "2"})
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (3, 250, 2)
    assert applied == {"num_epochs": 3, "num_val_iterations_per_epoch": 2}
