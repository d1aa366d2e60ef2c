"""Cross-validation folds that keep every subject (or site) on one side: nnU-Net's ``splits_final.json``.

nnU-Net splits the training cases at random (5-fold ``KFold``, seed 12345). When a dataset holds several
scans of one subject (ISBI 2015: 4-5 time points of each of 5 subjects) that puts scans of one subject in
training and validation of the same fold, and the validation score measures memory, not generalisation.
Here the folds are made of whole groups:

* a case's group comes from ``case_groups.json`` beside ``dataset.json`` (written by ``nnunet-ext convert``:
  ``{"<case>": {"subject": ..., "site": ...}}``), from a regular expression on the case id, or from a CSV
  file with columns ``case`` and ``subject`` / ``site``;
* groups are assigned to folds largest first, each to the fold with the fewest cases so far (ties: the
  lower fold), in an order shuffled with the seed among groups of equal size: folds are balanced in cases
  and the file is the same for the same seed. When every case is its own group the split is nnU-Net's own
  (:func:`nnunet_ext.nnunet_adapter.crossval_splits`, what ``nnUNetv2_train`` writes);
* pseudo-labelled cases (a student dataset of ``nnunet-ext pseudolabel``) are never validated on: they
  are added to the training list of every fold, except a fold that validates on their own subject
  (known only from ``--pattern`` / ``--csv`` or ``case_groups.json``).

:func:`check_splits` refuses a split that leaks a group, validates on a pseudo-label or names a case the
dataset does not have, with one line naming the fold and the case.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

GROUPS_FILE = "case_groups.json"
SPLITS_FILE = "splits_final.json"
GROUP_KEYS = ("subject", "site")


# ---------------------------------------------------------------------------------------------- groups


def read_case_groups(raw_folder) -> dict[str, dict]:
    """``case_groups.json`` of a raw dataset folder (``{}`` when there is none)."""
    f = Path(raw_folder) / GROUPS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{f}: expected {{\"<case>\": {{\"subject\": ..., \"site\": ...}}, ...}}")
    return data


def write_case_groups(folder, groups: dict[str, dict]) -> Path:
    """Write ``case_groups.json`` (sorted by case) atomically into ``folder``."""
    from nnunet_ext.core.safety import atomic_write_text

    f = Path(folder) / GROUPS_FILE
    atomic_write_text(f, json.dumps({c: groups[c] for c in sorted(groups)}, indent=1))
    return f


def pseudo_labelled_cases(raw_folder) -> set[str]:
    """Cases of a student dataset that hold pseudo-labels: flagged in ``case_groups.json`` or kept in the
    ``provenance.json`` written by ``nnunet-ext pseudolabel``."""
    raw_folder = Path(raw_folder)
    out = {c for c, v in read_case_groups(raw_folder).items() if v.get("pseudo_labelled")}
    prov = raw_folder / "provenance.json"
    if prov.is_file():
        try:
            out |= set(json.loads(prov.read_text()).get("kept", []))
        except (ValueError, AttributeError):
            raise ValueError(f"{prov}: not a readable provenance file of nnunet-ext pseudolabel") from None
    return out


def groups_from_pattern(cases, pattern: str, pseudo=()) -> dict[str, str]:
    """Case -> group by ``re.search(pattern, case)``: the first parenthesised group if the pattern has one,
    else the whole match. Every case that is not pseudo-labelled must match (a pseudo-labelled case that does
    not match is its own group)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--pattern {pattern!r} is not a valid regular expression ({e})") from None
    out, unmatched = {}, []
    for c in sorted(cases):
        m = rx.search(c)
        g = (m.group(1) if rx.groups else m.group(0)) if m else None
        if not g:
            if c not in pseudo:
                unmatched.append(c)
            out[c] = c
        else:
            out[c] = g
    if unmatched:
        if len(unmatched) == len([c for c in cases if c not in pseudo]):
            raise ValueError(f"--pattern {pattern!r} matches no case (e.g. case {unmatched[0]}); the group is the "
                             f"pattern's first (...) group, or its whole match")
        raise ValueError(f"--pattern {pattern!r} does not match case {unmatched[0]}"
                         + (f" (nor {len(unmatched) - 1} other case(s))" if len(unmatched) > 1 else ""))
    return out


