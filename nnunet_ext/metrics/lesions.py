"""Voxel- and lesion-wise metrics of one case (binary masks, array order ``(z, y, x)``, spacing in mm in the
same order).

Definitions (also in docs/evaluation.md):

* Lesions are connected components of a binary mask (``connectivity`` 6, 18 or 26; default 26, the
  WMH 2017 challenge's "fully connected" components).
* Detection rule (:class:`DetectionRule`, text form parsed by :func:`parse_detection`): a reference lesion
  of ``n`` voxels of which ``c`` are covered by the prediction is *detected* when ``c >= 1`` and the rule's
  clauses hold, combined with ``or`` / ``and``; a clause is ``voxels OP k`` (on ``c``) or
  ``fraction OP f`` (on ``c / n``), ``OP`` one of ``>= > <= <``. ``"any"`` (default, WMH 2017) is
  ``voxels>=1``; the LSR thesis rule is ``"voxels>=3 or fraction>0.5"``; the focal-Tversky thesis rule
  ``"fraction>=0.6"``. The legacy ``min_overlap=f`` is ``fraction>=f`` (``c >= max(1, ceil(f n))``).
* A predicted component is a *false positive* when it touches no reference-lesion voxel (WMH 2017);
  with ``symmetric=True`` the detection rule is applied to it against the reference instead.
  This is many-to-many: one predicted component can detect several reference lesions (merged lesions) and
  one reference lesion can be covered by several components (split lesion, no FP counted).
* ``counting="prediction"`` (Nichyporuk thesis, section 3.4.2; ``--preset nichyporuk``): the rule is
  applied to every (predicted lesion P, reference lesion R) pair with ``c = |P & R|`` and ``n = |R|``; a
  predicted lesion is a TP when it satisfies the rule with at least one reference lesion, otherwise an FP;
  a reference lesion that no predicted lesion satisfies the rule with is an FN. ``lesion_tp`` then counts
  predicted lesions, ``TPR = TP / (TP + FN)``, ``PPV = TP / (TP + FP)``, ``F1 = 2 TP / (2 TP + FP + FN)``
  (the thesis' eq. 3.1-3.3), undefined (``None``) where the denominator is 0; in size bins TP and FP
  lesions are binned by their (predicted) size, FN lesions by their (reference) size.
  ``lesion_tp_ref`` reports the matched reference lesions.
* Rates: :func:`lesion_rates` is the one place computing lesion TPR / PPV / FDR / F1 and their empty-case
  conventions (``"wmh"``: TPR 1 without reference lesions, PPV 1 without predicted lesions, F1 = 2PR/(P+R),
  0 when P + R = 0; ``"bin"``: missing sides are ``None`` and F1 takes a missing side as 1; ``"anima"``:
  Anima's: PPV 0 without predicted lesions, sensitivity undefined (``None``; Anima NaN) without reference
  lesions, F1 0 unless P + S > 0).
* Size bins: reference lesions are binned by their size for TP/FN/TPR, predicted components by theirs for
  FP/PPV; the bin's F1 combines the two (``"bin"`` convention). Sizes are in voxels or, with
  ``size_unit="mm3"``, in mm^3. A bin is ``(lo, hi)`` (inclusive, ``hi=None`` open; text ``3-10``,
  ``51+``) or ``(lo, hi, "[)")`` half-open ``[lo, hi)`` (text ``[0,10)``, ``[1000,inf)``). Lesions outside
  every bin are counted in the totals only.
* HD95: for each surface voxel of one mask the Euclidean distance in mm to the nearest surface voxel of the
  other; the 95th percentile (numpy's linear interpolation) of each directed set; HD95 is the larger.
  Surfaces: ``"face"`` (default, MetricsReloaded): mask voxels with a face (6-)neighbour outside the mask,
  outside the image counting as background; ``"wmh2017"`` (the WMH 2017 organisers' evaluation.py:
  original minus ``sitk.BinaryErode(image, (1, 1, 0))``): mask voxels with any of their 8 in-plane
  (3 x 3 square, y/x) neighbours outside the mask, outside the image counting as *foreground*.
* Empty masks (undefined values are ``None`` in JSON and skipped, with a count, in means):

  ============ ========= ==== ==== ==== ==== ===== ========================
  reference    predicted dice ppv  tpr  avd  hd95  lesion_tpr / lesion_ppv
  ============ ========= ==== ==== ==== ==== ===== ========================
  empty        empty     1    1    1    0    0     1 / 1
  empty        non-empty 0    0    None None None  1 / 0 (all FP)
  non-empty    empty     0    None 0    100  None  0 / 1
  ============ ========= ==== ==== ==== ==== ===== ========================

  For an empty reference the false-positive lesion count and volume are reported (``fp_volume_mm3``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunet_ext.metrics.cases import as_binary  # noqa: F401  (re-exported: older imports use lesions.as_binary)

DEFAULT_BINS: tuple[tuple[int, int | None], ...] = ((3, 10), (11, 50), (51, None))
SIZE_UNITS = ("voxels", "mm3")
CONVENTIONS = ("wmh", "bin", "anima")
COUNTINGS = ("reference", "prediction")


# ----------------------------------------------------------------------------------------------- size bins
def bin_name(lo, hi=None, kind: str | None = None) -> str:
    if kind == "[)":
        return f"[{_num(lo)},{'inf' if hi is None else _num(hi)})"
    return f"{_num(lo)}-{_num(hi)}" if hi is not None else f"{_num(lo)}+"


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):g}"


def _bin_key(b) -> str:
    return bin_name(b[0], b[1], b[2] if len(b) > 2 else None)


def parse_bins(text: str) -> tuple:
    """Parse ``"3-10,11-50,51+"`` (inclusive) into ``((3, 10), (11, 50), (51, None))`` or
    ``"[0,10),[10,400),[400,1000),[1000,inf)"`` (half-open) into ``((0, 10, "[)"), ..., (1000, None, "[)"))``.
    Bounds may be decimals (mm^3 bins)."""
    text = text.strip()
    if text.startswith("["):
        parts = re.findall(r"\[\s*([^,\]\)]+)\s*,\s*([^,\]\)]+)\s*\)", text)
        rebuilt = ",".join(f"[{a},{b})" for a, b in parts)
        if not parts or rebuilt.replace(" ", "") != text.replace(" ", ""):
            raise ValueError(f"bad size bins {text!r}: use [LO,HI) intervals, comma-separated, e.g. "
                             f"[0,10),[10,400),[400,inf)")
        bins = []
        for a, b in parts:
            try:
                lo, hi = float(a), (None if b.strip() in ("inf", "+inf") else float(b))
            except ValueError:
                raise ValueError(f"bad size bin [{a},{b}): bounds must be numbers or inf") from None
            if lo < 0 or (hi is not None and hi <= lo):
                raise ValueError(f"bad size bin [{a},{b}): need 0 <= LO < HI")
            bins.append((lo, hi, "[)"))
        return tuple(bins)
    bins = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part.endswith("+"):
                bins.append((_int_or_float(part[:-1]), None))
            else:
                lo, hi = part.split("-")
                bins.append((_int_or_float(lo), _int_or_float(hi)))
        except ValueError:
            raise ValueError(f"bad size bin {part!r}: use LO-HI or LO+ (inclusive), comma-separated, "
                             f"or [LO,HI) intervals") from None
    for b in bins:
        lo, hi = b
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"bad size bin {bin_name(lo, hi)}: need 1 <= LO <= HI")
    return tuple(bins)


def _int_or_float(s: str):
    s = s.strip()
    v = float(s)
    return int(v) if v.is_integer() and "." not in s else v


def _in_bin(sizes: np.ndarray, b) -> np.ndarray:
    lo, hi = b[0], b[1]
    upper = np.inf if hi is None else hi
    if len(b) > 2 and b[2] == "[)":
        return (sizes >= lo) & (sizes < upper)
    return (sizes >= lo) & (sizes <= upper)


# ------------------------------------------------------------------------------------------ detection rule
_OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}
_CLAUSE = re.compile(r"^\s*(voxels|fraction)\s*(>=|>|<=|<)\s*([0-9.eE+-]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class DetectionRule:
    """When a lesion counts as detected: clauses ``(quantity, op, value)`` combined with ``combine``; a lesion
    with no covered voxel is never detected. ``quantity`` is ``"voxels"`` (covered voxels) or
    ``"fraction"`` (covered / lesion size)."""
    clauses: tuple = (("voxels", ">=", 1.0),)
    combine: str = "or"

    def __post_init__(self):
        if self.combine not in ("or", "and"):
            raise ValueError(f"detection rule: combine must be 'or' or 'and', got {self.combine!r}")
        if not self.clauses:
            raise ValueError("detection rule: needs at least one clause")
        for q, op, v in self.clauses:
            if q not in ("voxels", "fraction") or op not in _OPS:
                raise ValueError(f"detection rule: bad clause {q} {op} {v}")
            if q == "fraction" and not 0.0 <= v <= 1.0:
                raise ValueError(f"detection rule: fraction must be in [0, 1], got {v}")
            if q == "voxels" and v < 0:
                raise ValueError(f"detection rule: voxels must be >= 0, got {v}")

    def detected(self, covered: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Per lesion: ``covered`` voxels of ``sizes`` voxels -> detected (bool array)."""
        covered = np.asarray(covered, np.float64)
        sizes = np.asarray(sizes, np.float64)
        frac = np.divide(covered, sizes, out=np.zeros_like(covered), where=sizes > 0)
        results = []
        for q, op, v in self.clauses:
            x = covered if q == "voxels" else frac
            # a tolerance so that 0.6 * 5 voxels = 3 covered voxels counts as ">= 60 %"
            if op in (">=", "<"):
                results.append(_OPS[op](x, v - 1e-9) if op == ">=" else x < v - 1e-9)
            else:
                results.append(x > v + 1e-9 if op == ">" else x <= v + 1e-9)
        out = np.logical_or.reduce(results) if self.combine == "or" else np.logical_and.reduce(results)
        return out & (covered >= 1)

    def text(self) -> str:
        return f" {self.combine} ".join(f"{q}{op}{_num(v)}" for q, op, v in self.clauses)


