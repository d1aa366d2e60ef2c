"""Lesion-aware model selection on nnU-Net's validation predictions (``nnunet-ext select``).

Chooses, on a lesion metric, three things at once, using **only** the validation folds' probabilities
(``fold_k/validation/<case>.npz``, key ``probabilities``, written by ``nnUNetv2_train ... --npz`` or
``--val --npz``) against nnU-Net's ``gt_segmentations``:

1. the model: each trained configuration/trainer, and every pair of them as an ensemble (probabilities
   averaged), as ``nnUNetv2_find_best_configuration`` does on Dice;
2. the probability threshold ``t`` (a voxel is lesion when ``p >= t``; 0.5 is nnU-Net's argmax for two
   classes);
3. the minimum lesion size in mm^3 (predicted components with a smaller volume are removed).

Metrics (pooled over all validation cases of the folds): ``lesion_f1`` (default), ``small_lesion_f1`` (F1
of the first size bin, 3-10 voxels by default), ``lesion_tpr``, ``lesion_ppv``, ``dice``. Ties go to a
single model, then the threshold closest to 0.5, then the smaller minimum size. The choice is written to
``$nnUNet_results/<Dataset>/nnunet_ext_selection.json`` and, when it is a single model, into that model's
contract (:func:`nnunet_ext.inference.contract.update_contract`: ``threshold``, ``postprocessing``), which the
predictor applies.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.io import read_image
from nnunet_ext.core.progress import step
from nnunet_ext.inference.contract import postprocess
from nnunet_ext.inference.ensemble import SELECTION_FILE
from nnunet_ext.metrics.cases import check_same_grid, list_cases, load_probabilities
from nnunet_ext.metrics.grid import threshold_grid
from nnunet_ext.metrics.lesions import (BIN_COUNTS, POOLED_COUNTS, LesionRule, _bin_key, _bin_rates, label_components,
                                        pooled_rates, rule_of, split_rule_fields)
from nnunet_ext.metrics.validation import file_ending_of, gt_folder
from nnunet_ext.nnunet_adapter import ModelRef

METRICS = ("lesion_f1", "small_lesion_f1", "lesion_tpr", "lesion_ppv", "dice")


def default_thresholds() -> list[float]:
    return threshold_grid()


def default_min_sizes_mm3() -> list[float]:
    return [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0]


@dataclass(frozen=True)
class SelectOptions:
    """What :func:`select` searches and writes besides the models and the lesion rule: the ``metric``
    (:data:`METRICS`), the ``thresholds`` and minimum lesion sizes ``min_sizes_mm3`` searched (default
    :func:`default_thresholds`, :func:`default_min_sizes_mm3`; 0.5 and 0 are always added), pair
    ``ensembles``, ``write_contract`` (a single chosen model's contract), ``output`` (the selection file;
    default ``$nnUNet_results/<Dataset>/nnunet_ext_selection.json``) and ``progress``."""
    metric: str = "lesion_f1"
    thresholds: tuple | None = None
    min_sizes_mm3: tuple | None = None
    ensembles: bool = True
    write_contract: bool = True
    output: object = None
    progress: bool = True

    def grids(self) -> tuple[list[float], list[float]]:
        """(thresholds with 0.5, minimum sizes with 0), sorted and checked."""
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        thresholds = sorted(float(t) for t in (self.thresholds if self.thresholds is not None else default_thresholds()))
        if not thresholds or thresholds[0] <= 0 or thresholds[-1] >= 1:
            raise ValueError(f"thresholds must be in (0, 1), got {thresholds}")
        if 0.5 not in thresholds:
            thresholds = sorted(thresholds + [0.5])  # nnU-Net's argmax, the baseline
        sizes = self.min_sizes_mm3 if self.min_sizes_mm3 is not None else default_min_sizes_mm3()
        min_sizes = sorted(float(m) for m in sizes)
        if not min_sizes or min_sizes[0] < 0 or not np.isfinite(min_sizes).all():
            raise ValueError(f"minimum lesion sizes must be finite numbers >= 0 (mm3), got {min_sizes}")
        if 0.0 not in min_sizes:
            min_sizes = [0.0] + min_sizes
        return thresholds, min_sizes


def validation_probabilities(model: ModelRef, model_dir: Path) -> dict[str, Path]:
    """``{case: npz}`` over the folds' validation folders; a fold without them is an error saying how to
    produce them."""
    out = {}
    for f in model.folds:
        val = Path(model_dir) / f"fold_{f}" / "validation"
        files = sorted(val.glob("*.npz")) if val.is_dir() else []
        if not files:
            raise FileNotFoundError(
                f"no validation probabilities (*.npz) in {val}: run 'nnUNetv2_train {model.dataset} "
                f"{model.configuration} {f} -tr {model.trainer} -p {model.plans} --val --npz' (or train with --npz)")
        for p in files:
            out[p.name[:-4]] = p
    return out


def _score(acc: dict, metric: str, small_bin: str) -> float:
    if metric == "small_lesion_f1":
        v = acc["bins"][small_bin]["lesion_f1"]
    else:
        v = acc[metric]
    return -1.0 if v is None else float(v)


def candidate_mask(prob: np.ndarray, threshold: float, spacing, min_lesion_mm3: float, connectivity: int,
                   labels=None) -> np.ndarray:
    """The mask ``select`` scores for a (mean) probability map: ``prob >= threshold``, post-processed as the
    predictor does (:func:`nnunet_ext.inference.contract.postprocess`; ``labels``: the components of
    ``prob >= threshold``, when computed already)."""
    return postprocess(prob >= threshold, spacing, {"min_lesion_mm3": min_lesion_mm3, "connectivity": connectivity},
                       labels=labels)


def _compact_labels(labels: np.ndarray, n: int, kept: np.ndarray) -> tuple[np.ndarray, int]:
    """The components of ``labels`` (``n`` of them) that lie in ``kept``, numbered 1..k (k returned)."""
    present = np.zeros(n + 1, bool)
    present[np.unique(labels[kept])] = True
    present[0] = False
    mapping = np.zeros(n + 1, np.int64)
    mapping[present] = np.arange(1, int(present.sum()) + 1)
    return mapping[labels], int(present.sum())


def _empty_grid(thresholds, min_sizes, bins) -> dict:
    return {(t, m): {k: 0 for k in POOLED_COUNTS} | {"bins": {_bin_key(b): {k: 0 for k in BIN_COUNTS} for b in bins}}
            for t in thresholds for m in min_sizes}


def _mean_probability(members: list[dict[str, Path]], refs: dict[str, Path], case: str) -> tuple:
    """(reference mask, spacing, mean lesion probability of the members) of one case."""
    ref_arr, spacing = read_image(refs[case])
    ref = ref_arr == 1
    prob = None
    for mem in members:
        p = load_probabilities(mem[case])
        check_same_grid(refs[case], ref.shape, spacing, mem[case], p.shape, spacing)
        prob = p.astype(np.float64) if prob is None else prob + p
    return ref, spacing, prob / len(members)


def _add_case(grid: dict, ref, spacing, prob, thresholds, min_sizes, rule: LesionRule) -> None:
    """Add one case's counts at every (threshold, min size) to ``grid``."""
    ref_labels = label_components(ref, rule.connectivity)
    n_ref = int(ref.sum())
    for t in thresholds:
        labels = label_components(prob >= t, rule.connectivity)  # once per threshold, for every min size
        for m in min_sizes:
            pred = candidate_mask(prob, t, spacing, m, rule.connectivity, labels)
            tp = int(np.count_nonzero(pred & ref))
            a = grid[(t, m)]
            a["voxel_tp"] += tp
            a["voxel_fp"] += int(np.count_nonzero(pred)) - tp
            a["voxel_fn"] += n_ref - tp
            lc = rule.counts(ref, pred, spacing, ref_labels=ref_labels,
                             pred_labels=_compact_labels(labels[0], labels[1], pred))
            for k in POOLED_COUNTS[3:]:
                a[k] += lc[k]
            for b in a["bins"]:
                for k in BIN_COUNTS:
                    a["bins"][b][k] += lc["bins"][b][k]


