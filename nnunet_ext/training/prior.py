"""Output bias from the training set's class frequencies (the "prior" initialisation of the output layer).

A network whose losses are plain voxel-wise (binary) cross-entropies (BCE, LSR-weighted BCE, weighted BCE,
focal loss) starts with every class equally likely: on lesion data, where a few voxels in a thousand are
lesion, the first hundred iterations then only learn "everything is background", and the lesion evidence
has to climb back from there (measured in docs/results.md: plain LSR-weighted BCE stayed at validation
Dice 0 for 1,000 iterations). Setting each output head's bias so that the network starts at the training
set's class frequencies removes that phase without changing what the loss computes (Lin et al., "Focal
loss for dense object detection", 2017, section 4.1, uses the same initialisation with a fixed prior).

* :func:`class_fractions` counts the voxels of every class in the training cases' preprocessed labels
  (nnU-Net's ``-1`` crop marker counts as background, as nnU-Net's loss sees it), cached per case.
* :func:`prior_bias` turns fractions ``pi`` into biases: ``b_0 = 0`` and ``b_c = ln(pi_c / pi_0)`` for the
  foreground classes, so that the softmax of the bias is ``pi`` (two classes: the lesion logit minus the
  background logit is ``ln(pi / (1 - pi))``, a sigmoid of which is ``pi``).
* :func:`set_output_bias` writes the biases into every deep-supervision output head (``seg_layers``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ext.training.case_stats import cached_case_counts

CACHE_FILE = "nnunet_ext_stats/class_voxels.json"  # a subfolder: nnU-Net infers its dataset class from the files beside the cases
MIN_FRACTION = 1e-6


def class_fractions(dataset, identifiers, n_classes: int, cache_folder=None) -> np.ndarray:
    """Fraction of voxels of each class ``0 .. n_classes - 1`` over the preprocessed labels of ``identifiers``
    (``dataset.load_case(key)`` gives nnU-Net's ``(data, seg, seg_prev, properties)``); shape
    ``(n_classes,)``, summing to 1 over the counted voxels. Labels outside ``0 .. n_classes - 1`` (an ignore
    label) are not counted; ``-1`` counts as background. Per-case counts are cached in
    ``cache_folder/nnunet_ext_stats/class_voxels.json`` (written atomically)."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    ids = list(identifiers)
    if not ids:
        raise ValueError("class_fractions needs at least one training case")

    def count(seg):
        s = np.asarray(seg).astype(np.int64)
        s = np.where(s < 0, 0, s)
        return np.bincount(s[s < n_classes].ravel(), minlength=n_classes)[:n_classes].tolist()

    counts = cached_case_counts(dataset, ids, Path(cache_folder) / CACHE_FILE if cache_folder is not None else None,
                                count, lambda c: isinstance(c, list) and len(c) == n_classes)
    total = np.asarray(counts, dtype=np.float64).sum(0)
    if total.sum() == 0:
        raise ValueError("the training cases hold no labelled voxels")
    return total / total.sum()


def prior_bias(fractions) -> list[float]:
    """Output biases whose softmax equals ``fractions`` (background bias 0); fractions are clipped at
    1e-6 so that a class absent from the training cases gets a finite bias."""
    f = np.clip(np.asarray(fractions, dtype=np.float64), MIN_FRACTION, None)
    if f.ndim != 1 or len(f) < 2:
        raise ValueError(f"fractions must be a 1-D sequence of >= 2 class fractions, got shape {f.shape}")
    return [0.0] + [math.log(float(f[c]) / float(f[0])) for c in range(1, len(f))]


def output_heads(network: nn.Module) -> list[nn.Module]:
    """The convolutions that produce the class logits: every module inside a ``seg_layers`` list (nnU-Net's
    plain and residual-encoder U-Nets keep one per deep-supervision scale there)."""
    heads = []
    for name, module in network.named_modules():
        if name.split(".")[-1] == "seg_layers" and isinstance(module, nn.ModuleList):
            heads.extend(m for m in module if getattr(m, "bias", None) is not None)
    return heads


def set_output_bias(network: nn.Module, bias) -> int:
    """Write ``bias`` (one value per output class) into every output head; returns how many heads."""
    heads = output_heads(network)
    if not heads:
        raise NotImplementedError(f"output-bias initialisation: {type(network).__name__} has no 'seg_layers' "
                                  f"output heads with a bias")
    b = torch.as_tensor(bias, dtype=torch.float32)
    with torch.no_grad():
        for h in heads:
            if h.bias.shape != b.shape:
                raise ValueError(f"output head {h} has {tuple(h.bias.shape)} biases, got {tuple(b.shape)} values")
            h.bias.copy_(b.to(h.bias.device, h.bias.dtype))
    return len(heads)
