"""Lesion-wise metrics of nnU-Net's validation predictions, written beside nnU-Net's ``summary.json``.

nnU-Net's end-of-training validation (and ``nnUNetv2_train ... --val``) writes the predictions of a fold's
validation cases to ``fold_k/validation/<case><ending>`` and a Dice-only ``summary.json``;
:func:`write_fold_lesion_metrics` adds ``fold_k/validation/lesion_summary.json`` with the lesion-wise
evaluation (:func:`nnunet_ext.metrics.evaluate.evaluate_folders`) of those cases against nnU-Net's
``nnUNet_preprocessed/<dataset>/gt_segmentations``. ``nnunet-ext lesion-metrics`` runs it for any trained
model; our trainers call it at the end of training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from nnunet_ext.metrics.cases import list_cases
from nnunet_ext.nnunet_adapter import ModelRef

SUMMARY_FILE = "lesion_summary.json"


def write_fold_lesion_metrics(fold_dir, gt_dir, file_ending: str = ".nii.gz", **rule_options) -> dict:
    """Evaluate ``fold_dir/validation/*<file_ending>`` against ``gt_dir`` (same case names) and write
    ``fold_dir/validation/lesion_summary.json`` (plus its ``.csv``); returns the result.

    ``rule_options`` are :func:`~nnunet_ext.metrics.evaluate.evaluate_folders` keywords (``preset``,
    ``connectivity``, ``detection``, ``bins``, ``size_unit``, ``symmetric``, ``counting``, ``label``; default ``label=1``,
    the lesion label of an nnU-Net dataset). Only the cases predicted in the validation folder are scored.
    A missing folder, no validation prediction, or a prediction without reference is a clear error."""
    from nnunet_ext.metrics.evaluate import evaluate_folders

    fold_dir, gt_dir = Path(fold_dir), Path(gt_dir)
    val = fold_dir / "validation"
    if not val.is_dir():
        raise FileNotFoundError(f"no validation folder {val}: run nnUNetv2_train ... --val for this fold first")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"reference folder not found: {gt_dir}")
    preds = list_cases(val, file_ending)
    if not preds:
        raise FileNotFoundError(f"no validation predictions (*{file_ending}) in {val}")
    refs = list_cases(gt_dir, file_ending)
    lacking = [c for c in preds if c not in refs]
    if lacking:
        raise FileNotFoundError(f"no reference {gt_dir / (lacking[0] + file_ending)} for validation case {lacking[0]}")
    known = {"preset", "connectivity", "min_overlap", "bins", "detection", "size_unit", "symmetric", "counting", "label",
             "num_workers", "isbi_rater_score"}
    unknown = sorted(set(rule_options) - known)
    if unknown:
        raise ValueError(f"write_fold_lesion_metrics: unknown option(s) {unknown}; known: {sorted(known)}")
    opts = {"label": 1, **rule_options}
    res = evaluate_folders(gt_dir, val, val / SUMMARY_FILE, file_ending=file_ending, cases=sorted(preds),
                           progress=False, check_label="label" in rule_options, **opts)
    return res


def gt_folder(dataset) -> Path:
    """nnU-Net's copy of the training labels: ``$nnUNet_preprocessed/<Dataset>/gt_segmentations``."""
    from nnunet_ext.nnunet_adapter import preprocessed_folder

    d = preprocessed_folder(dataset) / "gt_segmentations"
    if not d.is_dir():
        raise FileNotFoundError(f"no reference folder {d}: run nnUNetv2_plan_and_preprocess for this dataset")
    return d


def file_ending_of(model_dir) -> str:
    p = Path(model_dir) / "dataset.json"
    if not p.is_file():
        raise FileNotFoundError(f"no {p}: not an nnU-Net model folder")
    return json.loads(p.read_text()).get("file_ending", ".nii.gz")


def lesion_metrics_for_model(dataset, configuration: str, trainer: str, plans: str = "nnUNetPlans",
                             folds: Sequence = (0, 1, 2, 3, 4), **rule_options) -> dict:
    """:func:`write_fold_lesion_metrics` for each fold of a trained model; ``{fold: pooled summary}``."""
    md = ModelRef(str(dataset), configuration, trainer, plans).folder()
    gt, ending = gt_folder(dataset), file_ending_of(md)
    out = {}
    for f in folds:
        fd = md / f"fold_{f}"
        if not fd.is_dir():
            raise FileNotFoundError(f"no fold folder {fd}: train it with nnUNetv2_train {dataset} {configuration} {f} "
                                    f"-tr {trainer} -p {plans}")
        res = write_fold_lesion_metrics(fd, gt, ending, **rule_options)
        out[str(f)] = {"path": str(fd / "validation" / SUMMARY_FILE), "n_cases": res["aggregate"]["n_cases"],
                       "pooled": {k: v for k, v in res["aggregate"]["pooled"].items() if k != "bins"},
                       "bins": res["aggregate"]["pooled"]["bins"]}
    return out
