"""Multi-rater consensus cascade (MSSEG-2 winning-style recipe) on top of nnU-Net's own commands.

Stage 1 models each rater with its own nnU-Net; stage 2 is an nnU-Net that sees the original images plus
one lesion-probability map per rater model and learns how the consensus is formed.

    nnunet-ext consensus split-raters -d 540 -nfolds 5      # one raw dataset per rater, shared K-fold split
    nnunet-ext consensus train -d 540 --stage 1 -c 3d_fullres -tr LSRTrainer
    nnunet-ext consensus build-stage2 -d 540                 # out-of-fold rater probabilities as channels
    nnunet-ext consensus train -d 540 --stage 2 -c 3d_fullres
    nnunet-ext consensus predict -d 540 -i imagesTs -o pred --keep-rater-predictions
    nnunet-ext consensus evaluate -d 540 --pred pred

No leakage: every rater dataset and the stage-2 dataset use one K-fold split (``splits_final.json``
written before nnU-Net plans them), and a training case's stage-2 channels come only from the fold model
that held the case out (nnU-Net's validation probabilities, ``nnUNetv2_train --npz``, or re-predicted with
that fold's model when they are missing). ``stage2_provenance.json`` records the fold and model per case
and rater. New cases get the fold ensemble of every rater model.

The mapping and settings live in ``consensus.json`` in the source raw dataset folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from nnunet_ext.core.io import read_image, write_image
from nnunet_ext.core.paths import NNUNET_FOLDERS, nnunet_command, nnunet_env, run_logged
from nnunet_ext.core.safety import atomic_copy, atomic_write_text
from nnunet_ext.inference.options import PredictOptions
from nnunet_ext.nnunet_adapter import ModelRef

STATE = "consensus.json"


# ---------------------------------------------------------------------------------------------- helpers


def _env_folder(name: str) -> Path:
    from nnunet_ext.nnunet_adapter import env_folder

    return env_folder(name)


def _raw() -> Path:
    return _env_folder("nnUNet_raw")


def dataset_folder(dataset) -> Path:
    """Raw folder of a dataset id or name."""
    raw = _raw()
    s = str(dataset)
    hits = list(raw.glob(f"Dataset{int(s):03d}_*")) if s.isdigit() else [raw / s]
    if not hits or not hits[0].is_dir():
        raise FileNotFoundError(f"dataset {dataset} not found in {raw}")
    return hits[0]


def load_state(dataset) -> tuple[Path, dict]:
    src = dataset_folder(dataset)
    f = src / STATE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: run `nnunet-ext consensus split-raters -d {dataset}` first")
    return src, json.loads(f.read_text())


def save_state(src: Path, state: dict) -> None:
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(src / STATE, json.dumps(state, indent=1))


def _cases(folder: Path, ending: str) -> list[str]:
    return sorted(p.name[: -len(ending)] for p in folder.glob(f"*{ending}"))


def kfold_splits(cases: list[str], n_folds: int, seed: int = 12345) -> list[dict]:
    """nnU-Net's own seeded K-fold split of the sorted case ids (nnunet_ext.nnunet_adapter.crossval_splits:
    what nnUNetv2_train itself writes when a dataset has no splits_final.json)."""
    from nnunet_ext.nnunet_adapter import crossval_splits

    if n_folds < 2 or n_folds > len(cases):
        raise ValueError(f"need 2 <= folds <= number of cases ({len(cases)}), got {n_folds}")
    return crossval_splits(cases, n_folds, seed)


def fold_of(splits: list[dict]) -> dict[str, int]:
    return {c: f for f, s in enumerate(splits) for c in s["val"]}


def write_splits(dataset_name: str, splits: list[dict]) -> Path:
    folder = _env_folder("nnUNet_preprocessed") / dataset_name
    folder.mkdir(parents=True, exist_ok=True)
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(folder / "splits_final.json", json.dumps(splits, indent=1))
    return folder / "splits_final.json"


def _link(src: Path, dst: Path, copy: bool) -> None:
    """Symlink (or copy) ``src`` to ``dst``; the source must exist (no dangling links). Replacing an existing
    ``dst`` is atomic (temporary name + rename)."""
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing: cannot link it into {dst.parent}")
    atomic_copy(src, dst, link=not copy)


def _free_ids(n: int, first: int | None, own=()) -> list[int]:
    """``n`` consecutive free dataset ids from ``first`` (default: after the highest used); ids in ``own``
    (datasets this run replaces) count as free."""
    from nnunet_ext.core import validate

    n = validate.integer(n, "number of datasets", 1, 999)
    if first is not None:
        first = validate.dataset_id(first, "--first-id")
    used = {int(p.name[7:10]) for p in _raw().glob("Dataset[0-9][0-9][0-9]_*")} - set(own)
    start = first if first is not None else max(used | {0}) + 1
    ids = list(range(start, start + n))
    clash = sorted(set(ids) & used)
    if clash or ids[-1] > 999:
        raise ValueError(f"dataset ids {ids[0]}..{ids[-1]} are not free (used: {clash}) or exceed 999; "
                         f"pass another --first-id")
    return ids


# ---------------------------------------------------------------------------------------------- split


def split_raters(dataset, first_id: int | None = None, n_folds: int = 5, copy: bool = False) -> dict:
    """One nnU-Net raw dataset per rater folder ``ratersTr/<rater>/`` of ``dataset`` (same images, that
    rater's labels), a shared K-fold split, and ``consensus.json``. Returns the state.

    Checked before anything is written: every image channel of every case exists and shares the geometry
    of the case's rater masks, which must be binary (0/1; 0/255 masks are written as 0/1). Idempotent: a
    re-run reuses the dataset ids recorded in ``consensus.json`` and rebuilds those datasets (each in a
    staging folder, moved into place), so it never creates a second set; the stage-1/2 records are kept
    when the split is unchanged."""
    from nnunet_ext.core import validate
    from nnunet_ext.core.safety import output_lock

    n_folds = validate.integer(n_folds, "--folds", 2, 100)
    if first_id is not None:
        first_id = validate.dataset_id(first_id, "--first-id")
    src = dataset_folder(dataset)
    from nnunet_ext.core.io import read_json

    if not (src / "dataset.json").is_file():
        raise FileNotFoundError(f"{src / 'dataset.json'} not found: {src} is not an nnU-Net raw dataset")
    dj = read_json(src / "dataset.json", required=("file_ending", "channel_names"))
    ending = dj["file_ending"]
    raters = sorted(p for p in (src / "ratersTr").glob("*") if p.is_dir()) if (src / "ratersTr").is_dir() else []
    if not raters:
        raise FileNotFoundError(f"{src / 'ratersTr'} has no rater folders: the cascade needs one label folder per rater")
    cases = _cases(src / "labelsTr", ending)
    if not cases:
        raise FileNotFoundError(f"no labels in {src / 'labelsTr'}")
    for r in raters:
        missing = sorted(set(cases) - set(_cases(r, ending)))
        if missing:
            raise FileNotFoundError(f"rater {r.name} has no mask for {len(missing)} case(s), e.g. {r / (missing[0] + ending)}")
    n_ch = len(dj["channel_names"])
    with output_lock(src.parent / f".{src.name}.split-raters.lock", what=f"split-raters of {src.name}"):
        old = read_json(src / STATE) if (src / STATE).is_file() else {}
        old_raters = old.get("raters", {})
        masks = _rater_masks(src, cases, raters, ending, n_ch)  # every input checked before anything is written
        test_images = sorted((src / "imagesTs").glob(f"*{ending}")) if (src / "imagesTs").is_dir() else []
        splits = kfold_splits(cases, n_folds)
        base = src.name.split("_", 1)[1]
        mapped = {r.name: old_raters[r.name]["id"] for r in raters if r.name in old_raters}
        if first_id is not None and mapped and sorted(mapped.values())[0] != first_id:
            raise ValueError(f"split-raters already created datasets {sorted(mapped.values())} for {src.name} "
                             f"(recorded in {src / STATE}); re-run without --first-id to rebuild them, or remove "
                             f"those datasets and {src / STATE} first")
        fresh = [r for r in raters if r.name not in mapped]
        if fresh:  # first run, or a rater folder added since: new ids (after the highest used)
            ids = _free_ids(len(fresh), first_id if not mapped else None)
            mapped.update({r.name: i for r, i in zip(fresh, ids)})
        state = {"source": {"id": int(src.name[7:10]), "name": src.name}, "n_folds": n_folds, "splits": splits,
                 "raters": {}}
        if old.get("splits") == splits:
            state.update({k: v for k, v in old.items() if k not in state})
        for r in raters:
            name = f"Dataset{mapped[r.name]:03d}_{base}_{r.name}"
            ours = r.name in old_raters and old_raters[r.name].get("name") == name
            _write_rater_dataset(src, r.name, mapped[r.name], name, ours, cases, masks, test_images, dj, copy)
            split_file = _env_folder("nnUNet_preprocessed") / name / "splits_final.json"
            atomic_write_text(split_file, json.dumps(splits, indent=1))
            state["raters"][r.name] = {"id": mapped[r.name], "name": name}
        atomic_write_text(src / STATE, json.dumps(state, indent=1))
    return state


def _rater_masks(src: Path, cases: list[str], raters: list[Path], ending: str, n_ch: int) -> dict:
    """``{(rater, case): (mask, image)}``: every channel of every case present, every rater mask binary and
    on its case's grid (nnunet_ext.core.io.read_mask)."""
    from nnunet_ext.core.io import read_mask, read_sitk

    masks = {}
    for c in cases:
        ref_path = src / "imagesTr" / f"{c}_0000{ending}"
        for k in range(n_ch):
            p = src / "imagesTr" / f"{c}_{k:04d}{ending}"
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing (case {c} needs {n_ch} channels)")
        ref = read_sitk(ref_path)
        for r in raters:
            masks[r.name, c] = read_mask(r / f"{c}{ending}", reference=ref, reference_path=ref_path)
    return masks


def _write_rater_dataset(src: Path, rater: str, did: int, name: str, ours: bool, cases, masks: dict, test_images,
                         dj: dict, copy: bool) -> None:
    """One rater's raw dataset ``name`` (the source's images, that rater's labels), built in a staging folder."""
    from nnunet_ext.core.safety import staged_folder

    ending, n_ch = dj["file_ending"], len(dj["channel_names"])
    final = _raw() / name
    for p in _raw().glob(f"Dataset{did:03d}_*"):
        if p != final:
            raise ValueError(f"dataset id {did} is already used by {p}; pass another --first-id")
    with staged_folder(final, overwrite=ours, lock_file=_raw() / f".Dataset{did:03d}.lock",
                       inputs=[src], what="rater dataset") as out:
        for c in cases:
            for k in range(n_ch):
                _link(src / "imagesTr" / f"{c}_{k:04d}{ending}", out / "imagesTr" / f"{c}_{k:04d}{ending}", copy)
            arr, img = masks[rater, c]
            write_image(arr, (), out / "labelsTr" / f"{c}{ending}", reference=img)
        for p in test_images:
            _link(p, out / "imagesTs" / p.name, copy)
        atomic_write_text(out / "dataset.json", json.dumps(
            {**dj, "name": f"{name.split('_', 1)[1]}", "numTraining": len(cases),
             "description": f"rater {rater} of {src.name} (nnunet-ext consensus)"}, indent=2))


# ---------------------------------------------------------------------------------------------- train


def _ref(dataset_name: str, settings: dict, folds=None) -> ModelRef:
    """The model of a stage's ``settings`` (``configuration``, ``trainer``, ``plans``) on one dataset."""
    return ModelRef(dataset_name, settings["configuration"], settings["trainer"], settings["plans"], folds)


def rater_models(state: dict) -> dict[str, ModelRef]:
    """The stage-1 model of each rater (all folds of the shared split), from ``consensus.json``: its
    ``models`` (ModelRefs), or, in files of earlier versions, its ``stage1`` settings."""
    stored = state.get("models", {}).get("raters", {})
    out = {}
    for r, v in state["raters"].items():
        if r in stored and stored[r].get("dataset") == v["name"]:
            out[r] = ModelRef.from_json(stored[r], f"{STATE}: models.raters.{r}")
        else:
            out[r] = _ref(v["name"], state["stage1"], range(state["n_folds"]))
    return out


def _store_rater_models(state: dict, s1: dict) -> None:
    """``consensus.json``'s ``models.raters``: each rater's stage-1 model with every fold of the split."""
    state.setdefault("models", {})["raters"] = {r: _ref(v["name"], s1, range(state["n_folds"])).to_json()
                                                for r, v in state["raters"].items()}


def consensus_model(state: dict) -> ModelRef:
    """The stage-2 (consensus) model, from ``consensus.json``'s ``models`` or, in files of earlier versions,
    its ``stage2`` / ``stage2_training`` records."""
    stored = state.get("models", {}).get("consensus")
    if stored:
        return ModelRef.from_json(stored, f"{STATE}: models.consensus")
    s2 = state["stage2_training"]
    return _ref(state["stage2"]["name"], s2, s2["folds"])


def _targets(dataset, state: dict, stage: int, raters=None) -> list[dict]:
    if stage == 1:
        names = list(state["raters"]) if raters is None else list(raters)
        unknown = sorted(set(names) - set(state["raters"]))
        if unknown:
            raise ValueError(f"unknown rater(s) {unknown}; the cascade has {sorted(state['raters'])}")
        return [{**state["raters"][r], "rater": r} for r in names]
    if stage == 2:
        if "stage2" not in state:
            raise RuntimeError(f"no stage-2 dataset yet: run `nnunet-ext consensus build-stage2 -d {dataset}`")
        return [state["stage2"]]
    raise ValueError(f"stage must be 1 or 2, got {stage}")


def _native_plans(plans: str, state: dict) -> bool:
    """Whether ``plans`` is a native-resolution plan (``nnunet-ext plan-native``): its default name, or a
    rater dataset's plans file of that name with a configuration marked native."""
    from nnunet_ext.preprocessing.native import NATIVE_KEY, NATIVE_PLANS

    if plans == NATIVE_PLANS:
        return True
    for r in state["raters"].values():
        f = _env_folder("nnUNet_preprocessed") / r["name"] / f"{plans}.json"
        if f.is_file() and any(c.get(NATIVE_KEY) for c in json.loads(f.read_text())["configurations"].values()):
            return True
    return False


def prepare(dataset, stage: int, configuration: str, plans: str = "nnUNetPlans", raters=None, n_proc: int = 2,
            log: Path | None = None) -> list[str]:
    """Everything the concurrent fold trainings of a stage must not do at the same time: plan/preprocess
    (when missing), the shared split, and nnU-Net's one-off unpacking of the preprocessed data (a no-op for
    the blosc2 format of nnU-Net >= 2.6; legacy ``.npz`` datasets are unpacked to ``.npy`` here, once).
    A native-resolution ``plans`` (``nnUNetPlans_native``, :func:`_native_plans`) is planned and
    preprocessed with :func:`nnunet_ext.preprocessing.native.plan_native`, the stage-2 dataset too. Returns the prepared
    dataset names."""
    from nnunet_ext.nnunet_adapter import unpack_preprocessed
    from nnunet_ext.preprocessing.native import NATIVE_KEY, NativeResolutionPreprocessor, plan_native

    src, state = load_state(dataset)
    env = nnunet_env(None, n_proc)
    log = log or src / "consensus.log"
    native = _native_plans(plans, state)
    done = []
    for t in _targets(dataset, state, stage, raters):
        pre = _env_folder("nnUNet_preprocessed") / t["name"]
        pfile = pre / f"{plans}.json"
        if native:  # McGill's stage-1/2 models: every case at its own resolution (nnunet_ext.preprocessing.native)
            planned = json.loads(pfile.read_text())["configurations"] if pfile.is_file() else {}
            if not planned.get(configuration, {}).get(NATIVE_KEY):
                print(f"plan_native({t['name']}, {configuration}, plans {plans})", flush=True)
                plan_native(t["id"], (configuration,), plans_name=plans, n_proc=n_proc)
        elif not pfile.is_file():
            run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(t["id"]), "-c", configuration,
                        "-np", str(n_proc)], env, log)
        plan = json.loads(pfile.read_text())
        if configuration not in plan["configurations"]:
            raise ValueError(f"configuration {configuration!r} is not in {pfile}")
        data = pre / plan["configurations"][configuration].get("data_identifier", f"{plans}_{configuration}")
        if not data.is_dir() or not any(data.iterdir()):
            if plan["configurations"][configuration].get(NATIVE_KEY):  # nnUNetv2_preprocess would resample
                NativeResolutionPreprocessor(verbose=False).run(t["id"], configuration, plans, n_proc)
            else:
                run_logged([nnunet_command("nnUNetv2_preprocess"), "-d", str(t["id"]), "-c", configuration,
                            "-plans_name", plans, "-np", str(n_proc)], env, log)
        write_splits(t["name"], state["splits"])
        unpack_preprocessed(data, n_proc)
        done.append(t["name"])
    return done


