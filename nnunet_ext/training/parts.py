"""Method parts that a trainer composes: one loss part, any target parts, at most one network part.

    class LSRFiLMTrainer(ComposedTrainer):
        loss_part = LSRBCE(alpha=4, beta=4)
        target_parts = (LesionSizes(),)
        network_part = FiLM()

* **Loss parts** build an ``nn.Module`` ``(logits (B, C, *sp), target (B, 1 + K, *sp)) -> scalar`` from the
  trainer and the target layout (map name -> target channel): :class:`DiceCE` (nnU-Net's), :class:`LSRBCE`,
  :class:`LSRDice`, :class:`FocalTversky`, :class:`SoftDice`, :class:`SoftDiceBCE`, :class:`SoftSegAW`,
  :class:`SigmoidDice`, and the LSR thesis' baselines :class:`WBCE`, :class:`FocalBCE`, :class:`BCEIW`.
* **Target parts** add maps that travel beside the labels (``nnunet_ext.training.targets``):
  :class:`LesionSizes` (exact, nearest), :class:`SoftTargets` (linear), :class:`RandomRater` (replaces the
  labels, and the sources of the other maps, by one rater drawn per sample), :class:`FusedRaters` (the
  labels are the raters' union, intersection or majority, fused on loading).
* **Network parts** condition nnU-Net's planned network: :class:`FiLM` (voxel spacing), :class:`CohortNorm`
  (SCIN), :class:`CohortNormFineTune`.

A loss declares the maps it ``needs`` and the ones it can ``use``; a target part no loss uses, a missing
needed map, or two network parts raise ``NotImplementedError`` naming both parts.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from nnunet_ext.training.lsr import check_alpha_beta, lesion_size_map
from nnunet_ext.preprocessing.maps import map_path, read_map, save_map_like_seg
from nnunet_ext.preprocessing.soft_preprocess import RATER_FOLDER, soft_folder
from nnunet_ext.preprocessing.maps import SOFT_SCALE
from nnunet_ext.training.targets import FUSIONS, MapSpec


def part_name(part) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in vars(part).items() if not k.startswith("_") and k != "needs")
    return f"{type(part).__name__}({args})"


# ================================================================================================ losses


class LossPart:
    needs: frozenset = frozenset()   # maps the loss cannot work without
    uses: frozenset = frozenset()    # maps it uses when present
    activation = "softmax"           # how the soft output is read at prediction (nnunet_ext.inference.contract)
    two_class_only = False
    # start every output head at the training set's class frequencies (nnunet_ext.training.prior): for
    # losses that are voxel-wise cross-entropies alone, which otherwise spend their first hundreds of
    # iterations predicting background everywhere
    prior_bias = False

    def build(self, trainer, layout: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def settings(self) -> dict:
        return {"loss": part_name(self)}


class DiceCE(LossPart):
    """nnU-Net's own loss (soft Dice + cross-entropy), exactly as nnUNetTrainer builds it."""

    def build(self, trainer, layout):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer._build_loss(trainer), True  # (loss, already wrapped for deep supervision)


class LSRBCE(LossPart):
    """LSR-weighted (binary) cross-entropy (nnunet_ext.training.losses.LSRCrossEntropyLoss); on soft targets when a
    soft map is present. ``alpha = 0`` is plain (B)CE and needs no sizes."""

    uses = frozenset({"sizes", "soft"})
    prior_bias = True

    def __init__(self, alpha: float = 4.0, beta: float = 4.0, prior_bias: bool | None = None):
        check_alpha_beta(alpha, beta)
        self.alpha, self.beta = float(alpha), float(beta)
        if prior_bias is not None:
            self.prior_bias = bool(prior_bias)
        self.needs = frozenset({"sizes"}) if self.alpha > 0 else frozenset()

    def _lsr(self, trainer, layout):
        from nnunet_ext.training.losses import LSRCrossEntropyLoss

        return LSRCrossEntropyLoss(self.alpha, self.beta, ignore_label=trainer.label_manager.ignore_label,
                                   size_channel=layout.get("sizes", 1), soft_channel=layout.get("soft"))

    def build(self, trainer, layout):
        return self._lsr(trainer, layout), False


class LSRDice(LSRBCE):
    """nnU-Net's soft Dice on the labels plus LSR-weighted cross-entropy."""

    prior_bias = False  # the Dice term learns the lesions from the start, as in nnU-Net's Dice + CE

    def build(self, trainer, layout):
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1

        from nnunet_ext.training.losses import DiceAndLSRLoss

        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1,
                                           batch_dice=trainer.configuration_manager.batch_dice, do_bg=False,
                                           smooth=1e-5, ddp=trainer.is_ddp)
        return DiceAndLSRLoss(dice, self._lsr(trainer, layout)), False


