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
  normalized ReLU for SoftSeg models), optionally nnU-Net's ``<case>.npz``/``.pkl``; every file is written to
  a temporary name and renamed, so an interrupted run leaves no half-written output;
* an optional per-case hook (a module-level function, e.g. pseudo-labelling's confidence filter) called in
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
import uuid
from pathlib import Path

import numpy as np
import torch

from nnunet_ext.inference.contract import TTA_MODES, ModelContract, load_contract
from nnunet_ext.inference.thresholds import combined_threshold, soft_output


def remove_small_lesions(mask: np.ndarray, spacing_zyx, min_mm3: float, connectivity: int = 26) -> np.ndarray:
    """``mask`` (z, y, x; label values kept) without the predicted lesions (connected components of its
    foreground) smaller than ``min_mm3``; 0 keeps everything (nnunet_ext.metrics.lesions)."""
    if not min_mm3 > 0:
        return mask
    from nnunet_ext.metrics.lesions import remove_small_lesions as keep_large

    return (mask * keep_large(mask > 0, spacing_zyx, min_mm3, connectivity)).astype(mask.dtype)


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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}_{p.name}")
    try:
        sitk.WriteImage(img, str(tmp), True, compression_level)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    threshold = options["threshold"]
    if threshold is not None and soft is not None:
        mask = (soft >= threshold).astype(np.uint8)
    else:
        mask = np.asarray(seg).astype(np.uint8 if np.max(seg) < 255 else np.uint16)
    mask = remove_small_lesions(mask, properties["spacing"], options["min_lesion_mm3"], options["connectivity"])
    if options.get("hook"):
        import importlib

        mod, fn = options["hook"].split(":")
        getattr(importlib.import_module(mod), fn)(case=case, probabilities=hook_prob, mask=mask,
                                                  properties=properties, **options.get("hook_args", {}))
    if options["save_probabilities"] or save_probabilities:
        import pickle

        tmp = out.with_name(f".tmp_{os.getpid()}_{case}.npz")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=prob)
        os.replace(tmp, out.with_name(f"{case}.npz"))
        with open(out.with_name(f"{case}.pkl"), "wb") as f:
            pickle.dump(properties, f)
    if soft is not None and options["write_soft"]:
        _write(soft.astype(np.float32), properties, str(out.parent / "soft" / f"{case}{ending}"))
    if options["write_mask"]:
        _write(mask, properties, str(out.parent / f"{case}{ending}"))
    return {"case": case, "lesion_voxels": int((mask > 0).sum())}


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

            data_iterator = _counted(data_iterator, total, sys.stdout)
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


def _counted(data_iterator, total: int, stream):
    """``data_iterator``'s items; a case counts as predicted when the next one is asked for."""
    from nnunet_ext.core.progress import step

    k = 0
    for item in data_iterator:
        yield item
        k += 1
        ofile = item.get("ofile") if isinstance(item, dict) else None
        step("predict", k, total, item=os.path.basename(ofile) if ofile else None, stream=stream)


def _cpu_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count()))


