"""``nnunet-ext train``: nnU-Net's own ``nnUNetv2_train`` for every (configuration, trainer, fold), through the
launcher (nnunet_ext.cluster.launcher): one after the other or ``-j N`` at once on this machine, or one Slurm
job array per stage; ``nnunet-ext jobs status|resume`` follow and resume it.

* Every task is ``nnUNetv2_train D C FOLD -tr T -p P -device DEV --c``: nnU-Net continues from
  ``checkpoint_latest.pth`` where an interrupted run left one (and only validates where
  ``checkpoint_final.pth`` exists without a validation), and starts afresh where there is no checkpoint (it
  prints a one-line warning then). A fold is finished when ``fold_F/validation/summary.json`` exists (the
  last file nnU-Net writes for a fold); finished folds are never run again.
* Cascade configurations (``3d_cascade_fullres``: a ``previous_stage`` in the plans) train after every fold
  of their previous stage (a second stage, ``afterok`` on Slurm), since each of their folds reads the
  previous stage's validation predictions of all folds.
* ``then_find_best``: ``nnUNetv2_find_best_configuration`` over the trained models and folds after the last
  fold (a job that depends on the training arrays on Slurm; at the end locally). Ensembling of several
  models needs nnU-Net's validation probabilities (``npz``); without them it runs with
  ``--disable_ensembling``.
* A training budget (``epochs``, ``iterations``, ``val_iterations``: nnunet_ext.core.budget) goes into the
  jobs only when given here; a budget merely exported in the shell is kept out of them (the launcher warns).
* Before any script is written: nnU-Net's folders, the dataset, its plans and preprocessed data for every
  configuration, and every trainer name (nnU-Net's own lookup) are checked; a missing cross-validation
  split is written once (nnU-Net's default 5-fold split, what ``nnUNetv2_train`` would write), so folds
  starting at the same time never race to write it.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("cuda", "cpu", "mps")
FIND_BEST = "nnUNetv2_find_best_configuration"


@dataclass
class TrainOptions:
    """What ``nnunet-ext train`` trains: ``nnUNetv2_train``'s arguments, several of each, plus the launcher."""

    dataset: str
    configurations: list[str]
    trainers: list[str]
    folds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    npz: bool = False
    then_find_best: bool = False
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    workdir: str | None = None
    launcher: object = None  # nnunet_ext.cluster.launcher.LauncherOptions (default: local, one at a time)

    def __post_init__(self):
        from nnunet_ext.core.checks import model_name

        self.dataset = str(self.dataset)
        self.configurations = [str(c) for c in self.configurations]
        self.trainers = [str(t) for t in self.trainers]
        for option, values in (("-c", self.configurations), ("-tr", self.trainers), ("-f", self.folds)):
            if not values:
                raise ValueError(f"{option}: give at least one")
            dup = sorted({str(v) for v in values if list(map(str, values)).count(str(v)) > 1})
            if dup:
                raise ValueError(f"{option}: {' '.join(dup)} given twice")
        for c in self.configurations:
            for t in self.trainers:
                model_name(t, self.plans, c)  # plain names, never paths
        folds = []
        for f in self.folds:
            if str(f) == "all":
                folds.append("all")
            elif str(f).isdigit():
                folds.append(int(f))
            else:
                raise ValueError(f"-f {f}: a fold is a number (0, 1, ...) or 'all'")
        self.folds = folds
        if self.then_find_best and "all" in self.folds:
            raise NotImplementedError("--then-find-best with fold 'all': nnU-Net's find_best_configuration "
                                      "compares cross-validation folds (0 1 2 ...), which fold 'all' does not have")
        if self.device not in DEVICES:
            raise ValueError(f"-device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for option, v in (("--epochs", self.epochs), ("--iterations", self.iterations),
                          ("--val-iterations", self.val_iterations)):
            if v is not None and (isinstance(v, bool) or int(v) != v or int(v) < 1):
                raise ValueError(f"{option} must be a positive integer, got {v!r}")

    def budget(self) -> dict[str, str]:
        """The budget variables this command passes to its jobs (only those given)."""
        return {var: str(int(v)) for var, v in (("NNUNET_EXT_NUM_EPOCHS", self.epochs),
                                                ("NNUNET_EXT_ITERATIONS", self.iterations),
                                                ("NNUNET_EXT_VAL_ITERATIONS", self.val_iterations)) if v is not None}

    def key(self) -> str:
        """A short digest of what is trained (the default work folder's name)."""
        what = [sorted(self.configurations), sorted(self.trainers), sorted(map(str, self.folds)), self.plans,
                self.device, self.npz, self.then_find_best, self.budget()]
        return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- checks


