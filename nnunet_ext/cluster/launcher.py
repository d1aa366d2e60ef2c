"""Run fanned-out work (folds, raters, shards, arms) on this machine or as Slurm job arrays.

A command describes its work as ordered :class:`Stage` s of independent :class:`Task` s (one command line
each) and hands them to :func:`run_stages` with the options of :func:`add_launcher_arguments`:

* ``--launcher local`` (default): stages one after the other, tasks sequentially or ``-j N`` at once.
* ``--launcher slurm``: one job array per stage, chained with ``afterok``; returns the job ids at once.

Both run the same per-stage shell script ``WORKDIR/<stage>/<stage>.sbatch`` (plain bash plus ``#SBATCH``
lines; ``bash <script> INDEX`` runs one task without Slurm). The script itself writes the task's markers
into ``WORKDIR/<stage>/status/``: ``<task>.started`` (job id, host, time) and ``<task>.exit`` (exit code and
reason), and appends the task's output to ``WORKDIR/<stage>/logs/<task>.log``. A task is finished when its
``done`` file exists (e.g. ``fold_0/checkpoint_final.pth``), or, without one, when it exited with 0.
Finished tasks are never run again; ``nnunet-ext jobs status|resume WORKDIR`` (:mod:`nnunet_ext.cluster.jobs`)
read these markers plus ``squeue`` (and ``scontrol``/``sacct`` where the controller or accounting still
knows a job), so they work on clusters without accounting. ``WORKDIR/jobs.json`` keeps the stages and
every submission. docs/cluster.md.

Training budgets (``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERATIONS``, ``NNUNET_EXT_VAL_ITERATIONS``,
nnunet_ext.core.budget) reach a task only through its own ``env``, i.e. when the command asked for them
(``compare --epochs``, ``train --epochs``, or ``task_env(budget_from_shell=True)``, which says so). Every other
task's branch of the script unsets them, so a budget merely exported in the submitting shell (which
``sbatch`` and the local launcher would otherwise hand on) never shortens a training silently: it is dropped,
with one printed warning per command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_ext.core.safety import atomic_output, atomic_write_text

MANIFEST = "jobs.json"
LAUNCHERS = ("local", "slurm")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# variables a task inherits from the submitting shell (written into the script, so a hand re-submission
# from another shell sees the same folders); the training-budget variables only when asked for (task_env)
PASS_THROUGH_PREFIXES = ("nnUNet_", "NNUNET_EXT_")


@dataclass
class Task:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    done: str | None = None


@dataclass
class Stage:
    name: str
    tasks: list[Task]
    after: list[str] = field(default_factory=list)


@dataclass
class LauncherOptions:
    launcher: str = "local"
    jobs: int = 1
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    dry_run: bool = False

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if int(self.jobs) < 1:
            raise ValueError(f"-j/--jobs must be >= 1, got {self.jobs}")
        for k in ("gpus_per_task", "cpus_per_task"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
        if self.launcher == "local":
            given = [k for k in ("partition", "mem", "time") if getattr(self, k)] + (["sbatch_arg"] if self.sbatch_args else [])
            if given:
                raise NotImplementedError(f"--{', --'.join(g.replace('_', '-') for g in given)} only apply to --launcher slurm")


# ---------------------------------------------------------------------------------------------- CLI


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher options shared by every command that fans out."""
    g = parser.add_argument_group("launcher (docs/cluster.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: on this machine (default); slurm: one job array per stage, chained with afterok")
    g.add_argument("-j", "--jobs", type=int, default=1, help="local launcher: tasks run at once (default 1)")
    g.add_argument("--partition", default=None, help="slurm: partition (sbatch --partition)")
    g.add_argument("--gpus-per-task", type=int, default=None, help="GPUs per task (slurm: --gpus-per-task; "
                                                                   "local: CUDA_VISIBLE_DEVICES per slot)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task; also sets OMP/MKL/OpenBLAS threads and nnUNet_def_n_proc/nnUNet_n_proc_DA")
    g.add_argument("--mem", default=None, help="slurm: memory per task, e.g. 32G (sbatch --mem)")
    g.add_argument("--time", default=None, help="slurm: time limit per task, e.g. 1-00:00:00 (sbatch --time)")
    g.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args", metavar="ARG",
                   help="extra sbatch option written into every script; use the = form: --sbatch-arg=--qos=long (repeatable)")
    g.add_argument("--dry-run", action="store_true", help="write and print the scripts, run/submit nothing")


