"""``nnunet-ext predict``: nnU-Net's prediction with everything a model needs beyond its weights.

Model selection as ``nnUNetv2_predict`` (``-d -c -tr -p -f -chk``); the model's contract
(nnunet_ext.inference.contract) decides the condition (``--cohort`` for SCIN models), TTA aggregation, the soft
output, the threshold (the Dice-optimal validation threshold stored with soft models, else nnU-Net's
argmax) and the post-processing (minimum lesion size, ``--min-lesion-mm3`` overrides it). Writes for every
case ``<out>/<case>.nii.gz`` (mask), ``<out>/soft/<case>.nii.gz`` (soft lesion map, float32) and, with
``keep_probabilities``, nnU-Net's ``<case>.npz``; all in the input's geometry; and
``<out>/nnunet_ext_predict.json``. Runs in-process through nnunet_ext.inference.predictor, the one predictor.

``nnUNetv2_predict``'s options mean the same here: ``-step_size``, ``--continue_prediction`` (cases whose mask
exists are skipped), ``-num_parts`` / ``-part_id`` (each part writes ``nnunet_ext_predict_part<K>of<N>.json``),
``-prev_stage_predictions`` (cascade configurations), ``--disable_progress_bar``, and ``-npp`` / ``-nps``
defaulting to ``$nnUNet_npp`` / ``$nnUNet_nps``, else 3 (:func:`nnunet_default_processes`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def nnunet_default_processes(variable: str) -> int:
    """``nnUNetv2_predict``'s default for ``-npp`` (``variable="nnUNet_npp"``) or ``-nps`` (``"nnUNet_nps"``):
    the environment variable when it is set, else 3."""
    v = os.environ.get(variable)
    if v is None or v == "":
        return 3
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{variable} must be a whole number of processes, got {v!r}") from None


def predict(input_dir, output_dir, dataset, configuration: str, trainer: str = "nnUNetTrainer",
            plans: str = "nnUNetPlans", folds=None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
            disable_tta: bool = False, keep_probabilities: bool = False, n_proc: int = 1,
            cohort: str | None = None, npp: int | None = None, nps: int | None = None,
            min_lesion_mm3: float | None = None, threshold: float | None = None, uncertainty: bool = False,
            lesion_table: bool = False, step_size: float = 0.5, continue_prediction: bool = False,
            num_parts: int = 1, part_id: int = 0, prev_stage_predictions=None, progress: bool = True) -> dict:
    from nnunet_ext.inference.predictor import predict_cases

    from nnunet_ext.nnunet_adapter import ModelRef

    ref = ModelRef(str(dataset), configuration, trainer, plans, folds, checkpoint).with_folds(folds)
    mdir, folds = ref.folder(), list(ref.folds)
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found")
    from nnunet_ext.core.safety import check_output_not_input

    # predict only adds its files to -o: an input below -o (the consensus cascade's own scratch) is fine
    check_output_not_input(output_dir, [input_dir, mdir], allow_containing=True, what="-o (output folder)")
    summary = predict_cases(mdir, folds, str(input_dir), output_dir, checkpoint=checkpoint, device=device,
                            cohort=cohort, disable_tta=disable_tta, save_probabilities=keep_probabilities,
                            threshold=threshold, min_lesion_mm3=min_lesion_mm3, npp=npp or n_proc, nps=nps or n_proc,
                            uncertainty=uncertainty, lesion_table=lesion_table, step_size=step_size,
                            overwrite=not continue_prediction, num_parts=num_parts, part_id=part_id,
                            prev_stage_predictions=prev_stage_predictions, progress=progress)
    out = Path(output_dir)
    from nnunet_ext.core.safety import atomic_write_text

    name = "nnunet_ext_predict.json" if int(num_parts) == 1 else f"nnunet_ext_predict_part{part_id}of{num_parts}.json"
    atomic_write_text(out / name, json.dumps(summary, indent=1))
    return summary
