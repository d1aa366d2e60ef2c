"""``cohorts.json``: which cohort (site, labelling protocol, ...) each case of a dataset belongs to.

The file sits beside ``dataset.json`` in the raw dataset folder (``$nnUNet_raw/DatasetXXX_Name/``) and maps
case identifiers to cohort names::

    {"case_000": "siteA", "case_001": "siteB", ...}

Cohort-conditioned models (SCIN) read it at training time; a case without a cohort, or a cohort name the
model does not know, is an error, never a silent fallback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FILENAME = "cohorts.json"


def read_cohorts(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must be a non-empty JSON object mapping case identifiers to cohort names")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{path}: cohort names must be non-empty strings; bad entries for {bad[:5]}")
    return dict(data)


def cohorts_for_dataset(dataset_name: str, preprocessed_folder: str | os.PathLike | None = None) -> tuple[dict[str, str], Path]:
    """The cohorts of an nnU-Net dataset: ``$nnUNet_raw/<name>/cohorts.json``, else a copy in the
    preprocessed dataset folder (for machines that only hold preprocessed data)."""
    candidates = []
    raw = os.environ.get("nnUNet_raw")
    if raw:
        candidates.append(Path(raw) / dataset_name / FILENAME)
    if preprocessed_folder is not None:
        candidates.append(Path(preprocessed_folder) / FILENAME)
    for c in candidates:
        if c.is_file():
            return read_cohorts(c), c
    where = " or ".join(str(c) for c in candidates) or "$nnUNet_raw/<dataset>/ (nnUNet_raw is not set)"
    raise FileNotFoundError(f"cohort-conditioned training needs {FILENAME} mapping every case to its cohort; "
                            f"looked for {where}")


def check_cases(cohorts: dict[str, str], identifiers, source="cohorts.json") -> None:
    missing = sorted(set(identifiers) - set(cohorts))
    if missing:
        raise ValueError(f"{len(missing)} case(s) have no cohort in {source}: {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""))


def assign_slots(table: list[str | None], names, n_slots: int) -> list[str | None]:
    """Cohort table after adding ``names``: known names keep their slot, new ones (sorted) take free slots."""
    table = list(table) + [None] * (n_slots - len(table))
    for name in sorted(set(names) - {n for n in table if n is not None}):
        try:
            table[table.index(None)] = name
        except ValueError:
            raise ValueError(f"no free cohort slot for {name!r}: the model has {n_slots} slots, all used "
                             f"({[n for n in table if n]}); use a SCIN trainer with more slots")
    return table


def slot_of(table: list[str | None], name: str) -> int:
    if name not in table:
        known = [n for n in table if n is not None]
        raise ValueError(f"unknown cohort {name!r}; this model knows {known}")
    return table.index(name)