def _evaluate_candidate(members: list[dict[str, Path]], refs: dict[str, Path], thresholds, min_sizes,
                        rule: LesionRule, progress_label: str = "", progress: bool = False) -> dict:
    """Pooled counts and rates at every (threshold, min size) for the mean probability of ``members``."""
    grid = _empty_grid(thresholds, min_sizes, rule.bins)
    cases = sorted(members[0])
    for n, c in enumerate(cases, 1):
        _add_case(grid, *_mean_probability(members, refs, c), thresholds, min_sizes, rule)
        step(f"select {progress_label}", n, len(cases), progress)
    out = {}
    for key, a in grid.items():
        r = {**{k: a[k] for k in POOLED_COUNTS}, **pooled_rates(a)}
        r["bins"] = {b: _bin_rates(v) for b, v in a["bins"].items()}
        out[key] = r
    return out


def _models(dataset, configurations, trainers, plans: str, folds, gt: Path, output) -> list[dict]:
    """The models to select from (ModelRef, folder, validation probabilities, file ending), checked; the
    output checked before any work: never onto a model's or the references' files."""
    if not configurations or not trainers:
        raise ValueError("select needs at least one configuration (-c) and one trainer (-tr)")
    models = []
    for tr in trainers:
        for c in configurations:
            ref = ModelRef(str(dataset), c, tr, plans, folds)
            md = ref.folder()
            ref = ModelRef(md.parent.name, c, tr, plans, folds)  # stored with the dataset's name
            models.append({"ref": ref, "name": ref.name, "dir": md, "probs": validation_probabilities(ref, md),
                           "ending": file_ending_of(md)})
    if output is not None:
        from nnunet_ext.core.safety import check_output_file, check_output_not_input

        if not str(output).endswith(".json"):
            raise ValueError(f"-o/--output {output}: the selection file is JSON; give a path ending in .json")
        check_output_file(output, "-o/--output")
        check_output_not_input(output, [gt] + [m["dir"] for m in models], what="-o/--output")
    return models


