"""Shared fixtures. ``planned_phantom``: one tiny phantom planned and preprocessed by nnU-Net once per
session (2d and 3d_fullres), with soft labels and two raters on nnU-Net's grid, used by the end-to-end and
in-process trainer tests."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

# nnU-Net reads its process count once, at import: in-process runs on 2 cores must not start 8 workers
os.environ.setdefault("nnUNet_def_n_proc", "1")
# predict's -npp/-nps default to 3 as nnUNetv2_predict's; the tests' predictions run on 2 cores
os.environ.setdefault("nnUNet_npp", "1")
os.environ.setdefault("nnUNet_nps", "1")

PLANNED_ID = 590
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SESSION_SIGNALS = {s: signal.getsignal(s) for s in _SIGNALS}


@pytest.fixture(autouse=True)
def _signals_as_at_start():
    """Every test starts with the session's signal handlers. A test that calls a command in-process may
    leave handlers behind; an *ignored* SIGTERM would be inherited by every process started later, and
    nnU-Net's validation pool (terminate, then join) then waits forever for a worker it cannot end."""
    for s, h in _SESSION_SIGNALS.items():
        if signal.getsignal(s) is not h:
            signal.signal(s, h)
    yield


@dataclass
class Ran:
    """What :func:`run_nnunet` gives back, like ``subprocess.CompletedProcess``."""

    args: list
    returncode: int
    stdout: str
    stderr: str