def load_predictor(model_dir, folds, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
                   cohort: str | None = None, disable_tta: bool = False, tta: str | None = None):
    """An :class:`ExtPredictor` of a trained model folder with its contract applied."""
    model_dir = Path(model_dir)
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
    p = predictor_class()(tile_step_size=0.5, use_gaussian=True, use_mirroring=not disable_tta,
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


def resolve_threshold(model_dir, folds, contract: ModelContract, override: float | None = None):
    """(threshold or None for argmax, its source) for the folds in use."""
    if override is not None:
        if not 0 < override < 1:
            raise ValueError(f"threshold must be in (0, 1), got {override}")
        return float(override), "given"
    if contract.threshold is None:
        return None, "none: nnU-Net argmax"
    if contract.threshold == "stored":
        th = combined_threshold(model_dir, folds)
        if th is None:
            return None, "none stored: nnU-Net argmax"
        return th["threshold"], f"validation of folds {th['folds']}"
    return float(contract.threshold), "model contract"


def predict_cases(model_dir, folds, inputs, output_dir, *, checkpoint: str = "checkpoint_final.pth",
                  device: str = "cuda", cohort: str | None = None, disable_tta: bool = False, tta: str | None = None,
                  save_probabilities: bool = False, write_soft: bool = True, write_mask: bool = True,
                  threshold: float | None = None, min_lesion_mm3: float | None = None, npp: int = 2, nps: int = 2,
                  overwrite: bool = True, hook: str | None = None, hook_args: dict | None = None,
                  predictor=None, case_ids: list[str] | None = None) -> dict:
    """Predict ``inputs`` (an input folder in nnU-Net's naming, or a list of per-case file lists) into
    ``output_dir`` with the model in ``model_dir`` and its contract. ``threshold`` / ``min_lesion_mm3``
    override the contract's. With ``overwrite=False`` cases whose mask exists are skipped (resumption).
    ``case_ids`` names the outputs of a list of per-case file lists (default: nnU-Net's naming of the first
    file, ``<case>_0000<ending>`` -> ``<case>``; challenge layouts name their files otherwise).
    Returns a summary (cases, threshold and its source, post-processing)."""
    from nnunet_ext.nnunet_adapter import export_function

    model_dir, out = Path(model_dir), Path(output_dir)
    from nnunet_ext.core.checks import check_model_inputs

    check_model_inputs(model_dir, inputs)  # every input image whole, finite, 3-D, the model's channels: before any work
    if predictor is None:
        predictor = load_predictor(model_dir, folds, checkpoint, device, cohort, disable_tta, tta)
    contract = predictor.contract
    th, th_source = resolve_threshold(model_dir, folds, contract, threshold)
    pp = dict(contract.postprocessing)
    if min_lesion_mm3 is not None:
        if not min_lesion_mm3 >= 0 or min_lesion_mm3 == float("inf"):
            raise ValueError(f"min_lesion_mm3 must be a finite number >= 0, got {min_lesion_mm3}")
        pp["min_lesion_mm3"] = float(min_lesion_mm3)
    options = {"activation": contract.activation, "threshold": th, "min_lesion_mm3": pp["min_lesion_mm3"],
               "connectivity": pp["connectivity"], "save_probabilities": save_probabilities,
               "write_soft": write_soft, "write_mask": write_mask, "hook": hook, "hook_args": hook_args or {}}
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(inputs, (list, tuple)):
        ids = _case_ids(inputs, predictor.dataset_json["file_ending"]) if case_ids is None else list(case_ids)
        if len(ids) != len(inputs) or len(set(ids)) != len(ids):
            raise ValueError(f"case_ids must name each of the {len(inputs)} cases once, got {ids}")
        truncated = [str(out / c) for c in ids]
        source = [[str(f) for f in files] for files in inputs]
    else:
        source, truncated = str(inputs), str(out)
    with export_function(functools.partial(export_with_contract, options)):
        predictor.predict_from_files(source, truncated, save_probabilities=False, overwrite=overwrite,
                                     num_processes_preprocessing=npp, num_processes_segmentation_export=nps)
    ending = predictor.dataset_json["file_ending"]
    cases = sorted(p.name[:-len(ending)] for p in out.glob(f"*{ending}") if not p.name.startswith(".tmp_"))
    return {"model": str(model_dir), "folds": list(folds), "cases": cases, "condition": contract.condition,
            "cohort": cohort, "activation": contract.activation, "tta": contract.tta, "threshold": th,
            "threshold_source": th_source, "postprocessing": {**pp}, "contract": contract.source}


def _case_ids(inputs, ending: str) -> list[str]:
    ids = []
    for files in inputs:
        name = Path(files[0]).name
        if not name.endswith(ending):
            raise ValueError(f"{files[0]}: expected a file ending in {ending}")
        stem = name[:-len(ending)]
        ids.append(stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem)
    return ids
