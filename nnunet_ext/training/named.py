"""The named trainers: each a composition of method parts (see docs/trainers.md for the table).

nnU-Net finds a trainer by its class name only, so every combination a user trains is a named class;
a new one takes a few lines (docs/trainers.md, "Your own combination")."""
from __future__ import annotations

from nnunet_ext.training.composed import ComposedTrainer
from nnunet_ext.training.optimizers import AdamCosine
from nnunet_ext.training.parts import (BCEIW, LSRBCE, WBCE, CohortNorm, CohortNormFineTune, DiceCE, FiLM, FocalBCE,
                                       FocalTversky, FusedRaters, LesionSizes, LSRDice, RandomRater, SigmoidDice, SoftDice,
                                       SoftDiceBCE, SoftSegAW, SoftTargets)

# ---------------------------------------------------------------- lesion size reweighting (Nichyporuk et al. 2021)


class LSRTrainer(ComposedTrainer):
    """LSR-weighted BCE, alpha = beta = 4, whole-case lesion sizes (18-connected, the thesis' lesions)."""
    loss_part = LSRBCE(4, 4)
    target_parts = (LesionSizes(18),)


class LSRTrainer_cc26(LSRTrainer):
    """LSRTrainer with the weights of 26-connected lesions (the thesis' lesions are 18-connected)."""
    target_parts = (LesionSizes(26),)


class LSRTrainer_alpha1_beta4(LSRTrainer):
    loss_part = LSRBCE(1, 4)


class LSRTrainer_alpha8_beta8(LSRTrainer):
    loss_part = LSRBCE(8, 8)


class BCETrainer(ComposedTrainer):
    """Plain (binary) cross-entropy (LSR with alpha = 0): the LSR paper's baseline."""
    loss_part = LSRBCE(0, 4)


class LSRTrainer_zeroBias(LSRTrainer):
    """LSRTrainer with nnU-Net's zero-initialised output bias instead of the class-frequency prior (the
    behaviour before the prior initialisation; kept to reproduce it, see docs/results.md)."""
    loss_part = LSRBCE(4, 4, prior_bias=False)


class BCETrainer_zeroBias(BCETrainer):
    """BCETrainer with nnU-Net's zero-initialised output bias (see LSRTrainer_zeroBias)."""
    loss_part = LSRBCE(0, 4, prior_bias=False)


class LSRDiceTrainer(ComposedTrainer):
    """nnU-Net's soft Dice + LSR-weighted BCE."""
    loss_part = LSRDice(4, 4)
    target_parts = (LesionSizes(18),)


class LSRDiceTrainer_cc26(LSRDiceTrainer):
    """LSRDiceTrainer with the weights of 26-connected lesions."""
    target_parts = (LesionSizes(26),)


# ------------------------------------------------ the LSR thesis' other Fig. 5.1 baselines (BCE: BCETrainer)


class WBCETrainer(ComposedTrainer):
    """Weighted BCE: lesion voxels weigh #background / #lesion voxels inside the nonzero region of the
    training cases (the thesis' section 4.3.1 weight)."""
    loss_part = WBCE()


class FocalLossTrainer(ComposedTrainer):
    """Binary focal loss, gamma 2, alpha 0.25 (Lin et al.'s defaults; the thesis gives none)."""
    loss_part = FocalBCE(2.0, 0.25)


class BCEIWTrainer(ComposedTrainer):
    """BCE with inverse lesion-size weights: every lesion of a sample carries the same total weight (Shirokikh
    et al. 2020), 18-connected lesions."""
    loss_part = BCEIW()
    target_parts = (LesionSizes(18),)


# ---------------------------------------------------------------- focal Tversky


class FocalTverskyTrainer(ComposedTrainer):
    """Focal Tversky loss, a = 0.7, b = 0.3, gamma = 4/3, smoothing 1."""
    loss_part = FocalTversky(0.7, 0.3, 4 / 3, 1.0)


