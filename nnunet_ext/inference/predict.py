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


# the keywords of earlier versions of predict, and the PredictOptions fields they set
_ALIASES = {"keep_probabilities": lambda v: {"save_probabilities": bool(v)},
            "continue_prediction": lambda v: {"overwrite": not v}}
_MODEL_FIELDS = ("dataset", "configuration", "trainer", "plans", "folds", "checkpoint")


def predict(input_dir, output_dir, model=None, *positional, options=None, n_proc: int = 1, **fields) -> dict:
    """``nnunet-ext predict``: predict ``input_dir`` into ``output_dir`` with ``model`` (a
    :class:`nnunet_ext.nnunet_adapter.ModelRef`, or its ``to_json()`` dict; or its fields ``dataset``,
    ``configuration``, ``trainer``, ``plans``, ``folds``, ``checkpoint`` as keywords) and
    ``options`` (:class:`nnunet_ext.inference.options.PredictOptions`, a dict of its fields, or its fields as
    keywords; ``keep_probabilities`` / ``continue_prediction`` are ``save_probabilities`` / ``not overwrite``).
    ``npp`` / ``nps`` default to ``n_proc``. The positional form of earlier versions,
    ``predict(input_dir, output_dir, dataset, configuration[, trainer, plans, folds, checkpoint])``, still works.
    Writes ``nnunet_ext_predict.json`` (one file per part) and
    returns the summary of :func:`nnunet_ext.inference.predictor.predict_cases`."""
    from nnunet_ext.inference.options import predict_options
    from nnunet_ext.inference.predictor import predict_cases
    from nnunet_ext.nnunet_adapter import ModelRef

    if positional or not (model is None or isinstance(model, (ModelRef, dict))):  # the earlier positional form
        if len(positional) > len(_MODEL_FIELDS) - 1:
            raise TypeError(f"predict() takes at most {len(_MODEL_FIELDS) + 2} positional arguments")
        clash = sorted(set(_MODEL_FIELDS[:len(positional) + 1]) & set(fields))
        if clash:
            raise TypeError(f"predict() got multiple values for {clash}")
        fields.update(zip(_MODEL_FIELDS, (model,) + positional))
        model = None
    given = {k: fields.pop(k) for k in _MODEL_FIELDS if k in fields}
    if model is None:
        if "dataset" not in given or "configuration" not in given:
            raise TypeError("predict() needs model (a ModelRef) or dataset and configuration")
        model = ModelRef(str(given.pop("dataset")), given.pop("configuration"), **given)
    elif given:
        raise TypeError(f"predict() got model and its fields {sorted(given)}: give one of them")
    ref = ModelRef.from_json(model, "model") if isinstance(model, dict) else model
    o = predict_options(options, fields, "predict", _ALIASES)
    ref = ref.with_folds(ref.folds)
    mdir, folds = ref.folder(), list(ref.folds)
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found")
    from nnunet_ext.core.safety import check_output_not_input

    # predict only adds its files to -o: an input below -o (the consensus cascade's own scratch) is fine
    check_output_not_input(output_dir, [input_dir, mdir], allow_containing=True, what="-o (output folder)")
    npp, nps = o.processes(n_proc)
    summary = predict_cases(mdir, folds, str(input_dir), output_dir, o, checkpoint=ref.checkpoint, npp=npp, nps=nps)
    out = Path(output_dir)
    from nnunet_ext.core.safety import atomic_write_text

    name = ("nnunet_ext_predict.json" if o.num_parts == 1
            else f"nnunet_ext_predict_part{o.part_id}of{o.num_parts}.json")
    atomic_write_text(out / name, json.dumps(summary, indent=1))
    return summary
