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


class DatasetWrapper:
    """Base of our wrappers around an nnU-Net dataset: everything but ``load_case`` is the wrapped dataset's
    (nnU-Net's data loader uses ``identifiers`` and ``load_case``)."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        if name == "base":  # not set yet, e.g. while unpickling
            raise AttributeError(name)
        return getattr(self.base, name)

    def load_case(self, identifier):
        return self.base.load_case(identifier)


class WithExtraSegChannel(DatasetWrapper):
    """Returns the segmentation with a per-case map of the same grid stacked as channel 1, so nnU-Net's
    cropping and augmentation treat it like the labels. Subclasses implement ``load_extra`` and name the
    command that makes the maps in ``remedy``."""

    remedy = ""

    def load_extra(self, identifier):  # pragma: no cover - abstract
        raise NotImplementedError

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        extra = self.load_extra(identifier)
        seg = np.asarray(seg[:])
        if extra.shape != seg.shape[1:]:
            raise RuntimeError(f"{type(self).__name__}: map of case {identifier} has shape {extra.shape}, its "
                               f"segmentation {seg.shape[1:]}: {self.remedy}")
        return data, np.concatenate([seg, extra[None].astype(seg.dtype)]), seg_prev, properties