def _common_cases(models: list[dict], refs: dict, gt: Path) -> set:
    for mdl in models:
        lacking = [c for c in mdl["probs"] if c not in refs]
        if lacking:
            raise FileNotFoundError(f"no reference {gt / (lacking[0] + mdl['ending'])} for validation case {lacking[0]}")
    common = set.intersection(*(set(m["probs"]) for m in models))
    if any(set(m["probs"]) != common for m in models):
        raise ValueError("the models' validation folds hold different cases; they must share nnU-Net's split "
                         "(splits_final.json) and folds")
    return common


def _table(candidates, refs, thresholds, min_sizes, rule: LesionRule, o: "SelectOptions") -> tuple:
    """(table rows, best row, argmax row per candidate) over every candidate, threshold and min size."""
    small_bin = _bin_key(tuple(rule.bins)[0])
    table, best, argmax = [], None, {}
    for cand in candidates:
        name = " + ".join(m["name"] for m in cand)
        res = _evaluate_candidate([m["probs"] for m in cand], refs, thresholds, min_sizes, rule, name, o.progress)
        for (t, m), r in res.items():
            row = {"model": name, "members": [m_["name"] for m_ in cand], "threshold": t, "min_lesion_mm3": m,
                   "score": _score(r, o.metric, small_bin), "lesion_f1": r["lesion_f1"],
                   "small_lesion_f1": r["bins"][small_bin]["lesion_f1"], "lesion_tpr": r["lesion_tpr"],
                   "lesion_ppv": r["lesion_ppv"], "dice": r["dice"], "ref_lesions": r["ref_lesions"],
                   "pred_lesions": r["pred_lesions"]}
            table.append(row)
            key = (row["score"], -len(cand), -abs(t - 0.5), -m)
            if best is None or key > best[0]:
                best = (key, row, cand)
        a = res[(0.5, 0.0)]
        argmax[name] = {"threshold": 0.5, "min_lesion_mm3": 0.0, "lesion_f1": a["lesion_f1"],
                        "small_lesion_f1": a["bins"][small_bin]["lesion_f1"], "dice": a["dice"],
                        "score": _score(a, o.metric, small_bin)}
    return table, best[1], best[2], argmax, small_bin


