"""``nnunet-ext predict``: nnU-Net's prediction plus what our models learned beyond the weights.

Runs ``nnUNetv2_predict`` (same model selection flags) with probabilities, then writes for every case
``<out>/<case>.nii.gz`` (binary mask: the lesion probability at the Dice-optimal validation threshold stored
with the model, see nnunet_ext.thresholds; nnU-Net's argmax when the model has none) and
``<out>/soft/<case>.nii.gz`` (the soft output, float32: the lesion probability, or SoftSeg's normalized
ReLU for SoftSegTrainer models), both in the input's geometry.

Models with conditional instance norms (ResolutionFiLMTrainer, SCINTrainer) are recognised from their
checkpoint and run through nnunet_ext.conditioned_predict instead of ``nnUNetv2_predict`` (which cannot
supply the condition); SCIN models need ``cohort``, the cohort whose labelling style to predict in.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.io import write_image
from nnunet_ext.paths import nnunet_command, nnunet_env, run_logged
from nnunet_ext.thresholds import combined_threshold, soft_output


def model_folder(dataset, configuration: str, trainer: str, plans: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_results:
        raise RuntimeError("nnUNet_results is not set")
    d = Path(nnUNet_results) / maybe_convert_to_dataset_name(dataset) / f"{trainer}__{plans}__{configuration}"
    if not d.is_dir():
        raise FileNotFoundError(f"no trained model in {d}")
    return d


def model_condition(mdir: Path, folds, checkpoint: str) -> tuple[str | None, list[str]]:
    """(condition kind or None, cohort names) of a trained model, read from its first fold's checkpoint."""
    import torch

    from nnunet_ext.networks.conditional_norm import cohort_table_of_state_dict, kind_of_state_dict

    f = mdir / f"fold_{folds[0]}" / checkpoint
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found")
    weights = torch.load(f, map_location="cpu", weights_only=False)["network_weights"]
    return kind_of_state_dict(weights), [n for n in cohort_table_of_state_dict(weights) if n]


def predict(input_dir, output_dir, dataset, configuration: str, trainer: str = "nnUNetTrainer",
            plans: str = "nnUNetPlans", folds=None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
            disable_tta: bool = False, keep_probabilities: bool = False, n_proc: int = 1,
            cohort: str | None = None, npp: int | None = None, nps: int | None = None) -> dict:
    mdir = model_folder(dataset, configuration, trainer, plans)
    if folds is None:
        folds = sorted((p.name[5:] for p in mdir.glob("fold_*") if (p / checkpoint).is_file()),
                       key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
        folds = [int(f) if f.isdigit() else f for f in folds]
        if not folds:
            raise FileNotFoundError(f"no fold of {mdir} has {checkpoint}")
    kind, cohorts = model_condition(mdir, folds, checkpoint)
    if kind != "cohort" and cohort is not None:
        raise ValueError(f"--cohort applies to cohort-conditioned (SCIN) models; {trainer} is "
                         + ("conditioned on each image's voxel spacing" if kind else "not conditioned"))
    if kind == "cohort" and cohort is None:
        raise ValueError(f"{trainer} is cohort-conditioned: pass --cohort NAME (the labelling style to predict in), "
                         f"one of {cohorts}")
    if kind == "cohort" and cohort not in cohorts:
        raise ValueError(f"unknown cohort {cohort!r}; this model knows {cohorts}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["-i", str(input_dir), "-o", str(out), "-f", *map(str, folds), "-chk", checkpoint, "-device", device,
              "--save_probabilities", "-npp", str(npp or n_proc), "-nps", str(nps or n_proc)]
    if kind is None:
        cmd = [nnunet_command("nnUNetv2_predict"), *common, "-d", str(dataset), "-c", configuration, "-tr", trainer,
               "-p", plans]
    else:
        cmd = [sys.executable, "-m", "nnunet_ext.conditioned_predict", *common, "-m", str(mdir)]
        if cohort is not None:
            cmd += ["--cohort", cohort]
    if disable_tta:
        cmd.append("--disable_tta")
    run_logged(cmd, nnunet_env(None, n_proc), out / "nnunet_ext_predict.log")
    th = combined_threshold(mdir, folds)
    cases = sorted(p.name[:-4] for p in out.glob("*.npz"))
    ending = json.loads((mdir / "dataset.json").read_text())["file_ending"]
    for case in cases:
        with np.load(out / f"{case}.npz") as f:
            prob = soft_output(f["probabilities"], th["activation"] if th else "softmax")
        ref = sitk.ReadImage(str(out / f"{case}{ending}"))  # nnU-Net's mask: the input's geometry
        write_image(prob, (), out / "soft" / f"{case}{ending}", reference=ref)
        if th is not None:
            write_image((prob >= th["threshold"]).astype(np.uint8), (), out / f"{case}{ending}", reference=ref)
        if not keep_probabilities:
            os.remove(out / f"{case}.npz")
            pkl = out / f"{case}.pkl"
            if pkl.exists():
                os.remove(pkl)
    summary = {"model": str(mdir), "folds": list(folds), "cases": cases, "condition": kind, "cohort": cohort,
               "threshold": th["threshold"] if th else None,
               "threshold_source": f"validation of folds {th['folds']}" if th else "none stored: nnU-Net argmax"}
    (out / "nnunet_ext_predict.json").write_text(json.dumps(summary, indent=1))
    return summary