class FocalTverskyTrainer_a085(FocalTverskyTrainer):
    loss_part = FocalTversky(0.85, 0.15, 4 / 3, 1.0)


class FocalTverskyTrainer_thesis(FocalTverskyTrainer):
    """The focal-Tversky thesis' best setting: a/b = 0.85/0.15, gamma 4/3, smoothing Omega = 2, TP/FN/FP over
    the flattened mini-batch."""
    loss_part = FocalTversky(0.85, 0.15, 4 / 3, 2.0, batch=True)


class FocalTverskyTrainer_thesis_a07(FocalTverskyTrainer):
    """The focal-Tversky thesis' default setting: a/b = 0.7/0.3, gamma 4/3, smoothing Omega = 2, TP/FN/FP over
    the flattened mini-batch."""
    loss_part = FocalTversky(0.7, 0.3, 4 / 3, 2.0, batch=True)


# ---------------------------------------------------------------- soft and multi-rater labels


class SoftDiceTrainer(ComposedTrainer):
    """Kats et al.'s soft Dice alone on the preprocessed soft labels (the Bar-Ilan thesis' loss, eq. 1)."""
    loss_part = SoftDice()
    target_parts = (SoftTargets(),)


class SoftDiceBCETrainer(ComposedTrainer):
    """Kats et al.'s soft Dice + a soft BCE term (not in the thesis) on the preprocessed soft labels."""
    loss_part = SoftDiceBCE()
    target_parts = (SoftTargets(),)


class SoftSegTrainer(ComposedTrainer):
    """SoftSeg as published (Gros et al. 2021; Lemay 2022, ivadomed's code): normalized ReLU with one maximum
    over the whole training batch (at prediction: over the whole case) + Adaptive Wing on the soft labels,
    trained with the published optimizer (Adam, 5e-4, cosine annealing)."""
    loss_part = SoftSegAW(max_over="batch")
    target_parts = (SoftTargets(),)
    optimizer_part = AdamCosine(5e-4)


class SoftSegTrainer_perPatch(SoftSegTrainer):
    """SoftSeg with the normalized ReLU's maximum taken per training patch (and per sliding-window patch at
    prediction) instead of over the batch; its lesion output learns far more slowly on small lesions."""
    loss_part = SoftSegAW(max_over="sample")


class SoftSegTrainer_leak(SoftSegTrainer):
    """SoftSeg with a 0.01 straight-through gradient through negative lesion logits (forward unchanged) and
    nnU-Net's SGD: the way SoftSeg learns under nnU-Net's own optimizer."""
    loss_part = SoftSegAW(leak=0.01, max_over="batch")
    optimizer_part = None


class SoftSegTrainer_sgd(SoftSegTrainer):
    """SoftSeg (no leak) under nnU-Net's SGD instead of the published Adam."""
    optimizer_part = None


class SoftSegTrainer_perPatch_sgd(SoftSegTrainer_perPatch):
    """SoftSegTrainer_perPatch under nnU-Net's SGD: its lesion output dies within ~40 iterations on small
    lesions; kept to reproduce that measurement (benchmarks/learning_curves.py)."""
    optimizer_part = None


class ConvDiceTrainer(ComposedTrainer):
    """SoftSeg's conventional baseline ("Conv", Lemay 2022): Dice loss on a sigmoid output, hard labels
    (labelsTr, e.g. a STAPLE or majority fusion); Dice-optimal validation threshold, as the thesis."""
    loss_part = SigmoidDice()
    soft_threshold = True
    optimizer_part = AdamCosine(5e-4)  # the same training loop as SoftSeg in the paper


class RandomRaterTrainer(ComposedTrainer):
    """nnU-Net's loss on one rater's mask drawn per sample (Lemay et al. 2022, "no fusion")."""
    target_parts = (RandomRater(),)


class RaterUnionTrainer(ComposedTrainer):
    """nnU-Net's Dice+CE on the union of the raters' masks, fused on loading (the Bar-Ilan thesis' "Union"
    baseline, Table 2); needs ``nnunet-ext preprocess-soft --raters``."""
    target_parts = (FusedRaters("union"),)


