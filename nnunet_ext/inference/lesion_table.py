"""Per-lesion table of a prediction (``predict --lesion-table``): ``lesions.csv`` and ``cases.csv``.

A lesion is a connected component of the final binary prediction (every foreground label, after the model's
post-processing; the contract's connectivity: 6, 18 or 26). ``lesions.csv``, one row per lesion:

``case``              the case id
``lesion``            1, 2, ... in the order of each lesion's first voxel in the image array's (z, y, x) order
``voxels``            its number of voxels
``volume_mm3``        voxels x the voxel volume (product of the image spacing)
``x_mm y_mm z_mm``    its centroid (the mean of its voxels' indices) in world coordinates:
                      ``origin + direction @ (spacing * index)``, as SimpleITK's
                      ``TransformContinuousIndexToPhysicalPoint`` maps a continuous index (ITK's LPS frame)
``mean_probability``  mean of the lesion probability over its voxels (nnunet_ext.inference.uncertainty:
``max_probability``   the foreground probability; the soft map for SoftSeg models; the members' mean for
                      ensembles) and its maximum
``mean_entropy``      mean voxel entropy over its voxels (nats, nnunet_ext.inference.uncertainty)

``cases.csv``, one row per case, also for a case without any lesion: ``case``, ``lesions`` (count), ``voxels``
and ``volume_mm3`` (totals). Floats are rounded to 6 decimals. Both files are written atomically.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

LESIONS_FILE = "lesions.csv"
CASES_FILE = "cases.csv"
LESION_COLUMNS = ("case", "lesion", "voxels", "volume_mm3", "x_mm", "y_mm", "z_mm", "mean_probability",
                  "max_probability", "mean_entropy")
CASE_COLUMNS = ("case", "lesions", "voxels", "volume_mm3")
ENTROPY_SUFFIX = "_entropy"  # <case>_entropy<file ending>: the voxel entropy map of predict --uncertainty


@dataclass(frozen=True)
class Geometry:
    """An image's geometry in SimpleITK's terms: ``spacing`` and ``origin`` (x, y, z), ``direction`` (3 x 3,
    row-major, columns = the axes' directions)."""

    spacing: tuple
    origin: tuple
    direction: tuple

    def __post_init__(self):
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(f"the lesion table needs a 3-D geometry (3 spacings, 3 origin values, 9 direction "
                             f"values), got {len(self.spacing)}, {len(self.origin)}, {len(self.direction)}")
        if not all(float(s) > 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {tuple(self.spacing)}")

    @classmethod
    def from_properties(cls, properties: dict) -> "Geometry":
        """From nnU-Net's case properties (``sitk_stuff``: what the predictor writes its outputs with)."""
        s = properties["sitk_stuff"]
        return cls(tuple(map(float, s["spacing"])), tuple(map(float, s["origin"])),
                   tuple(map(float, s["direction"])))

    @classmethod
    def from_image(cls, img) -> "Geometry":
        """From a SimpleITK image."""
        return cls(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(np.asarray(self.spacing, np.float64)))


def index_to_world(index_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World coordinates (N, 3; x, y, z in mm) of continuous array indices ``index_zyx`` (N, 3; z, y, x):
    ``origin + direction @ (spacing * (x, y, z))``."""
    ijk = np.asarray(index_zyx, np.float64).reshape(-1, 3)[:, ::-1]
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    return np.asarray(geometry.origin, np.float64) + (ijk * np.asarray(geometry.spacing, np.float64)) @ d.T


def _r(v) -> float:
    return round(float(v), 6)


def case_lesions(case: str, mask: np.ndarray, probability: np.ndarray, entropy: np.ndarray | None,
                 geometry: Geometry, connectivity: int = 26) -> tuple[list[dict], dict]:
    """(one row per lesion, the case's row) of a case's final ``mask`` (z, y, x; every non-zero voxel is
    lesion), its lesion ``probability`` and voxel ``entropy`` (same shape; None leaves ``mean_entropy``
    empty), as the module docstring defines them."""
    from nnunet_ext.metrics.lesions import check_connectivity, label_components

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"case {case}: the lesion table needs a 3-D mask, got shape {mask.shape}")
    for name, arr in (("probability", probability), ("entropy", entropy)):
        if arr is not None and np.shape(arr) != mask.shape:
            raise ValueError(f"case {case}: {name} shape {np.shape(arr)} differs from the mask's {mask.shape}")
    labels, n = label_components(mask > 0, check_connectivity(connectivity))
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    # number the lesions by their first voxel in (z, y, x) order, whatever order the labelling used
    _, first = np.unique(lab, return_index=True)
    order = np.argsort(first)  # order[k] = (old label - 1) of new lesion k + 1
    new_of_old = np.empty(n + 1, np.int64)
    new_of_old[0] = 0
    new_of_old[order + 1] = np.arange(1, n + 1)
    lab = new_of_old[lab]
    voxels = np.bincount(lab, minlength=n + 1)[1:]
    idx = np.stack(np.unravel_index(flat, mask.shape), 1).astype(np.float64)
    centroid = np.stack([np.bincount(lab, weights=idx[:, a], minlength=n + 1)[1:] for a in range(3)], 1).astype(np.float64)
    centroid /= np.maximum(voxels, 1)[:, None]
    world = index_to_world(centroid, geometry)
    prob = np.asarray(probability, np.float64).ravel()[flat]
    mean_p = np.bincount(lab, weights=prob, minlength=n + 1)[1:] / np.maximum(voxels, 1)
    max_p = np.full(n + 1, -np.inf)
    np.maximum.at(max_p, lab, prob)
    if entropy is not None:
        ent = np.asarray(entropy, np.float64).ravel()[flat]
        mean_h = np.bincount(lab, weights=ent, minlength=n + 1)[1:] / np.maximum(voxels, 1)
    vv = geometry.voxel_volume
    rows = [{"case": case, "lesion": k + 1, "voxels": int(voxels[k]), "volume_mm3": _r(voxels[k] * vv),
             "x_mm": _r(world[k, 0]), "y_mm": _r(world[k, 1]), "z_mm": _r(world[k, 2]),
             "mean_probability": _r(mean_p[k]), "max_probability": _r(max_p[k + 1]),
             "mean_entropy": _r(mean_h[k]) if entropy is not None else ""} for k in range(n)]
    total = int(voxels.sum())
    return rows, {"case": case, "lesions": n, "voxels": total, "volume_mm3": _r(total * vv)}


def export_extras(case: str, class_probabilities: np.ndarray, mask: np.ndarray, properties: dict,
                  connectivity: int = 26, lesion_table: bool = True) -> tuple[np.ndarray, dict]:
    """What the predictor's export step adds for ``--uncertainty`` / ``--lesion-table``: (the voxel entropy
    map, float32; ``{"lesions": rows, "case_row": row}`` when ``lesion_table``, else ``{}``) of a case's
    class probabilities ``(C, z, y, x)`` (in the input geometry, under the model's activation) and final
    mask."""
    from nnunet_ext.inference.uncertainty import entropy, lesion_probability

    ent = entropy(class_probabilities)
    if not lesion_table:
        return ent, {}
    rows, case_row = case_lesions(case, mask, lesion_probability(class_probabilities), ent,
                                  Geometry.from_properties(properties), connectivity)
    return ent, {"lesions": rows, "case_row": case_row}


def _csv(columns: Sequence[str], rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_lesion_tables(out_dir, lesion_rows: Iterable[dict], case_rows: Iterable[dict],
                        part: str = "") -> tuple[Path, Path]:
    """Write ``out_dir/lesions<part>.csv`` and ``out_dir/cases<part>.csv`` (each atomically), rows sorted by
    case (and lesion). ``part`` (e.g. ``_part0of2``) names the tables of one part of a prediction split into
    parts. Returns their paths."""
    from nnunet_ext.core.safety import atomic_write_text

    out = Path(out_dir)
    lesions = sorted(lesion_rows, key=lambda r: (r["case"], r["lesion"]))
    cases = sorted(case_rows, key=lambda r: r["case"])
    seen = [r["case"] for r in cases]
    if len(set(seen)) != len(seen):
        raise ValueError(f"the lesion table got a case twice: {sorted(c for c in set(seen) if seen.count(c) > 1)}")
    paths = tuple(out / f"{Path(name).stem}{part}.csv" for name in (LESIONS_FILE, CASES_FILE))
    atomic_write_text(paths[0], _csv(LESION_COLUMNS, lesions))
    atomic_write_text(paths[1], _csv(CASE_COLUMNS, cases))
    return paths


def tables_from_export(results) -> tuple[list[dict], list[dict]]:
    """(lesion rows, case rows) from what the predictor's export step returned for each case (None when
    nnU-Net had no case to predict)."""
    lesion_rows, case_rows = [], []
    for r in results or []:
        if isinstance(r, dict) and "case_row" in r:
            lesion_rows += r["lesions"]
            case_rows.append(r["case_row"])
    return lesion_rows, case_rows
