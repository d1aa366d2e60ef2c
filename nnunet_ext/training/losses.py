"""Segmentation losses as plain ``nn.Module``s.

Shapes: ``logits`` is ``(B, C, *spatial)`` (raw network output, C classes incl. background, softmax
applied inside the loss as nnU-Net expects); ``target`` is ``(B, K, *spatial)`` with the label map in
channel 0 and the maps of the trainer's target parts in channels 1.. (see
``nnunet_ext.training.targets``); each loss is told the channel of the map it uses (``size_channel``,
``soft_channel``) and falls back to the labels when the target has no such channel (nnU-Net's validation
targets carry the labels only): every voxel then weighs 1 and the soft target is ``label == 1``. Soft
channels of integer targets (what the training transport delivers) are in 1/255 steps, of floating ones
in [0, 1]. Arguments are checked in ``__init__``; ``forward`` stays on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.networks.activations import normalized_relu
from nnunet_ext.preprocessing.maps import SOFT_SCALE
from nnunet_ext.training.lsr import check_alpha_beta, weights_from_size_tensor


def _labels_and_mask(target: torch.Tensor, ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label map (B, *spatial) as long, and the float mask of annotated voxels (None without ignore label)."""
    seg = target[:, 0].long()
    if ignore_label is None:
        return seg, None
    mask = seg != ignore_label
    return torch.where(mask, seg, torch.zeros_like(seg)), mask.float()


class LSRCrossEntropyLoss(nn.Module):
    """Lesion-size-reweighted cross-entropy: ``sum(w * CE) / N`` over annotated voxels (N of them).

    With two classes (background, lesion) the softmax cross-entropy equals the binary cross-entropy of
    the sigmoid of the logit difference, i.e. the paper's LSR-weighted BCE; with more classes each class's
    lesions are weighted by their own sizes. ``alpha = 0`` is plain (B)CE.

    ``size_channel``: target channel of the whole-case lesion sizes. ``soft_channel`` (2-class networks
    only): target channel of a soft lesion target S in [0, 1]; the loss is then the soft two-class
    cross-entropy ``-(S ln p1 + (1 - S) ln p0)`` with the same weights (LSR on soft or random-rater
    targets)."""

    def __init__(self, alpha: float = 4.0, beta: float = 4.0, ignore_label: int | None = None,
                 size_channel: int = 1, soft_channel: int | None = None):
        super().__init__()
        check_alpha_beta(alpha, beta)
        if size_channel < 1 or (soft_channel is not None and (soft_channel < 1 or soft_channel == size_channel)):
            raise ValueError(f"map channels must be >= 1 and distinct, got size_channel={size_channel}, "
                             f"soft_channel={soft_channel}")
        self.alpha, self.beta, self.ignore_label = float(alpha), float(beta), ignore_label
        self.size_channel, self.soft_channel = size_channel, soft_channel

    def voxel_weights(self, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] <= self.size_channel or self.alpha == 0:
            return torch.ones_like(target[:, 0], dtype=torch.float32)
        sizes = target[:, self.size_channel]
        # sizes count only where the label is foreground (see nnunet_ext.training.targets on borders)
        sizes = torch.where(target[:, 0] > 0, sizes, torch.zeros_like(sizes))
        return weights_from_size_tensor(sizes, self.alpha, self.beta)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != target.ndim or logits.shape[2:] != target.shape[2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must be "
                             f"(B, C, *spatial) and (B, K, *spatial)")
        seg, mask = _labels_and_mask(target, self.ignore_label)
        w = self.voxel_weights(target)
        if self.soft_channel is not None and target.shape[1] > self.soft_channel:
            s = _soft_target(target, self.soft_channel)
            logp = torch.log_softmax(_two_class(logits).float(), 1)
            ce = -(s * logp[:, 1] + (1 - s) * logp[:, 0])
        else:
            ce = F.cross_entropy(logits.float(), seg, reduction="none")
        if mask is not None:
            w = w * mask
            n = mask.sum().clamp(min=1.0)
        else:
            n = torch.tensor(float(seg.numel()), device=logits.device)
        return (w * ce).sum() / n


