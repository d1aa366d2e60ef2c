"""Output activations applied inside the network's forward pass at prediction (contract ``activation``).

SoftSeg's normalized ReLU (Lemay 2022, eq. 4.1; ivadomed applies it as the last step of the model's
``forward``) divides by the maximum of the output of one network input. Training applies it in the loss
(:mod:`nnunet_ext.training.losses`), per sample, i.e. per patch (:func:`normalized_relu`). Prediction must
normalise the same thing: nnU-Net's sliding window feeds the network one patch per forward pass (batch 1, one pass per
test-time flip), so a forward hook replaces each pass's output by ``[0, q]`` with ``q`` the normalized ReLU
of that patch's lesion logit. nnU-Net then averages these outputs over the flips and blends the patches
(Gaussian-weighted mean) and the folds exactly as it does for logits, so the aggregate is ``[0, Q]`` with
``Q`` in [0, 1] the blended SoftSeg output; its softmax is what nnU-Net exports, and
``ln p1 - ln p0 = Q`` recovers it (:func:`nnunet_ext.inference.thresholds.soft_output`). The whole-case
maximum is never used: it would rescale every patch by a number the network never saw in training.

A model trained with the maximum over the whole training batch (``max_over="batch"``, as ivadomed, where
SoftSeg was published, computes it: ``nn.ReLU()(x) / nn.ReLU()(x).max()`` on the output of a forward pass of
24 slices) has the contract activation ``normalized_relu_case``: each pass returns the un-normalised ReLU
(:func:`relu_output`) and the case's blended map is divided by its own maximum, the prediction-time batch
being the whole case.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


MAX_OVER = ("sample", "batch")


def normalized_relu(x: torch.Tensor, leak: float = 0.0, max_over: str = "sample") -> torch.Tensor:
    """SoftSeg's output activation (Lemay 2022, eq. 4.1): ``relu(x) / max(relu(x))``, 0 where the maximum
    is 0. ``max_over="sample"``: the maximum is taken per sample over all but the batch axis, i.e. over the
    whole output of one network input (a training patch; at prediction one sliding-window patch, see the
    module docstring); ``"batch"``: over the whole tensor, i.e. the output of one forward pass of the batch
    (ivadomed's ``nn.ReLU()(x) / nn.ReLU()(x).max()``).

    ``leak > 0`` (the ``_leak`` trainers) changes only the backward pass: negative inputs get gradient
    ``leak / max(max, 1e-3)`` (straight-through), so a network whose lesion logits all went negative can
    recover. The forward value is that of ``leak = 0``."""
    if max_over not in MAX_OVER:
        raise ValueError(f"max_over must be one of {MAX_OVER}, got {max_over!r}")
    r = F.relu(x)
    if max_over == "batch":
        mx = r.max().view(*([1] * r.ndim))
    else:
        mx = r.flatten(1).max(1).values.view(-1, *([1] * (r.ndim - 1)))
    out = torch.where(mx > 0, r / mx.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(r))
    if leak > 0:
        neg = (x < 0).to(x.dtype)
        # adds 0 to the value, leak / max to the gradient of negative inputs
        out = out + leak * neg * (x - x.detach()) / mx.detach().clamp(min=1e-3)
    return out


def normalized_relu_output(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 2, *sp)`` logits -> ``(B, 2, *sp)`` ``[0, q]``, q = normalized ReLU of ``z1 - z0`` per sample
    (in the logits' dtype)."""
    if logits.ndim < 3 or logits.shape[1] != 2:
        raise ValueError(f"the normalized ReLU output needs (B, 2, *spatial) logits (background, lesion), got "
                         f"{tuple(logits.shape)}")
    q = normalized_relu(logits[:, 1].float() - logits[:, 0].float())
    return torch.stack([torch.zeros_like(q), q], 1).to(logits.dtype)


CASE_SCALE = 8.0  # relu(z) / CASE_SCALE is what a pass returns for "normalized_relu_case" (see relu_output)


def relu_output(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 2, *sp)`` logits -> ``(B, 2, *sp)`` ``[0, relu(z1 - z0) / CASE_SCALE]``: the un-normalised ReLU of
    the lesion logit, for models trained with the maximum over the whole batch (``max_over="batch"``). The
    division by the whole case's maximum happens after nnU-Net has averaged the flips, blended the patches and
    the folds (:func:`nnunet_ext.inference.thresholds.soft_output`, activation ``normalized_relu_case``); the
    constant scale keeps ``softmax([0, r])`` away from saturation for logits up to about 220 and cancels in
    that division."""
    if logits.ndim < 3 or logits.shape[1] != 2:
        raise ValueError(f"the ReLU output needs (B, 2, *spatial) logits (background, lesion), got "
                         f"{tuple(logits.shape)}")
    r = F.relu(logits[:, 1].float() - logits[:, 0].float()) / CASE_SCALE
    return torch.stack([torch.zeros_like(r), r], 1).to(logits.dtype)


def _hook(module, inputs, output):
    if isinstance(output, torch.Tensor):  # deep-supervision lists only occur in training, left alone
        return normalized_relu_output(output)
    return output


def _case_hook(module, inputs, output):
    if isinstance(output, torch.Tensor):
        return relu_output(output)
    return output


def add_output_activation(network: torch.nn.Module, activation: str):
    """Register the forward hook of ``activation`` on ``network``; returns its handle (``.remove()``), or
    None for ``softmax`` (nnU-Net's own output)."""
    if activation == "softmax":
        return None
    if activation == "normalized_relu":
        return network.register_forward_hook(_hook)
    if activation == "normalized_relu_case":
        return network.register_forward_hook(_case_hook)
    raise ValueError(f"unknown output activation {activation!r}")


@contextmanager
def output_activation(network: torch.nn.Module, activation: str):
    """``network`` returns the outputs of ``activation`` inside the block (see the module docstring)."""
    handle = add_output_activation(network, activation)
    try:
        yield network
    finally:
        if handle is not None:
            handle.remove()
