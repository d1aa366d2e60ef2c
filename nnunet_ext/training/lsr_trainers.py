"""Lesion Size Reweighting trainers and the focal Tversky trainer (see docs/trainers.md)."""
from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnunet_ext.losses import DiceAndLSRLoss, FocalTverskyLoss, LSRCrossEntropyLoss
from nnunet_ext.lsr import check_alpha_beta
from nnunet_ext.training.base import ExtTrainer
from nnunet_ext.training.lesion_sizes import WithLesionSizes, ensure_size_maps, size_folder
from nnunet_ext.training.plumbing import refuse_unsupported, wrap_deep_supervision


class LSRTrainer(ExtTrainer):
    """LSR-weighted (binary) cross-entropy on nnU-Net's planned network (Nichyporuk et al. 2021),
    alpha = beta = 4. Variants set the class attributes below."""

    lsr_alpha: float = 4.0
    lsr_beta: float = 4.0
    lsr_connectivity: int = 26

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_alpha_beta(self.lsr_alpha, self.lsr_beta)
        refuse_unsupported(self, "lesion size reweighting")

    def _lsr_loss(self) -> LSRCrossEntropyLoss:
        return LSRCrossEntropyLoss(self.lsr_alpha, self.lsr_beta, ignore_label=self.label_manager.ignore_label)

    def _build_loss(self):
        return wrap_deep_supervision(self, self._lsr_loss())

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        folder = size_folder(self.preprocessed_dataset_folder, self.lsr_connectivity)
        classes = [c for c in self.label_manager.foreground_labels if c != self.label_manager.ignore_label]
        made = ensure_size_maps(dataset_tr, folder, classes, self.lsr_connectivity)
        if made:
            self.print_to_log_file(f"computed lesion size maps of {made} cases in {folder}")
        # validation keeps plain targets: its loss is the unweighted cross-entropy
        return WithLesionSizes(dataset_tr, folder), dataset_val

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "lsr_alpha": self.lsr_alpha, "lsr_beta": self.lsr_beta,
                "lsr_connectivity": self.lsr_connectivity, "loss": type(self._lsr_loss()).__name__}


class LSRTrainer_alpha1_beta4(LSRTrainer):
    lsr_alpha, lsr_beta = 1.0, 4.0


class LSRTrainer_alpha8_beta8(LSRTrainer):
    lsr_alpha, lsr_beta = 8.0, 8.0


class BCETrainer(LSRTrainer):
    """Plain (binary) cross-entropy through the same machinery (alpha = 0): the paper's baseline."""

    lsr_alpha = 0.0


class LSRDiceTrainer(LSRTrainer):
    """nnU-Net's soft Dice plus LSR-weighted cross-entropy."""

    def _build_loss(self):
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=self.configuration_manager.batch_dice,
                                           do_bg=False, smooth=1e-5, ddp=self.is_ddp)
        return wrap_deep_supervision(self, DiceAndLSRLoss(dice, self._lsr_loss()))


class FocalTverskyTrainer(ExtTrainer):
    """Focal Tversky loss, a=0.7, b=0.3, gamma=4/3, smoothing 1 (see nnunet_ext.losses.FocalTverskyLoss)."""

    tversky_a, tversky_b, tversky_gamma, tversky_smooth = 0.7, 0.3, 4 / 3, 1.0

    def _build_loss(self):
        refuse_unsupported(self, "the focal Tversky loss", cascade=False)
        return wrap_deep_supervision(self, FocalTverskyLoss(
            self.tversky_a, self.tversky_b, self.tversky_gamma, self.tversky_smooth,
            batch=bool(self.configuration_manager.batch_dice), ignore_label=self.label_manager.ignore_label))

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "tversky_a": self.tversky_a, "tversky_b": self.tversky_b,
                "tversky_gamma": self.tversky_gamma, "tversky_smooth": self.tversky_smooth}


class FocalTverskyTrainer_a085(FocalTverskyTrainer):
    tversky_a, tversky_b = 0.85, 0.15
