"""Lesion size reweighting and focal Tversky: weights and losses against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from nnunet_ext.losses import DiceAndLSRLoss, FocalTverskyLoss, LSRCrossEntropyLoss
from nnunet_ext.lsr import lesion_size_map, lesion_size_weights, lsr_weight, weights_from_size_tensor
from nnunet_ext.training.lesion_sizes import WithLesionSizes, ensure_size_maps
from nnunet_ext.training.plumbing import deep_supervision_weights

# w = 1 + (4/s) * exp(-(s-1)/4), worked out by hand:
#   s=1: 1 + 4 * e^0 = 5;  s=3: 1 + (4/3) e^-0.5 = 1 + 1.33333 * 0.606531 = 1.808708
#   s=10: 1 + 0.4 e^-2.25 = 1 + 0.4 * 0.105399 = 1.042160;  s=100: 1 + 0.04 e^-24.75 = 1.0000000000007
HAND = {1: 5.0, 3: 1.808708, 10: 1.042160, 100: 1.0}


@pytest.mark.parametrize("size,expected", sorted(HAND.items()))
def test_weight_formula(size, expected):
    assert lsr_weight(size) == pytest.approx(expected, abs=1e-6)
    assert weights_from_size_tensor(torch.tensor([float(size)]), 4.0, 4.0).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("size", [1, 3, 10, 100])
def test_weights_of_single_lesion_in_volume(size):
    label = np.zeros((12, 12, 12), np.uint8)
    label.reshape(-1)[:size] = 1  # a run of voxels along x: one 26- (and 6-) connected lesion
    w = lesion_size_weights(label)
    assert w.dtype == np.float32
    assert np.allclose(w[label == 1], HAND[size], atol=1e-6)
    assert np.all(w[label == 0] == 1.0)


def test_weight_bounded_and_total_weight_monotone_when_alpha_le_beta():
    s = np.arange(1, 2000)
    for alpha, beta in [(4, 4), (1, 4), (8, 8), (2, 10)]:
        w = lsr_weight(s, alpha, beta)
        assert w.max() <= 1 + alpha + 1e-12
        assert np.all(np.diff(s * w) > 0)


def test_empty_label_gives_ones():
    w = lesion_size_weights(np.zeros((5, 6, 7), np.uint8))
    assert w.shape == (5, 6, 7) and np.all(w == 1.0)


def test_touching_lesions_6_vs_26_connectivity():
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1:4] = 1  # 3 voxels
    label[2, 2, 4:6] = 1  # 2 voxels, touching the first only through an edge/corner
    w26 = lesion_size_weights(label, connectivity=26)
    w6 = lesion_size_weights(label, connectivity=6)
    assert np.allclose(w26[label == 1], lsr_weight(5))
    assert np.allclose(w6[1, 1, 1:4], lsr_weight(3)) and np.allclose(w6[2, 2, 4:6], lsr_weight(2))


def test_multi_class_sizes_per_class():
    label = np.zeros((4, 4, 8), np.uint8)
    label[1, 1, 0:3] = 1
    label[1, 1, 3:5] = 2  # touches class 1 but is a separate class
    sizes = lesion_size_map(label)
    assert list(sizes[1, 1, :5]) == [3, 3, 3, 2, 2]
    assert lesion_size_map(label, classes=[2])[1, 1, 0] == 0


@pytest.mark.parametrize("alpha,beta,match", [(5, 4, "alpha must be <= beta"), (-1, 4, "alpha must be >= 0"),
                                              (0, 0, "beta must be > 0")])
def test_bad_alpha_beta(alpha, beta, match):
    with pytest.raises(ValueError, match=match):
        lesion_size_weights(np.zeros((3, 3, 3)), alpha, beta)
    with pytest.raises(ValueError, match=match):
        LSRCrossEntropyLoss(alpha, beta)


class _FakeDataset:
    def __init__(self, segs):
        self.segs, self.identifiers = segs, list(segs)

    def load_case(self, key):
        return np.zeros((1,) + self.segs[key].shape[1:], np.float32), self.segs[key], None, {}


def test_patch_border_lesion_keeps_full_size_weight(tmp_path):
    seg = np.zeros((1, 8, 8, 16), np.int16)
    seg[0, 4, 4, 2:12] = 1  # a 10-voxel lesion
    base = _FakeDataset({"case": seg})
    assert ensure_size_maps(base, tmp_path, [1], 26) == 1
    assert ensure_size_maps(base, tmp_path, [1], 26) == 0  # cached, not recomputed
    _, seg2, _, _ = WithLesionSizes(base, tmp_path).load_case("case")
    assert seg2.shape == (2, 8, 8, 16)
    patch = crop_and_pad_nd(seg2, [[0, 8], [0, 8], [8, 16]], -1)  # cuts the lesion: 4 of its voxels inside
    lesion = patch[0] == 1
    assert lesion.sum() == 4
    w = weights_from_size_tensor(torch.from_numpy(patch[1].astype(np.float32)), 4.0, 4.0).numpy()
    assert np.allclose(w[lesion], HAND[10], atol=1e-5)  # weight of the full 10-voxel lesion, not of 4 voxels
    assert not np.isclose(HAND[10], lsr_weight(4))


def _logits_target(seed=0, with_sizes=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, 4, 5, 6, generator=g)
    seg = (torch.rand(2, 1, 4, 5, 6, generator=g) > 0.7).float()
    sizes = seg * torch.randint(1, 20, (2, 1, 4, 5, 6), generator=g).float()
    return logits, (torch.cat([seg, sizes], 1) if with_sizes else seg)


def test_alpha_zero_equals_plain_bce():
    logits, target = _logits_target()
    loss = LSRCrossEntropyLoss(alpha=0.0, beta=4.0)(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], target[:, 0])
    assert loss.item() == pytest.approx(bce.item(), rel=1e-5)


def test_weighted_loss_matches_formula():
    logits, target = _logits_target(1)
    loss = LSRCrossEntropyLoss(4.0, 4.0)(logits, target)
    seg, sizes = target[:, 0], target[:, 1]
    p1 = torch.sigmoid(logits[:, 1] - logits[:, 0])
    bce = -(seg * torch.log(p1) + (1 - seg) * torch.log(1 - p1))
    w = torch.where(sizes > 0, 1 + 4 / sizes.clamp(min=1) * torch.exp(-(sizes - 1) / 4), torch.ones_like(sizes))
    assert loss.item() == pytest.approx((w * bce).mean().item(), rel=1e-5)
    # without the size channel (validation targets) every voxel weighs 1
    assert LSRCrossEntropyLoss()(logits, target[:, :1]).item() == pytest.approx(bce.mean().item(), rel=1e-5)


def test_ignore_label_voxels_contribute_nothing():
    logits, target = _logits_target(2)
    target = target.clone()
    target[:, 0, 0] = 2  # first z-slice is ignored
    loss = LSRCrossEntropyLoss(4.0, 4.0, ignore_label=2)
    a = loss(logits, target)
    logits2 = logits.clone()
    logits2[:, :, 0] = torch.randn_like(logits2[:, :, 0]) * 10
    assert loss(logits2, target).item() == pytest.approx(a.item(), rel=1e-6)
    kept = LSRCrossEntropyLoss(4.0, 4.0)(logits[:, :, 1:], target[:, :, 1:])
    assert a.item() == pytest.approx(kept.item(), rel=1e-5)  # normalised by annotated voxels only


def test_dice_and_lsr_sums_terms():
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    logits, target = _logits_target(3)
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=True, do_bg=False, smooth=1e-5,
                                       ddp=False)
    lsr = LSRCrossEntropyLoss()
    total = DiceAndLSRLoss(dice, lsr)(logits, target)
    assert total.item() == pytest.approx((dice(logits, target[:, :1]) + lsr(logits, target)).item(), rel=1e-6)


def test_focal_tversky_hand_computed():
    logits = torch.zeros(1, 2, 1, 1, 4)  # p = 0.5 everywhere
    target = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 4)
    # TP = 1.5, FN = 1.5, FP = 0.5; TI = (1.5 + 1) / (1.5 + 0.7*1.5 + 0.3*0.5 + 1) = 2.5 / 3.7
    expected = (1 - 2.5 / 3.7) ** (4 / 3)
    assert FocalTverskyLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # a=0.85, b=0.15: TI = 2.5 / (1.5 + 1.275 + 0.075 + 1)
    assert FocalTverskyLoss(0.85, 0.15)(logits, target).item() == pytest.approx((1 - 2.5 / 3.85) ** (4 / 3), rel=1e-6)


def test_focal_tversky_perfect_prediction_is_zero():
    target = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 4)
    logits = torch.cat([(1 - target) * 50, target * 50], 1)
    assert FocalTverskyLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs", [dict(a=-0.1), dict(a=0, b=0), dict(gamma=0), dict(smooth=-1)])
def test_focal_tversky_bad_args(kwargs):
    with pytest.raises(ValueError):
        FocalTverskyLoss(**kwargs)


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="must be"):
        LSRCrossEntropyLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))


def test_deep_supervision_weights_like_nnunet():
    w = deep_supervision_weights(4)
    assert np.allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    w = deep_supervision_weights(3, is_ddp=True)
    assert w[-1] > 0 and math.isclose(w.sum(), 1.0)
