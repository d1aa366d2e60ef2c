"""The one predictor: nnU-Net's ``nnUNetPredictor`` honouring a model's contract (nnunet_ext.inference.contract).

Every command that predicts (``nnunet-ext predict``, submissions, the consensus cascade, pseudo-labelling,
comparisons, the demo) calls :func:`predict_cases`. What it adds to nnU-Net's predictor:

* **condition**: the condition of each case is set on the network while nnU-Net iterates over the
  preprocessed cases -- the original voxel spacing from the image header (FiLM), or the requested cohort
  (SCIN);
* **TTA aggregation**: nnU-Net averages the logits of the flips (``mean_logits``); ``mean_probabilities``
  averages their softmax probabilities instead (same network passes);
* **outputs**, made inside nnU-Net's own export workers from the probabilities in the input geometry (no
  probability file is written and read back unless asked for): ``<out>/<case><ending>`` the mask (the soft
  lesion map at the model's threshold, or nnU-Net's argmax; then predicted lesions smaller than
  ``min_lesion_mm3`` removed), ``<out>/soft/<case><ending>`` the soft lesion map (float32; SoftSeg's
  normalized ReLU for SoftSeg models), optionally nnU-Net's ``<case>.npz``/``.pkl``, the voxel entropy map
  ``<out>/<case>_entropy<ending>`` and the rows of ``lesions.csv`` / ``cases.csv`` (``uncertainty``,
  ``lesion_table``: nnunet_ext.inference.uncertainty, .lesion_table); every file is written to
  a temporary name and renamed, so an interrupted run leaves no half-written output;
* an optional per-case hook (a picklable callable: a module-level function or a ``functools.partial`` of one,
  e.g. pseudo-labelling's confidence filter) called in
  the export worker with the case's class probabilities (``(1 - q, q)`` of the soft map for SoftSeg models).

SoftSeg models (activation ``normalized_relu``) get a forward hook on the network: every forward pass (one
sliding-window patch, one flip) returns its own normalized ReLU, as in training (nnunet_ext.networks.activations).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import torch

from nnunet_ext.inference.contract import (TTA_MODES, ModelContract, load_contract, postprocess,  # noqa: F401
                                           resolve_threshold)
from nnunet_ext.inference.options import PredictOptions, predict_options
from nnunet_ext.inference.thresholds import soft_output


def final_mask(soft, seg, threshold, spacing_zyx, postprocessing: dict) -> np.ndarray:
    """The model's mask of one case: the soft lesion map at ``threshold`` (nnU-Net's segmentation ``seg`` when
    there is no threshold or no soft map), post-processed by the contract's rule
    (:func:`nnunet_ext.inference.contract.postprocess`)."""
    if threshold is not None and soft is not None:
        mask = (soft >= threshold).astype(np.uint8)
    else:
        mask = np.asarray(seg).astype(np.uint8 if np.max(seg) < 255 else np.uint16)
    return postprocess(mask, spacing_zyx, postprocessing)


def _write(array: np.ndarray, properties: dict, path: str, compression_level: int = 1) -> None:
    """Write ``array`` in the case's original geometry (atomic). gzip level 1: the float maps of
    pseudo-labelling and the soft maps compress nearly as well and several times faster than the default."""
    import SimpleITK as sitk

    stuff = properties["sitk_stuff"]
    if len(stuff["spacing"]) == 2:
        array = array[0]
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(stuff["spacing"])
    img.SetOrigin(stuff["origin"])
    img.SetDirection(stuff["direction"])
    from nnunet_ext.core.io import write_sitk

    write_sitk(img, path, True, compression_level)


def export_with_contract(options: dict, predicted_logits, properties: dict, configuration_manager, plans_manager,
                         dataset_json, output_file_truncated: str, save_probabilities: bool = False,
                         num_threads_torch: int = 1) -> dict:
    """nnU-Net's export step with the contract applied (runs in nnU-Net's export workers)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    if isinstance(dataset_json, str):
        dataset_json = json.loads(Path(dataset_json).read_text())
    lm = plans_manager.get_label_manager(dataset_json)
    seg, prob = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, lm, properties, return_probabilities=True,
        num_threads_torch=num_threads_torch)
    del predicted_logits
    ending = dataset_json["file_ending"]
    out = Path(output_file_truncated)
    case = out.name
    soft = soft_output(prob, options["activation"]) if prob.shape[0] == 2 else None
    if soft is not None and options["activation"] != "softmax":
        hook_prob = np.stack([1 - soft, soft])  # the model's class probabilities under its activation
    else:
        hook_prob = prob
    mask = final_mask(soft, seg, options["threshold"], properties["spacing"],
                      {"min_lesion_mm3": options["min_lesion_mm3"], "connectivity": options["connectivity"]})
    if options.get("hook") is not None:
        options["hook"](case=case, probabilities=hook_prob, mask=mask, properties=properties,
                        **options.get("hook_args", {}))
    extra = {}
    if options.get("uncertainty") or options.get("lesion_table"):
        # voxel entropy of the class probabilities (and the per-lesion rows) from this case's flip-averaged
        # prediction: no extra network pass (nnunet_ext.inference.uncertainty, .lesion_table)
        from nnunet_ext.inference.lesion_table import ENTROPY_SUFFIX, export_extras

        ent, extra = export_extras(case, hook_prob, mask, properties, options["connectivity"],
                                   bool(options.get("lesion_table")))
        if options.get("uncertainty"):
            _write(ent, properties, str(out.parent / f"{case}{ENTROPY_SUFFIX}{ending}"))
        del ent
    if options["save_probabilities"] or save_probabilities:
        import pickle

        from nnunet_ext.core.safety import atomic_output, atomic_write_bytes

        with atomic_output(out.with_name(f"{case}.npz")) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=prob)
        atomic_write_bytes(out.with_name(f"{case}.pkl"), pickle.dumps(properties))
    if soft is not None and options["write_soft"]:
        _write(soft.astype(np.float32), properties, str(out.parent / "soft" / f"{case}{ending}"))
    if options["write_mask"]:
        _write(mask, properties, str(out.parent / f"{case}{ending}"))
    return {"case": case, "lesion_voxels": int((mask > 0).sum()), **extra}


