"""``nnunet-ext jobs status|resume WORKDIR``: the state of a launcher work folder and its resumption.

State comes from the tasks' own markers (``WORKDIR/<stage>/status/<task>.started|.exit``, written by the
stage script), the tasks' ``done`` files, ``squeue`` for what is queued or running, and ``scontrol``/``sacct``
for how a job ended when it wrote no exit code (node failure, out-of-memory kill); so it works on clusters
without accounting. ``resume`` re-runs or re-submits only unfinished and failed tasks.
"""
from __future__ import annotations

import time
from pathlib import Path

from nnunet_ext.cluster.launcher import (LauncherOptions, _finished, _latest_submissions, _marker, _run,
                                         _run_local, _slurm_final_state, _squeue, _stages_of, _submit,
                                         _write_scripts, load_manifest, task_log)


def status(workdir) -> dict:
    """State of every task: ``done``, ``running``, ``pending``, ``blocked`` (its dependency failed),
    ``failed`` (with exit code or Slurm's reason and the log path) or ``not run``."""
    workdir = Path(workdir).resolve()
    manifest = load_manifest(workdir)
    latest = _latest_submissions(manifest)
    queued = _squeue({j for j, _ in latest.values()}) if manifest.get("launcher") == "slurm" else {}
    result = {"workdir": str(workdir), "launcher": manifest.get("launcher"), "stages": {}}
    for st in _stages_of(manifest):
        rows = {}
        for k, t in enumerate(st.tasks):
            row = {"log": str(task_log(workdir, st.name, t.name))}
            sub = latest.get((st.name, k))
            if sub:
                row["job"] = f"{sub[0]}_{k}"
            ex = _marker(workdir, st.name, t.name, "exit")
            started = _marker(workdir, st.name, t.name, "started")
            if _finished(workdir, st, t):
                row["state"] = "done"
            elif sub and (sub[0], k) in queued:
                state, reason = queued[(sub[0], k)]
                if state == "PENDING" and "DependencyNeverSatisfied" in reason:
                    row["state"], row["reason"] = "blocked", "an earlier stage failed (DependencyNeverSatisfied)"
                elif state in ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"):
                    row["state"], row["reason"] = "pending", reason
                else:
                    row["state"], row["reason"] = "running", state.lower()
            elif ex is not None:
                row["state"], row["reason"] = "failed", ex
            elif started is not None and manifest.get("launcher") != "slurm":
                row["state"] = "failed"
                row["reason"] = "started, no exit code: still running in another process, or that run was interrupted"
            elif started is not None:
                final = _slurm_final_state(*sub) if sub else None
                row["state"] = "failed"
                row["reason"] = ("ended without writing its exit code (node failure, SIGKILL/out of memory or "
                                 "time limit)" + (f"; Slurm: {final}" if final else ""))
            elif sub and manifest.get("launcher") == "slurm":
                final = _slurm_final_state(*sub)
                row["state"] = "failed" if final else "not run"
                row["reason"] = f"never started; Slurm: {final}" if final else "never started"
            else:
                row["state"] = "not run"
            rows[t.name] = row
        # pending behind a stage that failed or is blocked: it would wait for ever (Slurm only flags the
        # direct dependents with DependencyNeverSatisfied)
        stuck = [a for a in st.after if any(r["state"] in ("failed", "blocked") for r in result["stages"][a].values())]
        for row in rows.values():
            if stuck and row["state"] == "pending":
                row["state"], row["reason"] = "blocked", f"waits for stage {', '.join(stuck)}, which failed or is blocked"
        result["stages"][st.name] = rows
    return result


