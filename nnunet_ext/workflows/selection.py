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
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.core.io import read_image
from nnunet_ext.core.progress import step
from nnunet_ext.metrics.cases import check_same_grid, list_cases, load_probabilities
from nnunet_ext.metrics.lesions import (BIN_COUNTS, DEFAULT_BINS, POOLED_COUNTS, _bin_key, _bin_rates,
                                        check_connectivity, label_components, lesion_counts, parse_detection,
                                        pooled_rates, voxel_volume)
from nnunet_ext.metrics.validation import file_ending_of, gt_folder, model_folder

METRICS = ("lesion_f1", "small_lesion_f1", "lesion_tpr", "lesion_ppv", "dice")
SELECTION_FILE = "nnunet_ext_selection.json"


def default_thresholds() -> list[float]:
    return [round(float(t), 2) for t in np.arange(0.05, 0.951, 0.05)]


def default_min_sizes_mm3() -> list[float]:
    return [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0]


def validation_probabilities(model_dir: Path, folds: Sequence, dataset, configuration: str, trainer: str,
                             plans: str) -> dict[str, Path]:
    """``{case: npz}`` over the folds' validation folders; a fold without them is an error saying how to
    produce them."""
    out = {}
    for f in folds:
        val = Path(model_dir) / f"fold_{f}" / "validation"
        files = sorted(val.glob("*.npz")) if val.is_dir() else []
        if not files:
            raise FileNotFoundError(
                f"no validation probabilities (*.npz) in {val}: run 'nnUNetv2_train {dataset} {configuration} {f} "
                f"-tr {trainer} -p {plans} --val --npz' (or train with --npz)")
        for p in files:
            out[p.name[:-4]] = p
    return out


def _score(acc: dict, metric: str, small_bin: str) -> float:
    if metric == "small_lesion_f1":
        v = acc["bins"][small_bin]["lesion_f1"]
    else:
        v = acc[metric]
    return -1.0 if v is None else float(v)


def _evaluate_candidate(members: list[dict[str, Path]], refs: dict[str, Path], thresholds, min_sizes, connectivity,
                        rule, bins, progress_label: str = "", progress: bool = False) -> dict:
    """Pooled counts at every (threshold, min size) for the mean probability of ``members``."""
    grid = {(t, m): {k: 0 for k in POOLED_COUNTS} | {"bins": {_bin_key(b): {k: 0 for k in BIN_COUNTS} for b in bins}}
            for t in thresholds for m in min_sizes}
    cases = sorted(members[0])
    for n, c in enumerate(cases, 1):
        ref_arr, spacing = read_image(refs[c])
        ref = ref_arr == 1
        prob = None
        for mem in members:
            p = load_probabilities(mem[c])
            check_same_grid(refs[c], ref.shape, spacing, mem[c], p.shape, spacing)
            prob = p.astype(np.float64) if prob is None else prob + p
        prob /= len(members)
        ref_labels = label_components(ref, connectivity)
        n_ref = int(ref.sum())
        vox = voxel_volume(spacing)
        for t in thresholds:
            mask = prob >= t
            pl, npred = label_components(mask, connectivity)
            vol = np.bincount(pl.ravel(), minlength=npred + 1) * vox
            for m in min_sizes:
                keep = ~(vol < m)
                keep[0] = False
                mapping = np.zeros(npred + 1, np.int64)
                mapping[keep] = np.arange(1, int(keep.sum()) + 1)
                pl_m = mapping[pl]
                pred = pl_m > 0
                tp = int(np.count_nonzero(pred & ref))
                a = grid[(t, m)]
                a["voxel_tp"] += tp
                a["voxel_fp"] += int(np.count_nonzero(pred)) - tp
                a["voxel_fn"] += n_ref - tp
                lc = lesion_counts(ref, pred, connectivity, bins=bins, ref_labels=ref_labels,
                                   pred_labels=(pl_m, int(keep.sum())), detection=rule)
                for k in POOLED_COUNTS[3:]:
                    a[k] += lc[k]
                for b in a["bins"]:
                    for k in BIN_COUNTS:
                        a["bins"][b][k] += lc["bins"][b][k]
        step(f"select {progress_label}", n, len(cases), progress)
    out = {}
    for key, a in grid.items():
        r = {**{k: a[k] for k in POOLED_COUNTS}, **pooled_rates(a)}
        r["bins"] = {b: _bin_rates(v) for b, v in a["bins"].items()}
        out[key] = r
    return out