def predictor_class():
    """nnU-Net's predictor with the contract's condition and TTA aggregation (built lazily: importing this
    module does not import nnU-Net's inference code)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ext.networks.conditional_norm import cohort_table_of_state_dict, condition_state, spacing_condition

    class ExtPredictor(nnUNetPredictor):
        contract: ModelContract = ModelContract()
        cohort_slot: int | None = None

        def use_contract(self, contract: ModelContract, cohort: str | None = None) -> None:
            from nnunet_ext.networks.activations import add_output_activation
            from nnunet_ext.networks.cohorts import slot_of

            self.contract = contract
            if getattr(self, "_activation_hook", None) is not None:
                self._activation_hook.remove()
            # SoftSeg: each forward pass (one sliding-window patch) returns its own normalized ReLU, as in training
            self._activation_hook = add_output_activation(self.network, contract.activation)
            state = condition_state(self.network)
            kind = None if state is None else state.kind
            if kind != contract.condition:
                raise ValueError(f"the model's network is conditioned on {kind!r}, its contract says "
                                 f"{contract.condition!r}")
            if kind != "cohort":
                if cohort is not None:
                    raise ValueError("--cohort applies to cohort-conditioned (SCIN) models; this model is "
                                     + ("conditioned on each image's voxel spacing" if kind else "not conditioned"))
                return
            tables = {tuple(cohort_table_of_state_dict(p)) for p in self.list_of_parameters}
            if len(tables) != 1:
                raise ValueError(f"the folds of this model disagree on their cohort tables: {sorted(tables)}")
            table = list(tables.pop())
            if cohort is None:
                raise ValueError(f"this SCIN model predicts in the labelling style of one cohort: pass --cohort NAME, "
                                 f"one of {[n for n in table if n]}")
            self.cohort_slot = slot_of(table, cohort)

        def _condition(self, properties: dict) -> torch.Tensor:
            if self.contract.condition == "cohort":
                return torch.tensor([self.cohort_slot], dtype=torch.long)
            return spacing_condition([properties["spacing"]])

        def _conditioned(self, data_iterator):
            state = condition_state(self.network)
            try:
                for item in data_iterator:
                    state.set(self._condition(item["data_properties"]))
                    yield item
            finally:
                state.clear()

        def _manage_input_and_output_lists(self, *args, **kwargs):
            from nnunet_ext.core.progress import VERBOSE, verbosity

            with contextlib.redirect_stdout(io.StringIO()) if verbosity() < VERBOSE else contextlib.nullcontext():
                lists = super()._manage_input_and_output_lists(*args, **kwargs)
            self._n_cases = len(lists[0])  # the cases this call predicts (after nnU-Net's overwrite filter)
            return lists

        def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                       num_processes_segmentation_export: int = 2):
            if self.contract.condition is not None:
                data_iterator = self._conditioned(data_iterator)
            total, self._n_cases = getattr(self, "_n_cases", None), None
            if not total:
                return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                          num_processes_segmentation_export)
            # a progress bar (plain lines off a terminal) instead of nnU-Net's five lines per case, which
            # --verbose keeps
            from nnunet_ext.core.progress import VERBOSE, verbosity

            data_iterator = _counted(data_iterator, total, sys.stdout, getattr(self, "show_progress", True))
            quiet = contextlib.redirect_stdout(io.StringIO()) if verbosity() < VERBOSE else contextlib.nullcontext()
            with quiet:
                return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                          num_processes_segmentation_export)

        def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
            if self.contract.tta == "mean_logits" or self.contract.activation != "softmax":
                # (a normalized-ReLU network already returns its activation: nnU-Net's mean of the flips is
                # the mean of the activation's outputs, whichever TTA mode)
                return super()._internal_maybe_mirror_and_predict(x)
            import itertools

            if self.label_manager is not None and self.label_manager.has_regions:
                raise NotImplementedError("tta=mean_probabilities supports softmax (label) models, not region models")
            axes = self.allowed_mirroring_axes if self.use_mirroring else None
            prob = torch.softmax(self.network(x).float(), 1)
            n = 1
            if axes:
                axes = [a + 2 for a in axes]
                for combo in itertools.chain.from_iterable(itertools.combinations(axes, k) for k in range(1, len(axes) + 1)):
                    prob += torch.flip(torch.softmax(self.network(torch.flip(x, combo)).float(), 1), combo)
                    n += 1
            # nnU-Net blends tiles and folds by averaging what this returns: log-probabilities, whose softmax
            # is the normalised geometric mean over tiles/folds of the flip-averaged probabilities
            return torch.log((prob / n).clamp(min=1e-8))

    return ExtPredictor


def _counted(data_iterator, total: int, stream, enabled: bool = True):
    """``data_iterator``'s items; a case counts as predicted when the next one is asked for (``enabled``
    False: no progress output, nnU-Net's ``--disable_progress_bar``)."""
    from nnunet_ext.core.progress import step

    k = 0
    for item in data_iterator:
        yield item
        k += 1
        ofile = item.get("ofile") if isinstance(item, dict) else None
        step("predict", k, total, enabled, item=os.path.basename(ofile) if ofile else None, stream=stream)