def groups_from_csv(cases, csv_file, key: str, pseudo=()) -> dict[str, str]:
    """Case -> group from a CSV file with a header holding the columns ``case`` and ``key``. Every case that
    is not pseudo-labelled needs a row; rows of other cases are ignored."""
    f = Path(csv_file)
    if not f.is_file():
        raise FileNotFoundError(f"--csv {f} not found")
    with open(f, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in reader.fieldnames or []]
        if "case" not in cols or key not in cols:
            raise ValueError(f"{f}: needs a header with the columns case and {key} "
                             f"(found: {', '.join(cols) or 'none'})")
        rows = {}
        for n, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            c, g = row["case"], row[key]
            if not c:
                continue
            if not g:
                raise ValueError(f"{f} line {n}: case {c} has an empty {key}")
            if c in rows and rows[c] != g:
                raise ValueError(f"{f} line {n}: case {c} is listed twice, with {key} {rows[c]} and {g}")
            rows[c] = g
    out = {}
    for c in sorted(cases):
        if c in rows:
            out[c] = rows[c]
        elif c in pseudo:
            out[c] = c
        else:
            raise ValueError(f"{f} has no row for case {c} (every training case needs its {key})")
    return out


def groups_from_file(cases, raw_folder, key: str, pseudo=()) -> dict[str, str]:
    """Case -> group from the dataset's ``case_groups.json``."""
    meta = read_case_groups(raw_folder)
    f = Path(raw_folder) / GROUPS_FILE
    if not meta:
        raise FileNotFoundError(f"{f} not found (written by nnunet-ext convert); give the {key} of each case with "
                                f"--pattern REGEX or --csv FILE")
    out = {}
    for c in sorted(cases):
        g = meta.get(c, {}).get(key)
        if g:
            out[c] = str(g)
        elif c in pseudo:
            out[c] = c
        else:
            raise ValueError(f"case {c} has no {key} in {f}; give the {key} of each case with --pattern REGEX or "
                             f"--csv FILE")
    return out


# ---------------------------------------------------------------------------------------------- folds


def grouped_splits(groups: dict[str, str], n_folds: int = 5, seed: int = 12345, train_only: dict | None = None,
                   what: str = "subject") -> list[dict]:
    """nnU-Net's split format ``[{"train": [...], "val": [...]}, ...]`` with every group of ``groups``
    (case -> group) in the validation list of exactly one fold and never on both sides of a fold.

    ``train_only`` (case -> group): cases that are only trained on (pseudo-labels); each is added to the
    training list of every fold whose validation list holds no case of its group."""
    from nnunet_ext.nnunet_adapter import crossval_splits

    members: dict[str, list[str]] = {}
    for c, g in groups.items():
        members.setdefault(g, []).append(c)
    if n_folds < 2:
        raise ValueError(f"-nfolds must be at least 2, got {n_folds}")
    if len(members) < n_folds:
        raise ValueError(f"{len(members)} {what}(s) cannot make {n_folds} folds (a {what} is never split); "
                         f"pass -nfolds {len(members)} or fewer" if len(members) >= 2 else
                         f"{len(members)} {what} with cases to validate on: cross-validation needs at least 2; "
                         f"train with fold all")
    if all(len(v) == 1 for v in members.values()):
        splits = crossval_splits(list(groups), n_folds, seed)  # nnU-Net's own split: nothing to keep together
    else:
        import numpy as np

        names = sorted(members)
        order = [names[i] for i in np.random.RandomState(seed).permutation(len(names))]
        order.sort(key=lambda g: -len(members[g]))  # stable: largest first, seeded order among equal sizes
        folds, sizes = [[] for _ in range(n_folds)], [0] * n_folds
        for g in order:
            k = min(range(n_folds), key=lambda i: (sizes[i], i))
            folds[k].append(g)
            sizes[k] += len(members[g])
        splits = []
        for k in range(n_folds):
            val = set(folds[k])
            splits.append({"train": sorted(c for g in names if g not in val for c in members[g]),
                           "val": sorted(c for g in folds[k] for c in members[g])})
    for s in splits:
        val_groups = {groups[c] for c in s["val"]}
        s["train"] = sorted(s["train"] + [c for c, g in (train_only or {}).items() if g not in val_groups])
    return splits