def parse_detection(text: str | DetectionRule | None) -> DetectionRule:
    """``"any"``, ``"voxels>=3 or fraction>0.5"``, ``"fraction>=60%"``, ``"voxels>=2 and fraction>0.1"``."""
    if isinstance(text, DetectionRule):
        return text
    if text is None or str(text).strip().lower() in ("", "any"):
        return DetectionRule()
    s = str(text).strip().lower()
    has_or, has_and = " or " in f" {s} ", " and " in f" {s} "
    if has_or and has_and:
        raise ValueError(f"detection rule {text!r}: use either 'or' or 'and', not both")
    combine = "and" if has_and else "or"
    clauses = []
    for part in re.split(r"\s+(?:or|and)\s+", s):
        m = _CLAUSE.match(part)
        if not m:
            raise ValueError(f"detection rule {text!r}: bad clause {part!r}; use e.g. 'voxels>=3', "
                             f"'fraction>0.5' or '50%' forms, joined by 'or'/'and'")
        q, op, v, pct = m.groups()
        try:
            val = float(v) / (100.0 if pct else 1.0)
        except ValueError:
            raise ValueError(f"detection rule {text!r}: bad number {v!r}") from None
        if pct and q != "fraction":
            raise ValueError(f"detection rule {text!r}: % only applies to fraction")
        clauses.append((q, op, val))
    return DetectionRule(tuple(clauses), combine)


