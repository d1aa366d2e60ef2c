"""Plumbing shared by trainers: deep-supervision wrapping and unsupported-combination checks."""
from __future__ import annotations

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn


def deep_supervision_weights(n_scales: int, is_ddp: bool = False, compiled: bool = False) -> np.ndarray:
    """nnU-Net's output weights: 1, 1/2, 1/4, ... with the lowest resolution switched off (a tiny weight
    under DDP without compile, which otherwise complains about unused parameters), normalised to sum 1."""
    w = np.array([1 / (2 ** i) for i in range(n_scales)])
    w[-1] = 1e-6 if (is_ddp and not compiled) else 0
    return w / w.sum()


def wrap_deep_supervision(trainer, loss: nn.Module) -> nn.Module:
    """Wrap ``loss`` in nnU-Net's DeepSupervisionWrapper with nnU-Net's weights when the trainer uses deep
    supervision; return it unchanged otherwise."""
    if not trainer.enable_deep_supervision:
        return loss
    n = len(trainer._get_deep_supervision_scales())
    return DeepSupervisionWrapper(loss, deep_supervision_weights(n, trainer.is_ddp, trainer._do_i_compile()))


def refuse_unsupported(trainer, what: str, regions: bool = True, cascade: bool = True) -> None:
    """Raise NotImplementedError for label/plan set-ups a trainer does not handle."""
    if regions and trainer.label_manager.has_regions:
        raise NotImplementedError(f"{type(trainer).__name__}: region-based training is not supported by {what}; "
                                  f"use plain labels in dataset.json")
    if cascade and trainer.is_cascaded:
        raise NotImplementedError(f"{type(trainer).__name__}: cascaded configurations "
                                  f"({trainer.configuration_name}) are not supported by {what}")