def _cpu_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count()))


def load_predictor(model_dir, folds, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
                   cohort: str | None = None, disable_tta: bool = False, tta: str | None = None,
                   step_size: float = 0.5):
    """An :class:`ExtPredictor` of a trained model folder with its contract applied (``step_size``: the
    sliding window's step as a fraction of the patch, nnU-Net's ``-step_size``)."""
    model_dir = Path(model_dir)
    if not 0 < step_size <= 1:
        raise ValueError(f"-step_size must be in (0, 1], got {step_size}")
    for f in folds:
        ck = model_dir / f"fold_{f}" / checkpoint
        if not ck.is_file():
            raise FileNotFoundError(f"{ck} not found (train fold {f}, or choose folds with -f)")
    from nnunet_ext.nnunet_adapter import ensure_ext_trainer_path

    ensure_ext_trainer_path()  # nnU-Net rebuilds the network through the trainer class named in the checkpoint
    contract = load_contract(model_dir, folds, checkpoint)
    if tta is not None:
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        contract.tta = tta
    dev = torch.device(device)
    _cpu_threads(dev)
    p = predictor_class()(tile_step_size=float(step_size), use_gaussian=True, use_mirroring=not disable_tta,
                          perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                          allow_tqdm=False)
    from nnunet_ext.core.progress import VERBOSE, verbosity

    try:  # nnU-Net's trainer search prints a line per module it inspects: only with --verbose
        with contextlib.redirect_stdout(io.StringIO()) if verbosity() < VERBOSE else contextlib.nullcontext():
            p.initialize_from_trained_model_folder(str(model_dir), tuple(folds), checkpoint)
    except (RuntimeError, EOFError, OSError, KeyError) as e:  # unreadable/incompatible checkpoint
        raise ValueError(f"cannot load the model in {model_dir} (folds {list(folds)}, {checkpoint}): "
                         f"{type(e).__name__}: {e}") from None
    p.use_contract(contract, cohort)
    from nnunet_ext.preprocessing.native import use_native_preprocessing

    use_native_preprocessing(p)  # native-resolution plans: new cases are not resampled either
    return p