def rule_from_min_overlap(min_overlap: float) -> DetectionRule:
    """The legacy ``min_overlap`` (fraction of the lesion that must be covered, 0 = any voxel)."""
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    return DetectionRule() if min_overlap == 0 else DetectionRule((("fraction", ">=", float(min_overlap)),))


# Lesion rules of the seed papers/challenges (``nnunet-ext evaluate --preset NAME``; see docs/evaluation.md).
# nichyporuk: the LSR thesis' section 3.4.2 (Tiny 1-2, Small 3-10, Medium 11-50, Large 51+ voxels); "lsr" is
# the same preset under its older name.
_NICHYPORUK = {"connectivity": 18, "detection": "voxels>=3 or fraction>0.5", "counting": "prediction",
               "bins": ((1, 2), (3, 10), (11, 50), (51, None))}
RULE_PRESETS = {
    "wmh2017": {"connectivity": 26, "detection": "any"},
    "nichyporuk": dict(_NICHYPORUK),
    "lsr": dict(_NICHYPORUK),
    "focal_tversky": {"connectivity": 26, "detection": "fraction>=0.6",
                      "bins": ((0, 10, "[)"), (10, 400, "[)"), (400, 1000, "[)"), (1000, None, "[)"))},
}


RULE_FIELDS = ("connectivity", "detection", "bins", "size_unit", "counting", "symmetric")