def check_splits(splits, groups: dict[str, str], cases, pseudo=(), source="splits_final.json",
                 what: str = "subject") -> None:
    """ValueError (one line naming the fold and the case) unless every fold of ``splits`` is
    ``{"train": [...], "val": [...]}`` of known ``cases``, no case is on both sides, no pseudo-labelled case
    is validated on and no group (``groups``: case -> group) has cases on both sides."""
    cases = set(cases)
    if not isinstance(splits, list) or not splits:
        raise ValueError(f"{source}: expected a list of folds [{{\"train\": [...], \"val\": [...]}}, ...]")
    for k, s in enumerate(splits):
        if not isinstance(s, dict) or not isinstance(s.get("train"), list) or not isinstance(s.get("val"), list):
            raise ValueError(f"{source}: fold {k} is not {{\"train\": [...], \"val\": [...]}}")
        for c in s["train"] + s["val"]:
            if c not in cases:
                raise ValueError(f"{source}: fold {k} names case {c}, which is not a training case of the dataset")
        both = sorted(set(s["train"]) & set(s["val"]))
        if both:
            raise ValueError(f"{source}: fold {k}: case {both[0]} is in both train and val")
        for c in sorted(s["val"]):
            if c in pseudo:
                raise ValueError(f"{source}: fold {k} validates on the pseudo-labelled case {c}; pseudo-labels are "
                                 f"for training only")
        val_groups = {}
        for c in sorted(s["val"]):
            val_groups.setdefault(groups.get(c, c), c)
        for c in sorted(s["train"]):
            g = groups.get(c, c)
            if g in val_groups:
                raise ValueError(f"{source}: fold {k} leaks {what} {g}: case {c} is in train, case {val_groups[g]} "
                                 f"in val")


def unused_cases(splits, cases) -> list[str]:
    """Cases of the dataset that no fold names."""
    named = {c for s in splits for c in s["train"] + s["val"]}
    return sorted(set(cases) - named)


def same_split(a, b) -> bool:
    """Same folds with the same cases (order inside a list does not matter)."""
    try:
        return len(a) == len(b) and all(set(x["train"]) == set(y["train"]) and set(x["val"]) == set(y["val"])
                                        for x, y in zip(a, b))
    except (TypeError, KeyError):
        return False


# ---------------------------------------------------------------------------------------------- command


def _dataset(dataset) -> tuple[str, Path, list[str]]:
    from nnunet_ext.nnunet_adapter import dataset_name, env_folder, raw_training_cases

    name = dataset_name(dataset)
    raw = env_folder("nnUNet_raw") / name
    if not (raw / "dataset.json").is_file():
        raise FileNotFoundError(f"{raw / 'dataset.json'} not found: the raw dataset is needed for its case list")
    return name, raw, raw_training_cases(raw)


def case_groups_of(dataset, group_by: str = "subject", pattern: str | None = None, csv_file=None):
    """``(name, raw folder, cases, groups, pseudo)`` of a dataset: its training cases, case -> group and its
    pseudo-labelled cases."""
    if group_by not in GROUP_KEYS:
        raise ValueError(f"--group-by must be one of {', '.join(GROUP_KEYS)}, got {group_by!r}")
    if pattern is not None and csv_file is not None:
        raise ValueError("--pattern and --csv exclude each other")
    name, raw, cases = _dataset(dataset)
    pseudo = pseudo_labelled_cases(raw) & set(cases)
    if pattern is not None:
        groups = groups_from_pattern(cases, pattern, pseudo)
    elif csv_file is not None:
        groups = groups_from_csv(cases, csv_file, group_by, pseudo)
    else:
        groups = groups_from_file(cases, raw, group_by, pseudo)
    return name, raw, cases, groups, pseudo


