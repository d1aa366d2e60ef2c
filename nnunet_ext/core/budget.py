"""The training-budget environment variables: ``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERATIONS`` (training
iterations per epoch) and ``NNUNET_EXT_VAL_ITERATIONS`` (validation iterations per epoch).

Every nnunet-ext trainer reads them (nnunet_ext.training.base) and prints and logs each one it applies. The
launcher (nnunet_ext.cluster.launcher) passes them into a job only when the command asked for a budget
(``compare --epochs``, ``train --epochs``, ...); a budget variable that is merely exported in the submitting
shell is unset in the job scripts, with a printed warning.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# variable -> the nnU-Net trainer attribute it sets
BUDGET_VARIABLES = {"NNUNET_EXT_NUM_EPOCHS": "num_epochs", "NNUNET_EXT_ITERATIONS": "num_iterations_per_epoch",
                    "NNUNET_EXT_VAL_ITERATIONS": "num_val_iterations_per_epoch"}


def budget_in(environ=None) -> dict[str, str]:
    """The budget variables set (non-empty) in ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in BUDGET_VARIABLES if environ.get(k)}


# the opt-in training seed (nnunet_ext.training.base): python's random, numpy and torch seeded, seeded data
# augmentation workers handing over batches in a fixed order, deterministic torch algorithms. Not a budget: it never changes what is trained.
SEED_VARIABLE = "NNUNET_EXT_SEED"
MAX_SEED = 2 ** 32 - 1  # numpy's seed range


def seed_in(environ=None) -> int | None:
    """The training seed of ``NNUNET_EXT_SEED`` in ``environ`` (default: this process's environment), None
    when it is unset or empty; a ValueError naming the variable when it is not a whole number in 0..2**32-1."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SEED_VARIABLE)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{SEED_VARIABLE} must be a whole number in 0..{MAX_SEED}, got {raw!r}")
    return value


def trained_budget(fold_dir: Path) -> dict | None:
    """(epochs, iterations per epoch) a fold was trained with, from nnU-Net's ``debug.json``."""
    p = fold_dir / "debug.json"
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    try:
        return {"epochs": int(d["num_epochs"]), "iterations": int(d["num_iterations_per_epoch"])}
    except (KeyError, ValueError):
        return None


def trained_seed(fold_dir: Path) -> int | None:
    """The training seed a fold was trained with (``nnunet_ext_settings.json``), None when it was not seeded."""
    p = fold_dir / "nnunet_ext_settings.json"
    if not p.is_file():
        return None
    try:
        seed = json.loads(p.read_text()).get("seed")
    except (ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) else None


def training_mismatch(fold_dir: Path, budget: dict, train_seed: int | None) -> str | None:
    """How the fold in ``fold_dir`` was trained against what is requested -- ``budget`` (its ``epochs`` and
    ``iterations``) and ``train_seed`` (checked when not None) --, as a phrase ("has 40 epochs x 20 iterations,
    requested ..."); None when it matches or nothing is recorded."""
    if train_seed is not None:
        seeded = trained_seed(fold_dir)
        if seeded != train_seed:
            return ("was trained without a training seed" if seeded is None else
                    f"was trained with training seed {seeded}") + f", requested training seed {train_seed}"
    b = trained_budget(fold_dir)
    want = {k: v for k, v in budget.items() if k in ("epochs", "iterations")}
    if b is not None and any(b[k] != v for k, v in want.items()):
        return f"has {b['epochs']} epochs x {b['iterations']} iterations, requested {want}"
    return None