@dataclass(frozen=True)
class LesionRule:
    """What a lesion is and when it counts, in one object passed through evaluation, the threshold sweep,
    model selection and comparisons: ``connectivity`` of the components, the ``detection`` rule (text or
    :class:`DetectionRule`), the size ``bins`` (text or tuples), their ``size_unit`` (``voxels`` or
    ``mm3``), ``counting`` (``reference``, or ``prediction``: the Nichyporuk thesis' pair-by-pair rule) and
    ``symmetric``. The empty-case convention of the rates follows from ``counting`` (``"wmh"`` for
    reference counting, ``"bin"`` for prediction counting; :func:`lesion_rates`). A lesion-rule preset is
    one of these (:meth:`preset`)."""
    connectivity: int = 26
    detection: DetectionRule = DetectionRule()
    bins: tuple = DEFAULT_BINS
    size_unit: str = "voxels"
    counting: str = "reference"
    symmetric: bool = False

    def __post_init__(self):
        check_connectivity(self.connectivity)
        object.__setattr__(self, "detection", parse_detection(self.detection))
        bins = parse_bins(self.bins) if isinstance(self.bins, str) else self.bins
        object.__setattr__(self, "bins", tuple(tuple(b) for b in bins))
        if self.size_unit not in SIZE_UNITS:
            raise ValueError(f"size_unit must be one of {SIZE_UNITS}, got {self.size_unit!r}")
        check_counting(self.counting, self.symmetric)
        object.__setattr__(self, "symmetric", bool(self.symmetric))

    @classmethod
    def preset(cls, name: str, presets: dict | None = None, bins=DEFAULT_BINS, size_unit: str = "voxels",
               symmetric: bool = False) -> "LesionRule":
        """The rule of a preset of ``presets`` (default :data:`RULE_PRESETS`): its connectivity, detection rule
        and counting, its bins when it fixes them (else ``bins``); ``size_unit`` and ``symmetric`` as given."""
        table = RULE_PRESETS if presets is None else presets
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(table)}")
        p = table[name]
        p = getattr(p, "rule", p)  # a preset of nnunet_ext.metrics.evaluate.PRESETS: its lesion-rule fields
        return cls(p["connectivity"], p["detection"], p.get("bins", bins), size_unit, p.get("counting", "reference"),
                   symmetric)

    @classmethod
    def resolve(cls, preset: str | None = None, connectivity: int = 26, min_overlap: float = 0.0,
                bins=DEFAULT_BINS, detection=None, size_unit: str = "voxels", symmetric: bool = False,
                counting: str = "reference", presets: dict | None = None) -> "LesionRule":
        """The rule in force for a command's options: a ``preset``'s connectivity / detection (/ bins,
        counting) override the arguments; ``detection`` overrides the legacy ``min_overlap``."""
        if preset is not None:
            return cls.preset(preset, presets, bins, size_unit, symmetric)
        rule = parse_detection(detection) if detection is not None else rule_from_min_overlap(min_overlap)
        return cls(connectivity, rule, bins, size_unit, counting, symmetric)

    def options(self) -> dict:
        """The rule as keyword arguments of :func:`lesion_counts` / :func:`case_metrics`."""
        return {"connectivity": self.connectivity, "detection": self.detection, "bins": self.bins,
                "size_unit": self.size_unit, "symmetric": self.symmetric, "counting": self.counting}

    def to_json(self) -> dict:
        return {"connectivity": self.connectivity, "detection": self.detection.text(),
                "bins": [list(b) for b in self.bins], "size_unit": self.size_unit, "counting": self.counting,
                "symmetric": self.symmetric}

    @classmethod
    def from_json(cls, d: dict) -> "LesionRule":
        return cls(**{k: d[k] for k in RULE_FIELDS if k in d})

    def counts(self, ref: np.ndarray, pred: np.ndarray, spacing=None, ref_labels=None, pred_labels=None) -> dict:
        """:func:`lesion_counts` of one case under this rule."""
        return lesion_counts(ref, pred, ref_labels=ref_labels, pred_labels=pred_labels, spacing=spacing,
                             **self.options())


def split_rule_fields(fields: dict) -> tuple[dict, dict]:
    """(lesion-rule keywords incl. ``preset`` / ``min_overlap``, the rest) of a function's keywords."""
    keys = set(RULE_FIELDS) | {"preset", "min_overlap"}
    return {k: v for k, v in fields.items() if k in keys}, {k: v for k, v in fields.items() if k not in keys}


def rule_of(rule: "LesionRule | None", fields: dict, what: str) -> "LesionRule":
    """``rule``, or the rule that ``fields`` (:data:`RULE_FIELDS`, ``preset``, ``min_overlap`` as keywords)
    describe (:meth:`LesionRule.resolve`); both at once is a ValueError naming ``what``."""
    if rule is not None:
        if fields:
            raise ValueError(f"{what}: give the lesion rule either as rule= or as {sorted(fields)}, not both")
        if not isinstance(rule, LesionRule):
            raise TypeError(f"{what}: rule must be a LesionRule, got {type(rule).__name__}")
        return rule
    return LesionRule.resolve(**fields)