def make_split(dataset, group_by: str = "subject", pattern: str | None = None, csv_file=None, n_folds: int = 5,
               seed: int = 12345, overwrite: bool = False) -> dict:
    """Write the grouped split of ``dataset`` to ``$nnUNet_preprocessed/<dataset>/splits_final.json`` (created
    before planning if need be; nnU-Net's planning keeps it), and to the raw dataset's ``splits_final.json``
    when that file exists (nnU-Net's planning copies it into the preprocessed folder and fails when the two
    differ). An existing file that differs is replaced only with ``overwrite``."""
    from nnunet_ext.nnunet_adapter import preprocessed_folder
    from nnunet_ext.core.safety import atomic_write_text

    name, raw, cases, groups, pseudo = case_groups_of(dataset, group_by, pattern, csv_file)
    labelled = {c: g for c, g in groups.items() if c not in pseudo}
    splits = grouped_splits(labelled, n_folds, seed, {c: groups[c] for c in pseudo}, what=group_by)
    check_splits(splits, groups, cases, pseudo, source="the new split", what=group_by)
    targets = [preprocessed_folder(name) / SPLITS_FILE] + ([raw / SPLITS_FILE] if (raw / SPLITS_FILE).is_file() else [])
    written, unchanged = [], []
    for t in targets:
        if t.is_file():
            try:
                old = json.loads(t.read_text())
            except ValueError:
                old = None
            if same_split(old, splits):
                unchanged.append(t)
                continue
            if not overwrite:
                raise ValueError(f"{t} already exists and differs from this split; pass --overwrite to replace it "
                                 f"(or --check to validate it)")
    for t in targets:
        if t not in unchanged:
            atomic_write_text(t, json.dumps(splits, indent=1))
            written.append(t)
    return {"dataset": name, "splits": splits, "groups": groups, "pseudo": sorted(pseudo), "written": written,
            "unchanged": unchanged, "group_by": group_by}


def check_existing(dataset, group_by: str = "subject", pattern: str | None = None, csv_file=None) -> dict:
    """Validate the ``splits_final.json`` nnU-Net would use for ``dataset`` (the preprocessed one, else the
    raw dataset's) against the groups; ValueError naming the case when it leaks."""
    from nnunet_ext.nnunet_adapter import preprocessed_folder

    name, raw, cases, groups, pseudo = case_groups_of(dataset, group_by, pattern, csv_file)
    candidates = [preprocessed_folder(name) / SPLITS_FILE, raw / SPLITS_FILE]
    f = next((p for p in candidates if p.is_file()), None)
    if f is None:
        raise FileNotFoundError(f"no {SPLITS_FILE} for {name} (looked at {candidates[0]} and {candidates[1]}); "
                                f"write one with nnunet-ext split -d {dataset}")
    try:
        splits = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    check_splits(splits, groups, cases, pseudo, source=str(f), what=group_by)
    return {"dataset": name, "file": f, "splits": splits, "groups": groups, "pseudo": sorted(pseudo),
            "unused": unused_cases(splits, cases), "group_by": group_by}


def format_split(res: dict) -> str:
    """One line per fold: cases and groups on each side."""
    groups, pseudo, what = res["groups"], set(res["pseudo"]), res["group_by"]
    lines = []
    for k, s in enumerate(res["splits"]):
        n_pseudo = sum(c in pseudo for c in s["train"])
        val_groups = sorted({groups.get(c, c) for c in s["val"]})
        shown = ", ".join(val_groups[:6]) + (f", ... ({len(val_groups)})" if len(val_groups) > 6 else "")
        lines.append(f"fold {k}: {len(s['train'])} train" + (f" ({n_pseudo} pseudo-labelled)" if n_pseudo else "")
                     + f", {len(s['val'])} val; val {what}s: {shown}")
    return "\n".join(lines)