def _plans(opts: TrainOptions) -> tuple[str, dict]:
    """(dataset folder name, plans) after checking the plans file, each configuration and its preprocessed data."""
    from nnunet_ext.core.checks import check_configuration, read_json_named
    from nnunet_ext.nnunet_adapter import dataset_name, env_folder

    env_folder("nnUNet_results")
    name = dataset_name(opts.dataset)
    pre = env_folder("nnUNet_preprocessed") / name
    plans_file = pre / f"{opts.plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {opts.dataset} -c "
                                f"{' '.join(opts.configurations)} first")
    plans = read_json_named(plans_file, "nnU-Net plans")
    for c in opts.configurations:
        check_configuration(plans_file, c)
        ident = _configuration(plans, c).get("data_identifier", f"{opts.plans}_{c}")
        if not (pre / ident).is_dir():
            raise FileNotFoundError(f"-c {c}: {pre / ident} not found: run nnUNetv2_plan_and_preprocess -d "
                                    f"{opts.dataset} -c {c} first")
    return name, plans


def _configuration(plans: dict, c: str) -> dict:
    """A configuration of the plans with nnU-Net's ``inherits_from`` resolved (only the keys read here)."""
    conf = dict(plans["configurations"][c])
    seen = {c}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in plans["configurations"]:
            break
        seen.add(parent)
        conf = {**plans["configurations"][parent], **conf}
    return conf


def check_trainers(opts: TrainOptions, lookup=None) -> dict:
    """nnU-Net's own lookup of every ``-tr`` name (``lookup``, default nnunet_adapter.lookup_trainers: one
    child process); ValueError naming the unknown ones, NotImplementedError when a budget is given and a
    trainer ignores it. Returns the lookup."""
    from nnunet_ext.core.paths import nnunet_env
    from nnunet_ext.nnunet_adapter import lookup_trainers

    env = nnunet_env(None)
    found = (lookup or lookup_trainers)(opts.trainers, env)
    unknown = [t for t in opts.trainers if not found.get(t, {}).get("found")]
    if unknown:
        raise ValueError(f"-tr {' '.join(unknown)}: no trainer of that name (nnU-Net's lookup: its own trainers, then "
                         f"nnUNet_extTrainer={env['nnUNet_extTrainer']}); check the spelling")
    if opts.budget():
        deaf = [t for t in opts.trainers if not found[t]["honours_budget"]]
        if deaf:
            raise NotImplementedError(f"-tr {' '.join(deaf)} with --epochs/--iterations/--val-iterations: nnU-Net's own "
                                      f"trainers ignore the budget variables; use ExtBaselineTrainer (nnU-Net's default "
                                      f"trainer + the budget) or drop the budget")
    return found


def _write_split_once(opts: TrainOptions, name: str, plans: dict) -> str | None:
    """Write nnU-Net's default 5-fold split (seed 12345) when the dataset has none and numbered folds are
    trained; returns a note, or None when nothing was written."""
    from nnunet_ext.core.safety import atomic_write_text
    from nnunet_ext.nnunet_adapter import crossval_splits, env_folder, preprocessed_identifiers

    numbered = [f for f in opts.folds if f != "all"]
    pre = env_folder("nnUNet_preprocessed") / name
    split_file = pre / "splits_final.json"
    if not numbered or split_file.is_file() or max(numbered) >= 5:  # nnU-Net makes its own random split then
        return None
    c = opts.configurations[0]
    ids = preprocessed_identifiers(pre / _configuration(plans, c).get("data_identifier", f"{opts.plans}_{c}"))
    if len(ids) < 5:
        return None  # nnU-Net's own error will name the problem
    atomic_write_text(split_file, json.dumps(crossval_splits(ids, n_folds=5, seed=12345), indent=4))
    return f"wrote nnU-Net's default 5-fold split (seed 12345) to {split_file}"


# ---------------------------------------------------------------------------------------------- stages


def fold_state(fold_dir: Path) -> str:
    """``finished`` (validation/summary.json), ``validate`` (checkpoint_final.pth, no validation yet),
    ``continue`` (checkpoint_latest.pth), or ``new``."""
    if (fold_dir / "validation" / "summary.json").is_file():
        return "finished"
    if (fold_dir / "checkpoint_final.pth").is_file():
        return "validate"
    if (fold_dir / "checkpoint_latest.pth").is_file():
        return "continue"
    return "new"


def _model_dir(results: Path, name: str, trainer: str, plans: str, configuration: str) -> Path:
    return results / name / f"{trainer}__{plans}__{configuration}"