def predict_cases(model_dir, folds, inputs, output_dir, options: PredictOptions | dict | None = None, *,
                  checkpoint: str = "checkpoint_final.pth", hook=None, hook_args: dict | None = None,
                  predictor=None, case_ids: list[str] | None = None, **fields) -> dict:
    """Predict ``inputs`` (an input folder in nnU-Net's naming, or a list of per-case file lists) into
    ``output_dir`` with the model in ``model_dir`` (its ``folds`` and ``checkpoint``) and its contract.
    ``options``: :class:`nnunet_ext.inference.options.PredictOptions` (or a dict of its fields), or its fields as
    keywords (``npp`` / ``nps`` default to 2 here). ``threshold`` / ``min_lesion_mm3``
    override the contract's. With ``overwrite=False`` cases whose mask exists are skipped (resumption).
    ``case_ids`` names the outputs of a list of per-case file lists (default: nnU-Net's naming of the first
    file, ``<case>_0000<ending>`` -> ``<case>``; challenge layouts name their files otherwise).
    ``uncertainty`` also writes ``<out>/<case>_entropy<ending>``, the voxel entropy of the predicted class
    distribution (float32, nats; nnunet_ext.inference.uncertainty); ``lesion_table`` writes
    ``<out>/lesions.csv`` and ``<out>/cases.csv`` for the cases this call predicts
    (nnunet_ext.inference.lesion_table; ``lesions_part<K>of<N>.csv`` / ``cases_part<K>of<N>.csv`` for one of
    ``num_parts`` > 1 parts).
    As ``nnUNetv2_predict``: ``step_size`` (sliding window), ``num_parts`` / ``part_id`` (this call predicts
    every ``num_parts``-th case from ``part_id`` on, in nnU-Net's order), ``prev_stage_predictions`` (the
    folder of the previous stage's masks, ``<case><ending>``: cascade configurations need it),
    ``progress=False`` (no progress output); ``overwrite=False`` is ``--continue_prediction``.
    Returns a summary (cases, threshold and its source, post-processing)."""
    from nnunet_ext.nnunet_adapter import export_function

    o = predict_options(options, fields, "predict_cases")  # the fields are checked here (ValueError naming one)
    npp, nps = o.processes(2)
    model_dir, out = Path(model_dir), Path(output_dir)
    from nnunet_ext.core.checks import check_model_inputs

    check_model_inputs(model_dir, inputs)  # every input image whole, finite, 3-D, the model's channels: before any work
    if predictor is None:
        predictor = load_predictor(model_dir, folds, checkpoint, o.device, o.cohort, o.disable_tta, o.tta,
                                   o.step_size)
    contract = predictor.contract
    predictor.show_progress = bool(o.progress)
    prev_files = _check_prev_stage(predictor, inputs, o.prev_stage_predictions)
    if (o.uncertainty or o.lesion_table) and predictor.label_manager.has_regions:
        raise NotImplementedError("--uncertainty / --lesion-table with a region-based (sigmoid per region) model: "
                                  "they need a class distribution per voxel")
    if hook is not None and not callable(hook):
        raise TypeError(f"hook must be a callable (a module-level function or a functools.partial of one), "
                        f"got {hook!r}")
    th, th_source = resolve_threshold(model_dir, folds, contract, o.threshold)
    pp = dict(contract.postprocessing)
    if o.min_lesion_mm3 is not None:
        pp["min_lesion_mm3"] = float(o.min_lesion_mm3)
    export = {"activation": contract.activation, "threshold": th, "min_lesion_mm3": pp["min_lesion_mm3"],
              "connectivity": pp["connectivity"], "save_probabilities": o.save_probabilities,
              "write_soft": o.write_soft, "write_mask": o.write_mask, "hook": hook, "hook_args": hook_args or {},
              "uncertainty": bool(o.uncertainty), "lesion_table": bool(o.lesion_table)}
    num_parts, part_id = int(o.num_parts), int(o.part_id)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(inputs, (list, tuple)):
        ids = _case_ids(inputs, predictor.dataset_json["file_ending"]) if case_ids is None else list(case_ids)
        if len(ids) != len(inputs) or len(set(ids)) != len(ids):
            raise ValueError(f"case_ids must name each of the {len(inputs)} cases once, got {ids}")
        truncated = [str(out / c) for c in ids]
        source = [[str(f) for f in files] for files in inputs]
    else:
        source, truncated = str(inputs), str(out)
    with export_function(functools.partial(export_with_contract, export)):
        exported = predictor.predict_from_files(source, truncated, save_probabilities=False, overwrite=o.overwrite,
                                                num_processes_preprocessing=npp, num_processes_segmentation_export=nps,
                                                folder_with_segs_from_prev_stage=prev_files, num_parts=num_parts,
                                                part_id=part_id)
    ending = predictor.dataset_json["file_ending"]
    from nnunet_ext.inference.lesion_table import ENTROPY_SUFFIX, tables_from_export, write_lesion_tables

    from nnunet_ext.core.safety import parse_temporary

    names = {p.name[:-len(ending)] for p in out.glob(f"*{ending}") if parse_temporary(p.name) is None}
    cases = sorted(c for c in names  # entropy maps beside their masks are no cases
                   if not (c.endswith(ENTROPY_SUFFIX) and c[:-len(ENTROPY_SUFFIX)] in names))
    summary = {"model": str(model_dir), "folds": list(folds), "cases": cases, "condition": contract.condition,
               "cohort": o.cohort, "activation": contract.activation, "tta": contract.tta, "threshold": th,
               "threshold_source": th_source, "postprocessing": {**pp}, "contract": contract.source}
    if o.uncertainty:
        from nnunet_ext.inference.uncertainty import DEFINITION

        summary["uncertainty"] = {"files": f"<case>{ENTROPY_SUFFIX}{ending}", "definition": DEFINITION}
    if o.lesion_table:
        part = "" if num_parts == 1 else f"_part{part_id}of{num_parts}"  # parts: one table each
        lesions_csv, cases_csv = write_lesion_tables(out, *tables_from_export(exported), part=part)
        summary["lesion_table"] = {"lesions": str(lesions_csv), "cases": str(cases_csv)}
    return summary