def format_status(st: dict) -> str:
    lines = [f"{st['workdir']} ({st['launcher']})"]
    for stage, rows in st["stages"].items():
        counts: dict[str, int] = {}
        for r in rows.values():
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        lines.append(f"stage {stage}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for name, r in rows.items():
            extra = f"  [{r['reason']}]" if r.get("reason") else ""
            job = f"  job {r['job']}" if r.get("job") else ""
            log = f"  log {r['log']}" if r["state"] in ("failed", "running") else ""
            lines.append(f"  {name:<28} {r['state']:<8}{job}{extra}{log}")
            if r["state"] == "failed" and r.get("log") and (last := _last_line(r["log"])):
                lines.append(f"  {'':<28} {last}")
    return "\n".join(lines)


def _last_line(log, width: int = 300) -> str:
    """The last line a failed task printed (its one-line error; the launcher's own ``=== TASK: ...`` lines
    are skipped), shortened to ``width``."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and not ln.startswith("=== ")]
    return lines[-1][:width] if lines else ""


def resume(workdir, dry_run: bool = False) -> dict:
    """Run (local) or re-submit (slurm) only the unfinished and failed tasks of ``workdir``, with the
    options it was started with; finished tasks are never run again. Slurm: running tasks are left alone
    (later stages wait for them); pending ones (some may wait behind a failed stage for ever) are cancelled
    and submitted again in the new chain. Returns ``{"launcher", "workdir", "stages"}`` like the commands that started it."""
    workdir = Path(workdir).resolve()
    manifest = load_manifest(workdir)
    stages = _stages_of(manifest)
    options = LauncherOptions(**manifest["options"])
    scripts = _write_scripts(stages, workdir, options)  # the same scripts again (also if one was deleted)
    out = {"launcher": options.launcher, "workdir": str(workdir)}
    if options.launcher == "local":
        if dry_run:
            for st in stages:
                todo = [k for k, t in enumerate(st.tasks) if not _finished(workdir, st, t)]
                print(f"[{st.name}] would run tasks {todo}" if todo else f"[{st.name}] finished")
            return {**out, "stages": {st.name: None for st in stages}}
        return {**out, "stages": _run_local(stages, workdir, options, scripts)}
    latest = _latest_submissions(manifest)
    queued = _squeue({j for j, _ in latest.values()})
    active: dict[str, set[str]] = {}
    skip: set[tuple[str, int]] = set()
    cancel = []
    # running tasks go on (later stages wait for them); pending ones are cancelled and submitted again
    # in the new chain: one of them may wait behind a failed stage, and Slurm never starts those
    for (stage, k), (job, idx) in latest.items():
        if (job, idx) not in queued:
            continue
        if queued[(job, idx)][0] == "PENDING":
            cancel.append(f"{job}_{idx}")
        else:
            active.setdefault(stage, set()).add(f"{job}_{idx}")
            skip.add((stage, k))
    if dry_run:
        for st in stages:
            todo = [k for k, t in enumerate(st.tasks) if not _finished(workdir, st, t) and (st.name, k) not in skip]
            print(f"[{st.name}] would submit tasks {todo}" if todo else f"[{st.name}] nothing to submit")
        if cancel:
            print(f"would cancel pending tasks {', '.join(cancel)} and submit them again")
        return {**out, "stages": {st.name: None for st in stages}}
    if cancel:
        r = _run(["scancel", *cancel])
        if r.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(cancel)} failed: {r.stderr.strip()}")
        print(f"cancelled pending tasks {', '.join(cancel)} (submitted again below)", flush=True)
    return {**out, "stages": _submit(manifest, stages, workdir, scripts, active, skip)}


def failed_tasks(st: dict) -> list[tuple[str, str, dict]]:
    """(stage, task, row) of every failed or blocked task in a :func:`status` result."""
    return [(stage, name, r) for stage, rows in st["stages"].items() for name, r in rows.items()
            if r["state"] in ("failed", "blocked")]


def wait(workdir, poll: float = 5.0, timeout: float | None = None) -> dict:
    """Block until no task of ``workdir`` is pending or running (blocked ones count as ended); returns
    :func:`status`."""
    t0 = time.time()
    while True:
        st = status(workdir)
        states = {r["state"] for rows in st["stages"].values() for r in rows.values()}
        if not states & {"pending", "running"}:
            return st
        if timeout is not None and time.time() - t0 > timeout:
            raise TimeoutError(f"{workdir}: tasks still pending/running after {timeout:.0f} s")
        time.sleep(poll)
