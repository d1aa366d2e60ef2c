"""Lesion size reweighting and focal Tversky: weights and losses against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from nnunet_ext.training.losses import DiceAndLSRLoss, FocalTverskyLoss, LSRCrossEntropyLoss
from nnunet_ext.training.lsr import lesion_size_map, lesion_size_weights, lsr_weight, weights_from_size_tensor
from nnunet_ext.nnunet_adapter import deep_supervision_weights

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


def test_patch_border_lesion_keeps_full_size_weight(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_ext.training.parts import compute_size_maps
    from nnunet_ext.training.targets import WithTargetMaps

    seg = np.zeros((1, 8, 8, 16), np.int16)
    seg[0, 4, 4, 2:12] = 1  # a 10-voxel lesion
    nnUNetDatasetBlosc2.save_case(np.zeros((1, 8, 8, 16), np.float32), seg, {}, str(tmp_path / "case"))
    base = nnUNetDatasetBlosc2(str(tmp_path))
    assert compute_size_maps(base, tmp_path, tmp_path / "sizes", [1], 26) == 1
    assert compute_size_maps(base, tmp_path, tmp_path / "sizes", [1], 26) == 0  # cached, not recomputed
    _, seg2, _, _ = WithTargetMaps(base, [tmp_path / "sizes"]).load_case("case")
    assert seg2.shape == (2, 8, 8, 16)
    patch = crop_and_pad_nd(seg2, [[0, 8], [0, 8], [8, 16]], -1)  # cuts the lesion: 4 of its voxels inside
    lesion = patch[0] == 1
    assert lesion.sum() == 4
    w = weights_from_size_tensor(torch.from_numpy(patch[1].astype(np.float32)), 4.0, 4.0).numpy()
    assert np.allclose(w[lesion], HAND[10], atol=1e-5)  # weight of the full 10-voxel lesion, not of 4 voxels
    assert not np.isclose(HAND[10], lsr_weight(4))


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="must be"):
        LSRCrossEntropyLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))


def test_deep_supervision_weights_like_nnunet():
    w = deep_supervision_weights(4)
    assert np.allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    w = deep_supervision_weights(3, is_ddp=True)
    assert w[-1] > 0 and math.isclose(w.sum(), 1.0)