def train_stages(opts: TrainOptions, name: str, plans: dict, results: Path, env: dict) -> tuple[list, dict]:
    """(launcher stages, {task name: fold state}): ``train`` (and ``train_cascade`` for cascade
    configurations whose previous stage is trained here too), then ``find_best`` when asked for."""
    from nnunet_ext.cluster.launcher import Stage, Task
    from nnunet_ext.core.paths import nnunet_command

    train_cmd = nnunet_command("nnUNetv2_train")
    first, second, states = [], [], {}
    for c in opts.configurations:
        prev = _configuration(plans, c).get("previous_stage")
        later = prev is not None and prev in opts.configurations
        if prev is not None and not later:
            for t in opts.trainers:
                need = _model_dir(results, name, t, opts.plans, prev) / "predicted_next_stage" / c
                if not need.is_dir():
                    raise FileNotFoundError(f"-c {c} trains on the {prev} predictions of every fold, and {need} does "
                                            f"not exist: add -c {prev} (trained first), or train {prev} with -tr {t}")
        for t in opts.trainers:
            for f in opts.folds:
                fold_dir = _model_dir(results, name, t, opts.plans, c) / f"fold_{f}"
                final = fold_dir / "checkpoint_final.pth"
                if final.is_file() and not zipfile.is_zipfile(final):
                    final.unlink()  # cut off while being saved (a kill): nnU-Net's --c would fail to load it
                task = Task(f"{c}_{t}_fold{f}",
                            [train_cmd, name, c, str(f), "-tr", t, "-p", opts.plans, "-device", opts.device, "--c"]
                            + (["--npz"] if opts.npz else []), dict(env),
                            done=str(fold_dir / "validation" / "summary.json"))
                states[task.name] = fold_state(fold_dir)
                (second if later else first).append(task)
    stages = []
    if first:
        stages.append(Stage("train", first))
    if second:
        stages.append(Stage("train_cascade", second, ["train"] if first else []))
    if opts.then_find_best:
        models = len(opts.configurations) * len(opts.trainers)
        argv = [nnunet_command(FIND_BEST), name, "-c", *opts.configurations, "-tr", *opts.trainers, "-p", opts.plans,
                "-f", *map(str, opts.folds)]
        if models > 1 and not opts.npz:
            argv.append("--disable_ensembling")  # ensembles need the folds' validation probabilities (--npz)
        stages.append(Stage("find_best", [Task("find_best", argv, dict(env))], [s.name for s in stages]))
    return stages, states


def default_workdir(name: str, opts: TrainOptions) -> Path:
    """``$nnUNet_results/nnunet_ext_jobs/<dataset>/train_<digest>``: one work folder per set of models,
    folds and budget, so a finished ``find_best`` of another set is never taken for this one's."""
    from nnunet_ext.nnunet_adapter import env_folder

    return env_folder("nnUNet_results") / "nnunet_ext_jobs" / name / f"train_{opts.key()}"


STATE_TEXT = {"new": "to train", "continue": "continues from checkpoint_latest.pth (--c)",
              "validate": "checkpoint_final.pth without validation: validates (--c)", "finished": "finished, skipped"}


def train(opts: TrainOptions, lookup=None) -> dict:
    """Check everything, then train every (configuration, trainer, fold) through the launcher (module
    docstring). Returns ``{"launcher", "workdir", "stages" (run_stages' result: job ids on Slurm),
    "folds" ({task: state before this run}), "notes"}``."""
    from nnunet_ext.cluster.launcher import LauncherOptions, run_stages, task_env
    from nnunet_ext.core.checks import check_writable_folder
    from nnunet_ext.core.paths import nnunet_env
    from nnunet_ext.nnunet_adapter import NNUNET_FOLDERS, env_folder

    options = opts.launcher or LauncherOptions()
    name, plans = _plans(opts)
    results = env_folder("nnUNet_results")
    workdir = Path(opts.workdir) if opts.workdir else default_workdir(name, opts)
    check_writable_folder(workdir, "--workdir")
    check_trainers(opts, lookup)  # before any script is written
    # nnU-Net's folders and our trainers, absolute, written into the scripts; the budget only when given
    env = task_env({k: v for k, v in nnunet_env(None).items() if k in NNUNET_FOLDERS + ("nnUNet_extTrainer",)})
    env.update(opts.budget())
    notes = []
    if not options.dry_run:
        note = _write_split_once(opts, name, plans)
        if note:
            notes.append(note)
            print(note, flush=True)
    stages, states = train_stages(opts, name, plans, results, env)
    for task, state in states.items():
        print(f"  {task}: {STATE_TEXT[state]}", flush=True)
    if opts.budget():
        print("training budget passed to the jobs: " + " ".join(f"{k}={v}" for k, v in opts.budget().items()),
              flush=True)
    print(f"work folder: {workdir}", flush=True)
    res = run_stages(stages, workdir, options)
    return {"launcher": options.launcher, "workdir": str(workdir), "stages": res, "folds": states, "notes": notes}