def launcher_options(args: argparse.Namespace) -> LauncherOptions:
    return LauncherOptions(launcher=args.launcher, jobs=args.jobs, partition=args.partition,
                           gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task, mem=args.mem,
                           time=args.time, sbatch_args=list(args.sbatch_args or []), dry_run=args.dry_run)


def task_env(extra: dict[str, str] | None = None, budget_from_shell: bool = False) -> dict[str, str]:
    """The submitting shell's ``nnUNet_*`` and ``NNUNET_EXT_*`` variables plus ``extra``: what a task needs
    to see nnU-Net's folders and our trainers wherever and whenever it runs. The training-budget variables
    (nnunet_ext.core.budget) of the shell are included only with ``budget_from_shell`` (a command whose
    documented budget is the shell's, e.g. ``consensus train``), and then printed; a budget in ``extra`` is
    the command's own."""
    from nnunet_ext.core.budget import BUDGET_VARIABLES, budget_in

    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_THROUGH_PREFIXES) and k not in BUDGET_VARIABLES}
    shell = budget_in()
    if budget_from_shell and shell:
        env.update(shell)
        print("training budget from this shell, passed to the jobs: "
              + " ".join(f"{k}={v}" for k, v in shell.items()), flush=True)
    env.update(extra or {})
    return env


def _budget_lines(t: Task) -> list[str]:
    """The ``unset`` line of a task's script branch: the budget variables the task did not ask for."""
    from nnunet_ext.core.budget import BUDGET_VARIABLES

    drop = [k for k in BUDGET_VARIABLES if k not in t.env]
    return [f"  unset {' '.join(drop)}  # training budget: only what the command asked for"] if drop else []


def warn_dropped_budget(stages: list[Stage], environ=None) -> list[str]:
    """Print one warning when budget variables of the submitting shell are kept from tasks that did not ask
    for them (their script branches unset them); returns those variable names."""
    import sys

    from nnunet_ext.core.budget import budget_in

    shell = budget_in(environ)
    dropped = [k for k in shell if any(k not in t.env for st in stages for t in st.tasks)]
    if dropped:
        print(f"warning: {' '.join(f'{k}={shell[k]}' for k in dropped)} is set in this shell but this command did "
              f"not ask for a training budget: its jobs run without it (use the command's budget options, e.g. "
              f"--epochs, to shorten training)", file=sys.stderr, flush=True)
    return dropped


# ---------------------------------------------------------------------------------------------- scripts


def _validate(stages: list[Stage]) -> None:
    seen: set[str] = set()
    if not stages:
        raise ValueError("no stages to run")
    for st in stages:
        if not _NAME.match(st.name):
            raise ValueError(f"stage name {st.name!r} must match [A-Za-z0-9_.-]+")
        if st.name in seen:
            raise ValueError(f"stage {st.name!r} appears twice")
        for a in st.after:
            if a not in seen:
                raise ValueError(f"stage {st.name!r} depends on {a!r}, which is not an earlier stage")
        seen.add(st.name)
        if not st.tasks:
            raise ValueError(f"stage {st.name!r} has no tasks")
        names = [t.name for t in st.tasks]
        for t in st.tasks:
            if not _NAME.match(t.name):
                raise ValueError(f"task name {t.name!r} (stage {st.name}) must match [A-Za-z0-9_.-]+")
            if not t.argv:
                raise ValueError(f"task {t.name} (stage {st.name}) has no command")
            for k in t.env:
                if not _ENV_NAME.match(k):
                    raise ValueError(f"task {t.name}: {k!r} is not a valid environment variable name")
        if len(set(names)) != len(names):
            raise ValueError(f"stage {st.name!r} has duplicate task names")


def _q(s) -> str:
    return shlex.quote(str(s))


def _sbatch_lines(stage: Stage, sdir: Path, o: LauncherOptions) -> list[str]:
    lines = [f"#SBATCH --job-name=nnx_{stage.name}", f"#SBATCH --output={sdir}/logs/slurm_%A_%a.out",
             "#SBATCH --ntasks=1"]
    if o.partition:
        lines.append(f"#SBATCH --partition={o.partition}")
    if o.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={o.cpus_per_task}")
    if o.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={o.gpus_per_task}")
    if o.mem:
        lines.append(f"#SBATCH --mem={o.mem}")
    if o.time:
        lines.append(f"#SBATCH --time={o.time}")
    for a in o.sbatch_args:
        if any(c in a for c in "\n\r"):
            raise ValueError(f"--sbatch-arg {a!r} contains a line break")
        lines.append(f"#SBATCH {a}")
    return lines