class DiceAndLSRLoss(nn.Module):
    """nnU-Net's soft Dice (given as ``dice``, e.g. ``MemoryEfficientSoftDiceLoss``) on the label channel
    plus :class:`LSRCrossEntropyLoss` on the full target."""

    def __init__(self, dice: nn.Module, lsr: LSRCrossEntropyLoss, weight_dice: float = 1.0, weight_ce: float = 1.0):
        super().__init__()
        if weight_dice < 0 or weight_ce < 0:
            raise ValueError("loss weights must be >= 0")
        self.dice, self.lsr, self.weight_dice, self.weight_ce = dice, lsr, weight_dice, weight_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seg, mask = _labels_and_mask(target, self.lsr.ignore_label)
        dc = self.dice(logits, seg[:, None], loss_mask=None if mask is None else mask[:, None])
        return self.weight_dice * dc + self.weight_ce * self.lsr(logits, target)


class FocalTverskyLoss(nn.Module):
    """Focal Tversky loss ``(1 - TI)^gamma`` with ``TI = (TP + s) / (TP + a FN + b FP + s)``, averaged
    over the foreground classes; TP/FN/FP are soft counts of the softmax probabilities pooled over the
    batch and all voxels (``batch=True``, as nnU-Net's batch Dice) or per sample (then averaged).

    Defaults a=0.7, b=0.3, gamma=4/3, s=1 (Abraham & Khan 2019 use ``(1 - TI)^(1/gamma)``; the exponent
    here is ``gamma`` itself, so gamma > 1 down-weights easy cases and gamma < 1 focuses on hard ones)."""

    def __init__(self, a: float = 0.7, b: float = 0.3, gamma: float = 4 / 3, smooth: float = 1.0,
                 batch: bool = True, ignore_label: int | None = None):
        super().__init__()
        if a < 0 or b < 0 or a + b == 0:
            raise ValueError(f"a and b must be >= 0 and not both 0, got a={a}, b={b}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.a, self.b, self.gamma, self.smooth, self.batch, self.ignore_label = a, b, gamma, smooth, batch, ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seg, mask = _labels_and_mask(target, self.ignore_label)
        p = torch.softmax(logits.float(), 1)
        g = F.one_hot(seg, logits.shape[1]).movedim(-1, 1).float()
        if mask is not None:
            p, g = p * mask[:, None], g * mask[:, None]
        p, g = p[:, 1:], g[:, 1:]  # foreground classes
        axes = [0] + list(range(2, p.ndim)) if self.batch else list(range(2, p.ndim))
        tp = (p * g).sum(axes)
        fn = ((1 - p) * g).sum(axes)
        fp = (p * (1 - g)).sum(axes)
        ti = (tp + self.smooth) / (tp + self.a * fn + self.b * fp + self.smooth)
        return ((1 - ti).clamp(min=0) ** self.gamma).mean()


def _soft_target(target: torch.Tensor, channel: int = 1) -> torch.Tensor:
    """Soft lesion target (B, *spatial) in [0, 1]: ``channel`` when present, else label == 1. An integer
    target carries soft maps as stored, in 1/255 steps (``nnunet_ext.training.targets``); a floating one
    in [0, 1]."""
    if target.shape[1] > channel:
        s = target[:, channel]
        return s.float() if s.is_floating_point() else s.float() / SOFT_SCALE
    return (target[:, 0] == 1).float()


def _two_class(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] != 2:
        raise ValueError(f"soft-label losses need exactly 2 output channels (background, lesion), got {logits.shape[1]}")
    return logits


def _lesion_logit(logits: torch.Tensor) -> torch.Tensor:
    """Lesion evidence of a 2-class network: z_lesion - z_background (softmax = sigmoid of it)."""
    logits = _two_class(logits)
    return logits[:, 1].float() - logits[:, 0].float()


def _masked_prob_and_target(logits: torch.Tensor, target: torch.Tensor, ignore_label, soft_channel: int | None):
    """(P, S, m): lesion probability ``sigmoid(z_lesion - z_background)`` and target, both zero where the
    ignore label is (m the float mask of annotated voxels, ones without ignore label). ``soft_channel``
    None: the hard label ``label == 1``."""
    d = _lesion_logit(logits)
    s = (target[:, 0] == 1).float() if soft_channel is None else _soft_target(target, soft_channel)
    _, mask = _labels_and_mask(target, ignore_label)
    m = torch.ones_like(s) if mask is None else mask
    return torch.sigmoid(d) * m, s * m, m


class SoftDiceLoss(nn.Module):
    """Soft Dice loss of Kats et al. (2019), as the Bar-Ilan thesis trains with it (eq. 1), alone:

    ``L = -sum((T + gamma D) P) / (0.5 sum P + 0.5 sum (T + gamma D) + eps)``

    for a soft target S = T + gamma D in [0, 1] (hard mask T, soft rim D) and P the lesion probability
    (sigmoid of the lesion-minus-background logit = the 2-class softmax). Sums run over batch and voxels
    (``batch=True``, nnU-Net's batch Dice) or per sample, then averaged; ``eps`` only guards an empty patch.
    Ignored voxels (``ignore_label`` in channel 0) count in no sum. Range [-1, 0]."""

    def __init__(self, batch: bool = True, eps: float = 1e-5, ignore_label: int | None = None, soft_channel: int = 1):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if soft_channel < 1:
            raise ValueError(f"soft_channel must be >= 1, got {soft_channel}")
        self.batch, self.eps, self.ignore_label, self.soft_channel = batch, eps, ignore_label, soft_channel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, s, _ = _masked_prob_and_target(logits, target, self.ignore_label, self.soft_channel)
        axes = list(range(0, p.ndim)) if self.batch else list(range(1, p.ndim))
        return (-(p * s).sum(axes) / (0.5 * p.sum(axes) + 0.5 * s.sum(axes) + self.eps)).mean()


class SigmoidDiceLoss(nn.Module):
    """The Dice loss of SoftSeg's conventional baseline ("Conv", Lemay 2022, ch. 4-5; ivadomed's
    ``DiceLoss``, after Milletari et al. 2016) on a sigmoid output and the hard labels:

    ``L = -(2 sum(P T) + smooth) / (sum P + sum T + smooth)``, smooth 1,

    P = sigmoid(z_lesion - z_background) (the lesion probability of the 2-class network), T = (label == 1);
    one sum over the whole batch (ivadomed flattens prediction and target). Ignored voxels count in no sum.
    Range [-1, 0)."""

    def __init__(self, smooth: float = 1.0, ignore_label: int | None = None):
        super().__init__()
        if not smooth >= 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth, self.ignore_label = float(smooth), ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t, _ = _masked_prob_and_target(logits, target, self.ignore_label, None)
        return -(2.0 * (p * t).sum() + self.smooth) / (p.sum() + t.sum() + self.smooth)


class SoftDiceBCELoss(nn.Module):
    """Soft Dice of Kats et al. (2019) plus soft binary cross-entropy, for a soft target S in [0, 1]:

    ``L = -sum(S P) / (0.5 sum P + 0.5 sum S + eps)  +  BCE(P, S)``, with P the lesion probability
    (sigmoid of the lesion-minus-background logit). With S = T + gamma D (hard mask T, soft rim D) the Dice
    term is exactly the paper's (:class:`SoftDiceLoss`); the BCE term is our addition (the thesis trains
    with the Dice term alone). Sums run over batch and voxels (``batch=True``, nnU-Net's batch Dice) or per
    sample, then averaged. Ignored voxels (``ignore_label`` in channel 0) count in neither term."""

    def __init__(self, batch: bool = True, weight_dice: float = 1.0, weight_bce: float = 1.0, eps: float = 1e-5,
                 ignore_label: int | None = None, soft_channel: int = 1):
        super().__init__()
        if weight_dice < 0 or weight_bce < 0 or eps <= 0:
            raise ValueError("weights must be >= 0 and eps > 0")
        if soft_channel < 1:
            raise ValueError(f"soft_channel must be >= 1, got {soft_channel}")
        self.batch, self.weight_dice, self.weight_bce, self.eps, self.ignore_label = batch, weight_dice, weight_bce, eps, ignore_label
        self.soft_channel = soft_channel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = _lesion_logit(logits)
        s = _soft_target(target, self.soft_channel)
        _, mask = _labels_and_mask(target, self.ignore_label)
        m = torch.ones_like(s) if mask is None else mask
        p = torch.sigmoid(d) * m
        s = s * m
        axes = list(range(0, p.ndim)) if self.batch else list(range(1, p.ndim))
        dice = -(p * s).sum(axes) / (0.5 * p.sum(axes) + 0.5 * s.sum(axes) + self.eps)
        bce = (F.binary_cross_entropy_with_logits(d, s, reduction="none") * m).sum() / m.sum().clamp(min=1.0)
        return self.weight_dice * dice.mean() + self.weight_bce * bce


class AdaptiveWingLoss(nn.Module):
    """Adaptive Wing loss (Wang et al. 2019), as used by SoftSeg (Gros et al. 2021), between a prediction p
    and a soft target y in [0, 1], averaged over annotated voxels:

    ``omega ln(1 + |(y - p) / eps|^(a - y))`` where ``|y - p| < theta``, else ``A |y - p| - C`` with
    ``A = omega (a - y) (theta/eps)^(a - y - 1) / (eps (1 + (theta/eps)^(a - y)))`` and
    ``C = theta A - omega ln(1 + (theta/eps)^(a - y))`` (continuous at theta). Defaults epsilon=1, a=2.1,
    theta=0.5, omega=8. The prediction is SoftSeg's normalized ReLU of the lesion logit, per sample
    (:func:`normalized_relu`; ``max_over="batch"``: over the whole batch, as ivadomed); ``leak=0`` (default) is SoftSeg exactly. ``leak > 0`` lets gradient through
    negative logits (forward unchanged): with tiny lesions, plain normalized ReLU drove every logit negative
    within one epoch and never recovered (docs/benchmarks.md)."""

    def __init__(self, omega: float = 8.0, theta: float = 0.5, epsilon: float = 1.0, alpha: float = 2.1,
                 ignore_label: int | None = None, leak: float = 0.0, soft_channel: int = 1, max_over: str = "sample"):
        super().__init__()
        from nnunet_ext.networks.activations import MAX_OVER

        if max_over not in MAX_OVER:
            raise ValueError(f"max_over must be one of {MAX_OVER}, got {max_over!r}")
        self.max_over = max_over
        if soft_channel < 1:
            raise ValueError(f"soft_channel must be >= 1, got {soft_channel}")
        self.soft_channel = soft_channel
        if omega <= 0 or theta <= 0 or epsilon <= 0:
            raise ValueError("omega, theta and epsilon must be > 0")
        if alpha <= 1:
            raise ValueError(f"alpha must be > 1 (the exponent alpha - y must stay > 0 for y in [0, 1]), got {alpha}")
        if leak < 0:
            raise ValueError(f"leak must be >= 0, got {leak}")
        self.omega, self.theta, self.epsilon, self.alpha, self.ignore_label = omega, theta, epsilon, alpha, ignore_label
        self.leak = leak

    def elementwise(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = (y - p).abs()
        e = self.alpha - y
        t = self.theta / self.epsilon
        a = self.omega * e * t ** (e - 1) / (self.epsilon * (1 + t ** e))
        c = self.theta * a - self.omega * torch.log1p(t ** e)
        small = self.omega * torch.log1p((diff / self.epsilon) ** e)
        return torch.where(diff < self.theta, small, a * diff - c)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = normalized_relu(_lesion_logit(logits), self.leak, self.max_over)
        y = _soft_target(target, self.soft_channel)
        _, mask = _labels_and_mask(target, self.ignore_label)
        loss = self.elementwise(p, y)
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------- the LSR thesis' baselines (Fig. 5.1)


def _two_class_ce(logits: torch.Tensor, target: torch.Tensor, ignore_label) -> tuple:
    """(CE, lesion, m): the two-class cross-entropy per voxel (= BCE of the lesion-minus-background logit),
    the hard lesion target (label == 1) and the float mask of annotated voxels (ones without ignore label)."""
    if logits.ndim != target.ndim or logits.shape[2:] != target.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must be "
                         f"(B, C, *spatial) and (B, K, *spatial)")
    d = _lesion_logit(logits)
    y = (target[:, 0] == 1).float()
    _, mask = _labels_and_mask(target, ignore_label)
    m = torch.ones_like(y) if mask is None else mask
    return F.binary_cross_entropy_with_logits(d, y, reduction="none"), y, m


class WeightedBCELoss(nn.Module):
    """Weighted BCE (the LSR thesis' "WBCE", Fig. 5.1): lesion voxels weigh ``pos_weight``, background 1,
    ``sum(w * BCE) / N`` over the N annotated voxels (PyTorch's ``BCEWithLogitsLoss(pos_weight=...)``).
    Logits ``(B, 2, *spatial)``: BCE of the lesion-minus-background logit = the 2-class softmax."""

    def __init__(self, pos_weight: float, ignore_label: int | None = None):
        super().__init__()
        if not pos_weight > 0 or pos_weight == float("inf"):
            raise ValueError(f"pos_weight must be a finite number > 0, got {pos_weight}")
        self.pos_weight, self.ignore_label = float(pos_weight), ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, y, m = _two_class_ce(logits, target, self.ignore_label)
        w = (1.0 + (self.pos_weight - 1.0) * y) * m
        return (w * ce).sum() / m.sum().clamp(min=1.0)


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017; the LSR thesis' "FL", Fig. 5.1):
    ``-alpha_t (1 - p_t)^gamma ln p_t`` with ``p_t`` the probability of the voxel's true class and
    ``alpha_t = alpha`` on lesion voxels, ``1 - alpha`` on background; mean over annotated voxels.
    Defaults gamma 2, alpha 0.25 (Lin et al.'s best setting; torchvision's ``sigmoid_focal_loss``).
    ``alpha=None`` switches the class balance off (``alpha_t = 1``)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, ignore_label: int | None = None):
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        self.gamma, self.alpha, self.ignore_label = float(gamma), alpha, ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, y, m = _two_class_ce(logits, target, self.ignore_label)
        p_t = torch.exp(-ce)  # ce = -ln p_t
        loss = (1.0 - p_t) ** self.gamma * ce
        if self.alpha is not None:
            loss = (self.alpha * y + (1.0 - self.alpha) * (1.0 - y)) * loss
        return (loss * m).sum() / m.sum().clamp(min=1.0)