def record_training(dataset, stage: int, configuration: str, trainer: str = "nnUNetTrainer",
                    plans: str = "nnUNetPlans", folds=None) -> dict:
    """Write the settings of a finished stage into ``consensus.json`` (what build-stage2 and predict read);
    every fold of every model of the stage must have its ``checkpoint_final.pth``."""
    src, state = load_state(dataset)
    folds = list(range(state["n_folds"])) if folds is None else list(folds)
    settings = {"configuration": configuration, "trainer": trainer, "plans": plans}
    refs = {t.get("rater", "consensus"): _ref(t["name"], settings) for t in _targets(dataset, state, stage)}
    missing = [str(r.folder(must_exist=False) / f"fold_{f}" / r.checkpoint) for r in refs.values() for f in folds
               if not (r.folder(must_exist=False) / f"fold_{f}" / r.checkpoint).is_file()]
    if missing:
        raise FileNotFoundError(f"stage {stage} is not fully trained: {len(missing)} checkpoint(s) missing, e.g. {missing[0]}")
    key = "stage1" if stage == 1 else "stage2_training"
    state[key] = {**({k: v for k, v in state.get(key, {}).items() if k != "folds"}),
                  "configuration": configuration, "trainer": trainer, "plans": plans,
                  "folds": sorted(set(state.get(key, {}).get("folds", [])) | set(folds))}
    if stage == 1:
        _store_rater_models(state, state["stage1"])
    else:
        state.setdefault("models", {})["consensus"] = _ref(state["stage2"]["name"], state[key],
                                                           state[key]["folds"]).to_json()
    save_state(src, state)
    return state