# ----------------------------------------------------------------------------------------------- rates
def lesion_rates(tp_ref: int, n_ref: int, tp_pred: int, n_pred: int, convention: str = "wmh") -> dict:
    """Lesion TPR (sensitivity), PPV, FDR and F1 from counts: ``tp_ref`` detected of ``n_ref`` reference
    lesions, ``tp_pred`` true-positive of ``n_pred`` predicted lesions. ``convention`` decides the empty
    cases (module docstring): ``"wmh"``, ``"bin"`` or ``"anima"``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if min(tp_ref, n_ref, tp_pred, n_pred) < 0 or tp_ref > n_ref or tp_pred > n_pred:
        raise ValueError(f"bad lesion counts: tp_ref {tp_ref} of {n_ref}, tp_pred {tp_pred} of {n_pred}")
    tpr = tp_ref / n_ref if n_ref else None
    ppv = tp_pred / n_pred if n_pred else None
    if convention == "wmh":
        tpr = 1.0 if tpr is None else tpr
        ppv = 1.0 if ppv is None else ppv
        f1 = 0.0 if ppv + tpr == 0 else 2 * ppv * tpr / (ppv + tpr)
    elif convention == "bin":
        if tpr is None and ppv is None:
            f1 = None
        else:
            p, r = (1.0 if ppv is None else ppv), (1.0 if tpr is None else tpr)
            f1 = 0.0 if p + r == 0 else 2 * p * r / (p + r)
    else:  # anima: PPV 0 without predicted lesions; sensitivity NaN (None) without reference lesions
        ppv = 0.0 if ppv is None else ppv
        f1 = 2 * ppv * tpr / (ppv + tpr) if tpr is not None and ppv + tpr > 0 else 0.0
    return {"lesion_tpr": tpr, "lesion_ppv": ppv, "lesion_fdr": None if ppv is None else 1.0 - ppv,
            "lesion_f1": f1}


def _f1(p: float | None, r: float | None) -> float | None:
    """F1 of a precision and a recall (``None`` when either is undefined, 0 when both are 0)."""
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _safe_div(a: float, b: float, empty: float | None) -> float | None:
    return float(a) / float(b) if b > 0 else empty


# --------------------------------------------------------------------------------------------- components
def check_connectivity(connectivity: int) -> int:
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return connectivity


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask: (labels uint32, count)."""
    lab, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8),
                                       connectivity=check_connectivity(connectivity), return_N=True)
    return lab, int(n)


def voxel_volume(spacing: Sequence[float]) -> float:
    return float(np.prod(np.asarray(spacing, dtype=np.float64)))


def remove_small_lesions(mask: np.ndarray, spacing: Sequence[float], min_lesion_mm3: float,
                         connectivity: int = 26, labels=None) -> np.ndarray:
    """``mask`` without its connected components smaller than ``min_lesion_mm3`` (volume = voxels x voxel
    volume; 0 keeps everything); ``labels``: its components ``(labels, n)`` when already computed. The
    post-processing stored in the model contract (nnunet_ext.inference.contract.postprocess)."""
    if not (min_lesion_mm3 >= 0) or math.isinf(min_lesion_mm3):
        raise ValueError(f"min_lesion_mm3 must be a finite number >= 0, got {min_lesion_mm3}")
    mask = np.asarray(mask, bool)
    if min_lesion_mm3 == 0 or not mask.any():
        return mask
    lab, n = label_components(mask, connectivity) if labels is None else labels
    vol = np.bincount(lab.ravel(), minlength=n + 1) * voxel_volume(spacing)
    keep = ~(vol < min_lesion_mm3)  # the same comparison as the predictor's post-processing
    keep[0] = False
    return keep[lab]


