"""Prediction with what ``nnunet-ext select`` chose, single model or ensemble (``nnunet-ext predict --selection``).

``select`` may choose a pair of models whose probabilities are averaged (as ``nnUNetv2_ensemble`` does),
with a threshold and a minimum lesion size. A model contract describes one model, so an ensemble's choice
lives in the selection file ``$nnUNet_results/<Dataset>/nnunet_ext_selection.json`` (key ``best``). This
module turns that file into predictions:

* a single model: :func:`nnunet_ext.inference.predictor.predict_cases` with its contract (which ``select`` updated);
* an ensemble: every member predicts its soft lesion map through the one predictor (its condition, TTA and
  activation from its own contract; each member's own threshold and post-processing are not used), the maps
  are averaged voxel by voxel, and the ensemble's mask is ``mean >= threshold`` with predicted lesions
  smaller than ``min_lesion_mm3`` removed -- the same arithmetic ``select`` scored on the validation folds
  (:func:`nnunet_ext.workflows.selection._evaluate_candidate`).

Members must have softmax outputs: the selection was made on nnU-Net's validation softmax probabilities.
Outputs as ``nnunet-ext predict``: ``<out>/<case><ending>`` (mask), ``<out>/soft/<case><ending>`` (mean map,
float32) and ``<out>/nnunet_ext_predict.json``; with ``--uncertainty`` ``<out>/<case>_entropy<ending>``, the
binary entropy of the mean map, and with ``--lesion-table`` ``lesions.csv`` / ``cases.csv`` of the ensemble's
mask and mean map (nnunet_ext.inference.lesion_table). Member maps are written to a private folder beside the
output and removed at the end; an interrupted run leaves no half-written output file (every write is
atomic) and a re-run starts the members again.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext.inference.options import PredictOptions, predict_options, refuse_unsupported

SELECTION_FILE = "nnunet_ext_selection.json"


def selection_path(dataset) -> Path:
    """``$nnUNet_results/<Dataset>/nnunet_ext_selection.json``, where ``nnunet-ext select`` writes."""
    from nnunet_ext.nnunet_adapter import dataset_name

    root = os.environ.get("nnUNet_results")
    if not root:
        raise ValueError("nnUNet_results is not set; give the selection file with --selection FILE")
    return Path(root) / dataset_name(dataset) / SELECTION_FILE


def _selection_models(best: dict, dataset, folds, path: Path) -> list:
    """The chosen models of a selection file's ``best`` as ModelRefs: ``members`` holds model references
    (``ModelRef.to_json``), or, in files of earlier versions, ``Trainer__Plans__configuration`` names of
    ``dataset`` (the file's ``dataset``)."""
    from nnunet_ext.nnunet_adapter import ModelRef

    members = best["members"]
    if not isinstance(members, list) or not members:
        raise ValueError("members must be a non-empty list")
    refs = []
    for m in members:
        if isinstance(m, dict):
            refs.append(ModelRef.from_json(m, f"{path}: members"))
        else:  # names from a file are data, never paths (no '/', no '..'): checked by ModelRef
            refs.append(ModelRef.from_name(dataset, m, folds, where=str(path)))
    return refs


def read_selection(path, dataset=None) -> dict:
    """The choice in a selection file: ``models`` (ModelRefs, folds included), ``members`` (their
    ``Trainer__Plans__configuration`` names), ``folds``, ``threshold``, ``min_lesion_mm3``, ``connectivity``,
    ``metric``. Files of earlier versions (members as names) are read with ``dataset`` (default: the file's
    own). Raises ValueError naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        best = d["best"]
        folds = list(best["folds"])
        models = _selection_models(best, dataset if dataset is not None else d.get("dataset"), folds, path)
        choice = {"models": models, "members": [m.name for m in models], "folds": folds,
                  "threshold": float(best["threshold"]), "min_lesion_mm3": float(best["min_lesion_mm3"]),
                  "connectivity": int(best["connectivity"]), "metric": best.get("metric"), "selection": str(path)}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run `nnunet-ext select` first (or give --selection FILE)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a selection file written by `nnunet-ext select` "
                         f"({type(e).__name__}: {e})") from None
    if not 0 < choice["threshold"] < 1:
        raise ValueError(f"{path}: threshold must be in (0, 1), got {choice['threshold']}")
    if not (choice["min_lesion_mm3"] >= 0 and np.isfinite(choice["min_lesion_mm3"])):
        raise ValueError(f"{path}: min_lesion_mm3 must be a finite number >= 0, got {choice['min_lesion_mm3']}")
    return choice


def member_folders(choice: dict, results=None) -> list[Path]:
    """The members' model folders (:meth:`ModelRef.folder`; ``results``: the results folder when it is not
    ``$nnUNet_results``)."""
    out = []
    for m in choice["models"]:
        d = m.folder(must_exist=False, results=results)
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found: the selection {choice['selection']} names model {m.name}")
        out.append(d)
    return out


def _check_members(folders: Sequence[Path], folds, checkpoint: str) -> str:
    """Members must be softmax models without a cohort condition, with the same file ending; returns the
    ending."""
    from nnunet_ext.inference.contract import load_contract

    endings = set()
    for d in folders:
        c = load_contract(d, folds, checkpoint)
        if c.activation != "softmax":
            raise NotImplementedError(f"ensemble prediction with a {c.activation} model ({d.name}): selection scores "
                                      f"nnU-Net's softmax probabilities, so ensembles take softmax models only")
        if c.condition == "cohort":
            raise NotImplementedError(f"ensemble prediction with a cohort-conditioned model ({d.name}): the "
                                      f"selection file names no cohort; predict that model alone with --cohort")
        endings.add(json.loads((d / "dataset.json").read_text())["file_ending"])
    if len(endings) != 1:
        raise ValueError(f"the ensemble's models have different file endings {sorted(endings)}")
    return endings.pop()


def combine_soft_maps(maps: Sequence[np.ndarray], spacing_zyx, threshold: float, min_lesion_mm3: float,
                      connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """(mean map float32, uint8 mask): the voxel-wise mean of the members' soft lesion maps (z, y, x), the mask
    ``mean >= threshold`` without predicted lesions smaller than ``min_lesion_mm3`` (mm^3, ``spacing_zyx``)."""
    from nnunet_ext.inference.contract import postprocess

    if not maps:
        raise ValueError("combine_soft_maps needs at least one map")
    shapes = {np.shape(m) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"the members' soft maps have different shapes {sorted(shapes)}")
    mean = np.zeros(maps[0].shape, np.float64)
    for m in maps:
        mean += m
    mean /= len(maps)
    mask = postprocess((mean >= threshold).astype(np.uint8), spacing_zyx,
                       {"min_lesion_mm3": min_lesion_mm3, "connectivity": connectivity})
    return mean.astype(np.float32), mask


# the PredictOptions fields an ensemble applies (threshold and min_lesion_mm3 are required)
ENSEMBLE_FIELDS = ("device", "disable_tta", "npp", "nps", "write_soft", "progress", "uncertainty", "lesion_table",
                   "threshold", "min_lesion_mm3")


def predict_ensemble(folders: Sequence[Path], folds, inputs, output_dir, options: PredictOptions | dict | None = None,
                     *, connectivity: int = 26, checkpoint: str = "checkpoint_final.pth", case_ids=None,
                     **fields) -> dict:
    """Predict ``inputs`` (a folder in nnU-Net's naming, or per-case file lists with ``case_ids``) with the
    mean of the members' soft maps (module docstring). ``options``: :class:`PredictOptions` (or a dict, or its
    fields as keywords): ``threshold`` and ``min_lesion_mm3`` are required, the fields of
    :data:`ENSEMBLE_FIELDS` apply (``npp`` / ``nps`` default to 1), others are refused. ``uncertainty`` /
    ``lesion_table`` as in :func:`predict_cases`, from the mean map: the binary entropy of the members' mean
    lesion probability. Returns a summary like :func:`predict_cases`."""
    import SimpleITK as sitk

    from nnunet_ext.core.io import read_sitk, write_sitk
    from nnunet_ext.inference.predictor import predict_cases
    from nnunet_ext.core.progress import step
    from nnunet_ext.inference.lesion_table import ENTROPY_SUFFIX, Geometry, case_lesions, write_lesion_tables
    from nnunet_ext.inference.uncertainty import binary_entropy

    o = predict_options(options, fields, "predict_ensemble")
    refuse_unsupported(o, ENSEMBLE_FIELDS, "predict_ensemble")
    if o.threshold is None or o.min_lesion_mm3 is None:
        raise TypeError("predict_ensemble() needs threshold and min_lesion_mm3")
    threshold, min_lesion_mm3, uncertainty, lesion_table = o.threshold, o.min_lesion_mm3, o.uncertainty, o.lesion_table
    npp, nps = o.processes(1)
    progress = o.progress
    folders = [Path(d) for d in folders]
    lesion_rows, case_rows = [], []
    ending = _check_members(folders, folds, checkpoint)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.ensemble-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        member_out = []
        for i, d in enumerate(folders):
            mo = work / f"member_{i}"
            if progress:
                print(f"ensemble: member {i + 1}/{len(folders)} {d.name}", flush=True)
            predict_cases(d, folds, inputs, mo, checkpoint=checkpoint, device=o.device, disable_tta=o.disable_tta,
                          write_soft=True, write_mask=False, npp=npp, nps=nps, case_ids=case_ids)
            member_out.append(mo)
        cases = sorted(p.name[:-len(ending)] for p in (member_out[0] / "soft").glob(f"*{ending}"))
        for n, case in enumerate(cases, 1):
            imgs = [read_sitk(mo / "soft" / f"{case}{ending}") for mo in member_out]
            maps = [sitk.GetArrayFromImage(im) for im in imgs]
            spacing = tuple(float(s) for s in reversed(imgs[0].GetSpacing()))
            mean, mask = combine_soft_maps(maps, spacing, threshold, min_lesion_mm3, connectivity)
            ent = binary_entropy(mean) if uncertainty or lesion_table else None
            if lesion_table:
                rows, case_row = case_lesions(case, mask, mean, ent, Geometry.from_image(imgs[0]), connectivity)
                lesion_rows += rows
                case_rows.append(case_row)
            for arr, path in ((mean, out / "soft" / f"{case}{ending}"),
                              (ent if uncertainty else None, out / f"{case}{ENTROPY_SUFFIX}{ending}"),
                              (mask, out / f"{case}{ending}")):
                if (path.parent.name == "soft" and not o.write_soft) or arr is None:
                    continue
                img = sitk.GetImageFromArray(arr)
                img.CopyInformation(imgs[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                write_sitk(img, path)
            step("ensemble: combined", n, len(cases), progress, item=case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"model": [str(d) for d in folders], "folds": list(folds), "cases": cases, "condition": None,
               "activation": "softmax (mean of the members)", "threshold": float(threshold),
               "threshold_source": "selection (ensemble)",
               "postprocessing": {"min_lesion_mm3": float(min_lesion_mm3), "connectivity": int(connectivity)}}
    if uncertainty:
        summary["uncertainty"] = {"files": f"<case>{ENTROPY_SUFFIX}{ending}",
                                  "definition": "binary entropy (nats) of the members' mean lesion probability"}
    if lesion_table:
        lesions_csv, cases_csv = write_lesion_tables(out, lesion_rows, case_rows)
        summary["lesion_table"] = {"lesions": str(lesions_csv), "cases": str(cases_csv)}
    return summary


# the PredictOptions fields a selection applies
SELECTION_FIELDS = ("device", "disable_tta", "npp", "nps", "uncertainty", "lesion_table", "threshold",
                    "min_lesion_mm3")


def predict_selection(input_dir, output_dir, dataset, selection=None, options: PredictOptions | dict | None = None, *,
                      checkpoint: str = "checkpoint_final.pth", n_proc: int = 1, **fields) -> dict:
    """``nnunet-ext predict --selection``: predict with the model or ensemble of a selection file (default
    :func:`selection_path` of ``dataset``). ``options``: :class:`PredictOptions` (or a dict, or its fields as
    keywords; those of :data:`SELECTION_FIELDS` apply, ``npp`` / ``nps`` default to ``n_proc``).
    ``threshold`` / ``min_lesion_mm3`` override the selection's."""
    from nnunet_ext.inference.predictor import predict_cases

    o = predict_options(options, fields, "predict_selection")
    refuse_unsupported(o, SELECTION_FIELDS, "predict_selection")
    threshold, min_lesion_mm3 = o.threshold, o.min_lesion_mm3
    npp, nps = o.processes(n_proc)
    path = Path(selection) if selection is not None else selection_path(dataset)
    if os.environ.get("nnUNet_results"):
        choice = read_selection(path, dataset)
        folders = member_folders(choice)
    else:  # the models beside the selection file (select writes it into $nnUNet_results/<Dataset>/)
        choice = read_selection(path, path.parent.name)
        folders = member_folders(choice, path.parent.parent)
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found")
    from nnunet_ext.core.safety import check_output_not_input

    check_output_not_input(output_dir, [input_dir, *folders], allow_containing=True, what="-o (output folder)")
    folds = [f for f in choice["folds"] if f != "all"] or ["all"]
    th = choice["threshold"] if threshold is None else float(threshold)
    mm3 = choice["min_lesion_mm3"] if min_lesion_mm3 is None else float(min_lesion_mm3)
    chosen = replace(o, threshold=th, min_lesion_mm3=mm3, npp=npp, nps=nps)
    if len(folders) == 1:  # the selection's values, also when `select --no-contract` left the contract alone
        summary = predict_cases(folders[0], folds, str(input_dir), output_dir, chosen, checkpoint=checkpoint)
        summary["threshold_source"] = "selection" if threshold is None else "given"
    else:
        summary = predict_ensemble(folders, folds, str(input_dir), output_dir, chosen,
                                   connectivity=choice["connectivity"], checkpoint=checkpoint)
        if threshold is not None:
            summary["threshold_source"] = "given"
    summary["selection"] = str(path)
    out = Path(output_dir)
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(out / "nnunet_ext_predict.json", json.dumps(summary, indent=1))
    return summary
