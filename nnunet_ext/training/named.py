"""The named trainers: each a composition of method parts (see docs/trainers.md for the table).

nnU-Net finds a trainer by its class name only, so every combination a user trains is a named class;
a new one takes a few lines (docs/trainers.md, "Your own combination")."""
from __future__ import annotations

from nnunet_ext.training.composed import ComposedTrainer
from nnunet_ext.training.parts import (LSRBCE, CohortNorm, CohortNormFineTune, DiceCE, FiLM, FocalTversky, LesionSizes,
                                       LSRDice, RandomRater, SoftDiceBCE, SoftSegAW, SoftTargets)

# ---------------------------------------------------------------- lesion size reweighting (Nichyporuk et al. 2021)


class LSRTrainer(ComposedTrainer):
    """LSR-weighted BCE, alpha = beta = 4, whole-case lesion sizes (26-connected)."""
    loss_part = LSRBCE(4, 4)
    target_parts = (LesionSizes(26),)


class LSRTrainer_alpha1_beta4(LSRTrainer):
    loss_part = LSRBCE(1, 4)


class LSRTrainer_alpha8_beta8(LSRTrainer):
    loss_part = LSRBCE(8, 8)


class BCETrainer(ComposedTrainer):
    """Plain (binary) cross-entropy (LSR with alpha = 0): the LSR paper's baseline."""
    loss_part = LSRBCE(0, 4)


class LSRDiceTrainer(ComposedTrainer):
    """nnU-Net's soft Dice + LSR-weighted BCE."""
    loss_part = LSRDice(4, 4)
    target_parts = (LesionSizes(26),)


# ---------------------------------------------------------------- focal Tversky


class FocalTverskyTrainer(ComposedTrainer):
    """Focal Tversky loss, a = 0.7, b = 0.3, gamma = 4/3, smoothing 1."""
    loss_part = FocalTversky(0.7, 0.3, 4 / 3, 1.0)


class FocalTverskyTrainer_a085(FocalTverskyTrainer):
    loss_part = FocalTversky(0.85, 0.15, 4 / 3, 1.0)


class FocalTverskyTrainer_thesis(FocalTverskyTrainer):
    """The focal-Tversky thesis' best setting: a/b = 0.85/0.15 with its own smoothing Omega = 2."""
    loss_part = FocalTversky(0.85, 0.15, 4 / 3, 2.0)


# ---------------------------------------------------------------- soft and multi-rater labels


class SoftDiceTrainer(ComposedTrainer):
    """Soft Dice (Kats et al. 2019) + soft BCE on the preprocessed soft labels."""
    loss_part = SoftDiceBCE()
    target_parts = (SoftTargets(),)


class SoftSegTrainer(ComposedTrainer):
    """SoftSeg (Gros et al. 2021): normalized ReLU + Adaptive Wing on the soft labels."""
    loss_part = SoftSegAW()
    target_parts = (SoftTargets(),)


class RandomRaterTrainer(ComposedTrainer):
    """nnU-Net's loss on one rater's mask drawn per sample (Lemay et al. 2022, "no fusion")."""
    target_parts = (RandomRater(),)


class SoftSegRandomRaterTrainer(ComposedTrainer):
    """SoftSeg on a rater drawn per sample, its mask kept soft through augmentation (SoftSeg thesis, best Brier)."""
    loss_part = SoftSegAW()
    target_parts = (RandomRater(), SoftTargets())


class SoftDiceRandomRaterTrainer(ComposedTrainer):
    """Soft Dice + soft BCE on a rater drawn per sample."""
    loss_part = SoftDiceBCE()
    target_parts = (RandomRater(), SoftTargets())


class LSRRandomRaterTrainer(ComposedTrainer):
    """LSR-weighted BCE on a rater drawn per sample, sizes of that rater's lesions."""
    loss_part = LSRBCE(4, 4)
    target_parts = (RandomRater(), LesionSizes(26))


class LSRSoftTrainer(ComposedTrainer):
    """LSR-weighted soft BCE on the soft labels (sizes of the binarized labels)."""
    loss_part = LSRBCE(4, 4)
    target_parts = (SoftTargets(), LesionSizes(26))


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
    target_parts = (LesionSizes(26),)
    network_part = FiLM()


class LSRSCINTrainer(ComposedTrainer):
    """LSR-weighted BCE with cohort-conditioned instance norms."""
    loss_part = LSRBCE(4, 4)
    target_parts = (LesionSizes(26),)
    network_part = CohortNorm(8)


__all__ = [n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, ComposedTrainer)
           and v is not ComposedTrainer] + ["DiceCE"]
