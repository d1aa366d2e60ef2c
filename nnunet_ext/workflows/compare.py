"""``nnunet-ext compare``: trainers side by side with the same split, budget and data, and paired confidence
intervals.

Steps (each one resumable: a re-run skips what exists and continues where an interrupted run stopped):

1. **Checks, before any training**: every trainer name is found by nnU-Net's own lookup
   (``recursive_find_trainer_class_by_name`` with our trainer folder on ``nnUNet_extTrainer``); a requested
   CPU budget is honoured by every arm (nnU-Net's own trainers ignore ``NNUNET_EXT_*``: use
   ``ExtBaselineTrainer``); the dataset is preprocessed for the configuration; ``splits_final.json`` holds
   every requested fold; arms trained already used the same plans, split and budget; test labels match the
   test images case by case and in geometry.
2. **Training** of every fold of every arm that has no ``checkpoint_final.pth`` with ``nnUNetv2_train``
   through the launcher (local or Slurm); trained arms are reused and the command says so.
3. **Prediction** through the one model contract (:func:`nnunet_ext.inference.predict.predict`, probabilities kept):
   the test set with the ensemble of the folds, or each fold's validation cases with that fold's model.
4. **Evaluation** of five operating points per arm on the soft maps: the model's own output (stored
   threshold and post-processing, ``model``), nnU-Net's ``argmax``, the ``segmentation_optimal`` threshold
   (best pooled voxel F1 over the sweep), the ``detection_optimal`` threshold (best pooled lesion F1) and
   ``fdr_limited``, the threshold with the best pooled lesion TPR at a pooled lesion FDR of at most 0.20
   (the arms compared at about equal FDR).
5. **Report** ``report.md`` / ``report.json`` / ``curves.png``: per arm and operating point mean Dice, lesion
   F1 and TPR/FDR per size bin, the gap between the two optimal thresholds, overlaid TPR-vs-FDR curves, and
   paired case-level bootstrap 95 % intervals of each arm's difference from the first arm in small-lesion
   TPR, lesion F1 and Dice.

Statistics: Dice is the mean over cases; lesion TPR/FDR/F1 and small-lesion TPR are computed from counts
pooled over the cases (a case contributes all its lesions). The bootstrap resamples cases with replacement,
the same resample for every arm (paired), and recomputes each statistic; the interval is the 2.5th-97.5th
percentile of the differences (percentile bootstrap). The operating points' thresholds stay fixed in the
bootstrap.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.budget import training_mismatch, trained_budget, trained_seed  # noqa: F401 (part of this module's interface)
from nnunet_ext.core.io import read_geometry, read_image
from nnunet_ext.metrics.soft import calibration_on_indices, calibration_record
from nnunet_ext.metrics.lesions import DEFAULT_BINS, LesionRule, bin_name, label_components, lesion_rates
from nnunet_ext.core.paths import NNUNET_FOLDERS, nnunet_command, nnunet_env, run_logged
from nnunet_ext.core.progress import step
from nnunet_ext.nnunet_adapter import (ModelRef, crossval_splits, dataset_name, lookup_trainers,
                                       preprocessed_identifiers)
from nnunet_ext.workflows import cascade_arm, dataset_arm

OPERATING_POINTS = ("model", "argmax", "segmentation_optimal", "detection_optimal", "fdr_limited")
FDR_LIMIT = 0.20  # "a convention to select operating points with an fdr of 0.20 or less" (Nichyporuk 2021, 4.2.1)
OP_TITLES = {"model": "model output (stored threshold + post-processing)", "argmax": "nnU-Net argmax",
             "segmentation_optimal": "segmentation-optimal threshold", "detection_optimal": "detection-optimal threshold",
             "fdr_limited": f"best lesion TPR at lesion FDR <= {FDR_LIMIT:.2f}"}
CI_METRICS = ("small_lesion_tpr", "lesion_f1", "dice")
METRIC_TITLES = {"small_lesion_tpr": "small-lesion TPR", "lesion_f1": "lesion F1", "dice": "Dice"}
BUDGET_ENV = {"epochs": "NNUNET_EXT_NUM_EPOCHS", "iterations": "NNUNET_EXT_ITERATIONS",
              "val_iterations": "NNUNET_EXT_VAL_ITERATIONS"}
_LESION_KEYS = ("ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp")
_PASSED_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
               "nnUNet_n_proc_DA", "nnUNet_compile")


# --------------------------------------------------------------------------------------------------------------
# counts and statistics (pure functions, unit-tested against hand-computed values)

def mask_counts(ref: np.ndarray, pred: np.ndarray, ref_labels=None, connectivity: int = 26,
                bins: Sequence = DEFAULT_BINS, rule: LesionRule | None = None) -> dict:
    """Voxel and lesion counts of one binary prediction against one binary reference under ``rule`` (default:
    the evaluator's detection rule, any overlap, ``connectivity``-connected lesions in ``bins``)."""
    rule = rule if rule is not None else LesionRule(connectivity, "any", bins)
    ref, pred = ref.astype(bool, copy=False), pred.astype(bool, copy=False)
    tp = int(np.count_nonzero(ref & pred))
    lc = rule.counts(ref, pred, ref_labels=ref_labels)
    return {"voxel_tp": tp, "voxel_fp": int(np.count_nonzero(pred)) - tp, "voxel_fn": int(np.count_nonzero(ref)) - tp,
            **{k: int(lc[k]) for k in _LESION_KEYS},
            "bins": {b: {k: int(v[k]) for k in _LESION_KEYS} for b, v in lc["bins"].items()}}


def case_dice(c: dict) -> float:
    """Dice of one case from its counts (1 when reference and prediction are both empty)."""
    den = 2 * c["voxel_tp"] + c["voxel_fp"] + c["voxel_fn"]
    return 2 * c["voxel_tp"] / den if den else 1.0


def _lesion_rates(ref, pred, tp, fp) -> dict:
    """TPR/FDR/F1 from pooled lesion counts, by the one lesion-rate helper with the evaluator's ("bin")
    conventions: no reference lesion: TPR undefined, 1 in F1; no predicted lesion: FDR undefined, PPV 1 in F1."""
    r = lesion_rates(tp, ref, pred - fp, pred, convention="bin")
    return {"lesion_tpr": r["lesion_tpr"], "lesion_fdr": r["lesion_fdr"], "lesion_f1": r["lesion_f1"]}


def summarise(cases: Sequence[dict]) -> dict:
    """Mean Dice over cases, pooled voxel rates, pooled lesion rates overall and per size bin."""
    if not cases:
        raise ValueError("no cases to summarise")
    tot = {k: sum(c[k] for c in cases) for k in ("voxel_tp", "voxel_fp", "voxel_fn") + _LESION_KEYS}
    tp, fp, fn = tot["voxel_tp"], tot["voxel_fp"], tot["voxel_fn"]
    out = {"n_cases": len(cases), "dice_mean": float(np.mean([case_dice(c) for c in cases])),
           "dice_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
           "voxel_tpr": tp / (tp + fn) if tp + fn else None, "voxel_fdr": fp / (tp + fp) if tp + fp else None,
           **{k: tot[k] for k in _LESION_KEYS},
           **_lesion_rates(tot["ref_lesions"], tot["pred_lesions"], tot["lesion_tp"], tot["lesion_fp"]), "bins": {}}
    out["voxel_f1"] = out["dice_pooled"]
    for b in cases[0]["bins"]:
        s = {k: sum(c["bins"][b][k] for c in cases) for k in _LESION_KEYS}
        out["bins"][b] = {**s, **_lesion_rates(s["ref_lesions"], s["pred_lesions"], s["lesion_tp"], s["lesion_fp"])}
    return out


def choose_thresholds(points: Sequence[dict]) -> dict:
    """Segmentation-optimal (best pooled voxel F1) and detection-optimal (best pooled lesion F1) points of a
    sweep (``points``: dicts with ``threshold``, ``voxel_f1``, ``lesion_f1``, in increasing threshold order;
    ties go to the lower threshold) and the gap between their thresholds."""
    if not points:
        raise ValueError("empty threshold sweep")
    seg = max(range(len(points)), key=lambda i: (points[i]["voxel_f1"], -i))
    det = max(range(len(points)), key=lambda i: (-1 if points[i]["lesion_f1"] is None else points[i]["lesion_f1"], -i))
    return {"segmentation_optimal": seg, "detection_optimal": det,
            "gap": round(abs(points[seg]["threshold"] - points[det]["threshold"]), 6)}


def fdr_limited_point(points: Sequence[dict], limit: float = FDR_LIMIT) -> int:
    """Index of the sweep point with the highest pooled lesion TPR among those whose pooled lesion FDR is at
    most ``limit`` (ties: the higher threshold, the fewer false positives); when no point reaches the limit,
    the point with the lowest FDR. Comparing arms here compares their lesion TPR at (about) equal FDR."""
    if not points:
        raise ValueError("empty threshold sweep")
    if not 0 < limit < 1:
        raise ValueError(f"limit must be in (0, 1), got {limit}")
    fdr = [1.0 if p["lesion_fdr"] is None and p["pred_lesions"] else (p["lesion_fdr"] or 0.0) for p in points]
    ok = [i for i in range(len(points)) if fdr[i] <= limit + 1e-12]
    if not ok:
        return min(range(len(points)), key=lambda i: (fdr[i], -i))
    return max(ok, key=lambda i: (points[i]["lesion_tpr"] or 0.0, i))


def statistic_arrays(cases: Sequence[dict], small_bin: str) -> dict[str, np.ndarray]:
    """Per-case arrays the bootstrap statistics are computed from."""
    if small_bin not in cases[0]["bins"]:
        raise ValueError(f"unknown size bin {small_bin!r}; bins: {list(cases[0]['bins'])}")
    a = {"dice": np.array([case_dice(c) for c in cases], float)}
    for k in _LESION_KEYS:
        a[k] = np.array([c[k] for c in cases], float)
    a["small_tp"] = np.array([c["bins"][small_bin]["lesion_tp"] for c in cases], float)
    a["small_ref"] = np.array([c["bins"][small_bin]["ref_lesions"] for c in cases], float)
    return a


def statistics_on_indices(a: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each statistic on each resample: ``idx`` is (resamples, cases) of case indices. Dice: mean over the
    resampled cases; lesion F1 and small-lesion TPR: from the pooled counts of the resampled cases
    (small-lesion TPR is NaN in a resample without small reference lesions)."""
    idx = np.atleast_2d(np.asarray(idx))
    s = {k: v[idx].sum(1) for k, v in a.items() if k != "dice"}
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(s["ref_lesions"] > 0, s["lesion_tp"] / np.maximum(s["ref_lesions"], 1), 1.0)
        ppv = np.where(s["pred_lesions"] > 0, (s["pred_lesions"] - s["lesion_fp"]) / np.maximum(s["pred_lesions"], 1), 1.0)
        f1 = np.where(tpr + ppv > 0, 2 * tpr * ppv / np.where(tpr + ppv > 0, tpr + ppv, 1), 0.0)
        small = np.where(s["small_ref"] > 0, s["small_tp"] / np.maximum(s["small_ref"], 1), np.nan)
    return {"dice": a["dice"][idx].mean(1), "lesion_f1": f1, "small_lesion_tpr": small}


def bootstrap_indices(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    if n_cases < 1 or n_resamples < 1:
        raise ValueError(f"need at least one case and one resample, got {n_cases} cases, {n_resamples} resamples")
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_resamples, n_cases))


def paired_differences(arm: dict[str, np.ndarray], reference: dict[str, np.ndarray], idx: np.ndarray,
                       level: float = 0.95) -> dict:
    """Point difference (all cases) and percentile-bootstrap interval of ``arm - reference`` per statistic,
    both arms resampled with the same ``idx``."""
    if len(arm["dice"]) != len(reference["dice"]):
        raise ValueError("paired comparison needs the same cases in both arms")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(arm["dice"])
    full = np.arange(n)[None]
    pa, pr = statistics_on_indices(arm, full), statistics_on_indices(reference, full)
    ba, br = statistics_on_indices(arm, idx), statistics_on_indices(reference, idx)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for m in CI_METRICS:
        d = ba[m] - br[m]
        ok = np.isfinite(d)
        point = float(pa[m][0] - pr[m][0])
        if not ok.any() or not np.isfinite(point):
            out[m] = {"difference": None if not np.isfinite(point) else point, "ci": None, "excludes_zero": None,
                      "arm": _f(pa[m][0]), "reference": _f(pr[m][0]), "undefined_resamples": int((~ok).sum())}
            continue
        lo, hi = (float(v) for v in np.percentile(d[ok], q))
        # rounding noise of equal statistics (e.g. -1e-17) is no difference
        out[m] = {"difference": point, "ci": [lo, hi], "excludes_zero": bool(lo > _EPS or hi < -_EPS),
                  "arm": _f(pa[m][0]), "reference": _f(pr[m][0]), "undefined_resamples": int((~ok).sum())}
    return out


_EPS = 1e-9
CALIBRATION_METRICS = ("brier", "ece")
CALIBRATION_TITLES = {"brier": "Brier (vs rater average)", "ece": "ECE (thesis, pooled)"}


def paired_calibration(arm: list[dict], reference: list[dict], idx: np.ndarray, level: float = 0.95) -> dict:
    """Point difference and percentile-bootstrap interval of ``arm - reference`` in Brier score and pooled ECE
    (:func:`nnunet_ext.metrics.soft.calibration_on_indices`); lower is better for both."""
    if len(arm) != len(reference):
        raise ValueError("paired comparison needs the same cases in both arms")
    full = np.arange(len(arm))[None]
    pa, pr = calibration_on_indices(arm, full), calibration_on_indices(reference, full)
    ba, br = calibration_on_indices(arm, idx), calibration_on_indices(reference, idx)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for m in CALIBRATION_METRICS:
        lo, hi = (float(v) for v in np.percentile(ba[m] - br[m], q))
        out[m] = {"difference": float(pa[m][0] - pr[m][0]), "ci": [lo, hi], "excludes_zero": bool(lo > _EPS or hi < -_EPS),
                  "arm": float(pa[m][0]), "reference": float(pr[m][0])}
    return out


def _f(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _signed(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def difference_sentence(arm: str, reference: str, diffs: dict, n_cases: int, n_small: int, small_bin: str) -> str:
    """One plain sentence: which of the arm's differences from the reference arm have a 95 % interval that
    excludes 0."""
    parts, shown = [], []
    for m in CI_METRICS:
        d = diffs[m]
        name = METRIC_TITLES[m] + (f" ({small_bin} voxels)" if m == "small_lesion_tpr" else "")
        if d["ci"] is None:
            parts.append(f"{name} n/a")
            continue
        parts.append(f"{name} {_signed(d['difference'])} (95 % CI {_signed(d['ci'][0])} to {_signed(d['ci'][1])})")
        if d["excludes_zero"]:
            shown.append(f"{'higher' if d['difference'] > 0 else 'lower'} {METRIC_TITLES[m]}")
    verdict = (f"the interval excludes 0 for {' and '.join(shown)}, a difference these {n_cases} cases support"
               if shown else f"every interval includes 0: no difference is shown on these {n_cases} cases")
    few = f"; with only {n_cases} cases a bootstrap interval is a rough guide" if n_cases < 10 else ""
    return (f"{arm} minus {reference}: " + "; ".join(parts) + f"; {verdict} ({n_small} reference lesions of "
            f"{small_bin} voxels{few}).")


# --------------------------------------------------------------------------------------------------------------
# configuration and checks

@dataclass
class CompareConfig:
    dataset: str
    configuration: str
    trainers: Sequence[str]
    folds: Sequence[int] = (0,)
    plans: str = "nnUNetPlans"
    test_images: str | None = None
    test_labels: str | None = None
    output: str | None = None
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    device: str = "cuda"
    n_proc: int = 2
    n_bootstrap: int = 2000
    seed: int = 0  # the bootstrap's
    train_seed: int | None = None  # NNUNET_EXT_SEED of every training: reproducible weights (nnunet_ext.training.base)
    connectivity: int = 26
    bins: Sequence = DEFAULT_BINS
    thresholds: Sequence[float] | None = None
    create_split: bool = False
    cohort: str | None = None
    soft_reference: str | None = None  # folder of <case> rater-average maps: adds Brier and ECE (calibration)
    disable_tta: bool = False  # predict without mirroring (nnUNetv2_predict --disable_tta), every arm alike
    launcher_options: object = None
    command_line: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "CompareConfig":
        trainers = list(self.trainers)
        if len(trainers) < 2:
            raise ValueError("compare needs at least two trainers (-tr A B ...); the first is the reference arm")
        if len(set(trainers)) != len(trainers):
            raise ValueError(f"a trainer is listed twice: {trainers}")
        folds = list(self.folds)
        if not folds:
            raise ValueError("give at least one fold (-f 0 [1 ...])")
        if any(f == "all" for f in folds):
            raise NotImplementedError("-f all trains on every case, so there is no validation split and no "
                                      "shared held-out data to compare on; use folds 0-4")
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 0 for f in folds):
            raise ValueError(f"folds must be non-negative integers, got {folds}")
        if len(set(folds)) != len(folds):
            raise ValueError(f"a fold is listed twice: {folds}")
        if (self.test_images is None) != (self.test_labels is None):
            raise ValueError("--test-images and --test-labels go together")
        for name in ("epochs", "iterations", "val_iterations"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.train_seed is not None:
            from nnunet_ext.core.budget import MAX_SEED

            if not isinstance(self.train_seed, int) or isinstance(self.train_seed, bool) \
                    or not 0 <= self.train_seed <= MAX_SEED:
                raise ValueError(f"train_seed must be a whole number in 0..{MAX_SEED}, got {self.train_seed!r}")
        if self.n_bootstrap < 100:
            raise ValueError(f"n_bootstrap must be at least 100, got {self.n_bootstrap}")
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")
        if self.n_proc < 1:
            raise ValueError(f"n_proc must be >= 1, got {self.n_proc}")
        if self.thresholds is not None:
            t = sorted(float(x) for x in self.thresholds)
            if not t or t[0] <= 0 or t[-1] >= 1 or len(set(t)) != len(t):
                raise ValueError("thresholds must be distinct numbers in (0, 1)")
        self.trainers, self.folds = trainers, folds
        if self.test_images is not None:  # absolute, so the report's commands work from anywhere
            self.test_images, self.test_labels = str(Path(self.test_images).resolve()), str(Path(self.test_labels).resolve())
        return self

    @property
    def budget(self) -> dict:
        return {k: getattr(self, k) for k in BUDGET_ENV if getattr(self, k) is not None}

    @property
    def training_env(self) -> dict:
        """The variables every training gets: the budget and the training seed."""
        from nnunet_ext.core.budget import SEED_VARIABLE

        env = {BUDGET_ENV[k]: str(v) for k, v in self.budget.items()}
        if self.train_seed is not None:
            env[SEED_VARIABLE] = str(self.train_seed)
        return env

    @property
    def rule(self) -> LesionRule:
        """The lesion rule of the comparison: the evaluator's (any overlap) with ``connectivity`` and ``bins``."""
        return LesionRule(self.connectivity, "any", self.bins)

    @property
    def eval_set(self) -> str:
        return "test" if self.test_images is not None else "validation"


def _read_json(p: Path):
    return json.loads(Path(p).read_text())


def _write_json(p: Path, obj) -> None:
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(p, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_test_set(images: Path, labels: Path, channels: int, ending: str) -> list[str]:
    """Cases of a test set; ValueError unless every label has all image channels and the same geometry."""
    images, labels = Path(images), Path(labels)
    for d in (images, labels):
        if not d.is_dir():
            raise FileNotFoundError(f"test folder not found: {d}")
    lab = sorted(p.name[: -len(ending)] for p in labels.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    if not lab:
        raise ValueError(f"no label files ending in {ending} in {labels}")
    img_cases = sorted({p.name[: -len(ending) - 5] for p in images.iterdir() if p.name.endswith(ending)
                        and len(p.name) > len(ending) + 5 and p.name[-len(ending) - 5] == "_"})
    no_image = [c for c in lab if c not in img_cases]
    if no_image:
        raise ValueError(f"test labels do not match the images: {len(no_image)} label(s) without image, e.g. "
                         f"{labels / (no_image[0] + ending)} has no {images / (no_image[0] + '_0000' + ending)}")
    no_label = [c for c in img_cases if c not in lab]
    if no_label:
        raise ValueError(f"test labels do not match the images: {len(no_label)} image case(s) without label, e.g. "
                         f"{no_label[0]} (no {labels / (no_label[0] + ending)})")
    from nnunet_ext.core.checks import check_image

    for c in lab:
        check_image(labels / f"{c}{ending}", what="--test-labels")  # whole file, finite, 3-D: before any training
        g = read_geometry(labels / f"{c}{ending}")
        for ch in range(channels):
            f = images / f"{c}_{ch:04d}{ending}"
            if not f.is_file():
                raise ValueError(f"test images incomplete: {f} missing (the dataset has {channels} channel(s))")
            check_image(f, what="--test-images")
            gi = read_geometry(f)
            if gi["size"] != g["size"] or not np.allclose(gi["spacing"], g["spacing"], rtol=1e-4):
                raise ValueError(f"test labels do not match the images: {labels / (c + ending)} has size {g['size']}, "
                                 f"spacing {g['spacing']} but {f} has size {gi['size']}, spacing {gi['spacing']}")
    return lab


@dataclass
class _Plan:
    """What the checks found: paths, split, which folds to train."""
    name: str
    env: dict
    raw: Path
    pre: Path
    results: Path
    report: Path
    ending: str
    channels: int
    split: list
    plans_json: dict
    to_train: list = field(default_factory=list)  # (trainer, fold, resume)
    reused: dict = field(default_factory=dict)  # trainer -> folds reused
    cascades: dict = field(default_factory=dict)  # cascade arm -> cascade_arm.CascadeArm
    others: dict = field(default_factory=dict)  # DATASET:TRAINER arm -> dataset_arm.DatasetArm
    cases: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _arm_trainer(arm: str) -> str:
    """The nnU-Net trainer class of a single-model arm (``TRAINER`` or ``DATASET:TRAINER``)."""
    parsed = dataset_arm.parse(arm)
    return parsed[1] if parsed else arm


def _arm_dataset(p: _Plan, cfg: CompareConfig, arm: str) -> str:
    """The dataset an arm trains on, as its commands name it: another dataset's name, else ``-d`` as given."""
    return p.others[arm].dataset if arm in p.others else str(cfg.dataset)


def _model_ref(p: _Plan, cfg: CompareConfig, arm: str, folds=None) -> ModelRef:
    name = p.others[arm].dataset if arm in p.others else p.name
    return ModelRef(name, cfg.configuration, _arm_trainer(arm), cfg.plans, folds)


def _model_dir(p: _Plan, cfg: CompareConfig, trainer: str) -> Path:
    """The arm's model folder; for a cascade arm its consensus model's."""
    if cascade_arm.is_cascade(trainer):
        return cascade_arm.consensus_dir(cfg.dataset, cfg.configuration, cascade_arm.stage_trainer(trainer), cfg.plans)
    return _model_ref(p, cfg, trainer).folder(must_exist=False, results=p.results)


def _single_arms(cfg: CompareConfig) -> list[str]:
    """The arms that are one nnU-Net model each (not a cascade), on the compared dataset or another one."""
    return [t for t in cfg.trainers if not cascade_arm.is_cascade(t)]


def _arm_folder(plan: _Plan, arm: str) -> Path:
    return plan.report / "arms" / cascade_arm.folder_name(arm)


def check_inputs(cfg: CompareConfig, lookup=lookup_trainers) -> _Plan:
    """Every check that must pass before training starts (see the module docstring)."""
    cfg.validate()
    if cfg.output:  # a file or an unwritable folder there: one clear line before anything else
        from nnunet_ext.core.checks import check_writable_folder

        check_writable_folder(cfg.output, "-o/--output")
    env = nnunet_env(None, cfg.n_proc)
    for k in NNUNET_FOLDERS:
        if not env.get(k):
            raise ValueError(f"{k} is not set")
    _check_trainers(cfg, env, lookup)
    name = dataset_name(cfg.dataset)
    split_file = Path(env["nnUNet_preprocessed"]) / name / "splits_final.json"
    cascades = {t: cascade_arm.check(t, cfg.dataset, cfg.configuration, cfg.plans, cfg.folds, cfg.budget,
                                     cfg.train_seed, cfg.test_images is not None, split_file)
                for t in cfg.trainers if cascade_arm.is_cascade(t)}
    plan = _dataset_plan(cfg, env)
    plan.cascades = cascades
    plan.others = _other_dataset_arms(cfg, plan)
    _check_trained_arms(cfg, plan)
    _check_eval_cases(cfg, plan)
    return plan


def _check_trainers(cfg: CompareConfig, env: dict, lookup) -> None:
    """Every trainer found by nnU-Net's lookup; with a budget, every trainer honours it."""
    names = list(dict.fromkeys(cascade_arm.stage_trainer(t) if cascade_arm.is_cascade(t) else _arm_trainer(t)
                               for t in cfg.trainers))
    found = lookup(names, env)
    unknown = [t for t in names if not found.get(t, {}).get("found")]
    if unknown:
        raise ValueError(f"unknown trainer(s) {unknown}: nnU-Net's lookup (its own trainers, then nnUNet_extTrainer="
                         f"{env['nnUNet_extTrainer']}) finds no class of that name")
    deaf = [t for t in names if not found[t]["honours_budget"]]  # nnU-Net's own trainers: no NNUNET_EXT_*
    if cfg.train_seed is not None:
        if deaf:
            raise NotImplementedError(
                f"{deaf} ignore(s) the training seed (--train-seed {cfg.train_seed}): nnU-Net's own trainers do not "
                f"read NNUNET_EXT_SEED. Use ExtBaselineTrainer (nnU-Net's default trainer + the nnunet-ext "
                f"variables), or drop --train-seed")
    if cfg.budget:
        if deaf:
            raise NotImplementedError(
                f"{deaf} ignore(s) the training budget ({cfg.budget}): nnU-Net's own trainers do not read "
                f"NNUNET_EXT_NUM_EPOCHS / NNUNET_EXT_ITERATIONS, so the arms would not get the same budget. Use "
                f"ExtBaselineTrainer (nnU-Net's default trainer + the budget variables), or drop the budget")


def _dataset_files(cfg: CompareConfig, env: dict, dataset) -> tuple:
    """A dataset's files: (name, file ending, channels, plans, split, notes), every one checked (dataset.json,
    plans with the configuration preprocessed, the split holding every fold, written with ``create_split``)."""
    name = dataset_name(dataset)
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    ds_json_p = raw / name / "dataset.json"
    if not ds_json_p.is_file():
        raise FileNotFoundError(f"{ds_json_p} not found")
    ds_json = _read_json(ds_json_p)
    ending, channels = ds_json["file_ending"], len(ds_json["channel_names"])
    plans_p = pre / name / f"{cfg.plans}.json"
    if not plans_p.is_file():
        raise FileNotFoundError(f"{plans_p} not found: run nnUNetv2_plan_and_preprocess -d {dataset} -c "
                                f"{cfg.configuration} first")
    plans_json = _read_json(plans_p)
    if cfg.configuration not in plans_json.get("configurations", {}):
        raise ValueError(f"configuration {cfg.configuration!r} is not in {plans_p}; it has "
                         f"{sorted(plans_json.get('configurations', {}))}")
    ident = plans_json["configurations"][cfg.configuration].get("data_identifier",
                                                                  f"{cfg.plans}_{cfg.configuration}")
    if not (pre / name / ident).is_dir():
        raise FileNotFoundError(f"{pre / name / ident} not found: run nnUNetv2_plan_and_preprocess -d {dataset} "
                                f"-c {cfg.configuration} first")
    split_p = pre / name / "splits_final.json"
    if not split_p.is_file():
        if not cfg.create_split:
            raise FileNotFoundError(
                f"missing split: {split_p} does not exist. Every arm must train on the same split; pass "
                f"--create-split to write nnU-Net's default 5-fold split (seed 12345, what nnUNetv2_train would "
                f"write), or write your own splits_final.json")
        split = write_default_split(pre / name / ident, split_p)
        notes = [f"no split existed: wrote nnU-Net's default 5-fold split (seed 12345) to {split_p}"]
        print("   " + notes[0], flush=True)
    else:
        split, notes = _read_json(split_p), []
    missing = [f for f in cfg.folds if f >= len(split)]
    if missing:
        raise ValueError(f"missing split: fold(s) {missing} are not in {split_p} ({len(split)} fold(s)); nnU-Net "
                         f"would silently train them on a random 80:20 split")
    return name, ending, channels, plans_json, split, notes


def _dataset_plan(cfg: CompareConfig, env: dict) -> _Plan:
    """The compared dataset's files (:func:`_dataset_files`) and the report folder, as a :class:`_Plan`."""
    raw, pre, results = (Path(env[k]) for k in NNUNET_FOLDERS)
    name, ending, channels, plans_json, split, notes = _dataset_files(cfg, env, cfg.dataset)
    report = Path(cfg.output or f"compare_{name}_{cfg.configuration}").resolve()
    from nnunet_ext.core.checks import check_writable_folder

    check_writable_folder(report, "-o/--output")  # before any training: a file there is one clear line
    return _Plan(name, env, raw, pre, results, report, ending, channels, split, plans_json, notes=notes)


def _other_dataset_arms(cfg: CompareConfig, plan: _Plan) -> dict:
    """The ``DATASET:TRAINER`` arms (:mod:`nnunet_ext.workflows.dataset_arm`), each dataset's files checked."""
    others = {}
    for t in cfg.trainers:
        if not dataset_arm.is_other_dataset(t):
            continue
        dataset, trainer = dataset_arm.check_arm(t, plan.name, cfg.test_images is not None)
        name, ending, channels, plans_json, split, notes = _dataset_files(cfg, plan.env, dataset)
        dataset_arm.check_same_files(t, name, plan.name, plan.channels, plan.ending, channels, ending)
        plan.notes += notes + [f"{t} trains on fold(s) {list(cfg.folds)} of its own dataset's split, "
                               f"{plan.pre / name / 'splits_final.json'}"]
        others[t] = dataset_arm.DatasetArm(t, name, trainer, plans_json, split)
    return others


def _check_trained_arms(cfg: CompareConfig, plan: _Plan) -> None:
    """Arms trained already used the same plans, split and budget; which folds to train (or continue) and
    which to reuse go into ``plan``."""
    budgets = {}
    for t in _single_arms(cfg):
        other = plan.others.get(t)
        name = other.dataset if other else plan.name
        plans_p, split_p = plan.pre / name / f"{cfg.plans}.json", plan.pre / name / "splits_final.json"
        plans_json, split = (other.plans_json, other.split) if other else (plan.plans_json, plan.split)
        mdir = _model_dir(plan, cfg, t)
        for f in cfg.folds:
            fd = mdir / f"fold_{f}"
            final = _whole_checkpoint(fd / "checkpoint_final.pth")  # a training killed while saving it: not final
            started = fd.is_dir() and any(fd.glob("checkpoint_*.pth"))
            if not started:
                plan.to_train.append((t, f, False))
                continue
            mp = mdir / "plans.json"
            if mp.is_file() and _read_json(mp) != plans_json:
                raise ValueError(f"arms trained with different plans: {mp} differs from {plans_p} (the dataset was "
                                 f"re-planned after {t} was trained); retrain {t} (delete {mdir}) or restore the plans")
            vd = fd / "validation"
            if final and vd.is_dir():
                val = sorted(p.name[: -len(plan.ending)] for p in vd.iterdir() if p.name.endswith(plan.ending))
                if val and val != sorted(split[f]["val"]):
                    raise ValueError(f"arms trained with different splits: {t} fold {f} was validated on {len(val)} "
                                     f"cases that are not fold {f}'s validation cases in {split_p}")
            why = training_mismatch(fd, cfg.budget, cfg.train_seed)
            if why:
                raise ValueError(f"arms trained with a different budget or seed: {t} fold {f} {why}; retrain it "
                                 f"(delete {fd}) or ask for what it was trained with")
            b = trained_budget(fd)
            if b is not None:
                budgets[(t, f)] = b
            if final:
                plan.reused.setdefault(t, []).append(f)
            else:
                plan.to_train.append((t, f, True))
    _check_budgets(cfg, plan, budgets)


def _check_budgets(cfg: CompareConfig, plan: _Plan, budgets: dict) -> None:
    """Without a requested budget, every trained arm used one budget, and arms still to train get it."""
    if not cfg.budget and len({(b["epochs"], b["iterations"]) for b in budgets.values()}) > 1:
        raise ValueError("arms trained with different budgets: " + ", ".join(
            f"{t} fold {f}: {b['epochs']}x{b['iterations']}" for (t, f), b in budgets.items()))
    if not cfg.budget and budgets and plan.to_train:
        e, i = next(iter(budgets.values()))["epochs"], next(iter(budgets.values()))["iterations"]
        if (e, i) != (1000, 250):
            raise ValueError(f"trained arms used {e} epochs x {i} iterations; pass --epochs {e} --iterations {i} so "
                             f"the arms still to train ({sorted({t for t, _, _ in plan.to_train})}) get the same budget")


def _check_eval_cases(cfg: CompareConfig, plan: _Plan) -> None:
    """The evaluation cases (test set, or the folds' validation cases) into ``plan``, every file present; the
    soft references on their labels' grid."""
    raw, name, ending, split = plan.raw, plan.name, plan.ending, plan.split
    if cfg.test_images is not None:
        plan.cases = check_test_set(Path(cfg.test_images), Path(cfg.test_labels), plan.channels, ending)
    else:
        plan.cases = sorted(c for f in cfg.folds for c in split[f]["val"])
        for f in cfg.folds:
            for c in split[f]["val"]:
                for p in [raw / name / "labelsTr" / f"{c}{ending}"] + \
                         [raw / name / "imagesTr" / f"{c}_{ch:04d}{ending}" for ch in range(plan.channels)]:
                    if not p.is_file():
                        raise FileNotFoundError(f"validation case {c} of fold {f}: {p} not found")
    if cfg.soft_reference is not None:
        sref = Path(cfg.soft_reference)
        if not sref.is_dir():
            raise FileNotFoundError(f"--soft-reference {sref}: folder not found")
        for c in plan.cases:
            p = sref / f"{c}{ending}"
            if not p.is_file():
                raise FileNotFoundError(f"--soft-reference: case {c}: {p} not found")
            ref_p = (Path(cfg.test_labels) / f"{c}{ending}") if cfg.test_images is not None else \
                raw / name / "labelsTr" / f"{c}{ending}"
            g, gr = read_geometry(p), read_geometry(ref_p)
            if g["size"] != gr["size"] or not np.allclose(g["spacing"], gr["spacing"], rtol=1e-4):
                raise ValueError(f"--soft-reference: {p} has another geometry than its label {ref_p}")


def _whole_checkpoint(path: Path) -> bool:
    """``path`` exists and is a whole ``torch.save`` file (a zip archive: its directory is written last, so a
    file cut off by a kill is not one)."""
    import zipfile

    return path.is_file() and zipfile.is_zipfile(path)


def write_default_split(preprocessed_folder: Path, split_file: Path) -> list:
    """nnU-Net's default split (what ``nnUNetTrainer.do_split`` writes when there is none)."""
    ids = sorted(preprocessed_identifiers(preprocessed_folder))
    if len(ids) < 5:
        raise ValueError(f"nnU-Net's default 5-fold split needs at least 5 cases, {preprocessed_folder} has {len(ids)}")
    split = crossval_splits(ids, n_folds=5, seed=12345)
    _write_json(split_file, split)
    return split


# --------------------------------------------------------------------------------------------------------------
# training through the launcher

def _launcher():
    try:
        from nnunet_ext.cluster import launcher
    except ImportError:
        return None
    return launcher


def training_tasks(cfg: CompareConfig, plan: _Plan) -> list[dict]:
    """One nnUNetv2_train task per fold of each arm still to train (``--c`` continues an interrupted run)."""
    extra = {k: plan.env[k] for k in _PASSED_ENV if plan.env.get(k)}
    extra.update(cfg.training_env)
    tasks = []
    for t, f, resume in plan.to_train:
        broken = _model_dir(plan, cfg, t) / f"fold_{f}" / "checkpoint_final.pth"
        if broken.is_file() and not _whole_checkpoint(broken):  # cut off by a kill: nnU-Net would try to load it
            broken.unlink()
        argv = [nnunet_command("nnUNetv2_train"), _arm_dataset(plan, cfg, t), cfg.configuration, str(f), "-tr", _arm_trainer(t), "-p",
                cfg.plans, "-device", cfg.device]
        if resume:
            argv.append("--c")
        tasks.append({"name": f"train_{cascade_arm.folder_name(t)}_fold{f}", "argv": argv, "env": extra,
                      "done": str(_model_dir(plan, cfg, t) / f"fold_{f}" / "checkpoint_final.pth")})
    return tasks


def run_training(tasks: list[dict], workdir: Path, options=None, stages=()) -> dict:
    """Run the tasks (and the launcher ``stages`` of cascade arms) with the launcher (nnunet_ext.cluster.launcher)
    when it is installed, else the tasks one after the other here. Returns the launcher's result (job ids under
    Slurm)."""
    if not tasks and not stages:
        return {}
    L = _launcher()
    if L is not None:
        todo = ([L.Stage("train", [L.Task(t["name"], t["argv"], env=t["env"], done=t["done"]) for t in tasks])]
                if tasks else []) + list(stages)
        if options is None:
            options = L.launcher_options(_default_launcher_args(L))
        return L.run_stages(todo, workdir, options)
    if stages:
        raise NotImplementedError("a cascade arm without nnunet_ext.cluster.launcher: it trains as chained stages")
    logs = Path(workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for k, t in enumerate(tasks, 1):
        if t["done"] and Path(t["done"]).is_file():
            print(f"   [{k}/{len(tasks)}] {t['name']}: done already, skipped", flush=True)
            continue
        print(f"   [{k}/{len(tasks)}] {t['name']} (log {logs / (t['name'] + '.log')})", flush=True)
        run_logged(t["argv"], {**os.environ, **t["env"]}, logs / f"{t['name']}.log")
    return {}


def _default_launcher_args(L):
    import argparse

    p = argparse.ArgumentParser()
    L.add_launcher_arguments(p)
    return p.parse_args([])


# --------------------------------------------------------------------------------------------------------------
# prediction and per-case counts

def _checkpoint_stamp(mdir: Path, folds) -> dict:
    return {str(f): (mdir / f"fold_{f}" / "checkpoint_final.pth").stat().st_mtime_ns for f in folds}


def _predict_once(cfg: CompareConfig, plan: _Plan, trainer: str, input_dir: Path, out: Path, folds, cases) -> bool:
    """Predict through the model contract (:func:`nnunet_ext.inference.predict.predict`) unless ``out`` holds this exact
    prediction already; True when it ran."""
    mdir = _model_dir(plan, cfg, trainer)
    stamp = {"folds": list(folds), "cases": sorted(cases), "checkpoints": _checkpoint_stamp(mdir, folds),
             "device": cfg.device, "cohort": cfg.cohort}
    if cfg.disable_tta:
        stamp["disable_tta"] = True  # predictions made with mirroring (no key: earlier runs) are not reused
    marker = out / "compare_prediction.json"
    if marker.is_file() and _read_json(marker) == stamp:
        return False
    if out.exists():
        shutil.rmtree(out)
    from nnunet_ext.inference.options import PredictOptions

    cohort = None  # passed to cohort-conditioned (SCIN) models only
    if cfg.cohort is not None:
        from nnunet_ext.inference.contract import load_contract

        if load_contract(mdir, folds).condition == "cohort":
            cohort = cfg.cohort
    o = PredictOptions(device=cfg.device, save_probabilities=True, disable_tta=cfg.disable_tta, cohort=cohort)
    # one child process per prediction: nnU-Net's predictor forks its pre-/post-processing workers, and a fork
    # from this long-lived process (threads of earlier steps) was seen to deadlock; the child also gets our
    # trainer folder on nnUNet_extTrainer for the predictor's trainer lookup
    # (spawned on the function: python -m nnunet_ext.cluster.call nnunet_ext.inference.predict:predict JSON)
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.inference.predict import predict

    argv = function_argv(predict, input_dir=str(input_dir), output_dir=str(out),
                         model=_model_ref(plan, cfg, trainer, list(folds)).to_json(), options=o.to_json(),
                         n_proc=cfg.n_proc)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged(argv, plan.env, out.parent / f"{out.name}_predict.log")
    _write_json(marker, stamp)
    return True


def _predict_cascade_once(cfg: CompareConfig, plan: _Plan, input_dir: Path, out: Path) -> bool:
    """A cascade arm's prediction of the test cases (:func:`nnunet_ext.workflows.consensus.predict_cascade`, in a
    child process as :func:`_predict_once`) unless ``out`` holds this exact prediction; True when it ran."""
    raters, cons = cascade_arm.models(cfg.dataset, cfg.folds)
    stamp = {"cascade": {"raters": raters, "consensus": cons}, "cases": sorted(plan.cases),
             "checkpoints": {m["model_dir"]: _checkpoint_stamp(Path(m["model_dir"]), m["folds"])
                             for m in raters + [cons]}, "device": cfg.device}
    if cfg.disable_tta:
        stamp["disable_tta"] = True
    marker = out / "compare_prediction.json"
    if marker.is_file() and _read_json(marker) == stamp:
        return False
    if out.exists():
        shutil.rmtree(out)
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.inference.options import PredictOptions
    from nnunet_ext.workflows.consensus import predict_cascade

    o = PredictOptions(device=cfg.device, save_probabilities=True, disable_tta=cfg.disable_tta)
    argv = function_argv(predict_cascade, raters=raters, consensus_model=cons, input_dir=str(input_dir),
                         output_dir=str(out), options=o.to_json(), n_proc=cfg.n_proc)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged(argv, plan.env, out.parent / f"{out.name}_predict.log")
    _write_json(marker, stamp)
    return True


def _validation_inputs(plan: _Plan, fold: int, report: Path) -> Path:
    """A folder of links to fold ``fold``'s validation images (nnU-Net's predict reads a folder)."""
    d = report / "inputs" / f"fold_{fold}"
    d.mkdir(parents=True, exist_ok=True)
    for c in plan.split[fold]["val"]:
        for ch in range(plan.channels):
            src = plan.raw / plan.name / "imagesTr" / f"{c}_{ch:04d}{plan.ending}"
            dst = d / src.name
            src = src.absolute()  # a link must not depend on the folder it lies in
            if os.path.islink(dst) and os.readlink(dst) != str(src):
                os.unlink(dst)  # a dangling or stale link (relative nnUNet_raw of an earlier version): made again
            if not dst.exists():
                try:
                    os.symlink(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    return d


def predict_arm(cfg: CompareConfig, plan: _Plan, trainer: str) -> dict[str, dict]:
    """Predict the arm's evaluation cases; returns case -> {"dir": prediction folder, "ref": label file}."""
    where = {}
    base = _arm_folder(plan, trainer)
    if cascade_arm.is_cascade(trainer):
        out = base / "test"
        ran = _predict_cascade_once(cfg, plan, Path(cfg.test_images).resolve(), out)
        print(f"   {trainer}: {'predicted' if ran else 'prediction exists, reused'} ({len(plan.cases)} test cases: "
              f"the rater models' fold ensembles, then the consensus model's folds {cfg.folds})", flush=True)
        return {c: {"dir": out, "ref": Path(cfg.test_labels).resolve() / f"{c}{plan.ending}"} for c in plan.cases}
    if cfg.test_images is not None:
        out = base / "test"
        ran = _predict_once(cfg, plan, trainer, Path(cfg.test_images).resolve(), out, cfg.folds, plan.cases)
        print(f"   {trainer}: {'predicted' if ran else 'prediction exists, reused'} ({len(plan.cases)} test cases, "
              f"folds {cfg.folds} ensembled)", flush=True)
        where = {c: {"dir": out, "ref": Path(cfg.test_labels).resolve() / f"{c}{plan.ending}"} for c in plan.cases}
    else:
        for f in cfg.folds:
            out = base / "validation" / f"fold_{f}"
            val = plan.split[f]["val"]
            ran = _predict_once(cfg, plan, trainer, _validation_inputs(plan, f, plan.report), out, [f], val)
            print(f"   {trainer} fold {f}: {'predicted' if ran else 'prediction exists, reused'} ({len(val)} "
                  f"validation cases)", flush=True)
            for c in val:
                where[c] = {"dir": out, "ref": plan.raw / plan.name / "labelsTr" / f"{c}{plan.ending}"}
    return where


def case_record(ref: np.ndarray, soft: np.ndarray, argmax: np.ndarray, model_mask: np.ndarray, thresholds,
                connectivity: int = 26, bins=DEFAULT_BINS, rule: LesionRule | None = None) -> dict:
    """Counts of one case at every sweep threshold (``soft >= t``), at nnU-Net's argmax and at the model's
    own mask, under ``rule`` (default: any overlap, ``connectivity``, ``bins``)."""
    for what, a in (("soft map", soft), ("argmax", argmax), ("model mask", model_mask)):
        if a.shape != ref.shape:
            raise ValueError(f"{what} has shape {a.shape}, the reference {ref.shape}")
    rule = rule if rule is not None else LesionRule(connectivity, "any", bins)
    ref = ref.astype(bool)
    rl = label_components(ref, rule.connectivity)
    return {"sweep": [mask_counts(ref, soft >= t, rl, rule=rule) for t in thresholds],
            "argmax": mask_counts(ref, argmax, rl, rule=rule),
            "model": mask_counts(ref, model_mask, rl, rule=rule)}


def evaluate_arm(cfg: CompareConfig, plan: _Plan, trainer: str, where: dict, thresholds) -> dict[str, dict]:
    """Per-case records of one arm (cached beside its predictions)."""
    cache = _arm_folder(plan, trainer) / f"{cfg.eval_set}_counts.json"
    stamps = sorted({str(v["dir"]) for v in where.values()})
    key = {"thresholds": list(thresholds), "bins": [list(b) for b in cfg.bins], "connectivity": cfg.connectivity,
           "predictions": {d: _read_json(Path(d) / "compare_prediction.json") for d in stamps},
           "soft_reference": None if cfg.soft_reference is None else str(Path(cfg.soft_reference).resolve())}
    if cache.is_file():
        c = _read_json(cache)
        if c.get("key") == key and sorted(c["cases"]) == sorted(where):
            return c["cases"]
    records = {}
    for n, (case, w) in enumerate(sorted(where.items()), 1):
        ref, _ = read_image(w["ref"])
        soft, _ = read_image(w["dir"] / "soft" / f"{case}{plan.ending}")
        mask, _ = read_image(w["dir"] / f"{case}{plan.ending}")
        with np.load(w["dir"] / f"{case}.npz") as z:
            argmax = np.argmax(z["probabilities"], 0) == 1
        records[case] = case_record(ref == 1, soft, argmax, mask == 1, thresholds, rule=cfg.rule)
        if cfg.soft_reference is not None:
            sref, _ = read_image(Path(cfg.soft_reference) / f"{case}{plan.ending}")
            records[case]["calibration"] = calibration_record(soft, ref == 1, sref)
        step(f"   {trainer}: evaluated", n, len(where), item=case)
    _write_json(cache, {"key": key, "cases": records})
    return records


def arm_summary(records: dict[str, dict], thresholds) -> dict:
    """Sweep curve, the four operating points and the per-case counts at each of them."""
    cases = sorted(records)
    points = []
    for i, t in enumerate(thresholds):
        s = summarise([records[c]["sweep"][i] for c in cases])
        points.append({"threshold": t, **s})
    ch = choose_thresholds(points)
    ch["fdr_limited"] = fdr_limited_point(points)
    per_op = {"model": [records[c]["model"] for c in cases], "argmax": [records[c]["argmax"] for c in cases],
              "segmentation_optimal": [records[c]["sweep"][ch["segmentation_optimal"]] for c in cases],
              "detection_optimal": [records[c]["sweep"][ch["detection_optimal"]] for c in cases],
              "fdr_limited": [records[c]["sweep"][ch["fdr_limited"]] for c in cases]}
    ops = {op: summarise(v) for op, v in per_op.items()}
    ops["segmentation_optimal"]["threshold"] = thresholds[ch["segmentation_optimal"]]
    ops["detection_optimal"]["threshold"] = thresholds[ch["detection_optimal"]]
    ops["fdr_limited"]["threshold"] = thresholds[ch["fdr_limited"]]
    return {"points": points, "operating_points": ops, "threshold_gap": ch["gap"], "_per_op": per_op}


# --------------------------------------------------------------------------------------------------------------
# report

def _fmt(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def format_table(report: dict) -> str:
    """Terminal table: one row per arm and operating point."""
    bins = report["bins"]
    head = f"{'arm':<24} {'operating point':<21} {'t':>5} {'Dice':>6} {'les.F1':>6} " + \
           " ".join(f"{b + ' TPR/FDR':>15}" for b in bins)
    lines = [head, "-" * len(head)]
    for arm, a in report["arms"].items():
        for op in OPERATING_POINTS:
            o = a["operating_points"][op]
            t = o.get("threshold")
            ts = {"argmax": "argm", "model": _fmt(a.get("stored_threshold"), 2) if a.get("stored_threshold") else "argm"
                  }.get(op, _fmt(t, 2))
            lines.append(f"{arm:<24} {op:<21} {ts:>5} {_fmt(o['dice_mean']):>6} {_fmt(o['lesion_f1']):>6} " + " ".join(
                f"{_fmt(o['bins'][b]['lesion_tpr'], 2) + '/' + _fmt(o['bins'][b]['lesion_fdr'], 2):>15}" for b in bins))
        lines.append(f"{'':<24} threshold gap (seg. vs det. optimum) {a['threshold_gap']:.2f}")
    return "\n".join(lines)


def curve_bands(records: dict[str, dict], kind: str, bin_: str | None, idx: np.ndarray,
                level: float = 0.95) -> dict[str, np.ndarray]:
    """Pointwise percentile band of one arm's operating-point curve over case resamples.

    ``records``: the arm's per-case records (:func:`case_record`; cases in sorted order are resampled);
    ``kind``: ``"voxel"`` or ``"lesion"``; ``bin_``: a size bin of the lesion curve or None (all lesions);
    ``idx``: (resamples, cases) case indices (:func:`bootstrap_indices`; give every arm the same ones).
    On each resample the curve's rates are recomputed from pooled counts at every sweep threshold, as
    :func:`summarise` does for the point estimate: voxel TPR = TP / (TP + FN), FDR = FP / (TP + FP); lesion
    TPR = detected / reference lesions, FDR = false positive / predicted lesions. Returns ``fdr_lo, fdr_hi,
    tpr_lo, tpr_hi``, one value per threshold (the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of
    the resamples where the rate is defined; NaN where it is defined in none)."""
    if kind not in ("voxel", "lesion"):
        raise ValueError(f"kind must be 'voxel' or 'lesion', got {kind!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    cases = sorted(records)
    if not cases:
        raise ValueError("no cases to resample")

    def counts(c):
        return [s if bin_ is None else s["bins"][bin_] for s in records[c]["sweep"]]

    if kind == "voxel":
        if bin_ is not None:
            raise ValueError("the voxel curve has no size bins; pass bin_=None")
        keys = ("voxel_tp", "voxel_fn", "voxel_fp")
    else:
        keys = ("lesion_tp", "ref_lesions", "lesion_fp", "pred_lesions")
    a = {k: np.array([[s[k] for s in counts(c)] for c in cases], float) for k in keys}  # (cases, thresholds)
    idx = np.atleast_2d(np.asarray(idx))
    s = {k: v[idx].sum(1) for k, v in a.items()}  # (resamples, thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "voxel":
            tpr = s["voxel_tp"] / (s["voxel_tp"] + s["voxel_fn"])
            fdr = s["voxel_fp"] / (s["voxel_tp"] + s["voxel_fp"])
        else:
            tpr = s["lesion_tp"] / s["ref_lesions"]
            fdr = s["lesion_fp"] / s["pred_lesions"]
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for name, v in (("fdr", fdr), ("tpr", tpr)):
        v = np.where(np.isfinite(v), v, np.nan)
        lo, hi = np.full(v.shape[1], np.nan), np.full(v.shape[1], np.nan)
        ok = np.isfinite(v).any(0)
        if ok.any():
            lo[ok], hi[ok] = np.nanpercentile(v[:, ok], q, axis=0)
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def _zoomed_limits(values, pad: float = 0.06, min_span: float = 0.15) -> tuple[float, float]:
    """Axis limits around ``values`` (rates in [0, 1]) with a margin; at least ``min_span`` wide."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return -0.02, 1.02
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    span = hi - lo
    lo, hi = lo - pad * span, hi + pad * span
    if lo < -0.02:
        lo, hi = -0.02, hi + (-0.02 - lo)
    if hi > 1.02:
        lo, hi = max(-0.02, lo - (hi - 1.02)), 1.02
    return lo, hi


def plot_curves(report: dict, png: Path, records: dict[str, dict] | None = None, panels=None,
                dpi: int = 110) -> Path:
    """One figure: every arm's voxel curve, all-lesion curve and lesion curve per size bin (TPR vs FDR), the
    segmentation-optimal (circle), detection-optimal (square), model-output (triangle), argmax (cross) and
    FDR-limited (diamond) points marked; each panel zoomed to its data.

    ``records`` (arm -> per-case records, as :func:`evaluate_arm` returns): adds each arm's pointwise 95 %
    band (:func:`curve_bands`) from the report's paired bootstrap resamples (the same resampled case sets for
    every arm, as the report's intervals). ``panels``: which panels, e.g. ``[("lesion", None), ("lesion",
    "3-10")]`` (default: voxels, all lesions, then every size bin)."""
    from nnunet_ext.core.plotting import pyplot, save_figure

    plt = pyplot()
    bins = report["bins"]
    titles = {("voxel", None): "voxels (segmentation)", ("lesion", None): "all lesions (detection)",
              **{("lesion", b): f"lesions of {b} voxels (n={report['reference_lesions'][b]})" for b in bins}}
    keys = [("voxel", None), ("lesion", None)] + [("lesion", b) for b in bins] if panels is None else \
        [tuple(p) for p in panels]
    for k in keys:
        if k not in titles:
            raise ValueError(f"unknown panel {k}; panels: {list(titles)}")
    panels = [(kind, b, titles[(kind, b)]) for kind, b in keys]
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.6 * nrow), squeeze=False)
    colors = ["black", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    idx = None
    if records is not None:
        boot = report.get("bootstrap", {})
        n = len(next(iter(records.values())))
        idx = bootstrap_indices(n, int(boot.get("resamples", 2000)), int(boot.get("seed", 0)))

    for k, (kind, b, title) in enumerate(panels):
        _plot_panel(axes[k // ncol][k % ncol], report, kind, b, title, records, idx, colors)
    for k in range(len(panels), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    ax = axes[0][0]
    for m, lab in (("o", "segmentation-optimal t"), ("s", "detection-optimal t"), ("^", "model output"),
                   ("x", "argmax"), ("D", f"lesion FDR <= {FDR_LIMIT:.2f}")):
        ax.plot([], [], m, ms=9, mfc="none", mew=2, color="gray", label=lab)
    if idx is not None:
        ax.fill([], [], color="gray", alpha=0.3, lw=0, label="95 % band (paired case bootstrap)")
    ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{report['dataset']} {report['configuration']}, {report['eval_set']} ({report['n_cases']} cases): "
                 f"operating-point curves (thresholds {report['thresholds'][0]:g}-{report['thresholds'][-1]:g})",
                 fontsize=11)
    return save_figure(fig, png, dpi=dpi)


def _xy(o: dict, kind: str, b: str | None):
    src = o if b is None else o["bins"][b]
    return src[f"{kind}_fdr"], src[f"{kind}_tpr"]


def _plot_panel(ax, report: dict, kind: str, b: str | None, title: str, records, idx, colors) -> None:
    """One panel of :func:`plot_curves`: every arm's curve (with its band when ``idx``), its operating points
    marked; the axes zoomed to the data."""
    xs, ys = [], []
    for i, (arm, a) in enumerate(report["arms"].items()):
        c = colors[i % len(colors)]
        if idx is not None and arm in records:
            band = curve_bands(records[arm], kind, b, idx)
            ok = np.isfinite(band["fdr_lo"]) & np.isfinite(band["tpr_hi"]) & np.isfinite(band["fdr_hi"]) & \
                np.isfinite(band["tpr_lo"])
            if ok.any():
                # better corner (lower FDR, higher TPR) out along the thresholds, worse corner back
                bx = np.concatenate([band["fdr_lo"][ok], band["fdr_hi"][ok][::-1]])
                by = np.concatenate([band["tpr_hi"][ok], band["tpr_lo"][ok][::-1]])
                ax.fill(bx, by, color=c, alpha=0.15, lw=0)
                xs += list(bx)
                ys += list(by)
        pts = [_xy(p, kind, b) for p in a["points"]]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if pts:
            ax.plot(*zip(*pts), "-", marker=".", ms=4, color=c, lw=1.8, label=arm)
            xs += [x for x, _ in pts]
            ys += [y for _, y in pts]
        for op, m in (("segmentation_optimal", "o"), ("detection_optimal", "s"), ("model", "^"), ("argmax", "x"),
                      ("fdr_limited", "D")):
            if op not in a["operating_points"]:  # a report written before this operating point existed
                continue
            x, y = _xy(a["operating_points"][op], kind, b)
            if x is not None and y is not None:
                ax.plot([x], [y], m, ms=10, mfc="none", mew=2, color=c)
                xs.append(x)
                ys.append(y)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(*_zoomed_limits(xs))
    ax.set_ylim(*_zoomed_limits(ys))
    ax.set_xlabel(f"{kind} FDR")
    ax.set_ylabel(f"{kind} TPR")
    ax.grid(alpha=0.3)


def write_markdown(report: dict, path: Path) -> Path:
    arms = list(report["arms"])
    bins = report["bins"]
    L = [f"# Comparison on {report['dataset']} ({report['configuration']}, {report['eval_set']} set)", ""]
    L += ["## Setup", "",
          f"* arms: {', '.join(f'`{a}`' for a in arms)} (reference arm: `{arms[0]}`)",
          f"* plans `{report['plans']}`, configuration `{report['configuration']}`, folds {report['folds']}",
          f"* evaluated on: {report['eval_set_description']}; {report['n_cases']} cases; reference lesions "
          + ", ".join(f"{b}: {report['reference_lesions'][b]}" for b in bins),
          f"* budget: {report['budget_description']}",
          f"* device: {report['device']}; training seed: {_seed_text(report.get('train_seed'))}; prediction: "
          + ("nnU-Net's mirroring" if report.get("mirroring", True) else "without mirroring (--disable_tta)"),
          f"* split: `{report['split_file']}`; " + "; ".join(
              f"fold {f}: {len(s['train'])} train / {len(s['val'])} validation" for f, s in report["split"].items()),
          f"* thresholds swept: {', '.join(f'{t:g}' for t in report['thresholds'])}",
          f"* bootstrap: {report['bootstrap']['resamples']} paired case resamples, seed {report['bootstrap']['seed']}, "
          f"percentile 95 % intervals; Dice = mean over cases, lesion F1 / TPR / FDR from counts pooled over cases",
          ""]
    for arm in arms:
        a = report["arms"][arm]
        L.append(f"* `{arm}`: {a['training']}; model output threshold: "
                 f"{a.get('stored_threshold') if a.get('stored_threshold') else 'none stored (nnU-Net argmax)'}, "
                 f"post-processing {a.get('postprocessing')}")
    L += [""] + [f"* note: {n}" for n in report["notes"]] + [""]
    L += ["## Results", "", "Pooled lesion counts; TPR / FDR per size bin.", ""]
    L.append("| arm | operating point | threshold | Dice (mean) | lesion F1 | " + " | ".join(
        f"{b} TPR / FDR" for b in bins) + " |")
    L.append("|---|---|---|---|---|" + "---|" * len(bins))
    for arm in arms:
        a = report["arms"][arm]
        for op in OPERATING_POINTS:
            o = a["operating_points"][op]
            t = {"argmax": "argmax", "model": _fmt(a.get("stored_threshold"), 2) if a.get("stored_threshold")
                 else "argmax"}.get(op, _fmt(o.get("threshold"), 2))
            L.append(f"| `{arm}` | {OP_TITLES[op]} | {t} | {_fmt(o['dice_mean'])} | {_fmt(o['lesion_f1'])} | " + " | ".join(
                f"{_fmt(o['bins'][b]['lesion_tpr'])} / {_fmt(o['bins'][b]['lesion_fdr'])}" for b in bins) + " |")
    L += ["", "Gap between the segmentation-optimal and the detection-optimal threshold:", "",
          "| arm | segmentation-optimal t (voxel F1) | detection-optimal t (lesion F1) | gap |", "|---|---|---|---|"]
    for arm in arms:
        a = report["arms"][arm]
        s, d = a["operating_points"]["segmentation_optimal"], a["operating_points"]["detection_optimal"]
        L.append(f"| `{arm}` | {s['threshold']:g} ({_fmt(s['voxel_f1'])}) | {d['threshold']:g} ({_fmt(d['lesion_f1'])}) "
                 f"| {a['threshold_gap']:.2f} |")
    L += ["", f"![operating-point curves]({Path(report['files']['curves']).name})", "",
          f"## Differences from `{arms[0]}` (paired bootstrap 95 % CI)", ""]
    L.append("| arm | operating point | " + " | ".join(METRIC_TITLES[m] for m in CI_METRICS) + " |")
    L.append("|---|---|" + "---|" * len(CI_METRICS))
    for arm in arms[1:]:
        for op in OPERATING_POINTS:
            d = report["differences"][arm][op]
            L.append(f"| `{arm}` | {OP_TITLES[op]} | " + " | ".join(
                "n/a" if d[m]["ci"] is None else
                f"{_signed(d[m]['difference'])} [{_signed(d[m]['ci'][0])}, {_signed(d[m]['ci'][1])}]"
                + (" **excludes 0**" if d[m]["excludes_zero"] else "") for m in CI_METRICS) + " |")
    L += ["", "In words (each model's own output):", ""] + [f"* {report['sentences'][a]}" for a in arms[1:]]
    if report.get("calibration"):
        c = report["calibration"]
        L += ["", "## Calibration of the soft output", "",
              f"Brier score of each arm's lesion probability map against the rater average (`{c['soft_reference']}`), "
              "mean over cases; ECE as the SoftSeg thesis (10 confidence bins, confidence = the larger class "
              "probability, accuracy against the hard reference), pooled over cases. Lower is better; differences "
              f"from `{arms[0]}` with paired bootstrap 95 % CI.", "",
              "| arm | " + " | ".join(CALIBRATION_TITLES[m] for m in CALIBRATION_METRICS) + " | "
              + " | ".join(f"difference in {CALIBRATION_TITLES[m].split(' ')[0]}" for m in CALIBRATION_METRICS) + " |",
              "|---|" + "---|" * (2 * len(CALIBRATION_METRICS))]
        for arm in arms:
            d = c["differences"].get(arm)
            L.append(f"| `{arm}` | " + " | ".join(f"{c['arms'][arm][m]:.4f}" for m in CALIBRATION_METRICS) + " | "
                     + " | ".join("reference" if d is None else
                                  f"{_signed(d[m]['difference'], 4)} [{_signed(d[m]['ci'][0], 4)}, {_signed(d[m]['ci'][1], 4)}]"
                                  + (" **excludes 0**" if d[m]["excludes_zero"] else "") for m in CALIBRATION_METRICS) + " |")
    L += ["", "The segmentation- and detection-optimal thresholds are chosen on these same cases, so their rows are "
          "optimistic; the model-output and argmax rows use no information from the evaluated labels"
          + (" (on validation folds the stored threshold was itself chosen on that fold's validation cases)"
             if report["eval_set"] == "validation" else "") + ". Intervals hold the thresholds fixed.", "",
          "## Commands", "", "```bash", *report["commands"], "```", ""]
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(path, "\n".join(L))
    return path


def _arm_contract(mdir: Path, folds) -> tuple[float | None, dict | None]:
    """(the threshold the model's contract applies to ``folds``, or None for argmax; its post-processing)."""
    from nnunet_ext.inference.contract import load_contract, resolve_threshold

    c = load_contract(mdir, folds)
    return resolve_threshold(mdir, folds, c)[0], c.postprocessing


def _train_arms(cfg: CompareConfig, plan: _Plan) -> dict | None:
    """Step 2: train every fold still to train (trained ones are reused, and said so). None when every fold is
    trained now; else the status to return (a dry run, or training tasks submitted)."""
    tasks = training_tasks(cfg, plan)
    stages = [st for c in plan.cascades.values() for st in cascade_arm.training_stages(
        c, cfg.dataset, cfg.configuration, cfg.plans, cfg.folds, cfg.device, cfg.n_proc, cfg.training_env)]
    for t, c in plan.cascades.items():
        print(f"   {t}: " + ("trained already, reused" if c.trained else
                             f"the cascade trains (stage 1: every rater x {len(c.state['splits'])} folds, stage 2: "
                             f"folds {list(cfg.folds)})"), flush=True)
    for t in _single_arms(cfg):
        folds = plan.reused.get(t, [])
        if folds:
            b = trained_budget(_model_dir(plan, cfg, t) / f"fold_{folds[0]}")
            print(f"   {t}: fold(s) {folds} trained already ({_model_dir(plan, cfg, t)}"
                  + (f", {b['epochs']} x {b['iterations']} iterations" if b else "") + "), reused", flush=True)
    print(f"[2/5] training: {len(tasks)} fold(s) to train" + (f" and {len(stages)} cascade stage(s)" if stages else "")
          + (f" with budget {cfg.budget}" if cfg.budget else " with each trainer's full budget"), flush=True)
    launched = run_training(tasks, plan.report / "jobs", cfg.launcher_options, stages)
    if (tasks or stages) and getattr(cfg.launcher_options, "dry_run", False):
        print("   dry run: nothing trained; the scripts are above", flush=True)
        return {"status": "dry run", "tasks": [t["name"] for t in tasks] + [st.name for st in stages]}
    left = [t["name"] for t in tasks if not Path(t["done"]).is_file()]
    if stages:
        from nnunet_ext.workflows.consensus import load_state

        for t in plan.cascades:
            s2 = load_state(cfg.dataset)[1].get("stage2_training", {})
            if not set(cfg.folds) <= set(s2.get("folds", [])):
                left.append(t)
    if left:
        _write_json(plan.report / "submitted.json", {"tasks": left, "launcher": launched})
        print(f"   submitted {len(left)} training task(s) ({launched}); run the same command again when they have "
              f"finished to predict and write the report", flush=True)
        return {"status": "training submitted", "tasks": left, "launcher": launched}
    return None


def compare(cfg: CompareConfig, lookup=lookup_trainers) -> dict:
    """Run the comparison (see the module docstring); returns the report dict (also in report.json)."""
    t0 = time.time()
    print(f"[1/5] checking {len(cfg.trainers)} arms, folds {list(cfg.folds)} before any training", flush=True)
    plan = check_inputs(cfg, lookup)
    report_dir = plan.report
    report_dir.mkdir(parents=True, exist_ok=True)
    print(f"   report folder {report_dir}; evaluating on the {cfg.eval_set} set ({len(plan.cases)} cases)", flush=True)
    pending = _train_arms(cfg, plan)
    if pending is not None:  # a dry run, or trainings submitted to run elsewhere
        return pending
    print(f"[3/5] prediction through the model contract ({cfg.eval_set} set, probabilities kept)", flush=True)
    thresholds = [float(t) for t in (cfg.thresholds or _default_thresholds())]
    thresholds = sorted(thresholds)
    where = {t: predict_arm(cfg, plan, t) for t in cfg.trainers}
    print(f"[4/5] evaluation: {len(thresholds)} thresholds + argmax + model output per arm", flush=True)
    records = {t: evaluate_arm(cfg, plan, t, where[t], thresholds) for t in cfg.trainers}
    cases = sorted(records[cfg.trainers[0]])
    for t in cfg.trainers[1:]:
        if sorted(records[t]) != cases:
            raise RuntimeError(f"{t} was evaluated on other cases than {cfg.trainers[0]}")
    print("[5/5] report and paired bootstrap", flush=True)
    small = bin_name(*cfg.bins[0])
    summaries = {t: arm_summary(records[t], thresholds) for t in cfg.trainers}
    idx = bootstrap_indices(len(cases), cfg.n_bootstrap, cfg.seed)
    ref_arrays = {op: statistic_arrays(summaries[cfg.trainers[0]]["_per_op"][op], small) for op in OPERATING_POINTS}
    ref_counts = summaries[cfg.trainers[0]]["operating_points"]["model"]
    n_small = ref_counts["bins"][small]["ref_lesions"]
    report = _report_header(cfg, plan, thresholds, cases, ref_counts)
    for t in cfg.trainers:
        s = summaries[t]
        mdir = _model_dir(plan, cfg, t)
        stored, pp = _arm_contract(mdir, cfg.folds)
        b = trained_budget(mdir / f"fold_{cfg.folds[0]}")
        trained_now = [f for (tt, f, _) in plan.to_train if tt == t]
        if t in plan.cascades:
            if not plan.cascades[t].trained:
                trained_now = list(cfg.folds)
            raters, cons = cascade_arm.models(cfg.dataset, cfg.folds)
            model = {"cascade": {"raters": raters, "consensus": cons}}
        else:
            model = _model_ref(plan, cfg, t, cfg.folds).to_json()
        report["arms"][t] = {
            "model": model,
            "model_dir": str(mdir), "stored_threshold": stored, "postprocessing": pp,
            "training": (f"trained now (folds {trained_now})" if trained_now else "reused (trained before)")
                        + (f", {b['epochs']} epochs x {b['iterations']} iterations" if b else ""),
            "operating_points": s["operating_points"], "threshold_gap": s["threshold_gap"], "points": s["points"]}
        if t != cfg.trainers[0]:
            report["differences"][t] = {
                op: paired_differences(statistic_arrays(s["_per_op"][op], small), ref_arrays[op], idx)
                for op in OPERATING_POINTS}
            report["sentences"][t] = difference_sentence(t, cfg.trainers[0], report["differences"][t]["model"],
                                                         len(cases), n_small, small)
    if cfg.soft_reference is not None:
        calib = {t: [records[t][c]["calibration"] for c in cases] for t in cfg.trainers}
        report["calibration"] = {"soft_reference": str(Path(cfg.soft_reference).resolve()), "arms": {
            t: {m: float(v[0]) for m, v in calibration_on_indices(calib[t], np.arange(len(cases))[None]).items()}
            for t in cfg.trainers}, "differences": {
            t: paired_calibration(calib[t], calib[cfg.trainers[0]], idx) for t in cfg.trainers[1:]}}
    report["files"] = {"markdown": str(report_dir / "report.md"), "json": str(report_dir / "report.json"),
                       "curves": str(report_dir / "curves.png")}
    report["seconds"] = round(time.time() - t0, 1)
    plot_curves(report, report_dir / "curves.png", records)
    write_markdown(report, report_dir / "report.md")
    _write_json(report_dir / "report.json", report)
    print(format_table(report))
    for t in cfg.trainers[1:]:
        print(report["sentences"][t])
    print(f"report: {report_dir / 'report.md'} (+ report.json, curves.png); {report['seconds']:.0f} s", flush=True)
    return report


def _default_thresholds() -> list[float]:
    from nnunet_ext.metrics.grid import threshold_grid

    return threshold_grid(extremes=True)


def _report_header(cfg: CompareConfig, plan: _Plan, thresholds, cases, ref_counts) -> dict:
    small_bins = [bin_name(*b) for b in cfg.bins]
    budget_env = " ".join(f"{k}={v}" for k, v in cfg.training_env.items())
    cmds = [cfg.command_line or ("nnunet-ext compare " + " ".join(shlex.quote(x) for x in _compare_argv(cfg)))]
    for t in cfg.trainers:
        if cascade_arm.is_cascade(t):
            cmds.append((budget_env + " " if budget_env else "") + f"nnunet-ext consensus train -d {cfg.dataset} --stage "
                        f"all -c {cfg.configuration} -tr {cascade_arm.stage_trainer(t)} -p {cfg.plans} -f "
                        f"{' '.join(map(str, cfg.folds))} -device {cfg.device}")
            continue
        for f in cfg.folds:
            cmds.append((budget_env + " " if budget_env else "") + f"nnUNetv2_train {_arm_dataset(plan, cfg, t)} {cfg.configuration} {f} "
                        f"-tr {_arm_trainer(t)} -p {cfg.plans} -device {cfg.device}")
    for t in cfg.trainers:
        if cascade_arm.is_cascade(t):
            cmds.append(f"nnunet-ext consensus predict -d {cfg.dataset} -i {cfg.test_images} -o "
                        f"{_arm_folder(plan, t) / 'test'} -device {cfg.device} --save_probabilities"
                        + (" --disable_tta" if cfg.disable_tta else "") + f" (consensus folds {list(cfg.folds)})")
            continue
        if cfg.test_images is not None:
            cmds.append(f"nnunet-ext predict -i {cfg.test_images} -o {_arm_folder(plan, t) / 'test'} "
                        f"-d {_arm_dataset(plan, cfg, t)} "
                        f"-c {cfg.configuration} -tr {_arm_trainer(t)} -p {cfg.plans} -f {' '.join(map(str, cfg.folds))} "
                        f"-device {cfg.device} --save_probabilities" + (" --disable_tta" if cfg.disable_tta else ""))
        else:
            for f in cfg.folds:
                cmds.append(f"nnunet-ext predict -i {plan.report / 'inputs' / f'fold_{f}'} -o "
                            f"{plan.report / 'arms' / t / 'validation' / f'fold_{f}'} -d {cfg.dataset} -c "
                            f"{cfg.configuration} -tr {t} -p {cfg.plans} -f {f} -device {cfg.device} --save_probabilities"
                            + (" --disable_tta" if cfg.disable_tta else ""))
    if cfg.budget:
        bd = ", ".join(f"{k} {v}" for k, v in cfg.budget.items()) + \
            f" ({' '.join(f'{BUDGET_ENV[k]}={v}' for k, v in cfg.budget.items())}) for every arm"
    else:
        bd = "each trainer's own (nnU-Net default: 1000 epochs x 250 iterations)"
    return {
        "dataset": plan.name, "configuration": cfg.configuration, "plans": cfg.plans, "folds": list(cfg.folds),
        "trainers": list(cfg.trainers), "eval_set": cfg.eval_set,
        "eval_set_description": (f"test images {cfg.test_images}, labels {cfg.test_labels}, ensemble of folds "
                                 f"{list(cfg.folds)}" if cfg.test_images is not None else
                                 f"the validation cases of folds {list(cfg.folds)}, each predicted by its fold's model"),
        "n_cases": len(cases), "cases": cases, "bins": small_bins,
        "reference_lesions": {b: ref_counts["bins"][b]["ref_lesions"] for b in small_bins},
        "budget": cfg.budget, "budget_description": bd, "device": cfg.device, "train_seed": cfg.train_seed,
        "mirroring": not cfg.disable_tta,
        "split_file": str(plan.pre / plan.name / "splits_final.json"),
        "split": {str(f): plan.split[f] for f in cfg.folds}, "thresholds": list(thresholds),
        "connectivity": cfg.connectivity,
        "bootstrap": {"resamples": cfg.n_bootstrap, "seed": cfg.seed, "level": 0.95, "method": "percentile, paired cases"},
        "notes": list(plan.notes), "commands": cmds, "arms": {}, "differences": {}, "sentences": {},
    }


def _seed_text(seed) -> str:
    if seed is None:
        return "none (nnU-Net's unseeded training)"
    return f"{seed} (NNUNET_EXT_SEED: the same seed gives the same weights on the same device)"


def _compare_argv(cfg: CompareConfig) -> list[str]:
    a = ["-d", str(cfg.dataset), "-c", cfg.configuration, "-tr", *cfg.trainers, "-f", *map(str, cfg.folds),
         "-p", cfg.plans, "-device", cfg.device]
    if cfg.test_images is not None:
        a += ["--test-images", str(cfg.test_images), "--test-labels", str(cfg.test_labels)]
    for k in ("epochs", "iterations", "val_iterations", "train_seed"):
        if getattr(cfg, k) is not None:
            a += [f"--{k.replace('_', '-')}", str(getattr(cfg, k))]
    if cfg.soft_reference:
        a += ["--soft-reference", str(cfg.soft_reference)]
    if cfg.output:
        a += ["-o", str(cfg.output)]
    return a