class RaterIntersectionTrainer(ComposedTrainer):
    """nnU-Net's Dice+CE on the intersection of the raters' masks, fused on loading (the Bar-Ilan thesis'
    "Intersection" baseline, Table 2); needs ``nnunet-ext preprocess-soft --raters``."""
    target_parts = (FusedRaters("intersection"),)


class SoftSegRandomRaterTrainer(ComposedTrainer):
    """SoftSeg on a rater drawn per sample, its mask kept soft through augmentation (SoftSeg thesis, best Brier)."""
    loss_part = SoftSegAW(max_over="batch")
    target_parts = (RandomRater(), SoftTargets())
    optimizer_part = AdamCosine(5e-4)


class SoftSegRandomRaterTrainer_leak(SoftSegRandomRaterTrainer):
    """SoftSegRandomRaterTrainer with the 0.01 gradient leak and nnU-Net's SGD of SoftSegTrainer_leak."""
    loss_part = SoftSegAW(leak=0.01, max_over="batch")
    optimizer_part = None


class ConvDiceRandomRaterTrainer(ConvDiceTrainer):
    """The "Conv-RandomSampling" candidate of Lemay 2022: Conv on one rater's hard mask drawn per sample."""
    target_parts = (RandomRater(),)


class SoftDiceRandomRaterTrainer(ComposedTrainer):
    """Kats et al.'s soft Dice alone on a rater drawn per sample (its mask kept soft through augmentation)."""
    loss_part = SoftDice()
    target_parts = (RandomRater(), SoftTargets())


class SoftDiceBCERandomRaterTrainer(SoftDiceRandomRaterTrainer):
    """Soft Dice + soft BCE on a rater drawn per sample."""
    loss_part = SoftDiceBCE()


class LSRRandomRaterTrainer(ComposedTrainer):
    """LSR-weighted BCE on a rater drawn per sample, sizes of that rater's lesions."""
    loss_part = LSRBCE(4, 4)
    target_parts = (RandomRater(), LesionSizes(18))


class LSRSoftTrainer(ComposedTrainer):
    """LSR-weighted soft BCE on the soft labels (sizes of the binarized labels)."""
    loss_part = LSRBCE(4, 4)
    target_parts = (SoftTargets(), LesionSizes(18))


# ---------------------------------------------------------------- conditional instance norm


class ResolutionFiLMTrainer(ComposedTrainer):
    """nnU-Net's loss; instance norms FiLM-conditioned on each case's original voxel spacing."""
    network_part = FiLM()


class SCINTrainer(ComposedTrainer):
    """nnU-Net's loss; one instance-norm affine per cohort (cohorts.json), 8 slots."""
    network_part = CohortNorm(8)


class SCINTrainer_32cohorts(SCINTrainer):
    network_part = CohortNorm(32)


class SCINNormFineTuneTrainer(SCINTrainer):
    """Norm-only fine-tuning of a SCIN model for this dataset's cohorts (-pretrained_weights)."""
    network_part = CohortNormFineTune(8)


# ---------------------------------------------------------------- seed systems


class LSRFiLMTrainer(ComposedTrainer):
    """McGill MSSEG-2 stage 1: LSR-weighted BCE with resolution FiLM (plan with nnunet-ext's native-resolution
    planner to keep each scan's own spacing, docs/conditioning.md)."""
    loss_part = LSRBCE(4, 4)
    target_parts = (LesionSizes(18),)
    network_part = FiLM()


class LSRSCINTrainer(ComposedTrainer):
    """LSR-weighted BCE with cohort-conditioned instance norms."""
    loss_part = LSRBCE(4, 4)
    target_parts = (LesionSizes(18),)
    network_part = CohortNorm(8)


__all__ = [n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, ComposedTrainer)
           and v is not ComposedTrainer] + ["DiceCE"]