def _write_chosen_contract(chosen: dict, model: dict, result: dict) -> None:
    """A single chosen model: its threshold and post-processing into its contract."""
    from nnunet_ext.inference.contract import contract_path, load_contract, update_contract

    md, ck_folds = model["dir"], [f for f in model["ref"].folds if f != "all"] or None
    if load_contract(md, ck_folds).activation != "softmax":
        raise ValueError(f"{md}: the model's soft output is not softmax, but nnU-Net's validation .npz holds "
                         f"softmax probabilities; selection applies to softmax models only")
    update_contract(md, folds=ck_folds, threshold=float(chosen["threshold"]),
                    postprocessing={"min_lesion_mm3": float(chosen["min_lesion_mm3"]),
                                    "connectivity": int(chosen["connectivity"])})
    result["contract_written"] = str(contract_path(md))


def select(dataset, configurations: Sequence[str], trainers: Sequence[str], plans: str = "nnUNetPlans",
           folds: Sequence = (0, 1, 2, 3, 4), rule: LesionRule | None = None, options: SelectOptions | None = None,
           **fields) -> dict:
    """Select model (or pair ensemble), threshold and minimum lesion size on validation predictions only
    (module docstring). ``rule``: the :class:`LesionRule` (or its fields as keywords: ``connectivity``,
    ``detection``, ``bins``, ...); ``options``: :class:`SelectOptions` (or its fields as keywords). Returns
    the full table and ``best`` (its ``members``: the chosen models as ModelRefs, ``ModelRef.to_json``);
    writes the selection JSON and, for a single model, its contract."""
    from nnunet_ext.core.validate import options_of

    rule_fields, rest = split_rule_fields(fields)
    rule = rule_of(rule, rule_fields, "select")
    o = options_of(SelectOptions, options, rest, "select")
    thresholds, min_sizes = o.grids()
    folds = [int(f) if str(f) != "all" else "all" for f in folds]
    gt = gt_folder(dataset)
    models = _models(dataset, configurations, trainers, plans, folds, gt, o.output)
    refs = list_cases(gt, models[0]["ending"])
    common = _common_cases(models, refs, gt)
    candidates = [[m] for m in models]
    if o.ensembles and len(models) > 1:
        candidates += [list(p) for p in itertools.combinations(models, 2)]
    table, row, cand, argmax, small_bin = _table(candidates, refs, thresholds, min_sizes, rule, o)
    chosen = dict(row, members=[m["ref"].to_json() for m in cand], connectivity=rule.connectivity,
                  detection=rule.detection.text(), metric=o.metric, folds=folds, n_cases=len(common))
    result = {"dataset": str(dataset), "metric": o.metric, "folds": folds, "thresholds": thresholds,
              "min_sizes_mm3": min_sizes, "connectivity": rule.connectivity, "detection": rule.detection.text(),
              "small_bin": small_bin, "n_validation_cases": len(common), "best": chosen,
              "argmax": argmax[chosen["model"]], "argmax_per_model": argmax, "table": table,
              "contract_written": None}
    if o.write_contract and len(cand) == 1:
        _write_chosen_contract(chosen, cand[0], result)
    elif o.write_contract:
        result["note"] = ("the best candidate is an ensemble: its threshold and minimum size are in this file "
                          "only; a model contract describes one model")
    out = Path(o.output) if o.output is not None else models[0]["dir"].parent / SELECTION_FILE
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1, default=str))
    result["output"] = str(out)
    return result


def format_selection(result: dict) -> str:
    b, a = result["best"], result["argmax"]
    fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"selected on {result['n_validation_cases']} validation cases of folds {result['folds']} "
             f"(metric {result['metric']}):",
             f"  {b['model']}: threshold {b['threshold']:g}, minimum lesion size {b['min_lesion_mm3']:g} mm3 -> "
             f"lesion F1 {fmt(b['lesion_f1'])}, small-lesion F1 {fmt(b['small_lesion_f1'])}, Dice {fmt(b['dice'])}",
             f"  argmax (threshold 0.5, no size filter) of that model: lesion F1 {fmt(a['lesion_f1'])}, "
             f"small-lesion F1 {fmt(a['small_lesion_f1'])}, Dice {fmt(a['dice'])}"]
    if result.get("contract_written"):
        lines.append(f"  written into the model contract {result['contract_written']}")
    elif result.get("note"):
        lines.append(f"  {result['note']}")
    lines.append(f"  table: {result.get('output')}")
    return "\n".join(lines)
