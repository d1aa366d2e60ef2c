"""The soft-label recipes as their papers define them, against values worked out by hand:
Kats et al.'s soft Dice alone (Bar-Ilan thesis eq. 1), SoftSeg's normalized ReLU normalised per network input
in training and at prediction (Lemay 2022 eq. 4.1), the leak variant, the thesis' "Conv" baseline (Dice on
a sigmoid output), the thesis' ECE (eq. 5.3-5.5 as the google-research code it cites) and entropy (eq. 5.1)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.inference.contract import ModelContract
from nnunet_ext.networks.activations import normalized_relu
from nnunet_ext.training.losses import AdaptiveWingLoss, SigmoidDiceLoss, SoftDiceBCELoss, SoftDiceLoss
from nnunet_ext.training import named
from nnunet_ext.training.parts import RandomRater, SigmoidDice, SoftDice, SoftDiceBCE, SoftSegAW, SoftTargets

# ------------------------------------------------------------------------------------------ soft Dice (item 2)


def test_kats_soft_dice_alone_by_hand():
    logits = torch.zeros(1, 2, 1, 1, 4)  # P = 0.5 everywhere
    target = torch.tensor([[1, 1, 0, 0], [1.0, 0.5, 0, 0]]).reshape(1, 2, 1, 1, 4)  # S = T + gamma D, gamma 0.5
    # sum(S P) = 0.75, sum P = 2, sum S = 1.5: -0.75 / (0.5 * 2 + 0.5 * 1.5) = -0.75 / 1.75
    assert SoftDiceLoss(eps=1e-12)(logits, target).item() == pytest.approx(-0.75 / 1.75, rel=1e-6)
    # the Dice + BCE variant adds ln 2 (BCE at P = 0.5) to the same value
    assert SoftDiceBCELoss(eps=1e-12)(logits, target).item() == pytest.approx(-0.75 / 1.75 + math.log(2), rel=1e-6)
    # integer targets carry the soft map in 1/255 steps; an ignored voxel counts in no sum
    ign = torch.tensor([[1, 1, 0, 2], [255, 128, 0, 255]]).reshape(1, 2, 1, 1, 4)
    # S = 1, 128/255, 0, (ignored); P = 0.5: sum SP = 0.5 (1 + 128/255), sum P = 1.5, sum S = 1 + 128/255
    s = 1 + 128 / 255
    assert SoftDiceLoss(eps=1e-12, ignore_label=2)(logits, ign).item() == pytest.approx(
        -0.5 * s / (0.75 + 0.5 * s), rel=1e-6)


def test_soft_dice_per_sample_is_averaged():
    logits = torch.zeros(2, 2, 1, 1, 2)
    target = torch.tensor([[[1, 0], [1.0, 0]], [[0, 0], [0.0, 0]]]).reshape(2, 2, 1, 1, 2)
    # sample 1: -0.5 / (0.5 + 0.5) = -0.5; sample 2: 0 / (0.5 + 0 + eps) = 0 -> mean -0.25
    assert SoftDiceLoss(batch=False, eps=1e-12)(logits, target).item() == pytest.approx(-0.25, rel=1e-6)
    # batch Dice: sum SP = 0.5, sum P = 2, sum S = 1: -0.5 / 1.5
    assert SoftDiceLoss(batch=True, eps=1e-12)(logits, target).item() == pytest.approx(-1 / 3, rel=1e-6)


def test_soft_dice_trainers_are_named_by_their_loss():
    assert isinstance(named.SoftDiceTrainer.loss_part, SoftDice)
    assert isinstance(named.SoftDiceBCETrainer.loss_part, SoftDiceBCE)
    assert isinstance(named.SoftDiceRandomRaterTrainer.loss_part, SoftDice)
    assert isinstance(named.SoftDiceBCERandomRaterTrainer.loss_part, SoftDiceBCE)
    assert [type(t) for t in named.SoftDiceRandomRaterTrainer.target_parts] == [RandomRater, SoftTargets]
    assert SoftDice.needs == {"soft"} and SoftDice.activation == "softmax"


# ------------------------------------------------------------------------------------------ SoftSeg (item 4)


class _PointNet(nn.Module):
    """A stand-in network: lesion logit = the input, background logit 0 (outputs (B, 2, *sp))."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], 1)