def train_stages(dataset, stage, configuration: str, trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                 folds=None, device: str = "cuda", n_proc: int = 2, stage2_id: int | None = None, num_gpus: int = 1):
    """The launcher stages of ``consensus train``: per training stage a ``prepare`` step (plan/preprocess,
    split, one-off unpacking), the fold trainings (``nnUNetv2_train ... --npz --c``, done when the fold's
    ``validation/summary.json`` exists: nnU-Net writes it after the final checkpoint and the validation)
    and a ``record`` step; ``stage="all"`` chains stage 1, build-stage2 and stage 2 (the stage-2 dataset id
    is fixed now, so its folds can be scheduled before it exists)."""
    from nnunet_ext.cluster.launcher import Stage, Task, task_env

    if stage not in (1, 2, "all"):
        raise ValueError(f"stage must be 1, 2 or 'all', got {stage!r}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if num_gpus > 1 and device != "cuda":
        raise NotImplementedError("nnU-Net's DDP training (-num_gpus > 1) needs -device cuda")
    from nnunet_ext.cluster.call import function_argv

    src, state = load_state(dataset)
    all_folds = list(range(state["n_folds"]))
    folds = all_folds if folds is None else list(folds)
    bad = [f for f in folds if not 0 <= int(f) < state["n_folds"]]
    if bad or not folds:
        raise ValueError(f"folds must be in 0..{state['n_folds'] - 1} (the shared split), got {folds}")
    # nnU-Net's folders and our trainers (absolute, written into the scripts); thread and process counts
    # come from the task's CPUs unless nnUNet_def_n_proc/nnUNet_n_proc_DA are set in this shell; the training
    # budget is the shell's NNUNET_EXT_* variables (printed when set)
    env = task_env({k: v for k, v in nnunet_env(None, n_proc).items() if k in NNUNET_FOLDERS + ("nnUNet_extTrainer",)},
                   budget_from_shell=True)
    ds = str(dataset)
    stages = []

    def block(s: int, targets: list[dict], after: list[str], folds: list[int]) -> list:
        pre = f"stage{s}_prepare"
        if s == 1:
            prep = [Task(t["rater"], function_argv(prepare, dataset=ds, stage=1, configuration=configuration,
                                                   plans=plans, raters=[t["rater"]], n_proc=n_proc), env)
                    for t in targets]
        else:
            prep = [Task("consensus", function_argv(prepare, dataset=ds, stage=2, configuration=configuration,
                                                    plans=plans, n_proc=n_proc), env)]
        fold_tasks = []
        for t in targets:
            for f in folds:
                fold_tasks.append(Task(
                    f"{t.get('rater', 'consensus')}_fold{f}",
                    [nnunet_command("nnUNetv2_train"), str(t["id"]), configuration, str(f), "-tr", trainer, "-p", plans,
                     "--npz", "-device", device, "--c"] + (["-num_gpus", str(num_gpus)] if num_gpus > 1 else []), env,
                    # nnU-Net validates (and writes the --npz probabilities stage 2 reads) after saving
                    # checkpoint_final.pth; summary.json is the last file a fold writes
                    done=str(ModelRef(t["name"], configuration, trainer, plans).folder(must_exist=False)
                             / f"fold_{f}" / "validation" / "summary.json")))
        out = [Stage(pre, prep, after), Stage(f"stage{s}_train", fold_tasks, [pre])]
        out.append(Stage(f"stage{s}_record", [Task("record", function_argv(
            record_training, dataset=ds, stage=s, configuration=configuration, trainer=trainer, plans=plans,
            folds=[int(f) for f in folds]), env)], [f"stage{s}_train"]))
        return out

    if stage == 1:
        stages += block(1, _targets(dataset, state, 1), [], folds)
    if stage == 2:
        stages += block(2, _targets(dataset, state, 2), [], folds)
    if stage == "all":  # stage 1 needs every fold (out-of-fold stage-2 inputs); -f chooses the stage-2 folds
        stages += block(1, _targets(dataset, state, 1), [], all_folds)
        if "stage2" in state:
            s2 = state["stage2"]
        else:
            did = _free_ids(1, stage2_id)[0]
            s2 = {"id": did, "name": f"Dataset{did:03d}_{src.name.split('_', 1)[1]}_consensus"}
        stages.append(Stage("build_stage2", [Task("build_stage2", function_argv(
            build_stage2, dataset=ds, configuration=configuration, trainer=trainer, plans=plans, stage2_id=s2["id"],
            device=device, n_proc=n_proc), env, done=None)], ["stage1_record"]))
        stages += block(2, [s2], ["build_stage2"], folds)
    return stages


def default_workdir(dataset, name: str) -> Path:
    """``$nnUNet_results/nnunet_ext_jobs/<source dataset>/<name>``: where a command's launcher scripts,
    markers and logs go unless ``--workdir`` says otherwise."""
    return _env_folder("nnUNet_results") / "nnunet_ext_jobs" / dataset_folder(dataset).name / name


@dataclass(frozen=True)
class TrainOptions:
    """How ``consensus train`` trains beside its configuration and trainer: nnU-Net's ``plans``, the
    ``folds`` (None: every fold of the shared split), ``device``, ``n_proc`` (processes of the preparation),
    ``stage2_id`` (the stage-2 dataset's id for ``stage="all"``; default the next free one) and ``num_gpus``
    (nnU-Net's DDP training of one fold)."""
    plans: str = "nnUNetPlans"
    folds: tuple | None = None
    device: str = "cuda"
    n_proc: int = 2
    stage2_id: int | None = None
    num_gpus: int = 1

    def __post_init__(self):
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(self.folds))
        if not isinstance(self.n_proc, int) or isinstance(self.n_proc, bool) or self.n_proc < 1:
            raise ValueError(f"n_proc must be >= 1, got {self.n_proc!r}")
        if not isinstance(self.num_gpus, int) or isinstance(self.num_gpus, bool) or self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus!r}")