def stage_script(stage: Stage, workdir: Path, options: LauncherOptions) -> str:
    """The bash script of one stage: ``#SBATCH`` lines, one ``case`` branch per task (its environment and
    command), then the shared part that skips finished tasks, writes the markers and the log."""
    sdir = Path(workdir).resolve() / stage.name
    n = len(stage.tasks)
    out = ["#!/bin/bash",
           f"# nnunet-ext stage '{stage.name}': {n} task(s), one per Slurm array index (0-{n - 1}).",
           f"# Submitted by nnunet-ext as:  sbatch --array=<unfinished indices> "
           f"{'--dependency=afterok:<job ids of ' + ', '.join(stage.after) + '> ' if stage.after else ''}{sdir / (stage.name + '.sbatch')}",
           f"# Re-submit by hand:           sbatch --array=0-{n - 1} {sdir / (stage.name + '.sbatch')}   (finished tasks exit at once)",
           f"# Without Slurm (or LSF/PBS):  bash {sdir / (stage.name + '.sbatch')} INDEX",
           f"# Markers: {sdir}/status/<task>.started|.exit   Logs: {sdir}/logs/<task>.log",
           *_sbatch_lines(stage, sdir, options),
           "set -u",
           'i="${SLURM_ARRAY_TASK_ID:-${1:-}}"',
           'if [ -z "$i" ]; then echo "usage: bash $0 TASK_INDEX (or submit with sbatch --array)" >&2; exit 2; fi',
           f"STAGE_DIR={_q(sdir)}",
           'DONE=""',
           'case "$i" in']
    for k, t in enumerate(stage.tasks):
        out.append(f"{k})")
        out.append(f"  TASK={_q(t.name)}")
        if t.done:
            out.append(f"  DONE={_q(Path(t.done).resolve())}")
        for key, val in sorted(t.env.items()):
            out.append(f"  export {key}={_q(val)}")
        out += _budget_lines(t)
        out.append("  CMD=(" + " ".join(_q(a) for a in t.argv) + ")")
        out.append("  ;;")
    out += ['*) echo "stage ' + stage.name + ': no task with index $i" >&2; exit 2 ;;', "esac", ""]
    out += [
        "# threads and nnU-Net worker processes from the CPUs of this task (unless the task sets them)",
        'N="${SLURM_CPUS_PER_TASK:-${NNUNET_EXT_TASK_CPUS:-1}}"',
        'export OMP_NUM_THREADS="$N" MKL_NUM_THREADS="$N" OPENBLAS_NUM_THREADS="$N"',
        'export nnUNet_def_n_proc="${nnUNet_def_n_proc:-$N}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-$N}"',
        "export PYTHONUNBUFFERED=1  # the log shows progress as it happens",
        'ST="$STAGE_DIR/status"; LOG="$STAGE_DIR/logs/$TASK.log"',
        'mkdir -p "$ST" "$STAGE_DIR/logs"',
        'if [ -n "$DONE" ] && [ -e "$DONE" ]; then echo "$TASK: finished already ($DONE)"; exit 0; fi',
        'if [ -z "$DONE" ] && [ "$(cut -d" " -f1 "$ST/$TASK.exit" 2>/dev/null)" = "0" ]; then '
        'echo "$TASK: finished already"; exit 0; fi',
        'rm -f "$ST/$TASK.exit"',
        'echo "job=${SLURM_JOB_ID:-local} array_job=${SLURM_ARRAY_JOB_ID:-} index=$i host=$(hostname) '
        'start=$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$ST/$TASK.started"',
        'JOB="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"',
        '{ echo "=== $TASK: start $(date -u +%Y-%m-%dT%H:%M:%SZ), job ${JOB:-${SLURM_JOB_ID:-local}}, host $(hostname), '
        'threads $N"; printf "$"; printf " %q" "${CMD[@]}"; echo; } >> "$LOG"',
        'mark() { echo "$1" > "$ST/.$TASK.exit.tmp" && mv -f "$ST/.$TASK.exit.tmp" "$ST/$TASK.exit"; }',
        "trap 'kill -TERM ${pid:-0} 2>/dev/null; wait ${pid:-0}; mark \"143 terminated by SIGTERM (scancel, time limit or "
        "preemption)\"; echo \"=== $TASK: terminated by SIGTERM\" >> \"$LOG\"; exit 143' TERM",
        '"${CMD[@]}" >> "$LOG" 2>&1 < /dev/null &',
        "pid=$!",
        "wait $pid",
        "rc=$?",
        'if [ "$rc" -eq 0 ] && [ -n "$DONE" ] && [ ! -e "$DONE" ]; then rc=3; mark "3 exited 0 but $DONE is missing"; '
        'elif [ "$rc" -eq 0 ]; then mark "0 ok"; '
        'elif [ "$rc" -eq 137 ]; then mark "137 killed by SIGKILL (out of memory?)"; '
        'else mark "$rc exit code $rc"; fi',
        'echo "=== $TASK: end $(date -u +%Y-%m-%dT%H:%M:%SZ), exit $rc" >> "$LOG"',
        'exit "$rc"', ""]
    return "\n".join(out)