def _predictor(network, activation, tta="mean_logits"):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.inference.predictor import predictor_class

    plans = PlansManager({"configurations": {"3d_fullres": {"patch_size": [1, 1, 4], "architecture": {}}},
                          "label_manager": "LabelManager"})
    p = predictor_class()(tile_step_size=1.0, use_gaussian=False, use_mirroring=True,
                          perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                          allow_tqdm=False)
    p.manual_initialization(network, plans, plans.get_configuration("3d_fullres"), None,
                            {"labels": {"background": 0, "lesion": 1}}, "T", (0, 1, 2))
    p.use_contract(ModelContract(activation=activation, tta=tta))
    return p


def test_normalized_relu_is_per_network_input_in_training_and_prediction():
    from nnunet_ext.inference.thresholds import soft_output

    x = torch.tensor([1.0, 2, 3, 4, -1, 2, 6, 3]).reshape(1, 1, 1, 8)  # (C, z, y, x), one case
    # two sliding-window patches of 4 voxels (step 1.0): [1 2 3 4] and [-1 2 6 3]; each normalised by its own
    # maximum: 1/4 2/4 3/4 4/4 | 0 2/6 6/6 3/6 (the whole case's maximum 6 would give 1/6 2/6 3/6 4/6 ...)
    want = np.array([0.25, 0.5, 0.75, 1.0, 0.0, 1 / 3, 1.0, 0.5])
    for tta in ("mean_logits", "mean_probabilities"):
        out = _predictor(_PointNet(), "normalized_relu", tta).predict_sliding_window_return_logits(x)
        assert out.shape == (2, 1, 1, 8) and float(out[0].abs().max()) == 0
        np.testing.assert_allclose(out[1].float().numpy().ravel(), want, atol=1e-3)  # (nnU-Net sums in fp16)
        prob = torch.softmax(out.float(), 0).numpy()  # what nnU-Net's export writes
        np.testing.assert_allclose(soft_output(prob, "normalized_relu").ravel(), want, atol=1e-3)
    # training sees the same two patches as two samples of a batch: the loss's prediction is the same map
    patches = torch.stack([x[..., :4], x[..., 4:]])  # (B=2, C=1, 1, 1, 4)
    logits = _PointNet()(patches)
    np.testing.assert_allclose(normalized_relu(logits[:, 1] - logits[:, 0]).numpy().ravel(), want, atol=1e-6)
    # Adaptive Wing is 0 only where prediction = target: 0 against the per-patch map, > 0 against the case-max one
    target = torch.cat([torch.zeros_like(patches), torch.tensor(want, dtype=torch.float32).reshape(2, 1, 1, 1, 4)], 1)
    assert AdaptiveWingLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-7)
    case_max = torch.cat([torch.zeros_like(patches), (patches.clamp(min=0) / 6)], 1)
    assert AdaptiveWingLoss()(logits, case_max).item() > 0.01
    # a softmax model is left alone: nnU-Net's logits
    raw = _predictor(_PointNet(), "softmax").predict_sliding_window_return_logits(x)
    np.testing.assert_allclose(raw[1].float().numpy().ravel(), x.numpy().ravel(), atol=1e-2)