class InverseWeightedBCELoss(nn.Module):
    """BCE with inverse lesion-size weights (the LSR thesis' "BCE+IW", Fig. 5.1, after Shirokikh et al.
    2020, its ref. [88]): in each sample, every lesion carries the same total weight and the lesions together
    keep their voxel count, ``w = P / (K |L|)`` on the voxels of a lesion L (P lesion voxels and K lesions in
    the sample), background 1; ``sum(w * BCE) / N`` over the N annotated voxels.

    Lesion sizes come from target channel ``size_channel`` (whole-case sizes, as for LSR): with them
    ``K = sum over the sample's lesion voxels of 1 / |L|``, which is the number of lesions in the sample and
    keeps the weights of a deep-supervision scale equal to those of full resolution; a lesion cut by the
    patch border counts for the fraction of it inside. Without the channel (validation) every voxel
    weighs 1."""

    def __init__(self, size_channel: int = 1, ignore_label: int | None = None):
        super().__init__()
        if size_channel < 1:
            raise ValueError(f"size_channel must be >= 1, got {size_channel}")
        self.size_channel, self.ignore_label = size_channel, ignore_label

    def voxel_weights(self, target: torch.Tensor) -> torch.Tensor:
        w = torch.ones_like(target[:, 0], dtype=torch.float32)
        if target.shape[1] <= self.size_channel:
            return w
        sizes = target[:, self.size_channel].float()
        lesion = (target[:, 0] == 1) & (sizes > 0)
        inv = torch.where(lesion, 1.0 / sizes.clamp(min=1.0), torch.zeros_like(sizes))
        dims = tuple(range(1, inv.ndim))
        n_lesion_voxels = lesion.float().sum(dims, keepdim=True)  # P per sample
        n_lesions = inv.sum(dims, keepdim=True)  # K per sample
        iw = n_lesion_voxels * inv / n_lesions.clamp(min=torch.finfo(torch.float32).tiny)
        return torch.where(lesion, iw, w)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, _, m = _two_class_ce(logits, target, self.ignore_label)
        return (self.voxel_weights(target) * m * ce).sum() / m.sum().clamp(min=1.0)