def _write_scripts(stages: list[Stage], workdir: Path, options: LauncherOptions) -> dict[str, Path]:
    paths = {}
    for st in stages:
        sdir = workdir / st.name
        (sdir / "logs").mkdir(parents=True, exist_ok=True)
        (sdir / "status").mkdir(exist_ok=True)
        p = sdir / f"{st.name}.sbatch"
        with atomic_output(p) as tmp:
            tmp.write_text(stage_script(st, workdir, options))
            tmp.chmod(0o755)
        paths[st.name] = p
    return paths


def _save_manifest(workdir: Path, manifest: dict) -> None:
    atomic_write_text(workdir / MANIFEST, json.dumps(manifest, indent=1))


def load_manifest(workdir) -> dict:
    f = Path(workdir) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {workdir} is not a work folder written by nnunet-ext")
    from nnunet_ext.core.checks import read_json_named

    manifest = read_json_named(f, "launcher manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list):
        raise ValueError(f"{f}: damaged launcher manifest (no list of stages); restore it or delete the work "
                         f"folder and run the command that wrote it again")
    return manifest


def _stages_of(manifest: dict) -> list[Stage]:
    return [Stage(s["name"], [Task(**t) for t in s["tasks"]], list(s["after"])) for s in manifest["stages"]]


# ---------------------------------------------------------------------------------------------- state


def _marker(workdir: Path, stage: str, task: str, kind: str) -> str | None:
    p = workdir / stage / "status" / f"{task}.{kind}"
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        return None


def task_log(workdir, stage: str, task: str) -> Path:
    return Path(workdir).resolve() / stage / "logs" / f"{task}.log"


def _finished(workdir: Path, stage: Stage, t: Task) -> bool:
    if t.done:
        return Path(t.done).exists()
    ex = _marker(workdir, stage.name, t.name, "exit")
    return ex is not None and ex.split()[0] == "0"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _squeue(job_ids: set[str]) -> dict[tuple[str, int], tuple[str, str]]:
    """{(array job id, index): (state, reason)} for our jobs still known to squeue."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    r = _run(["squeue", "-h", "-r", "-o", "%F|%K|%T|%r"])
    if r.returncode != 0:
        raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] in job_ids and parts[1].isdigit():
            out[(parts[0], int(parts[1]))] = (parts[2], parts[3])
    return out


def _slurm_final_state(job: str, index: int) -> str | None:
    """State of a finished array element from the controller (``scontrol``, while it remembers the job)
    or from accounting (``sacct``), whichever answers; ``None`` when neither does."""
    if shutil.which("scontrol"):
        r = _run(["scontrol", "show", "job", "-o", f"{job}_{index}"])
        m = re.search(r"JobState=(\S+)", r.stdout) if r.returncode == 0 else None
        if m:
            reason = re.search(r"Reason=(\S+)", r.stdout)
            return m.group(1) + (f" ({reason.group(1)})" if reason and reason.group(1) != "None" else "")
    if shutil.which("sacct"):
        r = _run(["sacct", "-n", "-X", "-P", "-j", f"{job}_{index}", "-o", "State"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0]
    return None


def _latest_submissions(manifest: dict) -> dict[tuple[str, int], tuple[str, int]]:
    """(stage, task index) -> (array job id, index) of the task's most recent submission."""
    latest = {}
    for sub in manifest.get("submissions", []):
        for k in sub["indices"]:
            latest[(sub["stage"], k)] = (sub["job_id"], k)
    return latest


# ---------------------------------------------------------------------------------------------- running


def run_stages(stages: list[Stage], workdir: Path, options: LauncherOptions) -> dict:
    """Run (local) or submit (slurm) ``stages``; finished tasks are skipped.

    local: returns ``{stage: {"ran": [...], "skipped": [...]}}`` when everything succeeded; a failed task
    does not stop the other tasks of its stage, but the later stages are not started and a RuntimeError
    names every failed task and its log. slurm: returns ``{stage: job_id}`` (``None`` for a stage with
    nothing left to do, or for every stage with ``dry_run``) right after submission."""
    _validate(stages)
    warn_dropped_budget(stages)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    old = None
    if (workdir / MANIFEST).is_file():
        old = load_manifest(workdir)
        if not options.dry_run:
            _refuse_if_active(workdir, old)
    scripts = _write_scripts(stages, workdir, options)
    manifest = {"version": 1, "launcher": options.launcher, "options": asdict(options), "created": _now(),
                "stages": [{"name": s.name, "after": s.after, "script": str(scripts[s.name]),
                            "tasks": [asdict(t) for t in s.tasks]} for s in stages],
                "submissions": (old or {}).get("submissions", []) if old and old.get("launcher") == options.launcher
                else []}
    if options.dry_run:
        if old is None:  # so that `jobs status` reads the markers of tasks run by hand (LSF, PBS, bash)
            _save_manifest(workdir, manifest)
        for s in stages:
            print(f"# ---- {scripts[s.name]}")
            print(scripts[s.name].read_text())
        waits: dict[str, list[str]] = {}  # stage -> the submitted stages its dependents wait for
        for s in stages:
            todo = [k for k, t in enumerate(s.tasks) if not _finished(workdir, s, t)]
            deps = sorted({d for a in s.after for d in waits[a]}, key=[x.name for x in stages].index)
            dep = f" --dependency=afterok:{':'.join('$JOB_' + a for a in deps)}" if deps else ""
            waits[s.name] = [s.name] if todo else deps
            if options.launcher == "slurm":
                print(f"# would run: JOB_{s.name}=$(sbatch --parsable --array={_ranges(todo)}{dep} {scripts[s.name]})"
                      if todo else f"# stage {s.name}: every task finished already")
            else:
                print(f"# would run: for i in {' '.join(map(str, todo))}; do bash {scripts[s.name]} $i; done"
                      if todo else f"# stage {s.name}: every task finished already")
        return {s.name: None for s in stages}
    _save_manifest(workdir, manifest)
    if options.launcher == "local":
        return _run_local(stages, workdir, options, scripts)
    return _submit(manifest, stages, workdir, scripts, active={})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _ranges(idx: list[int]) -> str:
    """0,1,2,5 -> '0-2,5' (sbatch --array syntax)."""
    out, k = [], 0
    while k < len(idx):
        j = k
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[k]) if j == k else f"{idx[k]}-{idx[j]}")
        k = j + 1
    return ",".join(out)


