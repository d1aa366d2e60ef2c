"""Where things are: our trainer folder and nnU-Net's data folders."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CHECKPOINT = "checkpoint_final.pth"  # nnU-Net's final checkpoint of a fold, the default everywhere


def resolve_nnunet_folders(environ=None) -> dict[str, str]:
    """Make relative ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` / ``nnUNet_extTrainer``
    values absolute (against the current folder), once, when a command starts: every path the command
    writes (links, launcher scripts, reports) and every process it starts then sees the same folders,
    wherever they run. Returns the variables it changed."""
    environ = os.environ if environ is None else environ
    changed = {}
    for name in NNUNET_FOLDERS + ("nnUNet_extTrainer",):
        v = environ.get(name)
        if not v:
            continue
        parts = v.split(os.pathsep) if name == "nnUNet_extTrainer" else [v]
        absolute = os.pathsep.join(os.path.abspath(os.path.expanduser(p)) if p else p for p in parts)
        if absolute != v:
            environ[name] = changed[name] = absolute
    return changed


def trainers_path() -> Path:
    """Absolute path of the folder that nnU-Net's ``nnUNet_extTrainer`` should point at.

    It is the repository's top-level ``trainers/`` folder, installed as the package ``nnunet_ext.trainers``
    (editable installs resolve it to the source folder, wheels to site-packages)."""
    spec = importlib.util.find_spec("nnunet_ext.trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunet_ext.trainers is not installed; reinstall the nnunet-ext package")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def with_our_trainers(ext_trainer_value: str) -> str:
    """An ``nnUNet_extTrainer`` value with our trainer folder in front of the folders the user set."""
    ours = str(trainers_path())
    others = [p for p in ext_trainer_value.split(os.pathsep) if p and p != ours]
    return os.pathsep.join([ours] + others)


def nnunet_env(workdir: str | os.PathLike | None = None, n_proc: int | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` ready for nnU-Net's commands: ``nnUNet_raw/preprocessed/results`` under
    ``workdir`` unless already set, our trainers on ``nnUNet_extTrainer`` (in front of any the user set),
    and process counts for small machines unless set."""
    env = dict(os.environ)
    if workdir is not None:
        for name in NNUNET_FOLDERS:
            if not env.get(name):
                env[name] = str((Path(workdir) / name).resolve())
                Path(env[name]).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = with_our_trainers(env.get("nnUNet_extTrainer", ""))
    n = str(n_proc or min(os.cpu_count() or 1, 8))
    env.setdefault("nnUNet_def_n_proc", n)
    env.setdefault("nnUNet_n_proc_DA", n)
    return env


def nnunet_command(name: str) -> str:
    """Path of one of nnU-Net's console commands, preferring the one next to this Python."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"nnU-Net command {name} not found; is nnunetv2 installed in this environment?")
    return found


def run_logged(cmd: list[str], env: dict, log: Path) -> None:
    """Run an nnU-Net command, appending its output to ``log`` and echoing epoch summaries and errors."""
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        from nnunet_ext.core import guard

        # under the guard: the command and its workers end with this process, however it ends
        proc = guard.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                f.write(line)
                # show nnU-Net's epoch summaries and errors, keep the rest in the log
                if any(k in line for k in ("Epoch ", "train_loss", "Pseudo dice", "Error", "error", "Traceback",
                                           "Predicting", "done with")):
                    print("   " + line.rstrip(), flush=True)
            rc = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM, an error: the command's whole process group ends now
            guard.stop(proc)
            proc.wait()
            raise
    if rc != 0:
        raise RuntimeError(f"command failed with exit code {rc}: {' '.join(cmd)} (full output in {log})")
    print(f"   ... {time.time() - t:.0f} s", flush=True)
