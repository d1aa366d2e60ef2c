"""Plumbing shared by all nnunet-ext trainers: training budget overrides and a settings record.

nnU-Net identifies a trainer by its class name only, so published hyper-parameters are named subclasses.
For smoke tests, demos and method studies on CPU, the training length can be shortened without a new
class through environment variables (they never change anything else):

``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERATIONS`` (training iterations per epoch),
``NNUNET_EXT_VAL_ITERATIONS`` (validation iterations per epoch). Each variable applied is printed at the
start of training and written to nnU-Net's training log (``training_log_*.txt``) with the value it replaced.

``NNUNET_EXT_SEED`` (opt-in, a whole number in 0..2**32-1) makes a training reproducible: python's ``random``,
numpy and torch are seeded when the trainer is created (before nnU-Net builds the network and its data
loaders), nnU-Net's data augmentation workers (``nnUNet_n_proc_DA``) are seeded from it and hand over their
batches in a fixed order (:class:`nnunet_ext.nnunet_adapter.seeded_worker_augmentation`; nnU-Net's own workers
are unseeded and deliver in whatever order they finish), and torch uses deterministic algorithms (on CUDA also
cuDNN's deterministic convolutions, without benchmarking; an operation without a deterministic CUDA
implementation only warns). On CPU the same seed, data, trainer, budget, thread count and number of
augmentation workers give the same weights. It is printed and logged like the budget variables. A run continued with ``--c`` is not
reproduced (the random state is not stored in the checkpoint).

Every trainer writes its resolved settings to ``nnunet_ext_settings.json`` in its output folder.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.core.budget import BUDGET_VARIABLES, SEED_VARIABLE, seed_in  # variable -> trainer attribute
from nnunet_ext.training.lesion_monitor import LesionMonitor


def apply_budget_overrides(trainer, environ=None) -> dict[str, int]:
    """Set the training-length attributes named in ``BUDGET_VARIABLES`` from the environment."""
    environ = os.environ if environ is None else environ
    applied = {}
    for var, attr in BUDGET_VARIABLES.items():
        if environ.get(var):
            try:
                value = int(environ[var])
            except ValueError:
                raise ValueError(f"{var} must be a positive integer, got {environ[var]!r}")
            if value < 1:
                raise ValueError(f"{var} must be a positive integer, got {value}")
            setattr(trainer, attr, value)
            applied[attr] = value
    return applied


def apply_training_seed(environ=None, device_type: str = "cpu") -> int | None:
    """Seed python's ``random``, numpy and torch with ``NNUNET_EXT_SEED`` (when set) and switch torch to
    deterministic algorithms; returns the seed, or None (nothing changed) when the variable is unset. On CPU an
    operation without a deterministic implementation is an error; on other devices (``device_type``) a
    warning, since some that nnU-Net's training uses have none on CUDA (torch lists ``NLLLoss``, which its
    cross-entropy calls), so a CUDA run is as deterministic as torch makes it, not guaranteed bit-identical."""
    seed = seed_in(environ)
    if seed is None:
        return None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator
    # cuBLAS is deterministic only with a fixed workspace (read when CUDA creates its handle)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device_type != "cpu")
    return seed


class ExtTrainer(LesionMonitor, nnUNetTrainer):
    """Base of every nnunet-ext trainer: nnU-Net's trainer plus budget overrides, a settings record and lesion
    metrics on the validation patches every few epochs (:mod:`nnunet_ext.training.lesion_monitor`).
    Subclasses add their own settings by extending :meth:`ext_settings`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        from nnunet_ext.nnunet_adapter import check_nnunet_version

        check_nnunet_version()
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_defaults = {attr: getattr(self, attr) for attr in BUDGET_VARIABLES.values()}
        self.budget_overrides = apply_budget_overrides(self)
        self.training_seed = apply_training_seed(device_type=self.device.type)

    def ext_settings(self) -> dict:
        return {"trainer": type(self).__name__, "num_epochs": self.num_epochs,
                "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "initial_lr": self.initial_lr, "budget_overrides_from_environment": self.budget_overrides,
                "lesion_metrics_every": getattr(self, "lesion_every", self.lesion_metrics_every),
                "seed": self.training_seed}

    def get_dataloaders(self):
        """nnU-Net's data loaders; with a training seed its worker processes take seeds from it and hand over
        their batches in a fixed order (:class:`nnunet_ext.nnunet_adapter.seeded_worker_augmentation`)."""
        if getattr(self, "training_seed", None) is None:
            return super().get_dataloaders()
        from nnunet_ext.nnunet_adapter import seeded_worker_augmentation

        with seeded_worker_augmentation(self.training_seed):
            return super().get_dataloaders()

    def seed_lines(self) -> list[str]:
        """The line saying the training is seeded (none without a seed)."""
        if self.training_seed is None:
            return []
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        n = get_allowed_n_proc_DA()
        where = (f"{n} seeded augmentation workers, batches in a fixed order" if n else
                 "data augmentation in the training process")
        return [f"nnunet-ext seed: {SEED_VARIABLE}={self.training_seed} seeds random, numpy and torch; {where} "
                f"(nnUNet_n_proc_DA={n}); deterministic torch algorithms"]

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, then lesion-wise metrics beside its summary.json
        (``validation/lesion_summary.json``, nnunet_ext.metrics.validation)."""
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            from nnunet_ext.metrics.validation import write_fold_lesion_metrics

            write_fold_lesion_metrics(self.output_folder,
                                      os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
                                      self.dataset_json["file_ending"])

    def budget_lines(self) -> list[str]:
        """One line per budget variable applied: what it set and what nnU-Net's trainer would have used."""
        return [f"nnunet-ext budget override: {var}={self.budget_overrides[attr]} sets {attr} = "
                f"{self.budget_overrides[attr]} (the trainer's own value: {self.budget_defaults.get(attr)})"
                for var, attr in BUDGET_VARIABLES.items() if attr in self.budget_overrides]

    def on_train_start(self):
        super().on_train_start()
        if self.training_seed is not None and self.device.type == "cuda":
            # nnU-Net's run_training switches cuDNN to benchmarking after creating the trainer
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        for line in self.budget_lines() + self.seed_lines():  # on the console and in nnU-Net's training log (rank 0 writes it)
            self.print_to_log_file(line)
        if self.local_rank == 0 and self.output_folder is not None:
            with open(os.path.join(self.output_folder, "nnunet_ext_settings.json"), "w") as f:
                json.dump(self.ext_settings(), f, indent=2)


class ExtBaselineTrainer(ExtTrainer):
    """nnU-Net's default trainer, unchanged except that it honours the budget variables: the baseline
    that method studies compare against under the same budget."""