def test_normalized_relu_over_the_batch_in_training_and_over_the_case_at_prediction():
    """ivadomed's ``nn.ReLU()(x) / nn.ReLU()(x).max()``: one maximum for the whole batch; at prediction the whole
    case is the batch (activation ``normalized_relu_case``)."""
    from nnunet_ext.inference.thresholds import soft_output

    x = torch.tensor([1.0, 2, 3, 4, -1, 2, 6, 3]).reshape(1, 1, 1, 8)
    # the same two patches as above, one maximum (6) for both: 1/6 2/6 3/6 4/6 | 0 2/6 6/6 3/6
    want = np.array([1, 2, 3, 4, 0, 2, 6, 3]) / 6
    patches = torch.stack([x[..., :4], x[..., 4:]])
    logits = _PointNet()(patches)
    d = logits[:, 1] - logits[:, 0]
    np.testing.assert_allclose(normalized_relu(d, max_over="batch").numpy().ravel(), want, atol=1e-6)
    # per sample (the other reading) the first patch reaches 1 at its own maximum 4
    assert normalized_relu(d, max_over="sample").numpy().ravel()[3] == pytest.approx(1.0)
    target = torch.cat([torch.zeros_like(patches), torch.tensor(want, dtype=torch.float32).reshape(2, 1, 1, 1, 4)], 1)
    assert AdaptiveWingLoss(max_over="batch")(logits, target).item() == pytest.approx(0.0, abs=1e-7)
    assert AdaptiveWingLoss(max_over="sample")(logits, target).item() > 0.01
    with pytest.raises(ValueError, match="max_over"):
        normalized_relu(d, max_over="case")
    with pytest.raises(ValueError, match="max_over"):
        SoftSegAW(max_over="volume")
    # prediction: every pass returns relu(x) / 8 (no per-patch maximum), nnU-Net blends, the case maximum divides
    for tta in ("mean_logits", "mean_probabilities"):
        out = _predictor(_PointNet(), "normalized_relu_case", tta).predict_sliding_window_return_logits(x)
        np.testing.assert_allclose(out[1].float().numpy().ravel(), np.maximum(x.numpy().ravel(), 0) / 8, atol=1e-3)
        prob = torch.softmax(out.float(), 0).numpy()
        np.testing.assert_allclose(soft_output(prob, "normalized_relu_case").ravel(), want, atol=1e-3)
    # a case without any positive output is 0, not 0/0
    assert soft_output(np.array([[1.0, 0.7], [0.0, 0.3]]), "normalized_relu_case").tolist() == [0.0, 0.0]
    # the trainer records the activation its prediction needs
    assert named.SoftSegTrainer.loss_part.activation == "normalized_relu_case"
    assert named.SoftSegTrainer.loss_part.max_over == named.SoftSegRandomRaterTrainer.loss_part.max_over == "batch"
    assert named.SoftSegTrainer_leak.loss_part.max_over == named.SoftSegTrainer_sgd.loss_part.max_over == "batch"
    assert named.SoftSegTrainer_perPatch.loss_part.activation == "normalized_relu"