def lesion_counts(ref: np.ndarray, pred: np.ndarray, connectivity: int = 26, min_overlap: float = 0.0,
                  bins: Sequence = DEFAULT_BINS, ref_labels=None, pred_labels=None,
                  detection: str | DetectionRule | None = None, size_unit: str = "voxels",
                  spacing: Sequence[float] | None = None, symmetric: bool = False,
                  counting: str = "reference") -> dict:
    """Lesion-wise detection counts and rates of binary ``ref``/``pred`` (see module docstring).
    ``ref_labels``/``pred_labels`` are precomputed ``(labels, n)`` to reuse; ``detection`` (text or
    :class:`DetectionRule`) overrides ``min_overlap``; ``size_unit="mm3"`` bins by volume (needs ``spacing``);
    ``counting="prediction"`` counts TP on predicted lesions, pair by pair (Nichyporuk thesis)."""
    rule = parse_detection(detection) if detection is not None else rule_from_min_overlap(min_overlap)
    if size_unit not in SIZE_UNITS:
        raise ValueError(f"size_unit must be one of {SIZE_UNITS}, got {size_unit!r}")
    if size_unit == "mm3" and spacing is None:
        raise ValueError("size_unit='mm3' needs the voxel spacing")
    check_counting(counting, symmetric)
    rl, nr = ref_labels if ref_labels is not None else label_components(ref, connectivity)
    pl, npred = pred_labels if pred_labels is not None else label_components(pred, connectivity)
    ref_sizes = np.bincount(rl.ravel(), minlength=nr + 1)[1:]
    pred_sizes = np.bincount(pl.ravel(), minlength=npred + 1)[1:]
    if counting == "prediction":
        return _counts_on_predictions(rl, nr, pl, npred, ref_sizes, pred_sizes, rule, bins,
                                      voxel_volume(spacing) if size_unit == "mm3" else 1.0)
    covered = np.bincount(rl[pl > 0], minlength=nr + 1)[1:]  # predicted voxels in each reference lesion
    detected = rule.detected(covered, ref_sizes)
    in_ref = np.bincount(pl[rl > 0], minlength=npred + 1)[1:]  # reference voxels in each predicted component
    true_pred = rule.detected(in_ref, pred_sizes) if symmetric else in_ref > 0
    tp, fn, fp = int(detected.sum()), int((~detected).sum()), int((~true_pred).sum())
    out = {"ref_lesions": nr, "pred_lesions": npred, "lesion_tp": tp, "lesion_fn": fn, "lesion_fp": fp,
           **lesion_rates(tp, nr, npred - fp, npred, "wmh"), "bins": {}}
    scale = voxel_volume(spacing) if size_unit == "mm3" else 1.0
    rs, ps = ref_sizes * scale, pred_sizes * scale
    for b in bins:
        rb, pb = _in_bin(rs, b), _in_bin(ps, b)
        out["bins"][_bin_key(b)] = _bin_rates({
            "ref_lesions": int(rb.sum()), "pred_lesions": int(pb.sum()), "lesion_tp": int((detected & rb).sum()),
            "lesion_fn": int((~detected & rb).sum()), "lesion_fp": int((~true_pred & pb).sum())})
    return out


def check_counting(counting: str, symmetric: bool = False) -> str:
    if counting not in COUNTINGS:
        raise ValueError(f"counting must be one of {COUNTINGS}, got {counting!r}")
    if counting == "prediction" and symmetric:
        raise ValueError("symmetric applies to counting='reference' only: counting='prediction' already "
                         "applies the rule to every predicted lesion")
    return counting


def _counts_on_predictions(rl, nr, pl, npred, ref_sizes, pred_sizes, rule: DetectionRule, bins, scale) -> dict:
    """``counting="prediction"`` (module docstring): the rule on every overlapping (predicted, reference)
    lesion pair, ``c`` = shared voxels, ``n`` = the reference lesion's size."""
    both = (rl > 0) & (pl > 0)
    p_idx = r_idx = shared = np.zeros(0, np.int64)
    if both.any():
        key = pl[both].astype(np.int64) * (nr + 1) + rl[both].astype(np.int64)  # one key per lesion pair
        pair, shared = np.unique(key, return_counts=True)
        p_idx, r_idx = pair // (nr + 1) - 1, pair % (nr + 1) - 1
    ok = rule.detected(shared, ref_sizes[r_idx])
    true_pred = np.zeros(npred, bool)
    true_pred[p_idx[ok]] = True
    matched_ref = np.zeros(nr, bool)
    matched_ref[r_idx[ok]] = True
    tp, fp, fn = int(true_pred.sum()), int((~true_pred).sum()), int((~matched_ref).sum())
    out = {"ref_lesions": nr, "pred_lesions": npred, "lesion_tp": tp, "lesion_fn": fn, "lesion_fp": fp,
           "lesion_tp_ref": int(matched_ref.sum()), "lesion_counting": "prediction",
           **lesion_rates(tp, tp + fn, tp, npred, "bin"), "bins": {}}
    rs, ps = ref_sizes * scale, pred_sizes * scale
    for b in bins:
        rb, pb = _in_bin(rs, b), _in_bin(ps, b)
        out["bins"][_bin_key(b)] = _bin_rates({
            "ref_lesions": int(rb.sum()), "pred_lesions": int(pb.sum()), "lesion_tp": int((true_pred & pb).sum()),
            "lesion_fn": int((~matched_ref & rb).sum()), "lesion_fp": int((~true_pred & pb).sum())})
    return out