def run_nnunet(cmd, env, ok=True, check_text=""):
    """Run an nnU-Net or nnunet-ext console command **in this process** (its console entry point with
    ``sys.argv``, ``os.environ`` = ``env``), as a subprocess would: exit
    status, stdout and stderr come back (training loads data single-threaded); a raised exception is exit status 1 with its traceback on stderr.
    Saves the ~5 s of imports and the data-loader worker start of every subprocess. With ``ok`` a non-zero
    status fails the test with the output's tail."""
    from importlib.metadata import entry_points

    cmd = [str(c) for c in cmd]
    name = Path(cmd[0]).name
    eps = list(entry_points(group="console_scripts", name=name))
    if not eps:
        raise ValueError(f"{name} is not a console command of this environment")
    if name == "nnunet-ext":  # the library's run loop, without main()'s process-exit signal handling
        from nnunet_ext.cli import run as ext_run
        from nnunet_ext.core.errors import run_cli

        def target():
            return run_cli(ext_run, cmd[1:])
    else:
        target = eps[0].load()
    import torch

    saved_env, saved_argv = dict(os.environ), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    saved_threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    if name == "nnUNetv2_train":  # single-threaded data loading (the planner needs a positive count)
        os.environ["nnUNet_n_proc_DA"] = "0"
    sys.argv = [name] + cmd[1:]
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                r = target()
                rc = int(r) if isinstance(r, int) and not isinstance(r, bool) else 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - a crashing command is a non-zero exit, as in a subprocess
                traceback.print_exc()
                rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for s, h in saved_signals.items():
            signal.signal(s, h)
        torch.set_num_threads(saved_threads)
    r = Ran(cmd, rc, out.getvalue(), err.getvalue())
    if ok:
        assert r.returncode == 0, f"{' '.join(cmd)} exited {rc}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def planned_phantom(tmp_path_factory):
    """(work, env, raw dataset folder): 8 + 2 cases of 32^3 in two cohorts and two sites (1 and 2 mm
    slices), soft labels, 2 raters; planned 2d and 3d_fullres; soft labels and raters preprocessed."""
    from nnunet_ext.core.paths import nnunet_command, nnunet_env
    from nnunet_ext.data.phantom import PhantomConfig, write_phantom_dataset
    from nnunet_ext.preprocessing.soft_preprocess import preprocess_raters, preprocess_soft_dataset

    work = tmp_path_factory.mktemp("planned")
    env = nnunet_env(work, n_proc=2)
    env.update({"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "1",
                "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
    cfg = PhantomConfig(shape=(32, 32, 32), empty_fraction=0.0, seed=5, soft=True, raters=2,
                        cohorts=("all", "no_small"), sites=((1.0, 1.0, 1.0), (1.0, 1.0, 2.0)))
    root = write_phantom_dataset(env["nnUNet_raw"], PLANNED_ID, 8, cfg, n_test=2, progress=False)
    r = subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(PLANNED_ID), "-c", "2d",
                        "3d_fullres", "-np", "2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with nnunet_paths(env):
        for c in ("2d", "3d_fullres"):
            preprocess_soft_dataset(PLANNED_ID, c, progress=False)
            preprocess_raters(PLANNED_ID, c, progress=False)
    return work, env, root


@contextlib.contextmanager
def nnunet_paths(env):
    """Run nnU-Net in-process with the nnUNet_* folders of ``env`` (nnU-Net 2.8 reads them from the
    environment when used) and single-threaded data loading."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {k: os.environ.get(k) for k in names + ("nnUNet_n_proc_DA",)}
    os.environ.update({k: env[k] for k in names})
    os.environ["nnUNet_n_proc_DA"] = "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------
# Slurm (issue 18; owner: launcher/jobs). A real single-node Slurm cluster for the whole session, in a
# temporary folder: private munged (own key and socket), slurmctld and slurmd with SLURM_CONF pointing at a
# generated slurm.conf (one node with this machine's CPUs and memory, one partition). Stopped at the end;
# only the daemons started here (by their pid files) and the jobs of this private cluster are ended.
# Skipped with the reason when the packages are missing (scripts/setup.sh --test installs them as root with apt).

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")


def _slurm_missing() -> str | None:
    import shutil

    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None and not os.path.exists(f"/usr/sbin/{p}")]
    if not missing:
        return None
    why = ("not running as root" if os.geteuid() != 0 else
           "apt-get is not available" if shutil.which("apt-get") is None else
           "the apt install of scripts/setup.sh --test failed or was not run")
    return (f"Slurm tests need slurm-wlm and munge ({', '.join(missing)} not found): {why}; "
            f"as root run `apt-get install -y slurm-wlm munge` or `bash scripts/setup.sh --test`")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    import shutil

    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pidfiles = {"munged": root / "munged.pid", "slurmctld": root / "slurmctld.pid", "slurmd": root / "slurmd.pid"}

    def run(self, *cmd, check=True):
        r = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}")
        return r

    def start(self):
        import socket
        import time

        root = self.root
        root.chmod(0o755)
        (root / "state").mkdir()
        (root / "spool").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = root / "munge.sock"
        self.run(_sbin("munged"), "--force", f"--socket={sock}", f"--key-file={key}", f"--log-file={root / 'munged.log'}",
                 f"--pid-file={self.pidfiles['munged']}", f"--seed-file={root / 'munged.seed'}")
        node = self.run(_sbin("slurmd"), "-C").stdout.splitlines()[0].split()
        fields = dict(f.split("=", 1) for f in node)
        host = socket.gethostname().split(".")[0]
        cpus, mem = int(fields["CPUs"]), int(fields["RealMemory"])
        node_line = " ".join(f for f in node if not f.startswith(("NodeName=", "RealMemory=", "UpTime=")))
        self.conf.write_text("\n".join([
            "ClusterName=nnunetexttest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}", f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "ReturnToService=2", "MinJobAge=3600", "KillWait=10",
            f"DefMemPerCPU={max(256, (mem - 512) // cpus)}",
            f"NodeName={host} {node_line} RealMemory={mem - 512} State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.run(_sbin("slurmctld"))
        self.run(_sbin("slurmd"))
        t0 = time.time()
        while time.time() - t0 < 60:
            r = self.run("sinfo", "-h", "-o", "%t", check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node did not come up: {r.stdout}{r.stderr}; see {root}/slurmctld.log, slurmd.log")

    def stop(self):
        import signal
        import time

        self.run("scancel", "--user", "root", check=False)  # this private controller's jobs only
        t0 = time.time()
        while time.time() - t0 < 30 and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(self.pidfiles[name].read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node Slurm; ``.env`` has SLURM_CONF for sbatch/squeue/scancel. Also sets
    SLURM_CONF in this process for the session (the launcher calls the Slurm commands)."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
# --------------------------------------------------------------------------------------------- end Slurm
