"""Soft targets: losses by hand, transport through nnU-Net's real training transforms, grid resampling."""
import json
import math

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.networks.activations import normalized_relu
from nnunet_ext.training.losses import AdaptiveWingLoss, SoftDiceBCELoss
from nnunet_ext.preprocessing.soft_preprocess import check_soft, soft_to_preprocessed_grid
from nnunet_ext.training.targets import MapSpec, MapTransport


def test_soft_dice_bce_by_hand():
    logits = torch.zeros(1, 2, 1, 1, 4)  # P = 0.5 everywhere
    target = torch.tensor([[1, 1, 0, 0], [1.0, 0.5, 0, 0]]).reshape(1, 2, 1, 1, 4)
    # sum(S P) = 0.75, sum P = 2, sum S = 1.5: dice term -0.75 / (1 + 0.75); BCE at p = 0.5 is ln 2 whatever S
    expected = -0.75 / 1.75 + math.log(2)
    assert SoftDiceBCELoss(eps=1e-12)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_soft_dice_without_soft_channel_uses_hard_label():
    logits = torch.randn(2, 2, 3, 4, 5)
    hard = (torch.rand(2, 1, 3, 4, 5) > 0.5).float()
    loss = SoftDiceBCELoss()
    assert loss(logits, hard).item() == pytest.approx(loss(logits, torch.cat([hard, hard], 1)).item(), rel=1e-6)


def test_normalized_relu():
    x = torch.tensor([[-1.0, 2.0, 4.0], [-3.0, -1.0, 0.0]])
    assert normalized_relu(x).tolist() == [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]


def test_adaptive_wing_by_hand_and_continuity():
    aw = AdaptiveWingLoss()
    # y = 0, p = 0.25 (< theta): 8 ln(1 + 0.25^2.1) = 8 ln(1.0544094) = 0.4238436
    assert aw.elementwise(torch.tensor([0.25]), torch.tensor([0.0])).item() == pytest.approx(0.4238436, rel=1e-5)
    y = torch.tensor([0.0, 0.3, 1.0])
    below, above = aw.elementwise(y + 0.5 - 1e-5, y), aw.elementwise(y + 0.5 + 1e-5, y)
    assert torch.allclose(below, above, atol=1e-3)
    assert aw.elementwise(y, y).abs().max().item() == 0.0


@pytest.mark.parametrize("kwargs", [dict(omega=0), dict(alpha=1.0), dict(theta=-1)])
def test_adaptive_wing_bad_args(kwargs):
    with pytest.raises(ValueError):
        AdaptiveWingLoss(**kwargs)


def test_soft_losses_need_two_channels():
    with pytest.raises(ValueError, match="2 output channels"):
        SoftDiceBCELoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize("bad,match", [(np.array([0.2, np.nan]), "NaN"), (np.array([0.2, 1.5]), r"\[0, 1\]")])
def test_check_soft(bad, match):
    with pytest.raises(ValueError, match=match):
        check_soft(bad, "case.nii.gz")


def _nnunet_transforms(patch, ds_scales):
    return nnUNetTrainer.get_training_transforms(
        patch, rotation_for_DA=(-math.pi, math.pi), deep_supervision_scales=ds_scales, mirror_axes=(0, 1),
        do_dummy_2d_data_aug=False, use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1],
        regions=None, ignore_label=None)


def test_soft_half_survives_nnunet_augmentation():
    torch.manual_seed(0)
    patch = (32, 32)
    ds = [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
    tf = MapTransport(_nnunet_transforms(patch, ds), [MapSpec("soft", False, 255.0)])
    means = []
    for _ in range(30):
        img = torch.randn(1, 46, 46)
        seg = torch.zeros(2, 46, 46, dtype=torch.int16)
        seg[0, 8:38, 8:38] = 1
        seg[1, 8:38, 8:38] = 128  # soft 0.502 over the region
        out = tf(image=img, segmentation=seg)
        targets = out["segmentation"]
        assert [tuple(t.shape) for t in targets] == [(2, 32, 32), (2, 16, 16), (2, 8, 8)]
        soft, hard = targets[0][1], targets[0][0]
        assert soft.dtype == torch.int16  # stored 1/255 steps
        inside = hard == 1
        assert inside.any()
        core = soft[inside]
        assert ((core > 0) & (core < 255)).float().mean() > 0.95  # stays soft: no binarisation
        means.append(core.float().mean().item())
        # deep-supervision targets subsample the full-resolution soft target (nearest-exact, as the labels)
        assert torch.equal(targets[1][1], soft[1::2, 1::2]) and torch.equal(targets[2][1], soft[2::4, 2::4])
    assert np.mean(means) == pytest.approx(128, rel=0.03)


class _Cfg:
    spacing = [1.0, 1.0, 1.0]

    @staticmethod
    def resampling_fn_probabilities(data, new_shape, current_spacing, new_spacing):
        return resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False, order=1,
                                             order_z=0)


