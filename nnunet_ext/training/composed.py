"""``ComposedTrainer``: nnU-Net's trainer assembled from method parts (nnunet_ext.training.parts).

A trainer is a short named class (nnU-Net identifies trainers by class name)::

    class LSRSoftTrainer(ComposedTrainer):        # your own combination, 4 lines
        loss_part = LSRBCE(alpha=4, beta=4)
        target_parts = (SoftTargets(), LesionSizes())
        network_part = None                       # or FiLM() / CohortNorm()

What the parts change, and nothing else:
* the loss (wrapped in nnU-Net's deep supervision with nnU-Net's weights);
* the training dataset (maps beside the labels, read patch-wise) and nnU-Net's own training transforms
  (the maps travel as segmentation channels beside the labels, nnunet_ext.training.targets); validation
  keeps nnU-Net's hard targets;
* the network (conditional instance norms) and the condition of every batch and validation case;
* the optimizer, where a method was published with its own (``optimizer_part``, nnunet_ext.training.optimizers);
* the output heads' bias, for losses that are voxel-wise cross-entropies alone (``LossPart.prior_bias``):
  set from the training cases' class frequencies (nnunet_ext.training.prior);
* the model contract (nnunet_ext.inference.contract) written into the model folder when training starts, and, for
  soft outputs and cross-entropy-only losses, the Dice-optimal validation threshold of each fold after
  nnU-Net's validation.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunet_ext.inference.contract import ModelContract, read_contract_file, write_contract
from nnunet_ext.training.base import ExtTrainer
from nnunet_ext.training.parts import DiceCE, LossPart, NetworkPart, RandomRater, TargetPart, part_name
from nnunet_ext.training.plumbing import refuse_unsupported, wrap_deep_supervision
from nnunet_ext.training.targets import (PACKED_FOLDER, MapTransport, Packing, WithTargetMaps, packed_folder,
                                         write_packed_maps)


def check_composition(loss: LossPart, targets, network) -> list:
    """The map layout ``[MapSpec, ...]`` of a composition, or NotImplementedError naming the two parts that
    cannot work together."""
    if not isinstance(loss, LossPart):
        raise NotImplementedError(f"the loss part must be a LossPart, got {loss!r}")
    if network is not None and not isinstance(network, NetworkPart):
        raise NotImplementedError(f"the network part must be one NetworkPart or None, got {network!r} "
                                  f"(two network parts cannot be combined)")
    seen, specs = set(), []
    for t in targets:
        if not isinstance(t, TargetPart):
            raise NotImplementedError(f"target parts must be TargetParts, got {t!r}")
        key = type(t).__name__ if t.provides is None else t.provides
        if key in seen:
            raise NotImplementedError(f"{part_name(t)} twice: a composition takes each target part once")
        seen.add(key)
        if t.spec() is not None:
            specs.append(t.spec())
    raters = [t for t in targets if isinstance(t, RandomRater)]
    if len(raters) > 1:
        raise NotImplementedError(f"{part_name(raters[0])} with {part_name(raters[1])}: the labels come from one "
                                  f"rater part")
    if raters and raters[0].fuse is not None:
        for t in targets:
            if t.spec() is not None:
                raise NotImplementedError(f"{part_name(raters[0])} with {part_name(t)}: its maps follow one rater, "
                                          f"not a fusion (use RandomRater(), or fuse the raters into the "
                                          f"dataset's labels with nnunet-ext fuse)")
    names = {s.name for s in specs}
    for need in loss.needs:
        if need not in names:
            part = {"sizes": "LesionSizes()", "soft": "SoftTargets()"}[need]
            raise NotImplementedError(f"{part_name(loss)} needs the {need!r} map: add {part} to the target parts")
    for t in targets:
        if t.provides is not None and t.provides not in loss.uses:
            raise NotImplementedError(f"{part_name(loss)} does not use {part_name(t)} (it would be carried through "
                                      f"augmentation and silently ignored)")
    return specs


class ComposedTrainer(ExtTrainer):
    """nnU-Net's trainer with one loss part, any target parts and at most one network part."""

    loss_part: LossPart = DiceCE()
    target_parts: tuple = ()
    network_part: NetworkPart | None = None
    soft_threshold: bool | None = None  # store the fold's Dice-optimal threshold (default: soft-target trainers)
    optimizer_part = None  # None: nnU-Net's SGD + poly schedule; else e.g. AdamCosine (nnunet_ext.training.optimizers)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.map_specs = check_composition(self.loss_part, self.target_parts, self.network_part)
        self.layout = {s.name: i + 1 for i, s in enumerate(self.map_specs)}
        what = " + ".join(part_name(p) for p in (self.loss_part, *self.target_parts, self.network_part) if p is not None)
        if self.target_parts or not isinstance(self.loss_part, DiceCE) or self.network_part is not None:
            refuse_unsupported(self, what, regions=not isinstance(self.loss_part, DiceCE) or bool(self.target_parts))
        if (self.loss_part.two_class_only or "soft" in self.layout or any(isinstance(t, RandomRater) for t in self.target_parts)) \
                and len(self.label_manager.foreground_labels) != 1:
            raise NotImplementedError(f"{type(self).__name__}: {what} supports one lesion class, dataset has labels "
                                      f"{self.label_manager.foreground_labels}")

    # ---------------------------------------------------------------------------------------- network
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        if cls.network_part is None:
            return net
        from nnunet_ext.networks.conditional_norm import condition_network

        return condition_network(net, cls.network_part.kind, cls.network_part.n_slots)

    @property
    def condition(self):
        from nnunet_ext.networks.conditional_norm import condition_state

        return condition_state(self.network)

    def _do_i_compile(self):
        return False if self.network_part is not None else super()._do_i_compile()

    def _set_condition(self, keys) -> None:
        part = self.network_part
        if part is not None:
            self.condition.set(part.condition_of(self, list(keys)))

    def configure_optimizers(self):
        if self.optimizer_part is None:
            return super().configure_optimizers()
        self.print_to_log_file(f"optimizer: {self.optimizer_part!r} over {self.num_epochs} epochs")
        return self.optimizer_part.build(self.network.parameters(), self.num_epochs)

    def initialize(self):
        super().initialize()
        if self.network_part is not None:
            self.condition.ddp_safe = bool(self.is_ddp)  # every cohort slot in the graph under DDP
        if self.loss_part.prior_bias:  # before any checkpoint is loaded (--c and -pretrained_weights win)
            self.init_output_bias()

    def init_output_bias(self) -> list[float]:
        """Start every output head at the class frequencies of this fold's training cases
        (:mod:`nnunet_ext.training.prior`); the fractions and biases go to the log and the settings."""
        from nnunet_ext.training.prior import class_fractions, prior_bias, set_output_bias

        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        n = self.label_manager.num_segmentation_heads  # output channels: the classes without an ignore label
        fractions = class_fractions(dataset, tr_keys, n, self.preprocessed_dataset_folder)
        bias = prior_bias(fractions)
        heads = set_output_bias(self.network, bias)
        self.output_bias = {"class_fractions": [round(float(f), 8) for f in fractions],
                            "bias": [round(b, 6) for b in bias], "heads": heads, "training_cases": len(tr_keys)}
        self.print_to_log_file(f"output bias from the class fractions of {len(tr_keys)} training cases "
                               f"{self.output_bias['class_fractions']}: {self.output_bias['bias']} on {heads} "
                               f"output heads")
        return bias

    def train_step(self, batch: dict) -> dict:
        self._set_condition(batch["keys"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._set_condition(batch["keys"])
        return super().validation_step(batch)

    # ---------------------------------------------------------------------------------------- loss and data
    def _build_loss(self):
        loss, wrapped = self.loss_part.build(self, self.layout)
        return loss if wrapped else wrap_deep_supervision(self, loss)

    def _raters(self):
        from nnunet_ext.preprocessing.soft_preprocess import rater_folders

        if not any(isinstance(t, RandomRater) for t in self.target_parts):
            return None
        return rater_folders(self.preprocessed_dataset_folder)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.target_parts:
            return dataset_tr, dataset_val
        raters = self._raters()
        for t in self.target_parts:
            t.prepare(self, dataset_tr, raters)
        folders = [t.folder(self, raters) for t in self.target_parts if t.spec() is not None]
        remedy = f"rerun nnunet-ext preprocess-soft -d {self.plans_manager.dataset_name} -c {self.configuration_name}"
        packing, packed = self.map_packing(), None
        if packing is not None:  # the labels with the first map packed in, stored once per case (and rater)
            pre, first = self.preprocessed_dataset_folder, folders[0]
            made = write_packed_maps(dataset_tr.identifiers, pre, first, packing, raters, remedy)
            if made:
                self.print_to_log_file(f"packed the first map into the labels of {made} cases in "
                                       f"{Path(pre) / PACKED_FOLDER}")
            packed = (lambda case, r: packed_folder(pre, first(case, r), packing)) if callable(first) \
                else packed_folder(pre, first, packing)
        fuse = next((t.fuse for t in self.target_parts if isinstance(t, RandomRater)), None)
        return WithTargetMaps(dataset_tr, folders, raters, remedy, packed_folders=packed, fuse=fuse), dataset_val

    def map_packing(self) -> Packing | None:
        """How the first map shares the label channel on its way through nnU-Net's data path (see
        :class:`nnunet_ext.training.targets.Packing`); the dataset wrapper and the transport use the same."""
        if not self.map_specs:
            return None
        lm = self.label_manager
        max_label = max(list(lm.all_labels) + ([lm.ignore_label] if lm.ignore_label is not None else []))
        return Packing.for_labels(max_label, self.map_specs[0])

    def get_training_transforms(self, *args, **kwargs):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        return MapTransport(transforms, self.map_specs, self.map_packing()) if self.map_specs else transforms

    # ---------------------------------------------------------------------------------------- contract
    def contract(self) -> ModelContract:
        c = ModelContract(trainer=type(self).__name__, activation=self.loss_part.activation)
        if self.network_part is not None:
            c.condition = self.network_part.kind
            if c.condition == "cohort":
                c.cohorts = [n for n in self.condition.cohort_table() if n]
        old = read_contract_file(self.output_folder_base) if os.path.isdir(self.output_folder_base) else None
        if old is not None:  # keep what was chosen after training (nnunet-ext select)
            c.threshold, c.postprocessing = old.threshold, old.postprocessing
        return c

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.network_part is not None:
            self.network_part.prepare(self)
        super().on_train_start()
        if self.local_rank == 0:
            write_contract(self.output_folder_base, self.contract())

    def stores_threshold(self) -> bool:
        if self.soft_threshold is not None:
            return self.soft_threshold
        return "soft" in self.layout or self.loss_part.activation != "softmax" or self.loss_part.prior_bias

    def perform_actual_validation(self, save_probabilities: bool = False):
        from nnunet_ext.networks.activations import output_activation
        from nnunet_ext.training.conditioning import conditioning_dataset_class

        soft = self.stores_threshold()
        base = self.dataset_class
        if self.network_part is not None:
            self.network_part.prepare(self)
            self.dataset_class = conditioning_dataset_class(base, lambda k: self._set_condition([k]))
        try:
            # the network returns its activation per forward pass (patch), as the predictor makes it do
            with output_activation(self.network, self.loss_part.activation):
                super().perform_actual_validation(save_probabilities or soft)
        finally:
            self.dataset_class = base
            if self.network_part is not None:
                self.condition.clear()
        if self.local_rank != 0:
            return
        gt = os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations")
        if soft:
            from nnunet_ext.inference.thresholds import fold_threshold_from_validation

            fold_threshold_from_validation(self.output_folder, gt, self.dataset_json["file_ending"],
                                           self.loss_part.activation)
        write_contract(self.output_folder_base, self.contract())

    def ext_settings(self) -> dict:
        s = {**super().ext_settings(), **self.loss_part.settings(), "loss_parameters": {k: v for k, v in vars(self.loss_part).items() if k != "needs"},
             "targets": [part_name(t) for t in self.target_parts], "target_layout": self.layout}
        if self.network_part is not None:
            s.update(self.network_part.settings(self))
        if getattr(self, "output_bias", None) is not None:
            s["output_bias"] = self.output_bias
        if self.optimizer_part is not None:
            s["optimizer"] = repr(self.optimizer_part)
            s["initial_lr"] = self.optimizer_part.lr
        return s
