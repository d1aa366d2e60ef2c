"""Everything nnunet-ext needs from nnU-Net's internals, in one place: an nnU-Net upgrade is a change here.

Paths and dataset names/ids, model folders, preprocessed case ids, cross-validation splits, nnU-Net's
trainer lookup, deep-supervision weights, the version check, and the ``-pretrained_weights`` file of the
running training. Everything else in the
package calls these functions rather than nnU-Net's modules (the trainers subclass nnU-Net's trainer and
the predictor subclasses nnU-Net's predictor: those are the documented extension points).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.paths import CHECKPOINT, NNUNET_FOLDERS  # noqa: F401  (re-exported: defined in core.paths)

# first release with the nnUNet_extTrainer variable (checked in the 2.7.0 and 2.8.0 packages: absent, present)
MIN_NNUNET = (2, 8, 0)


def nnunet_version() -> tuple[int, ...]:
    from importlib.metadata import version

    parts = []
    for p in version("nnunetv2").split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_nnunet_version() -> None:
    v = nnunet_version()
    if v < MIN_NNUNET:
        raise RuntimeError(f"nnunet-ext needs nnunetv2 >= {'.'.join(map(str, MIN_NNUNET))} (the first release with "
                           f"nnUNet_extTrainer); installed: {'.'.join(map(str, v))}")


# ------------------------------------------------------------------------------------------ folders, names


def env_folder(name: str) -> Path:
    """``$nnUNet_raw`` / ``$nnUNet_preprocessed`` / ``$nnUNet_results`` (RuntimeError when unset)."""
    if name not in NNUNET_FOLDERS:
        raise ValueError(f"not an nnU-Net folder variable: {name}")
    v = os.environ.get(name)
    if not v:
        raise RuntimeError(f"{name} is not set (export {name}=/path, as for nnU-Net's own commands)")
    return Path(v)


def dataset_name(dataset) -> str:
    """``DatasetXXX_Name`` of an id or name, as nnU-Net resolves it (searching raw, preprocessed, results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset if not str(dataset).isdigit() else int(dataset))
    except RuntimeError as e:
        raise FileNotFoundError(f"dataset {dataset}: {e}") from None


def nnunet_setting(name: str) -> str | None:
    """nnU-Net's own value of ``$nnUNet_raw`` / ``$nnUNet_preprocessed`` / ``$nnUNet_results``
    (``nnunetv2.paths``: the environment when nnU-Net was first imported; None when unset)."""
    if name not in NNUNET_FOLDERS:
        raise ValueError(f"not an nnU-Net folder variable: {name}")
    import nnunetv2.paths

    return getattr(nnunetv2.paths, name)


def dataset_id(name: str) -> int:
    return int(name[7:10])


def _fold(f):
    """A fold as nnU-Net names it: an int, or ``"all"``."""
    if isinstance(f, bool):
        raise ValueError(f"fold {f!r} is not a fold (an integer >= 0 or 'all')")
    if isinstance(f, int) or (isinstance(f, str) and f.isdigit()):
        return int(f)
    if f == "all":
        return "all"
    raise ValueError(f"fold {f!r} is not a fold (an integer >= 0 or 'all')")