def _bin_rates(b: dict) -> dict:
    """TPR/PPV/F1 of one size bin from its counts (``"bin"`` convention); TPR = TP / (TP + FN), which is
    TP / reference lesions unless TP counts predicted lesions (``counting="prediction"``)."""
    r = lesion_rates(b["lesion_tp"], b["lesion_tp"] + b["lesion_fn"], b["pred_lesions"] - b["lesion_fp"],
                     b["pred_lesions"], "bin")
    return {**b, "lesion_tpr": r["lesion_tpr"], "lesion_ppv": r["lesion_ppv"], "lesion_f1": r["lesion_f1"]}


# ------------------------------------------------------------------------------------------------- HD95
_FACE_3D = ndimage.generate_binary_structure(3, 1)
_FACE_INPLANE = np.zeros((3, 3, 3), bool)
_FACE_INPLANE[1] = ndimage.generate_binary_structure(2, 1)
_SQUARE_INPLANE = np.zeros((3, 3, 3), bool)
_SQUARE_INPLANE[1] = True
SURFACES = ("face", "face_inplane", "wmh2017")


def surface_mask(mask: np.ndarray, surface: str = "face") -> np.ndarray:
    """Boolean surface voxels of ``mask`` (same shape): ``"face"`` 6-neighbour surface, outside the image
    = background; ``"face_inplane"`` 4 in-plane neighbours, outside = background (our pre-issue-15 reading of
    the WMH script); ``"wmh2017"`` the organisers' ``mask - BinaryErode(mask, (1, 1, 0))``: 3 x 3 in-plane
    square, outside the image = foreground."""
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, got {surface!r}")
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return out
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if surface == "wmh2017":
        # outside the image counts as foreground: pad True where the crop touches the image border
        pads = [((1, 1)) for _ in range(3)]
        padded = np.pad(crop, pads, constant_values=False)
        for ax in range(3):
            if lo[ax] == 0:
                padded[(slice(None),) * ax + (0,)] = True
            if hi[ax] == mask.shape[ax]:
                padded[(slice(None),) * ax + (-1,)] = True
        kernel = _SQUARE_INPLANE
    else:
        padded = np.pad(crop, 1, constant_values=False)
        kernel = _FACE_3D if surface == "face" else _FACE_INPLANE
    eroded = ndimage.binary_erosion(padded, kernel, border_value=1)[1:-1, 1:-1, 1:-1]
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = crop & ~eroded
    return out


def _surface_points(mask: np.ndarray, spacing, inplane: bool = False, surface: str | None = None) -> np.ndarray:
    """Coordinates in mm of the surface voxels (``surface`` as :func:`surface_mask`; ``inplane=True`` is the
    WMH 2017 surface)."""
    s = surface or ("wmh2017" if inplane else "face")
    return np.argwhere(surface_mask(mask, s)) * np.asarray(spacing, dtype=np.float64)


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         inplane_surface: bool = False, surface: str | None = None) -> float | None:
    """95th-percentile Hausdorff distance in mm (max of the two directed 95th percentiles).

    0 when both masks are empty, ``None`` when exactly one is (or when a non-empty mask has no surface voxel,
    possible with the WMH surface when a mask fills whole slices; the organisers' script crashes there)."""
    r_any, p_any = bool(np.any(ref)), bool(np.any(pred))
    if not r_any and not p_any:
        return 0.0
    if not r_any or not p_any:
        return None
    s = surface or ("wmh2017" if inplane_surface else "face")
    rs = _surface_points(ref, spacing, surface=s)
    ps = _surface_points(pred, spacing, surface=s)
    if len(rs) == 0 or len(ps) == 0:
        return None
    d_pr = cKDTree(rs).query(ps, k=1)[0]
    d_rp = cKDTree(ps).query(rs, k=1)[0]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