def train(dataset, stage, configuration: str, trainer: str = "nnUNetTrainer", options: TrainOptions | None = None,
          *, launcher=None, workdir=None, **fields) -> dict:
    """Plan/preprocess (if needed) and train every fold of the stage-1 rater datasets, the stage-2 dataset,
    or (``stage="all"``) stage 1, build-stage2 and stage 2, with nnU-Net's own commands (``--npz``:
    validation probabilities feed stage 2), through the launcher (``launcher``: LauncherOptions; default
    local, one task at a time). Finished folds are skipped; an interrupted fold resumes (``--c``).
    ``options``: :class:`TrainOptions`, or its fields as keywords.

    Per-task logs: ``WORKDIR/<stage>/logs/<task>.log``. Returns ``{"launcher", "workdir", "stages"}``
    (run_stages' result) and, after a local run, ``"state"``."""
    from nnunet_ext.cluster.launcher import LauncherOptions, run_stages
    from nnunet_ext.core.validate import options_of

    o = options_of(TrainOptions, options, fields, "train")
    plans, num_gpus = o.plans, o.num_gpus
    options = launcher or LauncherOptions()
    if num_gpus > 1 and options.gpus_per_task is not None and options.gpus_per_task < num_gpus:
        raise ValueError(f"-num_gpus {num_gpus} needs --gpus-per-task >= {num_gpus} (one task runs nnU-Net's DDP)")
    stages = train_stages(dataset, stage, configuration, trainer, plans, o.folds, o.device, o.n_proc, o.stage2_id,
                          num_gpus)
    workdir = Path(workdir) if workdir else default_workdir(dataset, f"consensus_train_stage{stage}")
    from nnunet_ext.nnunet_adapter import check_fan_out

    # before any script is written (dry runs too): work folder writable, configuration planned, trainer known
    state = load_state(dataset)[1]
    names = [t["name"] for s in ((1, 2) if stage == "all" else (stage,)) if s == 1 or "stage2" in state
             for t in _targets(dataset, state, s)]
    check_fan_out([trainer], [_env_folder("nnUNet_preprocessed") / n / f"{plans}.json" for n in names], configuration,
                  {"--workdir": workdir})
    res = run_stages(stages, workdir, options)
    out = {"launcher": options.launcher, "workdir": str(workdir), "stages": res}
    if options.launcher == "local" and not options.dry_run:
        out["state"] = load_state(dataset)[1]
    return out