class FocalTversky(LossPart):
    """Focal Tversky loss (nnunet_ext.training.losses.FocalTverskyLoss). ``batch``: True pools TP/FN/FP over the
    flattened mini-batch (the focal-Tversky thesis), False per sample, None (default) follows the plan's
    ``batch_dice`` as nnU-Net's Dice does."""

    def __init__(self, a: float = 0.7, b: float = 0.3, gamma: float = 4 / 3, smooth: float = 1.0,
                 batch: bool | None = None):
        from nnunet_ext.training.losses import FocalTverskyLoss

        FocalTverskyLoss(a, b, gamma, smooth)  # validates
        if batch not in (None, True, False):
            raise ValueError(f"batch must be True, False or None, got {batch!r}")
        self.a, self.b, self.gamma, self.smooth, self.batch = a, b, gamma, smooth, batch

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import FocalTverskyLoss

        batch = bool(trainer.configuration_manager.batch_dice) if self.batch is None else self.batch
        return FocalTverskyLoss(self.a, self.b, self.gamma, self.smooth, batch=batch,
                                ignore_label=trainer.label_manager.ignore_label), False


class SoftDice(LossPart):
    """Kats et al.'s soft Dice alone on the soft map (nnunet_ext.training.losses.SoftDiceLoss): the Bar-Ilan thesis'
    loss (eq. 1)."""

    needs = uses = frozenset({"soft"})
    two_class_only = True

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import SoftDiceLoss

        return SoftDiceLoss(batch=bool(trainer.configuration_manager.batch_dice),
                            ignore_label=trainer.label_manager.ignore_label, soft_channel=layout["soft"]), False


class SigmoidDice(LossPart):
    """Dice loss on the sigmoid of the lesion logit and the hard labels (nnunet_ext.training.losses.SigmoidDiceLoss):
    SoftSeg's conventional baseline ("Conv", Lemay 2022)."""

    two_class_only = True

    def __init__(self, smooth: float = 1.0):
        from nnunet_ext.training.losses import SigmoidDiceLoss

        SigmoidDiceLoss(smooth)  # validates
        self.smooth = float(smooth)

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import SigmoidDiceLoss

        return SigmoidDiceLoss(self.smooth, ignore_label=trainer.label_manager.ignore_label), False


class WBCE(LossPart):
    """Weighted BCE (nnunet_ext.training.losses.WeightedBCELoss), the LSR thesis' WBCE. ``pos_weight=None``
    (default): the thesis' section 4.3.1 weight, #negative / #positive voxels of the training cases counted
    inside the brain region (nnU-Net's nonzero mask: its ``-1`` crop marker is outside), computed when the
    trainer builds its loss and written to the training log."""

    two_class_only = True
    prior_bias = True

    def __init__(self, pos_weight: float | None = None):
        if pos_weight is not None and not (0 < pos_weight < float("inf")):
            raise ValueError(f"pos_weight must be a finite number > 0 or None, got {pos_weight}")
        self.pos_weight = None if pos_weight is None else float(pos_weight)

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import WeightedBCELoss

        w = self.pos_weight
        if w is None:
            from nnunet_ext.training.class_weights import negative_positive_ratio

            tr_keys, _ = trainer.do_split()
            w, counts = negative_positive_ratio(trainer.dataset_class(trainer.preprocessed_dataset_folder, tr_keys),
                                                tr_keys, trainer.preprocessed_dataset_folder)
            trainer.print_to_log_file(f"WBCE positive weight {w:.6g} = {counts['negative']} background / "
                                      f"{counts['positive']} lesion voxels inside the nonzero region of "
                                      f"{len(tr_keys)} training cases")
        return WeightedBCELoss(w, ignore_label=trainer.label_manager.ignore_label), False


class FocalBCE(LossPart):
    """Binary focal loss (nnunet_ext.training.losses.FocalLoss), the LSR thesis' FL; gamma 2, alpha 0.25 by default
    (the thesis gives no values: Lin et al.'s)."""

    two_class_only = True
    prior_bias = True

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25):
        from nnunet_ext.training.losses import FocalLoss

        FocalLoss(gamma, alpha)  # validates
        self.gamma, self.alpha = float(gamma), alpha

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import FocalLoss

        return FocalLoss(self.gamma, self.alpha, ignore_label=trainer.label_manager.ignore_label), False