# ----------------------------------------------------------------------------------------------- per case
def case_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 connectivity: int = 26, min_overlap: float = 0.0, bins: Sequence = DEFAULT_BINS,
                 inplane_surface: bool = False, detection: str | DetectionRule | None = None,
                 size_unit: str = "voxels", symmetric: bool = False, surface: str | None = None,
                 counting: str = "reference") -> dict:
    """All per-case metrics for binary ``ref`` and ``pred`` (same shape) with voxel ``spacing`` (array
    order, mm)."""
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs prediction {pred.shape}")
    ref, pred = ref.astype(bool, copy=False), pred.astype(bool, copy=False)
    voxel_mm3 = voxel_volume(spacing)
    tp = int(np.count_nonzero(ref & pred))
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    fp, fn = n_pred - tp, n_ref - tp
    if n_ref == 0 and n_pred == 0:
        dice, ppv, tpr, avd = 1.0, 1.0, 1.0, 0.0
    else:
        dice = 2.0 * tp / (n_ref + n_pred)
        ppv = _safe_div(tp, n_pred, None)
        tpr = _safe_div(tp, n_ref, None)
        avd = abs(n_pred - n_ref) / n_ref * 100.0 if n_ref else None
    out = {"dice": dice, "ppv": ppv, "tpr": tpr, "avd": avd,
           "hd95": hd95(ref, pred, spacing, inplane_surface, surface),
           "voxel_tp": tp, "voxel_fp": fp, "voxel_fn": fn,
           "ref_volume_mm3": n_ref * voxel_mm3, "pred_volume_mm3": n_pred * voxel_mm3}
    out.update(lesion_counts(ref, pred, connectivity, min_overlap, bins, detection=detection, size_unit=size_unit,
                             spacing=spacing, symmetric=symmetric, counting=counting))
    if n_ref == 0:
        out["fp_volume_mm3"] = n_pred * voxel_mm3
    return out


POOLED_COUNTS = ("voxel_tp", "voxel_fp", "voxel_fn", "ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn",
                 "lesion_fp")
BIN_COUNTS = ("ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp")


def pooled_rates(counts: dict, bins_convention: bool = False) -> dict:
    """Pooled Dice and lesion rates from summed counts (``POOLED_COUNTS``); lesion TPR = TP / (TP + FN)
    (= TP / reference lesions when TP counts reference lesions)."""
    tp, fp, fn = counts["voxel_tp"], counts["voxel_fp"], counts["voxel_fn"]
    out = {"dice": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0}
    out.update(lesion_rates(counts["lesion_tp"], counts["lesion_tp"] + counts["lesion_fn"],
                            counts["pred_lesions"] - counts["lesion_fp"], counts["pred_lesions"],
                            "bin" if bins_convention else "wmh"))
    return out


def aggregate(per_case: dict[str, dict], bins: Sequence = DEFAULT_BINS) -> dict:
    """Mean over cases of each metric (``None`` skipped, ``n_undefined`` counts them) and pooled lesion
    and voxel counts with rates recomputed from the pooled counts. With ``counting="prediction"`` (the
    Nichyporuk thesis) ``mean`` holds its *per-scan* and ``pooled`` its *dataset-level* metrics, and undefined
    pooled rates are ``None`` as per case."""
    keys = ["dice", "ppv", "tpr", "avd", "hd95", "lesion_tpr", "lesion_ppv", "lesion_fdr", "lesion_f1"]
    mean = {}
    for k in keys:
        vals = [c[k] for c in per_case.values() if c.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
        undefined = len(per_case) - len(vals)
        if undefined:
            mean.setdefault("n_undefined", {})[k] = undefined
    pooled = {k: int(sum(c[k] for c in per_case.values())) for k in POOLED_COUNTS}
    on_predictions = any(c.get("lesion_counting") == "prediction" for c in per_case.values())
    pooled.update(pooled_rates(pooled, bins_convention=on_predictions))
    pooled["bins"] = {}
    for b in bins:
        name = _bin_key(b)
        pooled["bins"][name] = _bin_rates({k: int(sum(c["bins"][name][k] for c in per_case.values()))
                                           for k in BIN_COUNTS})
    return {"mean": mean, "pooled": pooled, "n_cases": len(per_case)}


__all__ = ["DEFAULT_BINS", "RULE_PRESETS", "COUNTINGS", "DetectionRule", "LesionRule", "parse_detection", "parse_bins", "label_components",
           "lesion_counts", "lesion_rates", "remove_small_lesions", "surface_mask", "hd95", "case_metrics",
           "aggregate", "as_binary", "bin_name"]