# ---------------------------------------------------------------------------------------------- stage 2


def _lesion_probability(npz: Path, activation: str = "softmax") -> np.ndarray:
    """The stage-1 model's soft lesion map (its contract's activation) from nnU-Net's probabilities."""
    from nnunet_ext.inference.thresholds import soft_output

    with np.load(npz) as f:
        prob = f["probabilities"]
    if prob.shape[0] != 2:
        raise NotImplementedError(f"{npz}: the consensus cascade handles binary (background/lesion) models, "
                                  f"got {prob.shape[0]} classes")
    return soft_output(prob, activation)


def _stage1_contract(state: dict, s1: dict):
    """The stage-1 models' contract (every rater model is trained with the same trainer)."""
    from nnunet_ext.inference.contract import load_contract

    r = next(iter(state["raters"].values()))
    mdir = _ref(r["name"], s1).folder(must_exist=False)
    c = load_contract(mdir, list(range(state["n_folds"])))
    if c.condition == "cohort":
        raise NotImplementedError(f"the consensus cascade with cohort-conditioned stage-1 models ({s1['trainer']}): "
                                  f"a rater model has no cohort to predict new cases in; use an unconditioned or "
                                  f"spacing-conditioned (FiLM) stage-1 trainer")
    return c


def _write_prob(prob: np.ndarray, reference_image: Path, out: Path) -> None:
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference_image))
    if prob.shape != tuple(reversed(ref.GetSize())):
        raise ValueError(f"probability map of shape {prob.shape} does not fit {reference_image} "
                         f"(size {ref.GetSize()} x, y, z)")
    write_image(prob, (), out, reference=ref)


