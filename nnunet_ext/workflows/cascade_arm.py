"""The consensus cascade (:mod:`nnunet_ext.workflows.consensus`) as one arm of ``nnunet-ext compare``.

``-tr ExtBaselineTrainer cascade:ExtBaselineTrainer`` compares one nnU-Net trained on the dataset's consensus
labels (``labelsTr``) with the cascade of the same dataset: one model per rater (stage 1, every fold of the
consensus split) and a consensus model on the images plus the rater models' out-of-fold lesion probabilities
(stage 2, the compared folds), every network trained with ``TRAINER`` and the comparison's budget. The arm
needs the dataset's ``consensus.json`` (``nnunet-ext consensus split-raters``) and a held-out test set; the
single-model arms train on the same split (the consensus split, written to the dataset's
``splits_final.json`` when it has none). The cascade predicts the test cases with
:func:`nnunet_ext.workflows.consensus.predict_cascade` (every rater model's fold ensemble, then the consensus
model's), so the arm's output is what ``nnunet-ext consensus predict`` writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.core.budget import BUDGET_VARIABLES, SEED_VARIABLE, training_mismatch

PREFIX = "cascade:"


def is_cascade(arm: str) -> bool:
    return str(arm).startswith(PREFIX)


def stage_trainer(arm: str) -> str:
    """The trainer of both stages of a ``cascade:TRAINER`` arm."""
    t = str(arm)[len(PREFIX):]
    if not t:
        raise ValueError(f"arm {arm!r}: name the trainer of both stages, e.g. cascade:ExtBaselineTrainer")
    return t


def folder_name(arm: str) -> str:
    """The arm's folder name under the report's ``arms/`` (no ``:``)."""
    return str(arm).replace(":", "_")


@dataclass
class CascadeArm:
    """A cascade arm after the checks: its stage trainer, the dataset's ``consensus.json`` and whether both
    stages are trained (with this trainer, configuration and plans, stage 2 on every compared fold)."""
    arm: str
    trainer: str
    state: dict
    trained: bool


def _stage_matches(rec: dict | None, trainer: str, configuration: str, plans: str) -> bool:
    return bool(rec) and (rec.get("trainer"), rec.get("configuration"), rec.get("plans")) == (trainer, configuration,
                                                                                                 plans)


def check(arm: str, dataset, configuration: str, plans: str, folds, budget: dict, train_seed, test_set: bool,
          split_file: Path) -> CascadeArm:
    """Everything a cascade arm needs before training: a held-out test set, the consensus split (written to
    ``split_file`` when missing, else equal to it), folds inside it, and, where models are trained already,
    the same trainer, configuration, plans, budget and seed."""
    from nnunet_ext.workflows.consensus import load_state, rater_models

    trainer = stage_trainer(arm)
    if not test_set:
        raise NotImplementedError(f"compare's validation-fold evaluation with the arm {arm}: the cascade predicts "
                                  f"new cases with every fold's rater models; give --test-images/--test-labels")
    try:
        src, state = load_state(dataset)
    except FileNotFoundError as e:
        raise ValueError(f"arm {arm} needs the consensus split: run `nnunet-ext consensus split-raters -d {dataset}` "
                         f"first ({e})") from None
    splits = state["splits"]
    if split_file.is_file():
        if json.loads(split_file.read_text()) != splits:
            raise ValueError(f"arms with different splits: {split_file} is not the consensus split of {src / 'consensus.json'}"
                             f" that the cascade arm {arm} trains on; remove {split_file} (compare writes the "
                             f"consensus split there) or split the raters again")
    else:
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps(splits, indent=1))
        print(f"   wrote the consensus split of {src.name} ({len(splits)} folds) to {split_file}: every arm trains "
              f"on it", flush=True)
    bad = [f for f in folds if f >= len(splits)]
    if bad:
        raise ValueError(f"fold(s) {bad} are not in the consensus split ({len(splits)} folds)")
    s1, s2 = state.get("stage1"), state.get("stage2_training")
    for key, rec in (("stage 1", s1), ("stage 2", s2)):
        if rec and not _stage_matches(rec, trainer, configuration, plans):
            raise ValueError(f"the cascade of {src.name} was trained ({key}) with {rec.get('trainer')} / "
                             f"{rec.get('configuration')} / {rec.get('plans')}, the arm {arm} asks for {trainer} / "
                             f"{configuration} / {plans}; a dataset holds one cascade")
    trained = bool(s1 and s2 and "stage2" in state and set(folds) <= set(s2.get("folds", [])))
    if trained or s1:
        from nnunet_ext.nnunet_adapter import ModelRef

        dirs = [r.folder(must_exist=False) / f"fold_{f}" for r in rater_models(state).values() for f in r.folds]
        if trained:
            c = ModelRef(state["stage2"]["name"], configuration, trainer, plans)
            dirs += [c.folder(must_exist=False) / f"fold_{f}" for f in folds]
        for d in dirs:
            why = training_mismatch(d, budget, train_seed)
            if why:
                raise ValueError(f"arms trained with a different budget or seed: {d} (cascade arm {arm}) {why}")
    return CascadeArm(arm, trainer, state, trained)


def training_stages(c: CascadeArm, dataset, configuration: str, plans: str, folds, device: str, n_proc: int,
                    training_env: dict) -> list:
    """The launcher stages that train the cascade (:func:`nnunet_ext.workflows.consensus.train_stages`,
    stage "all"), each task with exactly the comparison's budget and seed; none when it is trained."""
    if c.trained:
        return []
    from nnunet_ext.workflows.consensus import train_stages

    stages = train_stages(dataset, "all", configuration, c.trainer, plans, list(folds), device, n_proc)
    for st in stages:
        st.name = f"{folder_name(c.arm)}_{st.name}"
        st.after = [f"{folder_name(c.arm)}_{a}" for a in st.after]
        for t in st.tasks:
            t.env = {k: v for k, v in t.env.items() if k not in BUDGET_VARIABLES and k != SEED_VARIABLE}
            t.env.update(training_env)
    return stages


def models(dataset, folds) -> tuple[list[dict], dict]:
    """(rater models, consensus model restricted to ``folds``) of the trained cascade, as
    :func:`nnunet_ext.workflows.consensus.predict_cascade` takes them."""
    from nnunet_ext.workflows.consensus import cascade_models, load_state

    raters, cons = cascade_models(load_state(dataset)[1])
    missing = sorted(set(folds) - set(cons["folds"]))
    if missing:
        raise RuntimeError(f"the consensus model has no fold(s) {missing}")
    raters = [{**r, "model_dir": str(r["model_dir"]), "folds": list(r["folds"])} for r in raters]
    return raters, {"model_dir": str(cons["model_dir"]), "folds": list(folds)}


def consensus_dir(dataset, configuration: str, trainer: str, plans: str) -> Path | None:
    """The consensus model's folder (its contract gives the arm's stored threshold), None before build-stage2."""
    from nnunet_ext.nnunet_adapter import ModelRef
    from nnunet_ext.workflows.consensus import load_state

    state = load_state(dataset)[1]
    if "stage2" not in state:
        return None
    return ModelRef(state["stage2"]["name"], configuration, trainer, plans).folder(must_exist=False)
