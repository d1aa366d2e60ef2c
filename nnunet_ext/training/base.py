"""Plumbing shared by all nnunet-ext trainers: training budget overrides and a settings record.

nnU-Net identifies a trainer by its class name only, so published hyper-parameters are named subclasses.
For smoke tests, demos and method studies on CPU, the training length can be shortened without a new
class through environment variables (they never change anything else):

``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERATIONS`` (training iterations per epoch),
``NNUNET_EXT_VAL_ITERATIONS`` (validation iterations per epoch). Each variable applied is printed at the
start of training and written to nnU-Net's training log (``training_log_*.txt``) with the value it replaced.

Every trainer writes its resolved settings to ``nnunet_ext_settings.json`` in its output folder.
"""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.core.budget import BUDGET_VARIABLES  # variable -> trainer attribute
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

    def ext_settings(self) -> dict:
        return {"trainer": type(self).__name__, "num_epochs": self.num_epochs,
                "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "initial_lr": self.initial_lr, "budget_overrides_from_environment": self.budget_overrides,
                "lesion_metrics_every": getattr(self, "lesion_every", self.lesion_metrics_every)}

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
        for line in self.budget_lines():  # on the console and in nnU-Net's training log (rank 0 writes it)
            self.print_to_log_file(line)
        if self.local_rank == 0 and self.output_folder is not None:
            with open(os.path.join(self.output_folder, "nnunet_ext_settings.json"), "w") as f:
                json.dump(self.ext_settings(), f, indent=2)


class ExtBaselineTrainer(ExtTrainer):
    """nnU-Net's default trainer, unchanged except that it honours the budget variables: the baseline
    that method studies compare against under the same budget."""