def _predict(model: dict, input_dir: Path, output_dir: Path, folds, env, log, device, checkpoint="checkpoint_final.pth",
             probabilities=True) -> None:
    """:func:`nnunet_ext.inference.predict.predict` (the one predictor, with the model's contract) in its own process
    (spawned on the function): ``<case><ending>`` masks, ``soft/`` maps, ``.npz`` on request."""
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.inference.predict import predict as predict_model

    n = int(env["nnUNet_def_n_proc"])
    ref = ModelRef(str(model["id"]), model["configuration"], model["trainer"], model["plans"], list(folds), checkpoint)
    o = PredictOptions(device=device, save_probabilities=probabilities, npp=n, nps=n)
    run_logged(function_argv(predict_model, input_dir=str(input_dir), output_dir=str(output_dir),
                             model=ref.to_json(), options=o.to_json()), env, log)


def build_stage2(dataset, configuration: str | None = None, trainer: str | None = None, plans: str | None = None,
                 stage2_id: int | None = None, device: str = "cuda", n_proc: int = 2, copy: bool = False) -> Path:
    """Create the consensus dataset: original channels + one out-of-fold lesion-probability channel per
    rater model; labels = the source's consensus labels; the same split; ``stage2_provenance.json``."""
    src, state = load_state(dataset)
    s1 = dict(state.get("stage1", {}))
    s1.update({k: v for k, v in (("configuration", configuration), ("trainer", trainer), ("plans", plans)) if v})
    if not all(k in s1 for k in ("configuration", "trainer", "plans")):
        raise ValueError("stage-1 settings unknown: pass -c/-tr/-p or train with `nnunet-ext consensus train --stage 1`")
    dj = json.loads((src / "dataset.json").read_text())
    ending, n_ch = dj["file_ending"], len(dj["channel_names"])
    splits, fold = state["splits"], fold_of(state["splits"])
    env = nnunet_env(None, n_proc)
    log = src / "consensus.log"
    if "stage2" in state:
        did, name = state["stage2"]["id"], state["stage2"]["name"]
    else:
        did = _free_ids(1, stage2_id)[0]
        name = f"Dataset{did:03d}_{src.name.split('_', 1)[1]}_consensus"
    out = _raw() / name
    provenance = {}
    raters = list(state["raters"])
    activation = _stage1_contract(state, s1).activation
    for r_idx, r in enumerate(raters):
        rds = state["raters"][r]
        mdir = _ref(rds["name"], s1).folder(must_exist=False)
        for f, split in enumerate(splits):
            ckpt = mdir / f"fold_{f}" / "checkpoint_final.pth"
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} missing: stage 2 needs every fold of every rater model "
                                        f"(`nnunet-ext consensus train -d {dataset} --stage 1`)")
            val_dir = mdir / f"fold_{f}" / "validation"
            lacking = [c for c in split["val"] if not (val_dir / f"{c}.npz").is_file()]
            if lacking:  # trained without --npz: re-predict the held-out cases with this fold's model
                tmp_in, tmp_out = out / ".oof" / r / f"fold_{f}_in", out / ".oof" / r / f"fold_{f}"
                for c in lacking:
                    for k in range(n_ch):
                        _link(src / "imagesTr" / f"{c}_{k:04d}{ending}", tmp_in / f"{c}_{k:04d}{ending}", False)
                _predict({**rds, **s1}, tmp_in, tmp_out, [f], env, log, device)
            for c in split["val"]:
                npz = val_dir / f"{c}.npz" if c not in lacking else out / ".oof" / r / f"fold_{f}" / f"{c}.npz"
                _write_prob(_lesion_probability(npz, activation), src / "imagesTr" / f"{c}_0000{ending}",
                            out / "imagesTr" / f"{c}_{n_ch + r_idx:04d}{ending}")
                provenance.setdefault(c, {})[r] = {"fold": f, "model": str(ckpt),
                                                   "source": "validation npz" if c not in lacking else "re-predicted",
                                                   "file": str(npz)}
    for c in fold:
        for k in range(n_ch):
            _link(src / "imagesTr" / f"{c}_{k:04d}{ending}", out / "imagesTr" / f"{c}_{k:04d}{ending}", copy)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        atomic_copy(src / "labelsTr" / f"{c}{ending}", out / "labelsTr" / f"{c}{ending}")
    shutil.rmtree(out / ".oof", ignore_errors=True)
    channels = {**{str(k): v for k, v in dj["channel_names"].items()},
                **{str(n_ch + i): "noNorm" for i in range(len(raters))}}
    atomic_write_text(out / "dataset.json", json.dumps({
        **dj, "channel_names": channels, "numTraining": len(fold), "name": name.split("_", 1)[1],
        "description": f"consensus stage 2 of {src.name}: images + out-of-fold lesion probability of each rater model",
        "nnunet_ext_channels": [dj["channel_names"][str(k)] for k in range(n_ch)] + [f"{r} probability" for r in raters]},
        indent=2))
    atomic_write_text(out / "stage2_provenance.json", json.dumps(provenance, indent=1))
    write_splits(name, splits)
    state["stage1"] = s1
    _store_rater_models(state, s1)
    state["stage2"] = {"id": did, "name": name, "rater_order": raters}
    save_state(src, state)
    return out


# ---------------------------------------------------------------------------------------------- predict