def select(dataset, configurations: Sequence[str], trainers: Sequence[str], plans: str = "nnUNetPlans",
           folds: Sequence = (0, 1, 2, 3, 4), metric: str = "lesion_f1", thresholds: Sequence[float] | None = None,
           min_sizes_mm3: Sequence[float] | None = None, connectivity: int = 26, detection=None,
           bins: Sequence = DEFAULT_BINS, ensembles: bool = True, write_contract: bool = True, output=None,
           progress: bool = True) -> dict:
    """Select model (or pair ensemble), threshold and minimum lesion size on validation predictions only
    (module docstring). Returns the full table and ``best``; writes the selection JSON and, for a single
    model, its contract."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_connectivity(connectivity)
    rule = parse_detection(detection)
    thresholds = sorted(float(t) for t in (thresholds if thresholds is not None else default_thresholds()))
    if not thresholds or thresholds[0] <= 0 or thresholds[-1] >= 1:
        raise ValueError(f"thresholds must be in (0, 1), got {thresholds}")
    if 0.5 not in thresholds:
        thresholds = sorted(thresholds + [0.5])  # nnU-Net's argmax, the baseline
    min_sizes = sorted(float(m) for m in (min_sizes_mm3 if min_sizes_mm3 is not None else default_min_sizes_mm3()))
    if not min_sizes or min_sizes[0] < 0 or not np.isfinite(min_sizes).all():
        raise ValueError(f"minimum lesion sizes must be finite numbers >= 0 (mm3), got {min_sizes}")
    if 0.0 not in min_sizes:
        min_sizes = [0.0] + min_sizes
    folds = [int(f) if str(f) != "all" else "all" for f in folds]
    if not configurations or not trainers:
        raise ValueError("select needs at least one configuration (-c) and one trainer (-tr)")
    gt = gt_folder(dataset)
    models = []
    for tr in trainers:
        for c in configurations:
            md = model_folder(dataset, c, tr, plans)
            ending = file_ending_of(md)
            probs = validation_probabilities(md, folds, dataset, c, tr, plans)
            models.append({"name": f"{tr}__{plans}__{c}", "dir": md, "probs": probs, "ending": ending})
    if output is not None:  # checked before any work: never onto a model's or the references' files
        from nnunet_ext.core.safety import check_output_file, check_output_not_input

        if not str(output).endswith(".json"):
            raise ValueError(f"-o/--output {output}: the selection file is JSON; give a path ending in .json")
        check_output_file(output, "-o/--output")
        check_output_not_input(output, [gt] + [m["dir"] for m in models], what="-o/--output")
    refs = list_cases(gt, models[0]["ending"])
    for mdl in models:
        lacking = [c for c in mdl["probs"] if c not in refs]
        if lacking:
            raise FileNotFoundError(f"no reference {gt / (lacking[0] + mdl['ending'])} for validation case {lacking[0]}")
    common = set.intersection(*(set(m["probs"]) for m in models))
    if any(set(m["probs"]) != common for m in models):
        raise ValueError("the models' validation folds hold different cases; they must share nnU-Net's split "
                         "(splits_final.json) and folds")
    candidates = [[m] for m in models]
    if ensembles and len(models) > 1:
        candidates += [list(p) for p in itertools.combinations(models, 2)]
    small_bin = _bin_key(tuple(bins)[0])
    table, best, argmax = [], None, {}
    for cand in candidates:
        name = " + ".join(m["name"] for m in cand)
        res = _evaluate_candidate([m["probs"] for m in cand], refs, thresholds, min_sizes, connectivity, rule,
                                  tuple(bins), name, progress)
        for (t, m), r in res.items():
            row = {"model": name, "members": [m_["name"] for m_ in cand], "threshold": t, "min_lesion_mm3": m,
                   "score": _score(r, metric, small_bin), "lesion_f1": r["lesion_f1"],
                   "small_lesion_f1": r["bins"][small_bin]["lesion_f1"], "lesion_tpr": r["lesion_tpr"],
                   "lesion_ppv": r["lesion_ppv"], "dice": r["dice"], "ref_lesions": r["ref_lesions"],
                   "pred_lesions": r["pred_lesions"]}
            table.append(row)
            key = (row["score"], -len(cand), -abs(t - 0.5), -m)
            if best is None or key > best[0]:
                best = (key, row)
        a = res[(0.5, 0.0)]
        argmax[name] = {"threshold": 0.5, "min_lesion_mm3": 0.0, "lesion_f1": a["lesion_f1"],
                        "small_lesion_f1": a["bins"][small_bin]["lesion_f1"], "dice": a["dice"],
                        "score": _score(a, metric, small_bin)}
    chosen = dict(best[1], connectivity=connectivity, detection=rule.text(), metric=metric, folds=folds,
                  n_cases=len(common))
    result = {"dataset": str(dataset), "metric": metric, "folds": folds, "thresholds": thresholds,
              "min_sizes_mm3": min_sizes, "connectivity": connectivity, "detection": rule.text(),
              "small_bin": small_bin, "n_validation_cases": len(common), "best": chosen,
              "argmax": argmax[chosen["model"]], "argmax_per_model": argmax, "table": table,
              "contract_written": None}
    if write_contract:
        if len(chosen["members"]) == 1:
            from nnunet_ext.inference.contract import load_contract, update_contract

            md = next(m["dir"] for m in models if m["name"] == chosen["members"][0])
            ck_folds = [f for f in folds if f != "all"] or None
            if load_contract(md, ck_folds).activation != "softmax":
                raise ValueError(f"{md}: the model's soft output is not softmax, but nnU-Net's validation .npz holds "
                                 f"softmax probabilities; selection applies to softmax models only")
            update_contract(md, folds=ck_folds, threshold=float(chosen["threshold"]),
                            postprocessing={"min_lesion_mm3": float(chosen["min_lesion_mm3"]),
                                            "connectivity": int(connectivity)})
            result["contract_written"] = str(md / "nnunet_ext_model.json")
        else:
            result["contract_written"] = None
            result["note"] = ("the best candidate is an ensemble: its threshold and minimum size are in this file "
                              "only; a model contract describes one model")
    out = Path(output) if output is not None else Path(os.environ["nnUNet_results"]) / models[0]["dir"].parent.name / SELECTION_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
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
