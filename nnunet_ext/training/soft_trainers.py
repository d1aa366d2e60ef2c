"""Soft-label trainers (see docs/soft_labels.md). They need ``nnunet-ext preprocess-soft`` to have put the
dataset's soft targets on the configuration's grid."""
from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.losses import AdaptiveWingLoss, SoftDiceBCELoss
from nnunet_ext.soft_preprocess import rater_folders, soft_folder
from nnunet_ext.training.targets import SoftTargetTransforms, WithRandomRater, WithSoftTargets
from nnunet_ext.thresholds import fold_threshold_from_validation
from nnunet_ext.training.base import ExtTrainer
from nnunet_ext.training.plumbing import refuse_unsupported, wrap_deep_supervision


class SoftTargetTrainer(ExtTrainer):
    """Base: training targets carry the preprocessed soft map (channel 1) through nnU-Net's augmentation and
    deep supervision. Validation keeps nnU-Net's hard targets. One lesion class only."""

    output_activation = "softmax"  # how the soft output is read from the logits (nnunet_ext.thresholds)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        refuse_unsupported(self, "soft-label training")
        if len(self.label_manager.foreground_labels) != 1:
            raise NotImplementedError(f"{type(self).__name__}: soft-label training supports one lesion class, "
                                      f"dataset has labels {self.label_manager.foreground_labels}")

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return WithSoftTargets(dataset_tr, soft_folder(self.preprocessed_dataset_folder)), dataset_val

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        return SoftTargetTransforms(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, always with probabilities, then the fold's Dice-optimal threshold counts
        (nnunet_ext.thresholds), applied by ``nnunet-ext predict``."""
        super().perform_actual_validation(True)
        if self.local_rank == 0:
            fold_threshold_from_validation(self.output_folder,
                                           os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
                                           self.dataset_json["file_ending"], self.output_activation)

    def ext_settings(self) -> dict:
        return {**super().ext_settings(), "output_activation": self.output_activation}


class SoftDiceTrainer(SoftTargetTrainer):
    """Soft Dice (Kats et al. 2019) + soft BCE on soft targets."""

    def _build_loss(self):
        return wrap_deep_supervision(self, SoftDiceBCELoss(batch=bool(self.configuration_manager.batch_dice),
                                                           ignore_label=self.label_manager.ignore_label))


class SoftSegTrainer(SoftTargetTrainer):
    """SoftSeg (Gros et al. 2021): normalized ReLU of the lesion logit + Adaptive Wing loss on soft targets.
    The activation lives in the loss; nnU-Net's inference applies its softmax, whose argmax is exactly the
    normalized ReLU's support (lesion logit > background logit); ``nnunet-ext predict`` writes the normalized
    ReLU map and thresholds it."""

    output_activation = "normalized_relu"

    def _build_loss(self):
        return wrap_deep_supervision(self, AdaptiveWingLoss(ignore_label=self.label_manager.ignore_label))


class RandomRaterTrainer(ExtTrainer):
    """Each training sample takes one rater's mask, drawn anew every time the case is loaded (Lemay et al.
    2022, "no fusion"); nnU-Net's default loss. Needs ``nnunet-ext preprocess-soft --raters``. Validation
    uses the dataset's labelsTr (e.g. the consensus)."""

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return WithRandomRater(dataset_tr, rater_folders(self.preprocessed_dataset_folder)), dataset_val