def _refuse_if_active(workdir: Path, manifest: dict) -> None:
    if manifest.get("launcher") != "slurm":
        return
    latest = _latest_submissions(manifest)
    queued = _squeue({j for j, _ in latest.values()})
    live = sorted({f"{j}_{k}" for (j, k) in queued})
    if live:
        raise RuntimeError(f"jobs of {workdir} are still queued or running ({', '.join(live[:8])}"
                           f"{' ...' if len(live) > 8 else ''}): wait, `nnunet-ext jobs status {workdir}`, or "
                           f"scancel them first")


def _run_local(stages: list[Stage], workdir: Path, options: LauncherOptions, scripts: dict[str, Path]) -> dict:
    jobs = int(options.jobs)
    cpus = options.cpus_per_task or max(1, (os.cpu_count() or 1) // jobs)
    slots = list(range(jobs))
    lock = threading.Lock()
    result = {}
    from nnunet_ext.core import guard

    running: set = set()  # the tasks' guard processes (each the leader of its task's process group)
    stopping = threading.Event()
    for st in stages:
        todo = [(k, t) for k, t in enumerate(st.tasks) if not _finished(workdir, st, t)]
        skipped = [t.name for t in st.tasks if _finished(workdir, st, t)]
        for name in skipped:
            print(f"[{st.name}] {name}: finished already", flush=True)

        def one(item):
            k, t = item
            with lock:
                slot = slots.pop(0)
            try:
                env = dict(os.environ)
                env["NNUNET_EXT_TASK_CPUS"] = str(cpus)
                env.pop("SLURM_ARRAY_TASK_ID", None)
                if options.gpus_per_task:
                    g = int(options.gpus_per_task)
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * g + d) for d in range(g))
                print(f"[{st.name}] {t.name}: running (log {task_log(workdir, st.name, t.name)})", flush=True)
                t0 = time.time()
                # under the guard (nnunet_ext.core.guard): the task and every process it starts end with this
                # command, also when it is killed with SIGKILL
                with lock:
                    if stopping.is_set():
                        return t.name, False
                    proc = guard.popen(["bash", str(scripts[st.name]), str(k)], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
                    running.add(proc)
                try:
                    proc.communicate()
                finally:
                    with lock:
                        running.discard(proc)
                ok = proc.returncode == 0 and _finished(workdir, st, t)
                if not stopping.is_set():
                    print(f"[{st.name}] {t.name}: {'done' if ok else f'FAILED (exit {proc.returncode})'} "
                          f"({time.time() - t0:.0f} s)", flush=True)
                return t.name, ok
            finally:
                with lock:
                    slots.append(slot)

        with ThreadPoolExecutor(max(1, min(jobs, len(todo) or 1))) as ex:
            try:
                outcome = list(ex.map(one, todo))
            except BaseException:  # Ctrl-C, SIGTERM: end the running tasks (else leaving the pool waits for them)
                with lock:
                    stopping.set()
                    for proc in running:
                        guard.stop(proc)
                raise
        failed = [n for n, ok in outcome if not ok]
        result[st.name] = {"ran": [n for n, _ in outcome], "skipped": skipped}
        if failed:
            msgs = [f"{n} ({_marker(workdir, st.name, n, 'exit') or 'no exit code'}; log: "
                    f"{task_log(workdir, st.name, n)})" for n in failed]
            later = [s.name for s in stages[stages.index(st) + 1:]]
            raise RuntimeError(f"stage {st.name}: {len(failed)} task(s) failed: {'; '.join(msgs)}. Finished tasks are "
                               f"kept; {'stages ' + ', '.join(later) + ' not started; ' if later else ''}"
                               f"`nnunet-ext jobs resume {workdir}` re-runs only what is unfinished")
    return result


def _sbatch(script: Path, indices: list[int], dependency: list[str]) -> str:
    cmd = ["sbatch", "--parsable", f"--array={_ranges(indices)}"]
    if dependency:
        cmd.append("--dependency=afterok:" + ":".join(dependency))
    cmd.append(str(script))
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found: --launcher slurm needs the Slurm client commands on PATH")
    r = _run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]