@dataclass(frozen=True)
class ModelRef:
    """One trained nnU-Net model: the folder ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``
    (:meth:`folder`, the one place a model folder is derived) and the folds and checkpoint used from it
    (``folds=None``: every fold that has the checkpoint). Stored in files as :meth:`to_json`; names are
    checked (:func:`nnunet_ext.core.checks.model_name`), never paths."""
    dataset: str
    configuration: str
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    folds: tuple | None = None
    checkpoint: str = CHECKPOINT

    def __post_init__(self):
        from nnunet_ext.core.checks import model_name

        object.__setattr__(self, "dataset", str(self.dataset))
        model_name(self.trainer, self.plans, self.configuration)
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(_fold(f) for f in self.folds))
        if not isinstance(self.checkpoint, str) or not self.checkpoint or "/" in self.checkpoint:
            raise ValueError(f"checkpoint {self.checkpoint!r} is not a checkpoint file name")

    @property
    def name(self) -> str:
        """``<trainer>__<plans>__<configuration>``: the model folder's name."""
        return f"{self.trainer}__{self.plans}__{self.configuration}"

    def folder(self, must_exist: bool = True, results=None) -> Path:
        """``$nnUNet_results/<DatasetXXX_Name>/<name>`` as nnU-Net's ``get_output_folder`` makes it (the dataset
        id or name resolved as nnU-Net does); ``results``: another results folder than ``$nnUNet_results``
        (an installed submission's, a selection file's when ``nnUNet_results`` is unset)."""
        root = env_folder("nnUNet_results") if results is None else Path(results)
        d = root / dataset_name(self.dataset) / self.name
        if must_exist and not d.is_dir():
            raise FileNotFoundError(f"no trained model in {d} (trainer {self.trainer}, plans {self.plans}, "
                                    f"configuration {self.configuration})")
        return d

    def available_folds(self) -> list:
        """The folds of the model folder that have the checkpoint (sorted; FileNotFoundError when none)."""
        mdir = self.folder()
        folds = sorted((p.name[5:] for p in mdir.glob("fold_*") if (p / self.checkpoint).is_file()),
                       key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
        if not folds:
            raise FileNotFoundError(f"no fold of {mdir} has {self.checkpoint}")
        return [_fold(f) for f in folds]

    def with_folds(self, folds=None) -> "ModelRef":
        """This model with ``folds`` (None: :meth:`available_folds`)."""
        return replace(self, folds=tuple(self.available_folds() if folds is None else folds))

    @classmethod
    def from_name(cls, dataset, name: str, folds=None, checkpoint: str = CHECKPOINT, where: str = "") -> "ModelRef":
        """The model ``<trainer>__<plans>__<configuration>`` (a folder name, e.g. a member of an older
        selection file) of ``dataset``."""
        from nnunet_ext.core.checks import split_member

        trainer, plans, configuration = split_member(name, where)
        return cls(str(dataset), configuration, trainer, plans, None if folds is None else tuple(folds), checkpoint)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "configuration": self.configuration, "trainer": self.trainer,
                "plans": self.plans, "folds": None if self.folds is None else list(self.folds),
                "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, d, where: str = "model") -> "ModelRef":
        """The model of :meth:`to_json`'s dict; ValueError naming ``where`` when it is not one."""
        keys = ("dataset", "configuration", "trainer", "plans", "folds", "checkpoint")
        if not isinstance(d, dict) or not {"dataset", "configuration", "trainer", "plans"} <= set(d) \
                or set(d) - set(keys):
            raise ValueError(f"{where}: not a model reference (keys {list(keys)}), got {d!r}")
        try:
            return cls(**{k: d[k] for k in keys if k in d})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def preprocessed_folder(dataset) -> Path:
    return env_folder("nnUNet_preprocessed") / dataset_name(dataset)


def raw_training_cases(raw_folder) -> list[str]:
    """The training case ids of a raw dataset folder, as nnU-Net's planning lists them (``imagesTr``, or the
    ``dataset`` entry of ``dataset.json``), sorted."""
    import json

    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    raw_folder = Path(raw_folder)
    ds = json.loads((raw_folder / "dataset.json").read_text())
    if "dataset" in ds:
        return sorted(map(str, ds["dataset"]))
    if not (raw_folder / "imagesTr").is_dir():
        raise FileNotFoundError(f"{raw_folder / 'imagesTr'} not found")
    return sorted(map(str, get_identifiers_from_splitted_dataset_folder(str(raw_folder / "imagesTr"),
                                                                        ds["file_ending"])))


def preprocessed_identifiers(folder) -> list[str]:
    """The case ids of a preprocessed configuration folder (e.g. ``.../nnUNetPlans_2d``), as nnU-Net's
    dataset class lists them."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return infer_dataset_class(str(folder)).get_identifiers(str(folder))


def unpack_preprocessed(folder, num_processes: int) -> None:
    """nnU-Net's unpacking of a preprocessed configuration folder (existing unpacked files are kept and
    verified), as its trainer does before training."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    infer_dataset_class(str(folder)).unpack_dataset(str(folder), overwrite_existing=False,
                                                    num_processes=num_processes, verify=True)