class _Plans:
    transpose_forward = [0, 1, 2]


def test_soft_to_grid_crops_resamples_and_keeps_mean():
    soft = np.zeros((10, 20, 20), np.float32)
    soft[2:8, 4:16, 4:16] = 0.5
    props = {"bbox_used_for_cropping": [[1, 9], [2, 18], [2, 18]], "spacing": [3.0, 1.0, 1.0]}
    grid = soft_to_preprocessed_grid(soft, props, _Plans(), _Cfg(), (24, 16, 16))
    assert grid.shape == (24, 16, 16)
    assert grid.max() <= 0.5 + 1e-6 and grid[12, 8, 8] == pytest.approx(0.5)
    # total soft "volume" in mm^3 preserved within a few percent (3 mm slices -> 1 mm)
    before = soft.sum() * 3.0
    after = grid.sum() * 1.0
    assert after == pytest.approx(before, rel=0.05)


def test_random_rater_draws_each_rater(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_ext.preprocessing.maps import map_path, save_map_like_seg
    from nnunet_ext.training.targets import WithTargetMaps

    seg = np.zeros((1, 1, 1, 4), np.int16)
    seg[0, 0, 0, 0] = -1
    nnUNetDatasetBlosc2.save_case(np.zeros((1, 1, 1, 4), np.float32), seg, {}, str(tmp_path / "c"))
    base = nnUNetDatasetBlosc2(str(tmp_path))
    for k, mask in enumerate(([0, 1, 1, 0], [0, 0, 1, 1])):
        save_map_like_seg((np.array(mask, np.uint8) * 255).reshape(1, 1, 4), tmp_path / "c_seg.b2nd",
                          map_path(tmp_path / f"r{k}", "c"))
    ds = WithTargetMaps(base, [], [tmp_path / "r0", tmp_path / "r1"])
    np.random.seed(0)
    seen = {tuple(np.asarray(ds.load_case("c")[1])[0, 0, 0].tolist()) for _ in range(40)}
    # voxel 0 is outside nnU-Net's crop and stays -1; both raters appear
    assert seen == {(-1, 1, 1, 0), (-1, 0, 1, 1)}
    with pytest.raises(FileNotFoundError, match="preprocess-soft --raters"):
        WithTargetMaps(base, [], [])


def test_fused_raters_union_intersection_majority_by_hand(tmp_path):
    """Three raters on five voxels (voxel 0 outside nnU-Net's crop, its marker -1 kept): votes 2, 1, 2, 3, 3
    -> union -1 1 1 1 1, intersection -1 0 0 1 1, majority (more than half: 2 of 3) -1 0 1 1 1."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_ext.preprocessing.maps import map_path, save_map_like_seg
    from nnunet_ext.training.targets import FusedMasks, WithTargetMaps

    seg = np.zeros((1, 1, 1, 5), np.int16)
    seg[0, 0, 0, 0] = -1
    nnUNetDatasetBlosc2.save_case(np.zeros((1, 1, 1, 5), np.float32), seg, {}, str(tmp_path / "c"))
    base = nnUNetDatasetBlosc2(str(tmp_path))
    masks = ([1, 1, 0, 1, 1], [1, 0, 1, 1, 1], [0, 0, 1, 1, 1])  # voxel 1: one vote, 2: two, 3-4: three
    masks = [[255 if v else 0 for v in m] for m in masks]
    masks[1][2] = 127  # below the 128 of a preprocessed (0..255) rater mask: not a vote
    masks[0][2] = 200  # at/above 128: a vote -> voxel 2 keeps two votes (raters 1 and 3)
    folders = []
    for k, mask in enumerate(masks):
        save_map_like_seg(np.array(mask, np.uint8).reshape(1, 1, 5), tmp_path / "c_seg.b2nd",
                          map_path(tmp_path / f"r{k}", "c"))
        folders.append(tmp_path / f"r{k}")
    want = {"union": [-1, 1, 1, 1, 1], "intersection": [-1, 0, 0, 1, 1], "majority": [-1, 0, 1, 1, 1]}
    for method, labels in want.items():
        ds = WithTargetMaps(base, [], folders, fuse=method)
        for _ in range(3):  # no draw: the same labels on every load
            assert np.asarray(ds.load_case("c")[1])[0, 0, 0].tolist() == labels, method
    # two raters: the majority needs both (a tie is background), as nnunet-ext fuse
    ds = WithTargetMaps(base, [], folders[1:], fuse="majority")
    assert np.asarray(ds.load_case("c")[1])[0, 0, 0].tolist() == [-1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="union, intersection or majority"):
        FusedMasks([np.zeros((1, 2), np.uint8)], "mean")
    with pytest.raises(ValueError, match="rater folders and no maps"):
        WithTargetMaps(base, [tmp_path / "r0"], folders, fuse="union")


def test_fused_raters_compositions():
    from nnunet_ext.training.composed import check_composition
    from nnunet_ext.training.named import RaterIntersectionTrainer, RaterUnionTrainer
    from nnunet_ext.training.parts import DiceCE, FusedRaters, LesionSizes, LSRBCE, RandomRater, SoftDice, SoftTargets

    assert RaterUnionTrainer.target_parts[0].fuse == "union"
    assert RaterIntersectionTrainer.target_parts[0].fuse == "intersection"
    assert check_composition(DiceCE(), (FusedRaters("union"),), None) == []
    with pytest.raises(ValueError, match="union, intersection, majority"):
        FusedRaters("staple")
    with pytest.raises(NotImplementedError, match=r"FusedRaters\(fuse='union'\) with SoftTargets"):
        check_composition(SoftDice(), (FusedRaters("union"), SoftTargets()), None)
    with pytest.raises(NotImplementedError, match=r"FusedRaters\(fuse='majority'\) with LesionSizes"):
        check_composition(LSRBCE(4, 4), (FusedRaters("majority"), LesionSizes()), None)
    with pytest.raises(NotImplementedError, match="one rater part"):
        check_composition(DiceCE(), (RandomRater(), FusedRaters("union")), None)


def test_threshold_search_by_hand(tmp_path):
    from nnunet_ext.inference.thresholds import THRESHOLDS, best_threshold, combined_threshold, threshold_counts

    prob = np.array([0.9, 0.7, 0.3, 0.2, 0.1])
    ref = np.array([1, 1, 1, 0, 0])
    c = threshold_counts(prob, ref)
    i25, i50 = THRESHOLDS.index(0.25), THRESHOLDS.index(0.5)
    assert (c["tp"][i25], c["fp"][i25], c["fn"][i25]) == (3, 0, 0)  # 0.25 and 0.3 separate perfectly
    assert (c["tp"][i50], c["fp"][i50], c["fn"][i50]) == (2, 0, 1)
    t, dice = best_threshold(c)
    assert t == 0.3 and dice[i25] == 1.0 and dice[i50] == pytest.approx(0.8)  # tie 0.25/0.3: nearer 0.5
    # folds are combined by summing counts
    for k, (p, r) in enumerate([(prob, ref), (np.array([0.8, 0.6, 0.6, 0.6]), np.array([1, 0, 0, 0]))]):
        (tmp_path / f"fold_{k}").mkdir()
        (tmp_path / f"fold_{k}" / "nnunet_ext_threshold.json").write_text(json.dumps(threshold_counts(p, r)))
    assert best_threshold(threshold_counts(np.array([0.8, 0.6, 0.6, 0.6]), np.array([1, 0, 0, 0])))[0] == 0.65
    both = combined_threshold(tmp_path, [0, 1])
    # pooled: 0.25-0.3 tp 4 fp 3 fn 0 (dice 8/11); 0.65-0.7 tp 3 fp 0 fn 1 (6/7, best; tie -> nearer 0.5)
    assert both["threshold"] == 0.65 and both["folds"] == [0, 1]
    assert combined_threshold(tmp_path, [5]) is None


def test_soft_output_activations():
    from nnunet_ext.inference.thresholds import soft_output

    p1 = np.array([0.5, 0.8, 0.2, 0.9])
    prob = np.stack([1 - p1, p1])
    assert np.allclose(soft_output(prob), p1)
    # a normalized-ReLU network exports softmax([0, Q]) (nnunet_ext.networks.activations): ln(p1/p0) = Q, clipped to
    # [0, 1]: ln(p1/p0) = 0, ln 4, -ln 4, ln 9 -> 0, 1 (ln 4 = 1.39 clipped), 0, 1; no rescaling by the maximum
    assert np.allclose(soft_output(prob, "normalized_relu"), [0, 1, 0, 1], atol=1e-6)
    q = np.array([0.3, 0.0, 0.6])
    assert np.allclose(soft_output(np.stack([1 / (1 + np.exp(q)), 1 / (1 + np.exp(-q))]), "normalized_relu"), q)
    assert np.all(soft_output(np.stack([p1 * 0 + 1, p1 * 0]), "normalized_relu") == 0)
    with pytest.raises(ValueError, match="activation"):
        soft_output(prob, "tanh")


def test_leaky_normalized_relu_same_value_gradient_through_negatives():
    x = torch.tensor([[-2.0, 1.0, 4.0]], requires_grad=True)
    plain = normalized_relu(x)
    leaky = normalized_relu(x, leak=0.01)
    assert torch.allclose(plain, leaky)
    leaky[0, 0].backward()
    assert x.grad[0, 0].item() == pytest.approx(0.01 / 4.0)
    dead = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    out = normalized_relu(dead, leak=0.01)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(dead.grad > 0)  # a network with only negative logits still gets a signal