def _submit(manifest: dict, stages: list[Stage], workdir: Path, scripts: dict[str, Path],
            active: dict[str, set[str]], skip: set[tuple[str, int]] = frozenset()) -> dict:
    """Submit the unfinished tasks of every stage as one array each; ``active`` maps a stage to the array
    elements (``<job>_<index>``) of it still running (resume): later stages wait for exactly those, not for
    their whole array, which may hold the failed element; ``skip`` holds (stage, index) pairs still running."""
    ids: dict[str, str | None] = {}
    deps_of: dict[str, set[str]] = {}
    for st in stages:
        todo = [k for k, t in enumerate(st.tasks) if not _finished(workdir, st, t) and (st.name, k) not in skip]
        dep = sorted({j for a in st.after for j in deps_of.get(a, set())},
                     key=lambda j: tuple(int(x) for x in j.split("_")))
        mine = set(active.get(st.name, set()))
        if todo:
            job = _sbatch(scripts[st.name], todo, dep)
            ids[st.name] = job
            mine.add(job)
            manifest.setdefault("submissions", []).append({"stage": st.name, "job_id": job, "indices": todo,
                                                           "dependency": dep, "time": _now()})
            _save_manifest(workdir, manifest)
            print(f"[{st.name}] job array {job}: tasks {_ranges(todo)} of {len(st.tasks)}"
                  f"{' after ' + ','.join(dep) if dep else ''}", flush=True)
        else:
            ids[st.name] = None
            print(f"[{st.name}] nothing to submit ({'finished' if not mine else 'still queued: ' + ','.join(sorted(mine))})",
                  flush=True)
            mine |= set(dep)  # whoever waits for this stage waits for what it would have waited for
        deps_of[st.name] = mine
    return ids