def _check_prev_stage(predictor, inputs, prev_stage_predictions) -> str | None:
    """The previous stage's folder for nnU-Net (None for a model without one), after checking that a cascade
    model gets it, that others do not, and that it holds every input case's mask."""
    prev_name = predictor.configuration_manager.previous_stage_name
    if prev_name is None:
        if prev_stage_predictions is not None:
            raise ValueError("-prev_stage_predictions applies to cascade configurations (3d_cascade_fullres); this "
                             "model's configuration has no previous stage")
        return None
    if prev_stage_predictions is None:
        raise ValueError(f"this model is a cascade stage: pass -prev_stage_predictions, the folder of its previous "
                         f"stage's ({prev_name}) predictions of these cases")
    folder = Path(prev_stage_predictions)
    if not folder.is_dir():
        raise FileNotFoundError(f"-prev_stage_predictions {folder}: folder not found")
    ending = predictor.dataset_json["file_ending"]
    # nnU-Net finds a case's previous-stage mask by its first input file's name without _0000<ending>
    if isinstance(inputs, (list, tuple)):
        ids = [os.path.basename(files[0])[:-(len(ending) + 5)] for files in inputs]
    else:
        from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

        ids = get_identifiers_from_splitted_dataset_folder(str(inputs), ending)
    missing = [c for c in ids if not (folder / f"{c}{ending}").is_file()]
    if missing:
        raise FileNotFoundError(f"-prev_stage_predictions {folder}: no {missing[0]}{ending} (the previous stage's "
                                f"prediction of case {missing[0]}; {len(missing)} case(s) missing)")
    return str(folder)


def _case_ids(inputs, ending: str) -> list[str]:
    ids = []
    for files in inputs:
        name = Path(files[0]).name
        if not name.endswith(ending):
            raise ValueError(f"{files[0]}: expected a file ending in {ending}")
        stem = name[:-len(ending)]
        ids.append(stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem)
    return ids