def crossval_splits(identifiers, n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """nnU-Net's own seeded K-fold split of ``identifiers`` (what ``nnUNetv2_train`` writes to
    ``splits_final.json`` when it has none)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if len(identifiers) < n_folds:
        raise ValueError(f"{len(identifiers)} cases cannot make {n_folds} folds")
    return [{"train": list(map(str, s["train"])), "val": list(map(str, s["val"]))}
            for s in generate_crossval_split(sorted(identifiers), seed=seed, n_splits=n_folds)]


def ensure_ext_trainer_path(environ=None) -> None:
    """Put our trainer folder on ``nnUNet_extTrainer`` (in front of any the user set) in this process, so
    nnU-Net's in-process lookups (the predictor builds the network through the trainer class named in the
    checkpoint) find our trainers also when the shell did not export it."""
    from nnunet_ext.core.paths import with_our_trainers

    environ = os.environ if environ is None else environ
    environ["nnUNet_extTrainer"] = with_our_trainers(environ.get("nnUNet_extTrainer", ""))


def trainer_class(name: str):
    """nnU-Net's lookup of a trainer class by name (built-ins first, then ``nnUNet_extTrainer``)."""
    import nnunetv2
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
                                               name, "nnunetv2.training.nnUNetTrainer")
    return cls


# ------------------------------------------------------------------------------------------ trainer lookup


_LOOKUP_MARK = "NNUNET_EXT_LOOKUP "


