"""Trainers with conditional instance norms: resolution FiLM and cohort-conditioned IN (SCIN).

Each trainer builds nnU-Net's planned network and conditions its instance norms
(nnunet_ext.networks.conditional_norm). The condition of every sample is looked up from the case
identifiers that nnU-Net's data loader returns with each batch (``batch['keys']``) and set on the network
before nnU-Net's own ``train_step`` / ``validation_step`` run; nnU-Net's end-of-training validation reads
cases through ``self.dataset_class``, which is swapped for a subclass that sets the condition of each case
it loads. Prediction needs ``nnunet-ext predict`` (nnUNetv2_predict cannot supply a condition and fails
with a message saying so). See docs/conditioning.md.
"""
from __future__ import annotations

import os
import pickle
import sys

import torch

from nnunet_ext.cohorts import assign_slots, check_cases, cohorts_for_dataset, slot_of
from nnunet_ext.networks.conditional_norm import (CohortInstanceNorm, condition_network, condition_state,
                                                  spacing_condition)
from nnunet_ext.training.base import ExtTrainer
from nnunet_ext.training.plumbing import refuse_unsupported


def conditioning_dataset_class(base_cls, on_load):
    """``base_cls`` (an nnU-Net dataset class) whose ``load_case(k)`` also calls ``on_load(k)``."""

    class ConditioningDataset(base_cls):
        def load_case(self, identifier):
            out = super().load_case(identifier)
            on_load(identifier)
            return out

    ConditioningDataset.__name__ = f"Conditioning{base_cls.__name__}"
    return ConditioningDataset


class ConditionedTrainer(ExtTrainer):
    """Base: builds the conditioned network and sets the condition of each batch / validation case.
    Subclasses set ``condition_kind`` and implement :meth:`condition_of`."""

    condition_kind: str = ""
    n_cohort_slots: int = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        refuse_unsupported(self, f"{type(self).__name__} (nnunet-ext predict has no previous-stage input)",
                           regions=False, cascade=True)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        return condition_network(network, cls.condition_kind, cls.n_cohort_slots)

    def _do_i_compile(self):
        return False  # the condition is set outside forward(); keep the module eager

    @property
    def condition(self):
        return condition_state(self.network)

    def condition_of(self, keys) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_condition(self, keys) -> None:
        self.condition.set(self.condition_of(list(keys)))

    def train_step(self, batch: dict) -> dict:
        self._set_condition(batch["keys"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._set_condition(batch["keys"])
        return super().validation_step(batch)

    def prepare_condition(self) -> None:
        """Called once the network exists (and pretrained weights or a checkpoint are loaded)."""

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.prepare_condition()
        super().on_train_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.prepare_condition()
        base = self.dataset_class
        self.dataset_class = conditioning_dataset_class(base, lambda k: self._set_condition([k]))
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base
            self.condition.clear()


class ResolutionFiLMTrainer(ConditionedTrainer):
    """Every instance norm becomes ``(gamma + gamma_r) xhat + (beta + beta_r)`` with ``(gamma_r, beta_r)``
    from a small MLP of the case's original voxel spacing (before nnU-Net's resampling)."""

    condition_kind = "spacing"

    def condition_of(self, keys):
        if not hasattr(self, "_spacings"):
            self._spacings = {}
        for k in keys:
            if k not in self._spacings:
                with open(os.path.join(self.preprocessed_dataset_folder, f"{k}.pkl"), "rb") as f:
                    self._spacings[k] = pickle.load(f)["spacing"]
        return spacing_condition([self._spacings[k] for k in keys])

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "condition": "original voxel spacing (mm), log2 -> MLP per norm"}


class SCINTrainer(ConditionedTrainer):
    """Cohort-conditioned instance norm (Nichyporuk, ch. 6): one (gamma, beta) per cohort and norm, all
    convolutions shared. Cohorts come from ``cohorts.json`` beside dataset.json; 8 cohort slots."""

    condition_kind = "cohort"
    n_cohort_slots = 8

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            raise NotImplementedError(f"{type(self).__name__}: cohorts absent from a batch get no gradient, which "
                                      f"nnU-Net's DDP set-up (no find_unused_parameters) rejects; train on one GPU")

    def prepare_condition(self):
        self.cohort_of_case, source = cohorts_for_dataset(self.plans_manager.dataset_name,
                                                          self.preprocessed_dataset_folder)
        ids = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder) if self.dataset_class else []
        check_cases(self.cohort_of_case, ids, str(source))
        self.cohort_table = assign_slots(self.condition.cohort_table(), self.cohort_of_case.values(),
                                         self.n_cohort_slots)
        self.condition.set_cohort_table(self.cohort_table)
        self.print_to_log_file(f"cohorts from {source}: " + ", ".join(
            f"{n} -> slot {i}" for i, n in enumerate(self.cohort_table) if n is not None))

    def condition_of(self, keys):
        if not hasattr(self, "cohort_table"):
            self.prepare_condition()
        try:
            return torch.tensor([slot_of(self.cohort_table, self.cohort_of_case[k]) for k in keys], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"case {e.args[0]} has no cohort in cohorts.json")

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "n_cohort_slots": self.n_cohort_slots,
                "cohort_table": {n: i for i, n in enumerate(getattr(self, "cohort_table", [])) if n is not None}}


