"""How a prediction runs and what it writes: :class:`PredictOptions`, the one parameter object of the
predictor (:func:`nnunet_ext.inference.predictor.predict_cases`), ``nnunet-ext predict``
(:func:`nnunet_ext.inference.predict.predict`), ensembles and selections (nnunet_ext.inference.ensemble) and
the consensus cascade. The model itself is a :class:`nnunet_ext.nnunet_adapter.ModelRef` (or a model folder
with its folds and checkpoint).

A function that takes ``options`` also takes its fields as keywords (``predict_cases(..., device="cpu")``),
and a dict of them (``dataclasses.asdict``), which is what a task spawned on a function
(``nnunet_ext.cluster.call.function_argv``) receives.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class PredictOptions:
    """The options of a prediction, checked when made (a ValueError naming the field).

    * where and how: ``device``, ``disable_tta`` (no mirroring), ``tta`` (None: the contract's aggregation of
      the flips, else ``mean_logits`` / ``mean_probabilities``), ``cohort`` (SCIN models), ``step_size`` (the
      sliding window's step as a fraction of the patch, nnU-Net's ``-step_size``), ``npp`` / ``nps``
      (pre-/post-processing processes; None: the function's own default), ``progress``;
    * the mask: ``threshold`` and ``min_lesion_mm3`` (None: the model's contract, or the selection's);
    * what is written: ``save_probabilities`` (nnU-Net's ``<case>.npz``/``.pkl``), ``write_soft``
      (``soft/<case>``), ``write_mask``, ``uncertainty`` (``<case>_entropy``), ``lesion_table``
      (``lesions.csv`` / ``cases.csv``);
    * which cases, as ``nnUNetv2_predict``: ``overwrite`` (False: cases whose mask exists are skipped,
      ``--continue_prediction``), ``num_parts`` / ``part_id``, ``prev_stage_predictions`` (cascade
      configurations)."""
    device: str = "cuda"
    disable_tta: bool = False
    tta: str | None = None
    cohort: str | None = None
    step_size: float = 0.5
    npp: int | None = None
    nps: int | None = None
    progress: bool = True
    threshold: float | None = None
    min_lesion_mm3: float | None = None
    save_probabilities: bool = False
    write_soft: bool = True
    write_mask: bool = True
    uncertainty: bool = False
    lesion_table: bool = False
    overwrite: bool = True
    num_parts: int = 1
    part_id: int = 0
    prev_stage_predictions: str | None = None

    def __post_init__(self):
        if not _real(self.step_size) or not 0 < self.step_size <= 1:
            raise ValueError(f"-step_size must be in (0, 1], got {self.step_size}")
        for name in ("npp", "nps"):
            v = getattr(self, name)
            if v is not None and (not _whole(v) or v < 1):
                raise ValueError(f"-npp and -nps must be >= 1 (processes), got -{name} {v!r}")
        for name in ("num_parts", "part_id"):
            v = getattr(self, name)
            if not _whole(v):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise ValueError(f"-part_id must be in 0..num_parts-1 and -num_parts >= 1, got -part_id {self.part_id} "
                             f"-num_parts {self.num_parts}")
        if self.min_lesion_mm3 is not None and not (_real(self.min_lesion_mm3)
                                                    and self.min_lesion_mm3 >= 0 and math.isfinite(self.min_lesion_mm3)):
            raise ValueError(f"min_lesion_mm3 must be a finite number >= 0, got {self.min_lesion_mm3}")
        if self.threshold is not None and not (_real(self.threshold) and 0 < self.threshold < 1):
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if self.lesion_table and not self.overwrite:
            raise ValueError("lesion_table needs overwrite=True: skipped cases would have no rows")

    def processes(self, default: int) -> tuple[int, int]:
        """(npp, nps), each ``default`` where it is None."""
        return (default if self.npp is None else self.npp), (default if self.nps is None else self.nps)

    def to_json(self) -> dict:
        return asdict(self)


def _whole(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def predict_options(options, given: dict, what: str, aliases: dict | None = None) -> PredictOptions:
    """``options`` (a :class:`PredictOptions`, a dict of its fields, or None for the defaults) with the keyword
    arguments ``given`` applied (:func:`nnunet_ext.core.validate.options_of`: an unknown keyword is a
    TypeError naming ``what``). ``aliases``: a function's own older keyword names -> a function of the value
    returning the fields it sets (e.g. ``continue_prediction`` -> ``overwrite``)."""
    from nnunet_ext.core.validate import options_of

    given = dict(given)
    for old, to_fields in (aliases or {}).items():
        if old in given:
            value = given.pop(old)
            for k, v in to_fields(value).items():
                given.setdefault(k, v)
    if isinstance(options, dict):
        options = PredictOptions(**options)
    elif options is not None and not isinstance(options, PredictOptions):
        raise TypeError(f"{what}(): options must be a PredictOptions (or a dict of its fields), got "
                        f"{type(options).__name__}")
    return options_of(PredictOptions, options, given, what)


def refuse_unsupported(o: PredictOptions, supported, what: str) -> None:
    """A NotImplementedError naming the first field of ``o`` outside ``supported`` that differs from its default:
    ``what`` (a function) does not apply it."""
    default = PredictOptions()
    for f in fields(PredictOptions):
        if f.name not in supported and getattr(o, f.name) != getattr(default, f.name):
            raise NotImplementedError(f"{what} with {f.name}={getattr(o, f.name)!r}: {what} does not apply {f.name}")