def test_output_activation_only_inside_the_block():
    from nnunet_ext.networks.activations import output_activation

    net = _PointNet()
    x = torch.tensor([[[-2.0, 1.0, 4.0]]])  # (B=1, C=1, 3)
    with output_activation(net, "normalized_relu"):
        assert net(x)[0, 1].tolist() == [0.0, 0.25, 1.0] and net(x)[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert net(x)[0, 1].tolist() == [-2.0, 1.0, 4.0]  # the hook is gone
    with output_activation(net, "softmax"):
        assert net(x)[0, 1].tolist() == [-2.0, 1.0, 4.0]


def test_soft_output_of_normalized_relu_reads_the_blended_map():
    from nnunet_ext.inference.thresholds import soft_output

    q = np.array([0.0, 0.2, 0.5, 0.6])  # the blended map need not reach 1: it is not rescaled
    prob = np.stack([1 / (1 + np.exp(q)), 1 / (1 + np.exp(-q))])  # softmax of [0, q]
    np.testing.assert_allclose(soft_output(prob, "normalized_relu"), q, atol=1e-6)
    # outside nnU-Net's crop it writes p = (1, 0): 0; no rescaling by the case maximum
    assert soft_output(np.array([[1.0, 0.6], [0.0, 0.4]]), "normalized_relu").tolist() == [0.0, pytest.approx(0.0)]


def test_published_softseg_has_no_leak_and_the_leak_variant_is_named():
    assert named.SoftSegTrainer.loss_part.leak == 0 and SoftSegAW().leak == 0
    assert named.SoftSegRandomRaterTrainer.loss_part.leak == 0
    assert named.SoftSegTrainer_leak.loss_part.leak == 0.01
    assert named.SoftSegRandomRaterTrainer_leak.loss_part.leak == 0.01
    assert named.SoftSegTrainer_leak.target_parts == named.SoftSegTrainer.target_parts
    # all lesion logits negative: the published activation is 0 everywhere and passes no gradient at all
    logits = torch.tensor([[0.0, 0.0, 0.0], [-1.0, -2.0, -0.5]]).reshape(1, 2, 1, 1, 3).requires_grad_(True)
    target = torch.tensor([[1, 0, 0], [255, 0, 0]]).reshape(1, 2, 1, 1, 3)
    AdaptiveWingLoss()(logits, target).backward()
    assert float(logits.grad.abs().max()) == 0.0
    logits.grad = None
    # the leak: the value is the same, the gradient flows through the negative logits
    leaky = AdaptiveWingLoss(leak=0.01)(logits, target)
    assert leaky.item() == pytest.approx(AdaptiveWingLoss()(logits, target).item())
    leaky.backward()
    assert float(logits.grad.abs().max()) > 0


def test_leak_keeps_the_published_forward_value_for_tiny_maxima():
    # max 5e-4 < 1e-3: the published value is relu / max; the leak variant divides by the same maximum
    x = torch.tensor([[-1.0, 2.5e-4, 5e-4]])
    np.testing.assert_allclose(normalized_relu(x, leak=0.01).numpy(), [[0.0, 0.5, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(normalized_relu(x).numpy(), [[0.0, 0.5, 1.0]], rtol=1e-6)


# ------------------------------------------------------------------------------------------ Conv (item 6)


def test_conv_dice_on_sigmoid_by_hand():
    # lesion logits z1 - z0 = 0, ln 3, -ln 3, 0 -> P = 0.5, 0.75, 0.25, 0.5; hard labels T = 1, 1, 0, 0
    d = torch.tensor([0.0, math.log(3), -math.log(3), 0.0])
    logits = torch.stack([torch.full_like(d, 0.3), d + 0.3]).reshape(1, 2, 1, 1, 4)
    target = torch.tensor([1.0, 1, 0, 0]).reshape(1, 1, 1, 1, 4)
    # sum PT = 1.25, sum P = 2, sum T = 2: -(2 * 1.25 + 1) / (2 + 2 + 1) = -0.7
    assert SigmoidDiceLoss()(logits, target).item() == pytest.approx(-0.7, rel=1e-6)
    # one sum over the whole batch (ivadomed flattens): the same voxels split into two samples give -0.7 too
    two = logits[0].reshape(2, 2, 2).permute(1, 0, 2).reshape(2, 2, 1, 1, 2)  # (sample, class, 1, 1, voxel)
    assert two[0, 1].ravel().tolist() == pytest.approx((d + 0.3)[:2].tolist())
    assert SigmoidDiceLoss()(two, target.reshape(2, 1, 1, 1, 2)).item() == pytest.approx(-0.7, rel=1e-6)
    # ignored voxels (label 2) count in no sum: drop voxel 4 -> sum P = 1.5, sum T = 2: -(3.5) / 4.5
    ign = torch.tensor([1.0, 1, 0, 2]).reshape(1, 1, 1, 1, 4)
    assert SigmoidDiceLoss(ignore_label=2)(logits, ign).item() == pytest.approx(-3.5 / 4.5, rel=1e-6)
    with pytest.raises(ValueError, match="smooth"):
        SigmoidDiceLoss(smooth=-1)


def test_conv_trainers():
    for name in ("ConvDiceTrainer", "ConvDiceRandomRaterTrainer"):
        cls = getattr(named, name)
        assert isinstance(cls.loss_part, SigmoidDice) and cls.loss_part.smooth == 1.0
        assert cls.loss_part.activation == "softmax"  # sigmoid(z1 - z0) is the 2-class softmax
        assert cls.soft_threshold is True  # Dice-optimal validation threshold, as the thesis' MS experiments
    assert named.ConvDiceTrainer.target_parts == ()
    assert [type(t) for t in named.ConvDiceRandomRaterTrainer.target_parts] == [RandomRater]


# ------------------------------------------------------------------------------------------ ECE, entropy (item 5)


def test_thesis_ece_by_hand():
    from nnunet_ext.metrics.soft import confidence_counts, ece

    p = np.array([0.0, 0.04, 0.28, 0.45, 0.5, 0.55, 0.62, 0.96, 1.0, 0.35])
    ref = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 0])
    # classes (1 - p, p): confidence 1 .96 .72 .55 .5 .55 .62 .96 1 .65; predicted class 0 0 0 0 0(tie) 1 1 1 1 0
    # correct:                        T  T   F   T   F  T   F   T  T  T
    # confidence 1 (p = 0 and p = 1): in no bin. Bins [k/10, (k+1)/10):
    #   [.5,.6): .55 T, .5 F, .55 T -> acc 2/3, conf 1.6/3 | [.6,.7): .62 F, .65 T -> acc .5, conf .635
    #   [.7,.8): .72 F -> acc 0, conf .72               | [.9,1): .96 T, .96 T -> acc 1, conf .96
    # ECE = (3 |2/3 - 1.6/3| + 2 |.5 - .635| + 1 * .72 + 2 * .04) / 8 = (.4 + .27 + .72 + .08) / 8 = 0.18375
    c = confidence_counts(p, ref)
    assert c["count"] == [0, 0, 0, 0, 0, 3, 2, 1, 0, 2] and c["unbinned"] == [2]
    assert c["correct"] == [0, 0, 0, 0, 0, 2, 1, 0, 0, 2]
    assert ece(p, ref) == pytest.approx(0.18375, abs=1e-12)


def _ece_reference(p, y, num_bins=10):
    """Independent transcription of the google-research ``uncertainties`` calibration (metrics.py) for
    two classes: a loop over bins ``tau[i] <= conf < tau[i+1]``, weights = binned counts."""
    p_mean = np.stack([1 - p, p], 1)
    pred, conf = p_mean.argmax(1), p_mean.max(1)
    tau = np.linspace(0, 1, num_bins + 1)
    gaps, sizes = [], []
    for i in range(num_bins):
        sec = (tau[i + 1] > conf) & (conf >= tau[i])
        if sec.sum():
            sizes.append(sec.sum())
            gaps.append(abs(conf[sec].mean() - (pred[sec] == y[sec]).mean()))
    return float(np.average(gaps, weights=np.array(sizes) / np.sum(sizes)))


def test_thesis_ece_pooled_over_cases_matches_the_cited_code():
    from nnunet_ext.metrics.soft import add_counts, confidence_counts, ece_from_counts

    rng = np.random.default_rng(3)
    cases = []
    for n in (500, 300):
        p = rng.random(n) ** 3
        p[:40] = 0.0  # SoftSeg-like exact zeros
        p[40:45] = np.linspace(0.1, 0.9, 5)  # bin edges
        y = (rng.random(n) < p).astype(np.uint8)
        cases.append((p.astype(np.float32), y))
    pooled = None
    for p, y in cases:
        pooled = add_counts(pooled, confidence_counts(p, y))
    allp = np.concatenate([c[0] for c in cases]).astype(np.float64)
    ally = np.concatenate([c[1] for c in cases])
    assert ece_from_counts(pooled) == pytest.approx(_ece_reference(allp, ally), abs=1e-12)
    assert pooled["unbinned"] == [80]


def test_evaluate_reports_the_thesis_ece_pooled(tmp_path):
    from nnunet_ext.cli import run
    from nnunet_ext.core.io import write_image
    from nnunet_ext.metrics.soft import ece, ece_probability_bins
    import json

    p1 = np.array([0.0, 0.04, 0.28, 0.45, 0.5, 0.55, 0.62, 0.96, 1.0, 0.35], np.float32).reshape(1, 2, 5)
    r1 = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 0], np.uint8).reshape(1, 2, 5)
    for d, a in (("ref", r1), ("pred", (p1 > 0.5).astype(np.uint8)), ("prob", p1)):
        write_image(a, (1.0, 1.0, 1.0), tmp_path / d / "c1.nii.gz")
    assert run(["evaluate", "--ref", str(tmp_path / "ref"), "--pred", str(tmp_path / "pred"), "--prob",
                str(tmp_path / "prob"), "-o", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["aggregate"]["pooled"]["ece"] == pytest.approx(0.18375, abs=1e-6)  # the hand-worked case above
    assert res["per_case"]["c1"]["ece"] == pytest.approx(ece(p1, r1), abs=1e-9)
    assert res["aggregate"]["pooled"]["ece_probability_bins"] == pytest.approx(ece_probability_bins(p1, r1))
    assert res["aggregate"]["calibration_counts"]["unbinned"] == [2]
    assert (tmp_path / "r.reliability.png").is_file() and (tmp_path / "r.reliability.probability_bins.png").is_file()


def test_entropy_is_summed_over_voxels_of_the_class_entropies():
    from nnunet_ext.metrics.soft import entropy_abs_error, image_entropy

    # -sum_c q_c ln q_c per voxel: ln 2 at 0.5; 0 at 0 and 1; at 0.2: -(0.2 ln 0.2 + 0.8 ln 0.8) = 0.5004024
    h02 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert image_entropy(np.array([0.5, 0.0, 1.0, 0.2])) == pytest.approx(math.log(2) + h02, abs=1e-12)
    assert image_entropy(np.zeros(10 ** 6)) == 0.0  # no clipping residue over many voxels
    assert entropy_abs_error(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(2 * math.log(2))


# ------------------------------------------------------------------------------------------ through nnU-Net


def _np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _np_loss(name, out, g, batch_dice, soft_channel):
    """Independent numpy (float64) loss of one deep-supervision scale: out (B, 2, ...), g the target."""
    p = _np_sigmoid(out[:, 1].astype(np.float64) - out[:, 0])  # no ignore label in the phantom
    if name == "ConvDiceTrainer":
        t = (g[:, 0] == 1).astype(np.float64)
        return -(2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    s = g[:, soft_channel] / 255.0
    if name == "SoftDiceTrainer":
        if batch_dice:
            return -(p * s).sum() / (0.5 * p.sum() + 0.5 * s.sum() + 1e-5)
        ax = tuple(range(1, p.ndim))
        return float(np.mean(-(p * s).sum(ax) / (0.5 * p.sum(ax) + 0.5 * s.sum(ax) + 1e-5)))
    # SoftSegTrainer: normalized ReLU with one maximum over the whole batch (SoftSegTrainer_perPatch: one per
    # sample), Adaptive Wing (omega 8, theta 0.5, epsilon 1, alpha 2.1)
    d = np.maximum(out[:, 1].astype(np.float64) - out[:, 0], 0)
    if name == "SoftSegTrainer":
        mx = np.full([1] * d.ndim, d.max())
    else:
        mx = d.reshape(len(d), -1).max(1).reshape(-1, *([1] * (d.ndim - 1)))
    q = np.where(mx > 0, d / np.where(mx > 0, mx, 1), 0)
    diff, e = np.abs(s - q), 2.1 - s
    a = 8 * e * 0.5 ** (e - 1) / (1 + 0.5 ** e)
    c = 0.5 * a - 8 * np.log1p(0.5 ** e)
    return float(np.mean(np.where(diff < 0.5, 8 * np.log1p(diff ** e), a * diff - c)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SoftDiceTrainer", "ConvDiceTrainer", "SoftSegTrainer", "SoftSegTrainer_perPatch"])
def test_fixed_batch_loss_through_nnunet(planned_phantom, name):
    """The loss each trainer builds inside nnU-Net (deep supervision, its batch Dice setting, soft maps in
    1/255 steps) against the numpy formulas of the papers."""
    from conftest import nnunet_paths
    from test_compositions import _trainer

    from nnunet_ext.nnunet_adapter import deep_supervision_weights

    work, env, root = planned_phantom
    with nnunet_paths(env):
        t = _trainer(getattr(named, name), env)
        batch = next(t.dataloader_train)
        torch.manual_seed(0)
        with torch.no_grad():
            out = t.network(batch["data"])
            got = float(t.loss(out, batch["target"]))
        w = deep_supervision_weights(len(out))
        want = sum(wk * _np_loss(name, o.numpy(), g.numpy(), bool(t.configuration_manager.batch_dice),
                                 t.layout.get("soft"))
                   for wk, o, g in zip(w, out, batch["target"]) if wk > 0)
        assert abs(got - want) < 1e-5 * abs(want) + 1e-6