class BCEIW(LossPart):
    """BCE with inverse lesion-size weights (nnunet_ext.training.losses.InverseWeightedBCELoss), the LSR thesis'
    BCE+IW; needs the lesion sizes (:class:`LesionSizes`)."""

    needs = uses = frozenset({"sizes"})
    two_class_only = True
    prior_bias = True

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import InverseWeightedBCELoss

        return InverseWeightedBCELoss(size_channel=layout["sizes"],
                                      ignore_label=trainer.label_manager.ignore_label), False


class SoftDiceBCE(LossPart):
    """Soft Dice (Kats et al.) + soft BCE on the soft map (the BCE term is not in the thesis: see SoftDice)."""

    needs = uses = frozenset({"soft"})
    two_class_only = True

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import SoftDiceBCELoss

        return SoftDiceBCELoss(batch=bool(trainer.configuration_manager.batch_dice),
                               ignore_label=trainer.label_manager.ignore_label, soft_channel=layout["soft"]), False


class SoftSegAW(LossPart):
    """SoftSeg: normalized ReLU of the lesion logit + Adaptive Wing loss on the soft map. ``leak=0`` is the
    published SoftSeg; ``leak > 0`` only lets gradient through negative logits (the ``_leak`` trainers)."""

    needs = uses = frozenset({"soft"})
    activation = "normalized_relu"
    two_class_only = True

    def __init__(self, leak: float = 0.0, max_over: str = "sample"):
        from nnunet_ext.networks.activations import MAX_OVER

        if leak < 0:
            raise ValueError(f"leak must be >= 0, got {leak}")
        if max_over not in MAX_OVER:
            raise ValueError(f"max_over must be one of {MAX_OVER}, got {max_over!r}")
        self.leak, self.max_over = leak, max_over
        # prediction normalises what training normalised: one patch, or the whole case as the batch
        self.activation = "normalized_relu" if max_over == "sample" else "normalized_relu_case"

    def build(self, trainer, layout):
        from nnunet_ext.training.losses import AdaptiveWingLoss

        return AdaptiveWingLoss(ignore_label=trainer.label_manager.ignore_label, leak=self.leak,
                                soft_channel=layout["soft"], max_over=self.max_over), False


# ================================================================================================ targets

class TargetPart:
    provides: str | None = None  # the map name this part adds (None: it changes the labels)

    def spec(self) -> MapSpec | None:
        return None

    def folder(self, trainer, raters: list[Path] | None):
        """Folder of this part's maps, or a callable ``(case, rater_index) -> folder`` with raters."""
        raise NotImplementedError  # pragma: no cover

    def prepare(self, trainer, dataset, raters: list[Path] | None) -> None:
        """Compute missing maps (offline, once per case)."""


class SoftTargets(TargetPart):
    """The dataset's soft labels (``nnunet-ext preprocess-soft``); with :class:`RandomRater`, the drawn
    rater's own mask, linearly interpolated (soft borders), as SoftSeg's random-rater training."""

    provides = "soft"

    def spec(self):
        return MapSpec("soft", exact=False, scale=SOFT_SCALE)

    def folder(self, trainer, raters):
        if raters:
            return lambda case, r: raters[r]
        return soft_folder(trainer.preprocessed_dataset_folder)

    def prepare(self, trainer, dataset, raters):
        folder = None if raters else self.folder(trainer, raters)
        if folder is not None:
            missing = [k for k in dataset.identifiers if not map_path(folder, k).is_file()]
            if missing:
                raise FileNotFoundError(f"no soft targets for {len(missing)} cases (e.g. {map_path(folder, missing[0])}): "
                                        f"run nnunet-ext preprocess-soft -d {trainer.plans_manager.dataset_name} "
                                        f"-c {trainer.configuration_name}")


class LesionSizes(TargetPart):
    """Whole-case lesion sizes (voxels, per foreground class, ``connectivity``), computed once per case from
    the preprocessed labels (or from each rater's mask with :class:`RandomRater`) and carried exactly.
    Default 18-connected lesions, the LSR thesis' lesions (section 3.4.2)."""

    provides = "sizes"

    def __init__(self, connectivity: int = 18):
        if connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        self.connectivity = connectivity

    def spec(self):
        return MapSpec("sizes", exact=True)

    def base(self, trainer) -> Path:
        return Path(trainer.preprocessed_dataset_folder) / f"nnunet_ext_lesion_sizes_cc{self.connectivity}"

    def folder(self, trainer, raters):
        base = self.base(trainer)
        if raters:
            return lambda case, r: base / raters[r].name
        return base

    def prepare(self, trainer, dataset, raters):
        lm = trainer.label_manager
        classes = [c for c in lm.foreground_labels if c != lm.ignore_label]
        made = compute_size_maps(dataset, trainer.preprocessed_dataset_folder, self.base(trainer), classes,
                                 self.connectivity, raters)
        if made:
            trainer.print_to_log_file(f"computed {made} lesion size maps in {self.base(trainer)}")