def _cascade_inputs(raters: list[dict], c_dir: Path, input_dir: Path) -> tuple[str, int, list[str]]:
    """(file ending, image channels, cases) of the cascade's input folder, after checking that the consensus
    model takes the rater models' channels plus one per rater and that every case has them."""
    dj = json.loads((c_dir / "dataset.json").read_text())
    ending, n_ch = dj["file_ending"], len(dj["channel_names"]) - len(raters)
    rater_ch = [len(json.loads((Path(r["model_dir"]) / "dataset.json").read_text())["channel_names"]) for r in raters]
    if n_ch < 1 or set(rater_ch) != {n_ch}:
        raise ValueError(f"the consensus model {c_dir} takes {len(dj['channel_names'])} channels, which is not the "
                         f"rater models' {sorted(set(rater_ch))} plus one per rater ({len(raters)})")
    cases = sorted({p.name[: -len(ending) - 5] for p in input_dir.glob(f"*_0000{ending}")})
    if not cases:
        raise FileNotFoundError(f"no <case>_0000{ending} files in {input_dir}")
    for c in cases:
        for k in range(n_ch):
            if not (input_dir / f"{c}_{k:04d}{ending}").is_file():
                raise FileNotFoundError(f"{input_dir / f'{c}_{k:04d}{ending}'} missing: the model needs {n_ch} channels")
    return ending, n_ch, cases


# the PredictOptions fields the cascade applies: device, mirroring and processes to every model, the outputs
# to the consensus model's
CASCADE_FIELDS = ("device", "disable_tta", "npp", "nps", "save_probabilities", "write_soft")


