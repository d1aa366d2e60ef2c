"""Plumbing shared by trainers: deep-supervision wrapping, unsupported-combination checks, dataset wrapping."""
from __future__ import annotations

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn

from nnunet_ext.nnunet_adapter import deep_supervision_weights


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
