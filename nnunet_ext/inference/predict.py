"""``nnunet-ext predict``: nnU-Net's prediction with everything a model needs beyond its weights.

Model selection as ``nnUNetv2_predict`` (``-d -c -tr -p -f -chk``); the model's contract
(nnunet_ext.inference.contract) decides the condition (``--cohort`` for SCIN models), TTA aggregation, the soft
output, the threshold (the Dice-optimal validation threshold stored with soft models, else nnU-Net's
argmax) and the post-processing (minimum lesion size, ``--min-lesion-mm3`` overrides it). Writes for every
case ``<out>/<case>.nii.gz`` (mask), ``<out>/soft/<case>.nii.gz`` (soft lesion map, float32) and, with
``keep_probabilities``, nnU-Net's ``<case>.npz``; all in the input's geometry; and
``<out>/nnunet_ext_predict.json``. Runs in-process through nnunet_ext.inference.predictor, the one predictor.
"""
from __future__ import annotations

import json
from pathlib import Path


def model_folder(dataset, configuration: str, trainer: str, plans: str) -> Path:
    from nnunet_ext.nnunet_adapter import model_folder as folder

    return folder(dataset, trainer, plans, configuration)


def available_folds(mdir: Path, checkpoint: str) -> list:
    folds = sorted((p.name[5:] for p in mdir.glob("fold_*") if (p / checkpoint).is_file()),
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
    if not folds:
        raise FileNotFoundError(f"no fold of {mdir} has {checkpoint}")
    return [int(f) if f.isdigit() else f for f in folds]


def predict(input_dir, output_dir, dataset, configuration: str, trainer: str = "nnUNetTrainer",
            plans: str = "nnUNetPlans", folds=None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
            disable_tta: bool = False, keep_probabilities: bool = False, n_proc: int = 1,
            cohort: str | None = None, npp: int | None = None, nps: int | None = None,
            min_lesion_mm3: float | None = None, threshold: float | None = None) -> dict:
    from nnunet_ext.inference.predictor import predict_cases

    mdir = model_folder(dataset, configuration, trainer, plans)
    folds = available_folds(mdir, checkpoint) if folds is None else list(folds)
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found")
    from nnunet_ext.core.safety import check_output_not_input

    # predict only adds its files to -o: an input below -o (the consensus cascade's own scratch) is fine
    check_output_not_input(output_dir, [input_dir, mdir], allow_containing=True, what="-o (output folder)")
    summary = predict_cases(mdir, folds, str(input_dir), output_dir, checkpoint=checkpoint, device=device,
                            cohort=cohort, disable_tta=disable_tta, save_probabilities=keep_probabilities,
                            threshold=threshold, min_lesion_mm3=min_lesion_mm3, npp=npp or n_proc, nps=nps or n_proc)
    out = Path(output_dir)
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(out / "nnunet_ext_predict.json", json.dumps(summary, indent=1))
    return summary