def compute_size_maps(dataset, preprocessed_folder, out_folder, classes, connectivity: int = 26,
                      raters: list[Path] | None = None) -> int:
    """Whole-case lesion size maps (int16, clipped at 32767) of every case of ``dataset`` missing in
    ``out_folder`` (one subfolder per rater when ``raters`` are given: sizes of that rater's lesions);
    returns how many were computed."""
    pre, out_folder = Path(preprocessed_folder), Path(out_folder)
    made = 0
    for key in dataset.identifiers:
        targets = [(out_folder / r.name, r) for r in raters] if raters else [(out_folder, None)]
        todo = [(t, r) for t, r in targets if not map_path(t, key).is_file()]
        if not todo:
            continue
        _, seg, _, _ = dataset.load_case(key)
        seg0 = np.asarray(seg[0:1])[0]
        for folder, rater in todo:
            label = seg0 if rater is None else np.where(seg0 == -1, 0, read_map(rater, key) >= 128)
            sizes = lesion_size_map(label, classes if rater is None else [1], connectivity).astype(np.int16)
            save_map_like_seg(sizes, pre / f"{key}_seg.b2nd", map_path(folder, key))
            made += 1
    return made


class RandomRater(TargetPart):
    """Each sample takes the mask of one rater drawn at random every time its case is loaded (Lemay et al.'s
    "no fusion"); needs ``nnunet-ext preprocess-soft --raters``. Validation keeps the dataset's labelsTr."""

    fuse: str | None = None  # None: one rater drawn per load; see FusedRaters

    def prepare(self, trainer, dataset, raters):
        if not raters:
            raise FileNotFoundError(f"no preprocessed rater masks in {Path(trainer.preprocessed_dataset_folder) / RATER_FOLDER}: "
                                    f"run nnunet-ext preprocess-soft -d {trainer.plans_manager.dataset_name} "
                                    f"-c {trainer.configuration_name} --raters")
        for r in raters:
            missing = [k for k in dataset.identifiers if not map_path(r, k).is_file()]
            if missing:
                raise FileNotFoundError(f"rater {r.name} has no mask for case {missing[0]} ({map_path(r, missing[0])})")


class FusedRaters(RandomRater):
    """The labels are the raters' masks fused when a case is loaded: ``"union"`` (any rater),
    ``"intersection"`` (every rater) or ``"majority"`` (more than half; a tie is background), the rules of
    ``nnunet-ext fuse``. One preprocessing (``nnunet-ext preprocess-soft --raters``) then serves trainers
    of every fusion, so they can be compared on one dataset (the Bar-Ilan thesis' Table 2 trains nnU-Net on
    the raters' intersection and on their union). Validation keeps the dataset's labelsTr. Maps that follow
    a rater (lesion sizes, soft targets) are not defined for a fusion."""

    def __init__(self, method: str):
        if method not in FUSIONS:
            raise ValueError(f"method must be one of {', '.join(FUSIONS)}, got {method!r}")
        self.fuse = method


# ================================================================================================ networks


class NetworkPart:
    kind = ""
    n_slots = 0

    def condition_of(self, trainer, keys) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, trainer) -> None:
        """Called once the network exists (and pretrained weights or a checkpoint are loaded)."""

    def settings(self, trainer) -> dict:
        return {"network": part_name(self)}


class FiLM(NetworkPart):
    """Every instance norm becomes ``(gamma + gamma_r) xhat + (beta + beta_r)``, ``(gamma_r, beta_r)`` from a
    small MLP of the case's original voxel spacing (before nnU-Net's resampling)."""

    kind = "spacing"

    def condition_of(self, trainer, keys):
        from nnunet_ext.networks.conditional_norm import spacing_condition

        cache = trainer.__dict__.setdefault("_ext_spacings", {})
        for k in keys:
            if k not in cache:
                with open(os.path.join(trainer.preprocessed_dataset_folder, f"{k}.pkl"), "rb") as f:
                    cache[k] = pickle.load(f)["spacing"]
        return spacing_condition([cache[k] for k in keys])


