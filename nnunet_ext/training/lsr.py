"""Lesion Size Reweighting (Nichyporuk et al., MIDL 2021).

Every lesion L (a connected component of one foreground class) gets the voxel weight

    w(|L|) = 1 + (alpha / |L|) * exp(-(|L| - 1) / beta)

background voxels weigh 1. With ``alpha <= beta`` the lesion's total weight ``|L| * w(|L|)`` grows with its
size (small lesions are up-weighted, never more than large ones in total); the weight of a voxel is at
most ``1 + alpha`` (a 1-voxel lesion). ``alpha = 0`` gives plain (binary) cross-entropy.

Sizes are those of whole cases in nnU-Net's preprocessed grid, computed once per case
(:func:`lesion_size_map`) and carried through augmentation beside the segmentation (see
``nnunet_ext.training.lesion_sizes``), so a lesion cut by the patch border keeps the weight of its full size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from nnunet_ext.metrics.lesions import label_components

SIZE_DTYPE_MAX = np.iinfo(np.int16).max  # sizes travel in nnU-Net's int16 segmentation tensors


def check_alpha_beta(alpha: float, beta: float) -> None:
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 gives plain cross-entropy), got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if alpha > beta:
        raise ValueError(f"alpha must be <= beta so that a lesion's total weight grows with its size, "
                         f"got alpha={alpha}, beta={beta}")


def lsr_weight(size, alpha: float = 4.0, beta: float = 4.0):
    """Voxel weight of a lesion of ``size`` voxels (numpy or torch; ``size`` >= 1)."""
    if isinstance(size, torch.Tensor):
        return 1.0 + alpha / size * torch.exp(-(size - 1.0) / beta)
    size = np.asarray(size, dtype=np.float64)
    return 1.0 + alpha / size * np.exp(-(size - 1.0) / beta)


def lesion_size_map(label: np.ndarray, classes: Sequence[int] | None = None, connectivity: int = 26,
                    clip: int | None = SIZE_DTYPE_MAX) -> np.ndarray:
    """For every voxel, the size (voxel count) of the connected component of its foreground class it
    belongs to; 0 for background and for labels not in ``classes`` (default: every label > 0).

    Sizes above ``clip`` are clipped (their weight is 1 to float precision for any sensible beta)."""
    label = np.asarray(label)
    if classes is None:
        classes = [int(c) for c in np.unique(label) if c > 0]
    out = np.zeros(label.shape, np.int32)
    for c in classes:
        comp, n = label_components(label == c, connectivity)
        if n == 0:
            continue
        counts = np.bincount(comp.ravel(), minlength=n + 1)
        counts[0] = 0
        sel = comp > 0
        out[sel] = counts[comp[sel]]
    if clip is not None:
        np.minimum(out, clip, out=out)
    return out


def lesion_size_weights(label: np.ndarray, alpha: float = 4.0, beta: float = 4.0, connectivity: int = 26,
                        classes: Sequence[int] | None = None) -> np.ndarray:
    """float32 LSR voxel weights of a label array (per foreground class when there are several); an empty
    label gives all ones."""
    check_alpha_beta(alpha, beta)
    sizes = lesion_size_map(label, classes, connectivity, clip=None)
    w = np.ones(label.shape, np.float32)
    fg = sizes > 0
    w[fg] = lsr_weight(sizes[fg], alpha, beta).astype(np.float32)
    return w


def weights_from_size_tensor(sizes: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """LSR weights from a tensor of lesion sizes (0 = background -> weight 1)."""
    s = sizes.float()
    return torch.where(s > 0, lsr_weight(s.clamp(min=1.0), alpha, beta), torch.ones_like(s))
