"""The model contract: what prediction needs beyond a trained model's weights.

Training writes ``nnunet_ext_model.json`` into the model folder (``<Trainer>__<Plans>__<configuration>``,
beside nnU-Net's ``plans.json`` / ``dataset.json``); :class:`nnunet_ext.inference.predictor.ExtPredictor`, the one
predictor every command uses, reads it. Fields:

``condition``       None, ``"spacing"`` (resolution FiLM) or ``"cohort"`` (SCIN)
``cohorts``         the cohort names a SCIN model knows (its slot table, from the checkpoint)
``activation``      how the soft lesion map is read from the network output: ``"softmax"`` or SoftSeg's
                    ``"normalized_relu"``, which the network applies per patch at prediction, or
                    ``"normalized_relu_case"`` (the maximum over the whole case)
                    (:mod:`nnunet_ext.networks.activations`, :func:`nnunet_ext.inference.thresholds.soft_output`)
``tta``             how the flips of test-time augmentation are aggregated: ``"mean_logits"`` (nnU-Net's)
                    or ``"mean_probabilities"``
``threshold``       ``"stored"``: apply the Dice-optimal validation threshold of the folds in use
                    (``fold_<k>/nnunet_ext_threshold.json``, :mod:`nnunet_ext.inference.thresholds`) when present;
                    a number: that threshold; ``None``: nnU-Net's argmax
``postprocessing``  ``{"min_lesion_mm3": float, "connectivity": int}``: predicted lesions (connected
                    components) smaller than ``min_lesion_mm3`` are removed; 0 keeps everything

Models trained before the contract existed have no file; their contract is derived from the checkpoint
(condition kind and cohort table travel in the state dict) and the per-fold threshold files (activation).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_ext.inference.thresholds import ACTIVATIONS  # noqa: F401  (the one definition: soft_output's)

CONTRACT_FILE = "nnunet_ext_model.json"
VERSION = 1
CONDITIONS = (None, "spacing", "cohort")
TTA_MODES = ("mean_logits", "mean_probabilities")
CONNECTIVITIES = (6, 18, 26)


def default_postprocessing() -> dict:
    return {"min_lesion_mm3": 0.0, "connectivity": 26}


@dataclass
class ModelContract:
    condition: str | None = None
    cohorts: list = field(default_factory=list)
    activation: str = "softmax"
    tta: str = "mean_logits"
    threshold: object = "stored"
    postprocessing: dict = field(default_factory=default_postprocessing)
    trainer: str = ""
    source: str = "derived"  # "file" when read from CONTRACT_FILE

    def validate(self, where="model contract") -> "ModelContract":
        if self.condition not in CONDITIONS:
            raise ValueError(f"{where}: condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"{where}: tta must be one of {TTA_MODES}, got {self.tta!r}")
        t = self.threshold
        if not (t is None or t == "stored" or (isinstance(t, (int, float)) and not isinstance(t, bool)
                                               and 0 < float(t) < 1)):
            raise ValueError(f"{where}: threshold must be 'stored', null or a number in (0, 1), got {t!r}")
        pp = {**default_postprocessing(), **(self.postprocessing or {})}
        mm = pp["min_lesion_mm3"]
        if not isinstance(mm, (int, float)) or isinstance(mm, bool) or not mm >= 0 or mm == float("inf"):
            raise ValueError(f"{where}: postprocessing.min_lesion_mm3 must be a finite number >= 0, got {mm!r}")
        if pp["connectivity"] not in CONNECTIVITIES:
            raise ValueError(f"{where}: postprocessing.connectivity must be one of {CONNECTIVITIES}, "
                             f"got {pp['connectivity']!r}")
        self.postprocessing = {"min_lesion_mm3": float(mm), "connectivity": int(pp["connectivity"])}
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return {"version": VERSION, **d}


def contract_path(model_dir) -> Path:
    return Path(model_dir) / CONTRACT_FILE


def write_contract(model_dir, contract: ModelContract) -> Path:
    """Write ``contract`` into ``model_dir`` (atomic)."""
    contract.validate(str(contract_path(model_dir)))
    p = contract_path(model_dir)
    from nnunet_ext.core.checks import check_contract_identity, folder_identity

    check_contract_identity(p, contract.to_json(), model_dir)
    # plans and configuration from the folder name: a contract copied into another model's folder is refused
    where = {k: v for k, v in folder_identity(model_dir).items() if k != "trainer"}
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(p, json.dumps({**contract.to_json(), **where}, indent=1))
    return p


def read_contract_file(model_dir) -> ModelContract | None:
    p = contract_path(model_dir)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); delete it to re-derive the contract from the checkpoint")
    if not isinstance(d, dict) or d.get("version") != VERSION:
        raise ValueError(f"{p}: unsupported model contract (version {d.get('version') if isinstance(d, dict) else '?'})")
    from nnunet_ext.core.checks import check_contract_identity

    check_contract_identity(p, d, model_dir)  # trainer / plans / configuration of the folder it lies in
    known = {k: d[k] for k in ("condition", "cohorts", "activation", "tta", "threshold", "postprocessing", "trainer")
             if k in d}
    return ModelContract(**known, source="file").validate(str(p))


def _derived(model_dir, folds, checkpoint) -> ModelContract:
    """Contract of a model trained before contracts existed: condition and cohorts from the checkpoint,
    activation from the stored per-fold thresholds."""
    from nnunet_ext.inference.thresholds import FILE as THRESHOLD_FILE

    model_dir = Path(model_dir)
    c = ModelContract(trainer=model_dir.name.split("__")[0])
    fold_dirs = [model_dir / f"fold_{f}" for f in folds] if folds else sorted(model_dir.glob("fold_*"))
    for fd in fold_dirs:
        t = fd / THRESHOLD_FILE
        if t.is_file():
            c.activation = json.loads(t.read_text()).get("activation", "softmax")
            break
    ck = next((fd / checkpoint for fd in fold_dirs if (fd / checkpoint).is_file()), None)
    if ck is not None:
        import torch

        from nnunet_ext.networks.conditional_norm import cohort_table_of_state_dict, kind_of_state_dict

        try:
            weights = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one clear error
            raise ValueError(f"{ck}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        c.condition = kind_of_state_dict(weights)
        c.cohorts = [n for n in cohort_table_of_state_dict(weights) if n]
    return c.validate()


def load_contract(model_dir, folds=None, checkpoint: str = "checkpoint_final.pth") -> ModelContract:
    """The contract of the model in ``model_dir``: its file, or derived from the checkpoint of the first of
    ``folds`` that has one (older models)."""
    c = read_contract_file(model_dir)
    return c if c is not None else _derived(model_dir, folds, checkpoint)


def update_contract(model_dir, folds=None, checkpoint: str = "checkpoint_final.pth", **fields) -> ModelContract:
    """Change some fields of a model's contract (e.g. ``postprocessing={"min_lesion_mm3": 3.0}``, chosen by
    ``nnunet-ext select``) and write it; unknown field names are a ValueError."""
    c = load_contract(model_dir, folds, checkpoint)
    for k, v in fields.items():
        if k not in ("condition", "cohorts", "activation", "tta", "threshold", "postprocessing"):
            raise ValueError(f"unknown model contract field {k!r}")
        if k == "postprocessing":
            v = {**c.postprocessing, **v}
        setattr(c, k, v)
    write_contract(model_dir, c)
    c.source = "file"
    return c


# ------------------------------------------------------------------------------------------ applying a contract


def resolve_threshold(model_dir, folds, contract: ModelContract, override: float | None = None):
    """(threshold or None for nnU-Net's argmax, its source) of ``contract`` for the folds in use: ``override``
    when given, else the contract's number, or (``"stored"``) the Dice-optimal validation threshold of
    ``folds`` (:func:`nnunet_ext.inference.thresholds.combined_threshold`) when any fold has one."""
    from nnunet_ext.inference.thresholds import combined_threshold

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


def postprocess(mask, spacing_zyx, rule, labels=None):
    """The contract's post-processing of a predicted ``mask`` (z, y, x; bool, or label values, which are
    kept): its lesions (connected components of the foreground, ``rule["connectivity"]``) smaller than
    ``rule["min_lesion_mm3"]`` removed; 0 keeps everything. ``rule``: a contract's ``postprocessing`` dict
    (or the :class:`ModelContract`); ``labels``: the foreground's components ``(labels, n)`` when already
    computed with that connectivity. The predictor, ensemble prediction and ``nnunet-ext select`` all
    post-process with this function (nnunet_ext.metrics.lesions.remove_small_lesions)."""
    import numpy as np

    from nnunet_ext.metrics.lesions import remove_small_lesions

    pp = rule.postprocessing if isinstance(rule, ModelContract) else rule
    pp = {**default_postprocessing(), **pp}
    mask = np.asarray(mask)
    kept = remove_small_lesions(mask > 0 if mask.dtype != bool else mask, spacing_zyx, pp["min_lesion_mm3"],
                                pp["connectivity"], labels=labels)
    return kept if mask.dtype == bool else (mask * kept).astype(mask.dtype)