class CohortNorm(NetworkPart):
    """Cohort-conditioned instance norm (SCIN): one (gamma, beta) per cohort slot and norm; cohorts from
    ``cohorts.json`` beside dataset.json."""

    kind = "cohort"

    def __init__(self, n_slots: int = 8):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = n_slots

    def prepare(self, trainer):
        from nnunet_ext.networks.cohorts import assign_slots, check_cases, cohorts_for_dataset

        trainer.cohort_of_case, source = cohorts_for_dataset(trainer.plans_manager.dataset_name,
                                                             trainer.preprocessed_dataset_folder)
        ids = trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder) if trainer.dataset_class else []
        check_cases(trainer.cohort_of_case, ids, str(source))
        state = trainer.condition
        trainer.cohort_table = assign_slots(state.cohort_table(), trainer.cohort_of_case.values(), self.n_slots)
        state.set_cohort_table(trainer.cohort_table)
        trainer.print_to_log_file(f"cohorts from {source}: " + ", ".join(
            f"{n} -> slot {i}" for i, n in enumerate(trainer.cohort_table) if n is not None))

    def condition_of(self, trainer, keys):
        from nnunet_ext.networks.cohorts import slot_of

        if not hasattr(trainer, "cohort_table"):
            self.prepare(trainer)
        try:
            return torch.tensor([slot_of(trainer.cohort_table, trainer.cohort_of_case[k]) for k in keys], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"case {e.args[0]} has no cohort in cohorts.json") from None

    def settings(self, trainer):
        return {**super().settings(trainer), "cohort_table": {
            n: i for i, n in enumerate(getattr(trainer, "cohort_table", [])) if n is not None}}


class CohortNormFineTune(CohortNorm):
    """Norm-only fine-tuning of a pretrained SCIN model (``-pretrained_weights``) for this dataset's cohorts:
    only their (gamma, beta) slots train; a new cohort takes a free slot initialised with the mean of the
    trained cohorts. nnU-Net's ``-pretrained_weights`` skips the segmentation layers by design; they are
    restored from the same checkpoint, so the model is the pretrained one except for the tuned norms."""

    def prepare(self, trainer):
        from nnunet_ext.networks.cohorts import slot_of
        from nnunet_ext.networks.conditional_norm import CohortInstanceNorm
        from nnunet_ext.nnunet_adapter import pretrained_weights_of_running_training

        if getattr(trainer, "_fine_tune_ready", False):
            return super().prepare(trainer)
        before = trainer.condition.cohort_table()
        fresh = trainer.current_epoch == 0
        if fresh:
            path = trainer.__dict__.get("pretrained_weights_file") or pretrained_weights_of_running_training()
            if path is None or not any(before):
                raise RuntimeError(f"{type(trainer).__name__} fine-tunes a pretrained SCIN model: run nnUNetv2_train "
                                   f"with -pretrained_weights <checkpoint of a SCINTrainer model>")
            weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
            own = trainer.network.state_dict()
            seg = {k: v for k, v in weights.items() if ".seg_layers." in k}
            bad = [k for k, v in seg.items() if k not in own or own[k].shape != v.shape]
            if bad or not seg:
                raise RuntimeError(f"segmentation layers of {path} do not fit this network ({bad[:3]})")
            trainer.network.load_state_dict(seg, strict=False)
        super().prepare(trainer)
        slots = sorted({slot_of(trainer.cohort_table, c) for c in trainer.cohort_of_case.values()})
        trained = [i for i, n in enumerate(before) if n is not None and i not in slots]
        norms = [m for m in trainer.network.modules() if isinstance(m, CohortInstanceNorm)]
        with torch.no_grad():
            for m in norms:
                for s in slots:
                    if fresh and before[s] is None and trained:  # new cohort: start from the mean cohort
                        m.weight[s].copy_(torch.stack([m.weight[i] for i in trained]).mean(0))
                        m.bias[s].copy_(torch.stack([m.bias[i] for i in trained]).mean(0))
        for p in trainer.network.parameters():
            p.requires_grad_(False)
        for m in norms:
            for s in slots:
                m.weight[s].requires_grad_(True)
                m.bias[s].requires_grad_(True)
        trainer.tuned_slots = slots
        trainer._fine_tune_ready = True
        n = sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)
        trainer.print_to_log_file(f"norm-only fine-tuning of cohort slots {slots} "
                                  f"({[trainer.cohort_table[s] for s in slots]}): {n} trainable parameters of "
                                  f"{sum(p.numel() for p in trainer.network.parameters())}")

    def settings(self, trainer):
        return {**super().settings(trainer), "fine_tuned_slots": getattr(trainer, "tuned_slots", None)}
