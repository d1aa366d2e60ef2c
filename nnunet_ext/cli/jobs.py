"""``nnunet-ext jobs``: the state of a launcher work folder (local or Slurm); resume its unfinished tasks."""
from __future__ import annotations

from nnunet_ext.cli import options

COMMANDS = ("jobs",)


def register(sub) -> None:
    p = options.verb(sub, "jobs", "state of a launcher work folder (local or Slurm); resume its unfinished tasks", [
        "nnunet-ext jobs status WORKDIR          # done / running / pending / failed (+ log)",
        "nnunet-ext jobs status WORKDIR --wait   # until nothing is pending or running",
        "nnunet-ext jobs resume WORKDIR          # re-run/re-submit only unfinished or failed tasks"],
        note="See docs/cluster.md.")
    p.add_argument("action", choices=("status", "resume"), help="status: print the tasks' states; resume: run or "
                                                                "submit the unfinished ones again")
    p.add_argument("workdir", help="the work folder a command printed (it holds jobs.json)")
    p.add_argument("--wait", action="store_true", help="status: poll until no task is pending or running")
    p.add_argument("--dry-run", action="store_true", help="resume: print what would be run/submitted")


def run(args) -> int:
    from nnunet_ext.cli.common import print_launched
    from nnunet_ext.cluster import jobs

    if args.action == "status":
        st = jobs.wait(workdir=args.workdir) if args.wait else jobs.status(workdir=args.workdir)
        print(jobs.format_status(st))
        return 1 if jobs.failed_tasks(st) else 0
    print_launched(jobs.resume(workdir=args.workdir, dry_run=args.dry_run))
    return 0