def print_trainer_lookup(names: Sequence[str]) -> None:
    """Print nnU-Net's lookup of each trainer name as one JSON line (what :func:`lookup_trainers` runs in its
    child process)."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    out = {}
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints the modules it searches
                c = recursive_find_trainer_class_by_name(name)
            # ExtTrainer (nnunet_ext.training.base) reads the NNUNET_EXT_* budget: found by name, not imported
            ours = any(k.__name__ == "ExtTrainer" and k.__module__ == "nnunet_ext.training.base" for k in c.__mro__)
            out[name] = {"found": True, "module": c.__module__, "honours_budget": ours}
        except Exception as e:  # noqa: BLE001 - any failure of the lookup is "not found", with its reason
            out[name] = {"found": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(_LOOKUP_MARK + json.dumps(out), flush=True)


def lookup_trainers(names: Sequence[str], env: dict) -> dict:
    """Look every name up with nnU-Net's own ``recursive_find_trainer_class_by_name`` (our trainer folder on
    ``nnUNet_extTrainer``), in one child process with the environment ``env`` (the lookup imports every
    trainer module, ~5 s): :func:`print_trainer_lookup` called through ``python -m nnunet_ext.cluster.call``."""
    import subprocess

    argv = [sys.executable, "-m", "nnunet_ext.cluster.call", f"{__name__}:print_trainer_lookup",
            json.dumps({"names": list(names)})]
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith(_LOOKUP_MARK)), None)
    if line is None:
        raise RuntimeError(f"trainer lookup failed (exit code {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return json.loads(line[len(_LOOKUP_MARK):])


def check_trainers(names: Sequence[str], option: str = "-tr") -> None:
    """Every trainer name found by nnU-Net's own lookup (its trainers, then ``nnUNet_extTrainer`` with our
    trainer folder in front), in one child process; ValueError naming the unknown ones."""
    from nnunet_ext.core.checks import _TRAINER
    from nnunet_ext.core.paths import nnunet_env

    names = list(dict.fromkeys(names))
    for n in names:
        if not isinstance(n, str) or not _TRAINER.match(n):
            raise ValueError(f"{option} {n!r}: a trainer is a Python class name (letters, digits, _)")
    env = nnunet_env(None)
    found = lookup_trainers(names, env)
    unknown = [n for n in names if not found.get(n, {}).get("found")]
    if unknown:
        raise ValueError(f"{option} {' '.join(unknown)}: no trainer of that name (nnU-Net's lookup: its own trainers, "
                         f"then nnUNet_extTrainer={env['nnUNet_extTrainer']}); check the spelling "
                         f"(`nnunet-ext trainers-path` holds ours)")


def check_fan_out(trainers: Sequence[str] = (), plans_files: Sequence = (), configuration: str | None = None,
                  folders: dict | None = None) -> None:
    """What a fan-out command checks before it writes a script: its work folders (``{option: path}``) are
    writable, the configuration is planned (or plannable) in each plans file, every trainer exists."""
    from nnunet_ext.core.checks import check_configuration, check_writable_folder

    for option, folder in (folders or {}).items():
        if folder is not None:
            check_writable_folder(folder, option)
    if configuration is not None:
        for f in plans_files:
            check_configuration(f, configuration)
    if trainers:
        check_trainers(trainers)


# ------------------------------------------------------------------------------------------ training


def deep_supervision_weights(n_scales: int, is_ddp: bool = False, compiled: bool = False) -> np.ndarray:
    """nnU-Net's output weights: 1, 1/2, 1/4, ... with the lowest resolution switched off (a tiny weight
    under DDP without compile, which otherwise complains about unused parameters), normalised to sum 1."""
    w = np.array([1 / (2 ** i) for i in range(n_scales)])
    w[-1] = 1e-6 if (is_ddp and not compiled) else 0
    return w / w.sum()


def pretrained_weights_of_running_training(environ=None) -> str | None:
    """The ``pretrained_weights`` file of the nnU-Net training this process is running (nnU-Net's
    ``run_training(..., pretrained_weights=...)``, which ``nnUNetv2_train -pretrained_weights`` calls), found
    on the call stack; else ``$NNUNET_EXT_PRETRAINED_WEIGHTS``. Works for the command line and for Python
    callers of ``run_training`` alike (no ``sys.argv`` parsing)."""
    environ = os.environ if environ is None else environ
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("run_training", "run_ddp", "maybe_load_checkpoint") and \
                frame.f_globals.get("__name__", "").startswith("nnunetv2.run"):
            for var in ("pretrained_weights", "pretrained_weights_file"):
                if frame.f_locals.get(var):
                    return str(frame.f_locals[var])
        frame = frame.f_back
    return environ.get("NNUNET_EXT_PRETRAINED_WEIGHTS") or None


# ------------------------------------------------------------------------------------------ inference


class export_function:
    """Context manager: nnU-Net's predictor exports each case with ``fn`` instead of its own
    ``export_prediction_from_logits`` (same arguments; ``fn`` must be picklable, e.g. a functools.partial
    of a module-level function, since nnU-Net's export workers are spawned processes)."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        import nnunetv2.inference.predict_from_raw_data as m

        if not hasattr(m, "export_prediction_from_logits"):
            raise RuntimeError("this nnU-Net version has no predict_from_raw_data.export_prediction_from_logits; "
                               "update nnunet_ext.nnunet_adapter.export_function")
        self._module, self._saved = m, m.export_prediction_from_logits
        m.export_prediction_from_logits = self.fn
        return self

    def __exit__(self, *exc):
        self._module.export_prediction_from_logits = self._saved
        return False


def build_trainer(trainer_cls, dataset, configuration: str, fold, plans: str = "nnUNetPlans",
                  device: str = "cpu"):
    """An instance of ``trainer_cls`` for a planned dataset, built as nnU-Net's ``get_trainer_from_args``
    builds it (without looking the class up by name)."""
    import json

    import torch

    pre = preprocessed_folder(dataset)
    plans_file, ds_file = pre / f"{plans}.json", pre / "dataset.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans_dict = json.loads(plans_file.read_text())
    plans_dict["continue_training"] = False  # nnU-Net 2.8 passes this through the plans
    return trainer_cls(plans=plans_dict, configuration=configuration, fold=fold,
                       dataset_json=json.loads(ds_file.read_text()), device=torch.device(device))


class _SeedWorkerOnThreadId:
    """Wraps a data loader's ``set_thread_id``, which batchgenerators' worker calls once at its start right
    after seeding numpy: also seeds torch and python's ``random`` there (forked workers would otherwise share
    the parent's torch state and draw the same torch noise), and limits the worker to one thread as nnU-Net's
    own workers do (a forked worker's torch thread pool hangs in its first multi-threaded operation, e.g. the
    ``matmul`` of the spatial transform). Picklable (no closure)."""

    def __init__(self, original, seeds):
        self.original, self.seeds = original, list(seeds)

    def __call__(self, thread_id):
        import random

        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(1, None)  # for the rest of the worker process, as NonDetMultiThreadedAugmenter
        self.original(thread_id)
        random.seed(int(self.seeds[thread_id]))
        torch.manual_seed(int(self.seeds[thread_id]))


def worker_seeds(seed: int, augmenter: int, n: int) -> list[int]:
    """One seed per worker of the ``augmenter``-th data loader (0: training, 1: validation), from ``seed``."""
    return [int(v) for v in np.random.SeedSequence([int(seed), int(augmenter)]).generate_state(n)]


class seeded_worker_augmentation:
    """Context manager: the data loaders ``nnUNetTrainer.get_dataloaders`` builds inside the block run in
    batchgenerators' ``MultiThreadedAugmenter`` instead of nnU-Net's ``NonDetMultiThreadedAugmenter``: the same
    worker processes (``nnUNet_n_proc_DA``), but batches are taken from the workers in a fixed round-robin
    order and worker ``i`` of loader ``k`` (0 training, 1 validation) seeds numpy, torch and ``random`` with
    :func:`worker_seeds` ``(seed, k, n)[i]``. The batches then depend on ``seed`` and the number of workers
    only. With ``nnUNet_n_proc_DA=0`` nnU-Net builds its ``SingleThreadedAugmenter`` as usual (augmentation
    in the training process, from its seeded random state). The module attribute is restored at the end."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def _augmenter(self, data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False,
                   wait_time=0.02):
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

        ws = worker_seeds(self.seed, self._made, num_processes)
        self._made += 1
        data_loader.set_thread_id = _SeedWorkerOnThreadId(data_loader.set_thread_id, ws)
        return MultiThreadedAugmenter(data_loader, transform, num_processes, num_cached_per_queue=num_cached,
                                      seeds=ws, pin_memory=pin_memory, wait_time=wait_time)

    def __enter__(self):
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

        self._module, self._made = trainer_module, 0
        self._saved = trainer_module.NonDetMultiThreadedAugmenter
        trainer_module.NonDetMultiThreadedAugmenter = self._augmenter
        return self

    def __exit__(self, *exc):
        self._module.NonDetMultiThreadedAugmenter = self._saved
        return False


class single_threaded_augmentation:
    """Context manager: nnU-Net's data augmentation in the calling process (its ``SingleThreadedAugmenter``)
    for the data loaders built inside the block, through nnU-Net's own switch: ``nnUNet_n_proc_DA=0``, which
    ``get_allowed_n_proc_DA`` reads when ``nnUNetTrainer.get_dataloaders`` builds them. Its worker processes
    (``NonDetMultiThreadedAugmenter``, ``seeds=None``) would draw from unseeded random states, in whatever
    order they finish. The variable is restored at the end of the block."""

    VARIABLE = "nnUNet_n_proc_DA"

    def __enter__(self):
        self._saved = os.environ.get(self.VARIABLE)
        os.environ[self.VARIABLE] = "0"
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            os.environ.pop(self.VARIABLE, None)
        else:
            os.environ[self.VARIABLE] = self._saved
        return False