def predict_cascade(raters: list[dict], consensus_model: dict, input_dir, output_dir,
                    options: PredictOptions | dict | None = None, *, jobs: int = 1,
                    checkpoint: str = "checkpoint_final.pth", keep_rater_predictions: bool = False,
                    n_proc: int = 2, **fields) -> dict:
    """The cascade on every case of ``input_dir`` (nnU-Net naming, the source dataset's channels): each rater
    model (``raters``: ``[{"name", "model_dir", "folds"}]`` in the consensus model's channel order) as the
    ensemble of its folds, its soft lesion map (its contract's activation) appended as one more channel, then
    the consensus model (``{"model_dir", "folds"}``), every model through the one predictor and its contract.
    ``consensus predict`` and a cascade submission's entrypoint both run this. ``options``:
    :class:`nnunet_ext.inference.options.PredictOptions` (or a dict, or its fields as keywords; those of
    :data:`CASCADE_FIELDS` apply, ``npp`` / ``nps`` default to ``n_proc``).

    Writes ``<out>/<case><ending>`` (the consensus model's mask; ``soft/`` maps with ``write_soft``, ``.npz``
    with ``save_probabilities``) and, with ``keep_rater_predictions``, ``<out>/raters/<rater>/<case><ending>``.
    ``jobs`` > 1: that many rater models at once, each in its own process (spawned on
    :func:`nnunet_ext.inference.predictor.predict_cases`, output in ``<out>/consensus_predict.log``); otherwise one after
    the other in this process."""
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.inference.options import predict_options, refuse_unsupported
    from nnunet_ext.inference.predictor import predict_cases

    o = predict_options(options, fields, "predict_cascade")
    refuse_unsupported(o, CASCADE_FIELDS, "predict_cascade")
    npp, nps = o.processes(n_proc)
    input_dir, out = Path(input_dir), Path(output_dir)
    c_dir = Path(consensus_model["model_dir"])
    ending, n_ch, cases = _cascade_inputs(raters, c_dir, input_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".cascade"
    env = nnunet_env(None, n_proc)
    log = out / "consensus_predict.log"
    rater_options = PredictOptions(device=o.device, disable_tta=o.disable_tta, write_mask=keep_rater_predictions,
                                   npp=npp, nps=nps).to_json()

    def run_rater(i_r):
        i, r = i_r
        print(f"[{i + 1}/{len(raters) + 1}] rater model {r['name']} (folds {list(r['folds'])}) on {len(cases)} "
              f"case(s)", flush=True)
        kw = dict(model_dir=str(r["model_dir"]), folds=list(r["folds"]), inputs=str(input_dir),
                  output_dir=str(work / r["name"]), options=rater_options, checkpoint=checkpoint)
        if jobs > 1:
            run_logged(function_argv(predict_cases, **kw), env, log)
        else:
            predict_cases(**kw)
        return r["name"]

    try:
        if jobs > 1:
            with ThreadPoolExecutor(jobs) as ex:
                list(ex.map(run_rater, enumerate(raters)))
        else:
            for item in enumerate(raters):
                run_rater(item)
        s2_in = work / "stage2_input"
        for c in cases:
            for k in range(n_ch):
                _link(input_dir / f"{c}_{k:04d}{ending}", s2_in / f"{c}_{k:04d}{ending}", False)
            for i, r in enumerate(raters):  # the rater model's soft lesion map, as in build-stage2
                soft, _ = read_image(work / r["name"] / "soft" / f"{c}{ending}")
                _write_prob(soft.astype(np.float32), input_dir / f"{c}_0000{ending}",
                            s2_in / f"{c}_{n_ch + i:04d}{ending}")
        print(f"[{len(raters) + 1}/{len(raters) + 1}] consensus model on {len(cases)} case(s)", flush=True)
        summary = predict_cases(c_dir, list(consensus_model["folds"]), str(s2_in), out,
                                replace(o, npp=npp, nps=nps), checkpoint=checkpoint)
        if keep_rater_predictions:
            for r in raters:
                for c in cases:
                    (out / "raters" / r["name"]).mkdir(parents=True, exist_ok=True)
                    atomic_copy(work / r["name"] / f"{c}{ending}", out / "raters" / r["name"] / f"{c}{ending}")
    finally:  # the rater outputs and stage-2 inputs are scratch, also when a model fails
        shutil.rmtree(work, ignore_errors=True)
    return {"cases": cases, "raters": [r["name"] for r in raters], "consensus": summary}


def cascade_models(state: dict) -> tuple[list[dict], dict]:
    """(rater models, consensus model) of a trained cascade, as :func:`predict_cascade` takes them."""
    if "stage2" not in state or "stage2_training" not in state:
        raise RuntimeError("the cascade is not trained: build-stage2 and `consensus train --stage 2` first")
    refs, cons = rater_models(state), consensus_model(state)
    _stage1_contract(state, state["stage1"])
    raters = [{"name": r, "model_dir": refs[r].folder(must_exist=False), "folds": list(refs[r].folds)}
              for r in state["stage2"]["rater_order"]]
    return raters, {"model_dir": cons.folder(must_exist=False), "folds": list(cons.folds)}


def predict(dataset, input_dir, output_dir, device: str = "cuda", jobs: int = 1, keep_rater_predictions: bool = False,
            save_probabilities: bool = False, n_proc: int = 2, checkpoint: str = "checkpoint_final.pth",
            disable_tta: bool = False) -> dict:
    """Rater models (fold ensembles, ``jobs`` in parallel) -> stage-2 inputs -> consensus model
    (:func:`predict_cascade`). Writes ``<out>/<case><ending>`` (and ``.npz`` probabilities on request); rater
    masks in ``<out>/raters/<rater>/`` with ``keep_rater_predictions``; ``disable_tta``: every model without
    mirroring."""
    from nnunet_ext.core.safety import check_output_not_input

    src, state = load_state(dataset)
    raters, consensus_model = cascade_models(state)
    check_output_not_input(output_dir, [input_dir], allow_containing=True, what="-o (output folder)")
    o = PredictOptions(device=device, save_probabilities=save_probabilities, npp=n_proc, nps=n_proc,
                       disable_tta=disable_tta)
    res = predict_cascade(raters, consensus_model, input_dir, output_dir, o, jobs=max(1, int(jobs)),
                          checkpoint=checkpoint, keep_rater_predictions=keep_rater_predictions)
    summary = {"cases": res["cases"], "raters": res["raters"], "stage1": state["stage1"],
               "stage2": {**state["stage2"], **state["stage2_training"]}}
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(Path(output_dir) / "consensus_predict.json", json.dumps(summary, indent=1))
    return summary


def launch_predict(dataset, input_dir, output_dir, launcher, workdir=None, **predict_kwargs) -> dict:
    """``consensus predict`` as one launcher task (one Slurm job holding every rater model and the consensus
    model; ``jobs`` inside it still runs rater models at once): :func:`predict` with ``predict_kwargs``, in
    a process spawned on the function. Scripts, markers and logs in ``workdir`` (default
    ``<output>/.nnunet_ext_jobs``). Returns ``{"launcher", "workdir", "stages"}``."""
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.cluster.launcher import Stage, Task, run_stages, task_env

    load_state(dataset)  # fails early when the cascade does not exist
    env = task_env({k: v for k, v in nnunet_env(None).items() if k in NNUNET_FOLDERS + ("nnUNet_extTrainer",)})
    task = Task("predict", function_argv(predict, dataset=str(dataset), input_dir=str(Path(input_dir).resolve()),
                                         output_dir=str(Path(output_dir).resolve()), **predict_kwargs), env)
    workdir = Path(workdir) if workdir else Path(output_dir).resolve() / ".nnunet_ext_jobs"
    res = run_stages([Stage("consensus_predict", [task])], workdir, launcher)
    return {"launcher": launcher.launcher, "workdir": str(workdir), "stages": res}


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(dataset, pred_dir, output=None, ref_dir=None, raters_dir=None) -> dict:
    """Each rater model and the consensus model (``pred_dir`` from ``predict --keep-rater-predictions``)
    against the consensus reference and each rater's reference, with ``--preset msseg2``."""
    from nnunet_ext.metrics.evaluate import evaluate_folders

    src, state = load_state(dataset)
    pred_dir = Path(pred_dir)
    ref_dir = Path(ref_dir) if ref_dir else src / "labelsTs"
    raters_dir = Path(raters_dir) if raters_dir else src / "ratersTs"
    models = {"consensus model": pred_dir, **{f"{r} model": pred_dir / "raters" / r for r in state["raters"]}}
    refs = {"consensus": ref_dir, **{r: raters_dir / r for r in state["raters"]}}
    table = {}
    for m, mdir in models.items():
        if not mdir.is_dir():
            raise FileNotFoundError(f"{mdir} missing: predict with --keep-rater-predictions")
        for rname, rdir in refs.items():
            if not rdir.is_dir():
                print(f"note: no reference folder {rdir}; skipped", file=sys.stderr)
                continue
            res = evaluate_folders(rdir, mdir, preset="msseg2", progress=False)
            table.setdefault(m, {})[rname] = res["aggregate"]["msseg2"]
    result = {"pred_dir": str(pred_dir), "table": table}
    if output:
        from nnunet_ext.core.safety import atomic_write_text

        atomic_write_text(output, json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    refs = list(next(iter(result["table"].values())))
    fmt = lambda v: "  n/a" if v is None else f"{v:5.3f}"  # noqa: E731
    lines = ["lesion F1 / Dice (cases with new lesions) vs reference:", f"{'model':<18}" + "".join(f"{r:>16}" for r in refs)]
    for m, row in result["table"].items():
        lines.append(f"{m:<18}" + "".join(f"{fmt(row[r]['lesion_f1_mean']):>9} {fmt(row[r]['dice_mean'])}" for r in refs))
    return "\n".join(lines)
