"""Targets carried beside the labels through nnU-Net's data loader and augmentation (temporary layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ext.soft_preprocess import SOFT_SCALE, load_soft
from nnunet_ext.training.plumbing import DatasetWrapper, WithExtraSegChannel


class WithSoftTargets(WithExtraSegChannel):
    """Wraps an nnU-Net dataset; ``load_case`` returns the segmentation with the soft map (0..255) as
    channel 1."""

    remedy = "rerun nnunet-ext preprocess-soft with --overwrite"

    def __init__(self, base, folder: Path):
        super().__init__(base)
        self.folder = Path(folder)

    def load_extra(self, identifier):
        return load_soft(self.folder, identifier)


class WithRandomRater(DatasetWrapper):
    """Wraps an nnU-Net dataset; every ``load_case`` replaces the label map by one rater's mask drawn at
    random (Lemay et al.'s "no fusion" strategy). Voxels outside nnU-Net's crop (-1) stay -1."""

    def __init__(self, base, folders):
        super().__init__(base)
        self.folders = [Path(f) for f in folders]
        if not self.folders:
            raise FileNotFoundError("no preprocessed rater folders: run nnunet-ext preprocess-soft --raters")

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        rater = self.folders[np.random.randint(len(self.folders))]
        mask = load_soft(rater, identifier) >= 128
        seg = np.array(seg[:])
        seg[0] = np.where(seg[0] == -1, -1, mask).astype(seg.dtype)
        return data, seg, seg_prev, properties


def area_resize(soft: torch.Tensor, shape) -> torch.Tensor:
    """(1, *spatial) soft map resized to ``shape`` by area averaging (deep-supervision targets)."""
    if tuple(soft.shape[1:]) == tuple(shape):
        return soft
    return F.interpolate(soft[None], size=tuple(shape), mode="area")[0]


class SoftTargetTransforms:
    """Wraps nnU-Net's training transforms so that segmentation channel 1 (soft map, 0..255) travels as a
    linearly interpolated ``regression_target`` and comes back, per deep-supervision scale, as float
    channel 1 of the target next to the hard labels (channel 0)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, **data):
        seg = data["segmentation"]
        if seg.shape[0] < 2:
            return self.inner(**data)
        soft = (seg[1:2].float() / SOFT_SCALE).clamp(min=0.0)  # padding (-1) -> 0
        data["segmentation"] = seg[:1]
        data["regression_target"] = soft
        out = self.inner(**data)
        soft = out.pop("regression_target").float().clamp(0.0, 1.0)
        segs = out["segmentation"]
        if isinstance(segs, (list, tuple)):
            out["segmentation"] = [torch.cat([s.float(), area_resize(soft, s.shape[1:])]) for s in segs]
        else:
            out["segmentation"] = torch.cat([segs.float(), area_resize(soft, segs.shape[1:])])
        return out