class SCINTrainer_32cohorts(SCINTrainer):
    n_cohort_slots = 32


def pretrained_weights_argument(argv=None, environ=None) -> str | None:
    """The ``-pretrained_weights`` file of this nnUNetv2_train run (or $NNUNET_EXT_PRETRAINED_WEIGHTS)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    for i, a in enumerate(argv[:-1]):
        if a in ("-pretrained_weights", "--pretrained_weights"):
            return argv[i + 1]
    return environ.get("NNUNET_EXT_PRETRAINED_WEIGHTS") or None


class SCINNormFineTuneTrainer(SCINTrainer):
    """Norm-only fine-tuning of a pretrained SCIN model for the cohorts of this (small) dataset:
    ``nnUNetv2_train D 2d F -tr SCINNormFineTuneTrainer -pretrained_weights <SCIN checkpoint>``.

    Only the (gamma, beta) slots of this dataset's cohorts train; every convolution, the segmentation
    layers and all other cohorts' norm parameters stay frozen. A cohort new to the model takes a free slot,
    initialised with the mean of the trained cohorts' parameters. nnU-Net's ``-pretrained_weights``
    deliberately skips the segmentation layers (``.seg_layers.``); this trainer restores them from the same
    checkpoint so the model is the pretrained one except for the tuned norms."""

    def prepare_condition(self):
        if getattr(self, "_fine_tune_ready", False):
            return super().prepare_condition()
        before = self.condition.cohort_table()
        fresh = self.current_epoch == 0
        if fresh:
            path = pretrained_weights_argument()
            if path is None or not any(before):
                raise RuntimeError(f"{type(self).__name__} fine-tunes a pretrained SCIN model: run nnUNetv2_train with "
                                   f"-pretrained_weights <checkpoint of a SCINTrainer model>")
            weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
            own = self.network.state_dict()
            seg = {k: v for k, v in weights.items() if ".seg_layers." in k}
            bad = [k for k, v in seg.items() if k not in own or own[k].shape != v.shape]
            if bad or not seg:
                raise RuntimeError(f"segmentation layers of {path} do not fit this network ({bad[:3]})")
            self.network.load_state_dict(seg, strict=False)
        super().prepare_condition()
        slots = sorted({slot_of(self.cohort_table, c) for c in self.cohort_of_case.values()})
        trained = [i for i, n in enumerate(before) if n is not None and i not in slots]
        norms = [m for m in self.network.modules() if isinstance(m, CohortInstanceNorm)]
        with torch.no_grad():
            for m in norms:
                for s in slots:
                    if fresh and before[s] is None and trained:  # new cohort: start from the mean cohort
                        m.weight[s].copy_(torch.stack([m.weight[i] for i in trained]).mean(0))
                        m.bias[s].copy_(torch.stack([m.bias[i] for i in trained]).mean(0))
        for p in self.network.parameters():
            p.requires_grad_(False)
        for m in norms:
            for s in slots:
                m.weight[s].requires_grad_(True)
                m.bias[s].requires_grad_(True)
        self.tuned_slots = slots
        self._fine_tune_ready = True
        n = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        self.print_to_log_file(f"norm-only fine-tuning of cohort slots {slots} "
                               f"({[self.cohort_table[s] for s in slots]}): {n} trainable parameters of "
                               f"{sum(p.numel() for p in self.network.parameters())}")

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "fine_tuned_slots": getattr(self, "tuned_slots", None)}
