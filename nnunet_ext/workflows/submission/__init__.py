"""Challenge submission packaging: a trained model into a folder that builds a runnable, offline container.

``build`` writes ``OUT/`` (through a hidden staging folder beside it, renamed into place at the end):

* ``model.zip`` -- nnU-Net's own export (``nnUNetv2_export_model_to_zip``) of the selected folds,
* ``model_extras/`` -- what prediction needs beyond the weights: the model contract
  (``nnunet_ext_model.json``, :mod:`nnunet_ext.inference.contract`) and every ``fold_<k>/nnunet_ext_*.json``
  (thresholds, settings) our trainers store beside the checkpoints,
* ``model_<i>.zip``/``model_extras_<i>/`` -- the other models of an ensemble (``--selection``) or the rater
  models of a consensus cascade (``--consensus``, whose ``model.zip`` is the consensus model),
* ``vendor/nnunet_ext/`` -- this package's code (the trainer classes must be importable to load the model),
* ``submission.json`` -- challenge, model selection, condition and cohort, versions,
* ``requirements.txt`` -- every Python package prediction imports, pinned to the versions in use here,
* ``entrypoint.py``, ``Dockerfile`` (base image and pip options as build arguments), ``README.md``.

``check_submission`` (``nnunet-ext submission test``) runs the entrypoint on a read-only copy of a sample
input, with a timeout, in a fresh folder per run, and checks every expected output.

Trust model: a PyTorch checkpoint can run code when loaded; only package and load models you trust.
Archives are extracted by :func:`safe_extract` (:mod:`nnunet_ext.workflows.submission.archive`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from nnunet_ext.inference.contract import CONTRACT_FILE
from nnunet_ext.workflows.submission.archive import safe_extract  # noqa: F401 - re-exported
from nnunet_ext.workflows.submission.layouts import CHALLENGES

CHANNELS_NEEDED = {"wmh2017": 2, "msseg2": 2, "isbi2015": 4}
# what the packaged code imports at prediction time; requirements.txt pins these and everything they need
RUNTIME_PACKAGES = ("nnunetv2", "torch", "SimpleITK", "numpy", "scipy", "connected-components-3d", "acvl-utils",
                    "matplotlib")
DEFAULT_TIMEOUT_S = 3600.0


def _versions() -> dict:
    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for pkg in RUNTIME_PACKAGES + ("nnunet-ext",):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(roots=RUNTIME_PACKAGES) -> list[str]:
    """``name==version`` of ``roots`` and of everything they require in this environment (environment
    markers and extras evaluated here), sorted: the complete set pip installs in the image with
    ``--no-deps``, so the container runs exactly the versions ``submission test`` runs."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (_canonical(name), extra) in done:
            continue
        done.add((_canonical(name), extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if not extra and name in roots:
                raise RuntimeError(f"{name} is not installed in this environment ({sys.executable})") from None
            continue
        found[_canonical(name)] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None and extra:
                continue  # already taken with the base package
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                continue
            todo.append((req.name, ""))
            todo.extend((req.name, e) for e in req.extras)
    return sorted(found.values(), key=str.lower)


DOCKERFILE = """# Built by nnunet-ext submission build. Offline at run time: everything is installed while building.
#
# Build arguments:
#   BASE_IMAGE  an image with Python {python} and its venv module. Default: python:{python}-slim (Docker Hub).
#               Without registry access use a local one, e.g. Debian bookworm (Python 3.11) made with
#               debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm DIR
#               tar -C DIR -c . | docker import - nnunet-ext-base:bookworm
#   PIP_ARGS    extra pip options, e.g. a local wheelhouse (pip wheel --no-deps -r requirements.txt -w WH)
#               served with python3 -m http.server -d WH 8765 and built with --network host:
#               --build-arg PIP_ARGS="--no-index --find-links http://127.0.0.1:8765/"
ARG BASE_IMAGE=python:{python}-slim
FROM ${{BASE_IMAGE}}
ARG PIP_ARGS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY requirements.txt /opt/submission/requirements.txt
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-deps $PIP_ARGS -r /opt/submission/requirements.txt \\
 && /opt/venv/bin/python -c "import torch, nnunetv2, SimpleITK, cc3d, scipy"
RUN useradd --create-home --uid 1000 submitter
COPY . /opt/submission
ENV PATH=/opt/venv/bin:$PATH \\
    PYTHONPATH=/opt/submission/vendor \\
    nnUNet_results=/opt/submission/results \\
    nnUNet_raw=/tmp/nnunet_raw nnUNet_preprocessed=/tmp/nnunet_preprocessed \\
    nnUNet_extTrainer=/opt/submission/vendor/nnunet_ext/trainers \\
    MPLCONFIGDIR=/tmp/matplotlib
# the model is installed as root and stays read-only for the user the container runs as
RUN /opt/venv/bin/python /opt/submission/entrypoint.py --install-only && chmod -R a+rX,go-w /opt/submission
USER submitter
ENTRYPOINT ["/opt/venv/bin/python", "/opt/submission/entrypoint.py", "--input", "/input", "--output", "/output"]
"""

DOCKERIGNORE = "results/\n**/__pycache__\n**/*.pyc\n"

ENTRYPOINT = '''#!/usr/bin/env python3
"""Submission entrypoint (written by nnunet-ext submission build): reads the challenge's input layout,
runs the packaged nnU-Net model, writes the challenge's output names in the input's geometry."""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "vendor"))
os.environ.setdefault("nnUNet_extTrainer", str(HERE / "vendor" / "nnunet_ext" / "trainers"))

from nnunet_ext.workflows.submission.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(HERE))
'''

README = """# Submission: {challenge}

Model: {model} of `{dataset}`, folds {folds}, checkpoint `{checkpoint}`{cohort_line}
(nnunet-ext {ext_version}, nnU-Net {nnunet_version}, PyTorch {torch_version}).

Test locally without Docker (same entrypoint; read-only copy of the input, fresh output folder, timeout):

    nnunet-ext submission test {out} --input SAMPLE_INPUT_DIR

Build and run the container (no network at run time, runs as the non-root user `submitter`):

    docker build -t {tag} {out}
    docker run --rm --network none -v "$PWD/input":/input:ro -v "$PWD/output":/output {tag}

The output folder must be writable by the container's user (uid 1000). Without access to Docker Hub,
build on a local base image and a local wheelhouse (see the comments at the top of the Dockerfile):

    docker build --network host --build-arg BASE_IMAGE=nnunet-ext-base:bookworm \\
        --build-arg PIP_ARGS="--no-index --find-links http://127.0.0.1:8765/" -t {tag} {out}

Input/output layout ({challenge}): see `vendor/nnunet_ext/workflows/submission/layouts.py`.

Trust model: a PyTorch checkpoint can execute code when it is loaded. Only build submissions from models
you trained or trust. `model.zip` is extracted only inside the results folder (absolute paths, `..`,
links, duplicates and oversized archives are refused before anything is written).
"""


def _check_build_args(folds, challenge: str, checkpoint: str, tag: str) -> list[int]:
    if challenge not in CHALLENGES:
        raise ValueError(f"unknown challenge {challenge!r}; known: {', '.join(CHALLENGES)}")
    folds = list(folds)
    if not folds:
        raise ValueError("-f: give at least one fold")
    for f in folds:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"-f: folds are non-negative integers, got {f!r}")
    if len(set(folds)) != len(folds):
        raise ValueError(f"-f: fold listed twice in {folds}")
    if not checkpoint or "/" in checkpoint or "\\" in checkpoint or checkpoint in (".", ".."):
        raise ValueError(f"-chk: a checkpoint file name inside fold_<k>/ (e.g. checkpoint_final.pth), got {checkpoint!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", tag or ""):
        raise ValueError(f"--tag {tag!r}: a docker image tag is lower-case letters, digits and . _ / : -")
    return folds


def _model_condition(mdir: Path, folds, checkpoint: str, cohort, trainer: str):
    """(contract as JSON, condition, cohort): the model's contract (file, or derived from the checkpoint for
    models trained before contracts existed) and the cohort checked against it."""
    from nnunet_ext.inference.contract import load_contract

    c = load_contract(mdir, folds, checkpoint)
    if cohort is not None and c.condition != "cohort":
        raise NotImplementedError(f"--cohort {cohort} with {trainer} (condition: {c.condition}): only "
                                  f"cohort-conditioned (SCIN) models take a cohort")
    if c.condition == "cohort":
        if cohort is None:
            raise ValueError(f"{trainer} is cohort-conditioned: pass --cohort NAME (the labelling style the "
                             f"submission predicts in), one of {c.cohorts}")
        if cohort not in c.cohorts:
            raise ValueError(f"--cohort {cohort!r}: unknown cohort; this model knows {c.cohorts}")
    return c.to_json(), c.condition, cohort


def _resolved(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _package_model(stage: Path, dataset, configuration: str, trainer: str, plans: str, folds, checkpoint: str,
                   zip_name: str, extras_name: str) -> None:
    """nnU-Net's export of one model into ``stage/zip_name`` and its extras (model contract, every fold's
    ``nnunet_ext_*.json``) into ``stage/extras_name/``."""
    from nnunet_ext.core.paths import nnunet_command, nnunet_env
    from nnunet_ext.nnunet_adapter import ModelRef

    mdir = ModelRef(str(dataset), configuration, trainer, plans).folder()
    r = subprocess.run([nnunet_command("nnUNetv2_export_model_to_zip"), "-d", str(dataset), "-o",
                        str(stage / zip_name), "-c", configuration, "-tr", trainer, "-p", plans,
                        "-f", *map(str, folds), "-chk", checkpoint],
                       env=nnunet_env(None), capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"nnUNetv2_export_model_to_zip failed for {mdir}: {tail[0]}")
    extras = stage / extras_name
    extras.mkdir()
    if (mdir / CONTRACT_FILE).is_file():  # as trained (or as `nnunet-ext select` left it), byte for byte
        shutil.copyfile(mdir / CONTRACT_FILE, extras / CONTRACT_FILE)
    else:  # a model trained before contracts existed: the contract derived from its checkpoint
        from nnunet_ext.inference.contract import load_contract

        (extras / CONTRACT_FILE).write_text(json.dumps(load_contract(mdir, folds, checkpoint).to_json(), indent=1))
    for f in folds:
        (extras / f"fold_{f}").mkdir()
        for j in sorted((mdir / f"fold_{f}").glob("nnunet_ext_*.json")):
            shutil.copyfile(j, extras / f"fold_{f}" / j.name)


def _check_model(mdir: Path, folds, checkpoint: str, challenge: str) -> tuple[int, str, dict]:
    ds_file = mdir / "dataset.json"
    try:
        ds = json.loads(ds_file.read_text())
        n_ch, file_ending = len(ds["channel_names"]), ds["file_ending"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ds_file}: not a readable nnU-Net dataset.json ({type(e).__name__}: {e})") from None
    if challenge in CHANNELS_NEEDED and n_ch != CHANNELS_NEEDED[challenge]:
        raise ValueError(f"{challenge} provides {CHANNELS_NEEDED[challenge]} input images per case, the model "
                         f"{mdir.name} expects {n_ch} channels ({ds['channel_names']})")
    for f in folds:
        if not (mdir / f"fold_{f}" / checkpoint).is_file():
            raise FileNotFoundError(f"{mdir / f'fold_{f}' / checkpoint} not found")
    return n_ch, file_ending, ds


@dataclass(frozen=True)
class BuildOptions:
    """How ``submission build`` packages beside the model's configuration and trainer: nnU-Net's ``plans`` and
    ``folds`` of the model, the ``challenge`` layout, the ``checkpoint``, the image ``tag`` and the ``cohort``
    of a cohort-conditioned (SCIN) model. Checked by :func:`build`."""
    plans: str = "nnUNetPlans"
    folds: tuple | list | None = (0,)
    challenge: str = "generic"
    checkpoint: str = "checkpoint_final.pth"
    tag: str = "nnunet-ext-submission"
    cohort: str | None = None


def build(out_dir, dataset, configuration: str | None = None, trainer: str | None = None,
          options: BuildOptions | None = None, *, selection=None, consensus=None, **fields) -> Path:
    """Write the submission folder ``out_dir`` (refused when it exists and is not empty, or overlaps a
    model folder); see the module docstring for its content. ``options``: :class:`BuildOptions`, or its
    fields as keywords.

    ``selection``: a selection file of ``nnunet-ext select`` ("" or True: the dataset's default one) instead
    of ``configuration/trainer/plans/folds``. A single selected model is packaged as usual (its contract holds
    the selection); an ensemble packages every member (``model.zip``/``model_extras`` for the first,
    ``model_<i>.zip``/``model_extras_<i>`` for the others) and the ensemble's threshold and minimum lesion
    size in ``submission.json`` (``ensemble``), which the entrypoint applies (:mod:`nnunet_ext.inference.ensemble`).

    ``consensus``: a trained consensus cascade (``consensus.json``, its folder, or "" / True: the one of
    ``dataset``) instead of one model: :func:`_build_cascade`."""
    from nnunet_ext.core.validate import options_of
    from nnunet_ext.nnunet_adapter import dataset_name

    o = options_of(BuildOptions, options, fields, "build")
    plans, folds, challenge, checkpoint, tag, cohort = o.plans, o.folds, o.challenge, o.checkpoint, o.tag, o.cohort
    if consensus is not None and consensus is not False:
        given = [o for o, v in (("-c", configuration), ("-tr", trainer), ("--cohort", cohort),
                                ("--selection", selection)) if v not in (None, False)]
        if given:
            raise ValueError(f"--consensus chooses the models and folds; drop {' '.join(given)}")
        return _build_cascade(out_dir, dataset, consensus, challenge, checkpoint, tag)

    models, folds, ensemble = _chosen_models(dataset, selection, configuration, trainer, plans, folds, cohort)
    members = [(m.trainer, m.plans, m.configuration) for m in models]
    trainer, plans, configuration = members[0]
    folds = _check_build_args(folds, challenge, checkpoint, tag)
    out = _new_output(out_dir)
    n_ch, file_ending = _check_models(out, models, folds, checkpoint, challenge)
    mdir = models[0].folder()
    if ensemble is not None:
        from nnunet_ext.inference.ensemble import _check_members

        _check_members([m.folder() for m in models], folds, checkpoint)
    _, condition, cohort = _model_condition(mdir, folds, checkpoint, cohort, trainer)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        for i, (tr, pl, cf) in enumerate(members):
            zip_name, extras_name = ("model.zip", "model_extras") if i == 0 else (f"model_{i}.zip", f"model_extras_{i}")
            _package_model(stage, dataset, cf, tr, pl, folds, checkpoint, zip_name, extras_name)
            if ensemble is not None:
                ensemble["members"].append({"trainer": tr, "plans": pl, "configuration": cf, "zip": zip_name,
                                            "extras": extras_name})
        cfg = {"challenge": challenge, "dataset": dataset_name(dataset),
               "configuration": configuration, "trainer": trainer, "plans": plans, "folds": folds,
               "checkpoint": checkpoint, "file_ending": file_ending, "n_channels": n_ch,
               "condition": condition, "cohort": cohort, "ensemble": ensemble}
        model_line = " + ".join(f"`{tr}__{pl}__{cf}`" for tr, pl, cf in members)
        if ensemble is not None:
            model_line += (f" (ensemble: mean probability >= {ensemble['threshold']:g}, lesions >= "
                           f"{ensemble['min_lesion_mm3']:g} mm3, from {ensemble['selection']})")
        _finish(stage, out, cfg, model_line, tag)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _chosen_models(dataset, selection, configuration, trainer, plans, folds, cohort) -> tuple[list, list, dict | None]:
    """(models as ModelRefs, folds, the ensemble record or None): the selection file's choice, or the one
    model of ``-c -tr -p``."""
    from nnunet_ext.nnunet_adapter import ModelRef

    if selection is None or selection is False:
        if configuration is None or trainer is None:
            raise ValueError("submission build needs -c CONFIGURATION and -tr TRAINER (or --selection)")
        return [ModelRef(str(dataset), configuration, trainer, plans)], folds, None
    from nnunet_ext.inference.ensemble import read_selection, selection_path

    given = [o for o, v in (("-c", configuration), ("-tr", trainer), ("--cohort", cohort)) if v]
    if given:
        raise ValueError(f"--selection chooses the model(s) and folds; drop {' '.join(given)}")
    spath = selection_path(dataset) if selection in ("", True) else Path(selection)
    choice = read_selection(spath, dataset)
    models = [ModelRef(str(dataset), m.configuration, m.trainer, m.plans) for m in choice["models"]]
    ensemble = None
    if len(models) > 1:
        ensemble = {"selection": str(spath), "threshold": choice["threshold"],
                    "min_lesion_mm3": choice["min_lesion_mm3"], "connectivity": choice["connectivity"],
                    "members": []}
    return models, [f for f in choice["folds"] if f != "all"], ensemble


def _check_models(out: Path, models: list, folds, checkpoint: str, challenge: str) -> tuple[int, str]:
    """(channels, file ending) the models share; each model checked and outside ``out``."""
    shapes = set()
    for m in models:
        mdir = m.folder()
        n_ch, file_ending, _ = _check_model(mdir, folds, checkpoint, challenge)
        shapes.add((n_ch, file_ending))
        ro, rm = _resolved(out), _resolved(mdir)
        if ro == rm or rm in ro.parents or ro in rm.parents:
            raise ValueError(f"-o {out} overlaps the model folder {mdir}; choose an output outside it")
    if len(shapes) != 1:
        raise ValueError(f"the ensemble's models take different inputs (channels, file ending): {sorted(shapes)}")
    return shapes.pop()


def _new_output(out_dir) -> Path:
    """``-o``: a new or empty folder."""
    out = Path(out_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"-o {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"-o {out} exists and is not empty; choose a new folder")
    return out


def _finish(stage: Path, out: Path, cfg: dict, model_line: str, tag: str) -> None:
    """Everything but the models: vendored code, ``submission.json`` (``cfg`` + versions), requirements,
    entrypoint, Dockerfile, README; then the staging folder is renamed to ``out``."""
    import nnunet_ext
    from nnunet_ext.core.paths import trainers_path

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    vendor = stage / "vendor" / "nnunet_ext"
    shutil.copytree(Path(nnunet_ext.__file__).parent, vendor, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(trainers_path(), vendor / "trainers", ignore=ignore, dirs_exist_ok=True)
    converters = Path(importlib.util.find_spec("nnunet_ext.dataset_conversion").origin).parent
    shutil.copytree(converters, vendor / "dataset_conversion", ignore=ignore,
                    dirs_exist_ok=True)
    versions = _versions()
    cfg = {**cfg, "versions": versions}
    (stage / "submission.json").write_text(json.dumps(cfg, indent=1))
    (stage / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    (stage / "entrypoint.py").write_text(ENTRYPOINT)
    (stage / "Dockerfile").write_text(DOCKERFILE.format(python=versions["python"]))
    (stage / ".dockerignore").write_text(DOCKERIGNORE)
    cohort = cfg.get("cohort")
    (stage / "README.md").write_text(README.format(
        challenge=cfg["challenge"], model=model_line, dataset=cfg["dataset"],
        folds=cfg["folds"], checkpoint=cfg["checkpoint"], ext_version=nnunet_ext.__version__,
        cohort_line=f", cohort `{cohort}`" if cohort else "",
        nnunet_version=versions.get("nnunetv2"), torch_version=versions.get("torch"), out=out, tag=tag))
    if out.is_dir():
        out.rmdir()  # empty (checked before building); fails if something appeared meanwhile
    os.rename(stage, out)


def _consensus_state(dataset, consensus) -> dict:
    """The cascade's ``consensus.json``: "" / True -> the one of ``dataset``; a folder -> its consensus.json;
    a file. It must belong to ``dataset``."""
    from nnunet_ext.workflows.consensus import STATE, load_state
    from nnunet_ext.core.io import read_json
    from nnunet_ext.nnunet_adapter import dataset_name

    if consensus in ("", True):
        return load_state(dataset)[1]
    f = Path(consensus)
    f = f / STATE if f.is_dir() else f
    if not f.is_file():
        raise FileNotFoundError(f"--consensus {consensus}: {f} not found (written by `nnunet-ext consensus split-raters`)")
    state = read_json(f, required=("source", "raters", "n_folds"))
    if state["source"]["name"] != dataset_name(dataset):
        raise ValueError(f"--consensus {f} is the cascade of {state['source']['name']}, not of -d {dataset}")
    return state


def _build_cascade(out_dir, dataset, consensus, challenge: str, checkpoint: str, tag: str) -> Path:
    """A consensus cascade as one submission: every rater model (all folds of the shared split) as
    ``model_<i>.zip``/``model_extras_<i>``, the consensus model as ``model.zip``/``model_extras``, and
    ``submission.json`` ``cascade`` (rater order = the consensus model's channel order), which the entrypoint
    runs with :func:`nnunet_ext.workflows.consensus.predict_cascade`, as ``nnunet-ext consensus predict`` does."""
    from nnunet_ext.workflows.consensus import cascade_models
    from nnunet_ext.inference.contract import load_contract
    from nnunet_ext.nnunet_adapter import dataset_name

    state = _consensus_state(dataset, consensus)
    _check_build_args([0], challenge, checkpoint, tag)
    raters, cons = cascade_models(state)
    out = _new_output(out_dir)
    s1, s2 = state["stage1"], {**state["stage2"], **state["stage2_training"]}
    members = [{"role": "consensus", "name": "consensus", "id": s2["id"], "dataset": s2["name"],
                "trainer": s2["trainer"], "plans": s2["plans"], "configuration": s2["configuration"],
                "folds": cons["folds"], "zip": "model.zip", "extras": "model_extras"}]
    for i, r in enumerate(raters, start=1):
        rds = state["raters"][r["name"]]
        members.append({"role": "rater", "name": r["name"], "id": rds["id"], "dataset": rds["name"],
                        "trainer": s1["trainer"], "plans": s1["plans"], "configuration": s1["configuration"],
                        "folds": r["folds"], "zip": f"model_{i}.zip", "extras": f"model_extras_{i}"})
    shapes = []
    for m, mdir in zip(members, [cons["model_dir"]] + [r["model_dir"] for r in raters]):
        n_ch, file_ending, _ = _check_model(mdir, m["folds"], checkpoint,
                                            challenge if m["role"] == "rater" else "generic")
        shapes.append((n_ch, file_ending))
        ro, rm = _resolved(out), _resolved(mdir)
        if ro == rm or rm in ro.parents or ro in rm.parents:
            raise ValueError(f"-o {out} overlaps the model folder {mdir}; choose an output outside it")
        if load_contract(mdir, m["folds"], checkpoint).condition == "cohort":
            raise NotImplementedError(f"--consensus with a cohort-conditioned (SCIN) {m['role']} model "
                                      f"({m['trainer']}): the cascade predicts in no cohort")
    n_ch, file_ending = shapes[1]
    if shapes[0] != (n_ch + len(raters), file_ending) or len(set(shapes[1:])) != 1:
        raise ValueError(f"the consensus model takes {shapes[0][0]} channels, not the {n_ch} images plus one "
                         f"per rater ({len(raters)}): rebuild stage 2 (`nnunet-ext consensus build-stage2`)")
    condition = load_contract(cons["model_dir"], cons["folds"], checkpoint).condition
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        for m in members:
            _package_model(stage, m["id"], m["configuration"], m["trainer"], m["plans"], m["folds"], checkpoint,
                           m["zip"], m["extras"])
        cfg = {"challenge": challenge, "dataset": s2["name"], "configuration": s2["configuration"],
               "trainer": s2["trainer"], "plans": s2["plans"], "folds": cons["folds"], "checkpoint": checkpoint,
               "file_ending": file_ending, "n_channels": n_ch, "condition": condition, "cohort": None,
               "ensemble": None, "cascade": {"source": dataset_name(dataset), "consensus": members[0],
                                             "raters": members[1:]}}
        model_line = (f"consensus cascade of {cfg['cascade']['source']}: rater models "
                      + ", ".join(f"`{m['dataset']}/{m['trainer']}__{m['plans']}__{m['configuration']}` (folds "
                                  f"{m['folds']})" for m in members[1:])
                      + f", then the consensus model `{s2['trainer']}__{s2['plans']}__{s2['configuration']}`")
        _finish(stage, out, cfg, model_line, tag)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ submission test


class SubmissionCheck(NamedTuple):
    ok: bool
    rows: list
    run_dir: Path | None  # kept with --work (output/, entrypoint.log); None when everything was temporary
    log_tail: str


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def _set_tree_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o755 if writable else 0o555)
        else:
            os.chmod(p, 0o644 if writable else 0o444)


def _new_run_dir(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    for k in range(1, 100_000):
        d = work / f"run_{k:03d}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"--work {work}: no free run_<n> folder name")


def _read_submission(sub: Path) -> dict:
    f = sub / "submission.json"
    if not sub.is_dir():
        raise FileNotFoundError(f"submission folder {sub} not found")
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: is {sub} a folder written by `nnunet-ext submission build`?")
    try:
        cfg = json.loads(f.read_text())
        for k in ("challenge", "n_channels", "file_ending"):
            cfg[k]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a valid submission.json ({type(e).__name__}: {e})") from None
    if not (sub / "entrypoint.py").is_file():
        raise FileNotFoundError(f"{sub / 'entrypoint.py'} not found")
    return cfg


def check_submission(sub_dir, input_dir, work_dir=None, device: str = "cpu",
                     timeout: float = DEFAULT_TIMEOUT_S) -> SubmissionCheck:
    """Run the entrypoint locally (no Docker) on a read-only copy of ``input_dir`` and check every expected
    output: present, same size/spacing/origin/direction as its reference input image, binary values; and
    that the entrypoint neither changed its input nor ran past ``timeout`` seconds.

    Each run has a fresh folder: ``work_dir/run_<n>/`` (kept: ``output/``, ``entrypoint.log``) or, without
    ``work_dir``, a temporary one removed afterwards. The input copy and the installed model are always
    removed at the end."""
    from nnunet_ext.workflows.submission.layouts import cases_for

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"--timeout must be a finite number of seconds > 0, got {timeout!r}")
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"-device must be cpu, cuda or mps, got {device!r}")
    sub = Path(sub_dir)
    cfg = _read_submission(sub)
    inp = Path(input_dir)
    if not inp.is_dir():
        raise FileNotFoundError(f"--input {inp} is not a folder")
    rs, ri = _resolved(sub), _resolved(inp)
    if work_dir is not None:
        rw = _resolved(work_dir)
        for name, other in (("the submission folder", rs), ("the input", ri)):
            if rw == other or other in rw.parents or rw in other.parents:
                raise ValueError(f"--work {work_dir} overlaps {name} ({other}); choose a folder outside both")
    # the layout is checked before anything runs: a wrong sample input is one clear error
    cases_for(cfg["challenge"], inp, Path("/nonexistent-output"), cfg["n_channels"], cfg["file_ending"])
    before = _tree_digest(inp)

    run_dir = _new_run_dir(Path(work_dir)) if work_dir is not None else Path(tempfile.mkdtemp(prefix="nnunet_ext_subtest_"))
    # input copy, installed model and the entrypoint's TMPDIR: a short path in the system's temporary folder
    # (multiprocessing's AF_UNIX sockets live in TMPDIR and their paths must stay under 108 bytes)
    scratch = Path(tempfile.mkdtemp(prefix="nnunet_ext_subtest_"))
    rows: list[dict] = []
    log_tail = ""
    try:
        ro_input = scratch / "input"
        shutil.copytree(inp, ro_input, symlinks=False)
        copied = _tree_digest(ro_input)
        _set_tree_writable(ro_input, False)
        out = run_dir / "output"
        out.mkdir()
        rc, seconds, lines = _run_entrypoint(sub, ro_input, out, run_dir / "entrypoint.log", scratch, device, timeout)
        log_tail = "\n".join(lines[-30:])
        if rc is None:
            rows.append({"case": "-", "check": "entrypoint ran", "ok": False,
                         "detail": f"timed out after {timeout:g} s (killed)"})
        else:
            rows.append({"case": "-", "check": "entrypoint ran", "ok": rc == 0,
                         "detail": f"{seconds:.0f} s" if rc == 0 else
                         f"exit code {rc}: {lines[-1] if lines else 'no output'}"})
        changed = _tree_digest(ro_input) != copied
        rows.append({"case": "-", "check": "input untouched", "ok": not changed,
                     "detail": "the entrypoint changed its (read-only) input" if changed else ""})
        if rc == 0:
            rows += _output_rows(cases_for(cfg["challenge"], ro_input, out, cfg["n_channels"], cfg["file_ending"]))
    finally:
        if (scratch / "input").exists():
            _set_tree_writable(scratch / "input", True)
        shutil.rmtree(scratch, ignore_errors=True)
        if work_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    if _tree_digest(inp) != before:  # only another process could do this: the entrypoint never saw inp
        rows.append({"case": "-", "check": "original input untouched", "ok": False, "detail": str(inp)})
    ok = all(r["ok"] for r in rows) and any(r["check"].endswith(" written") for r in rows)
    return SubmissionCheck(ok, rows, run_dir if work_dir is not None else None, log_tail)


def _run_entrypoint(sub: Path, ro_input: Path, out: Path, log: Path, scratch: Path, device: str,
                    timeout: float) -> tuple[int | None, float, list[str]]:
    """(exit code or None when it timed out, seconds, non-empty log lines) of the submission's entrypoint on
    ``ro_input``, with nnU-Net's folders and TMPDIR in ``scratch``, its output in ``log``."""
    env = dict(os.environ, PYTHONPATH=str(sub.resolve() / "vendor"), nnUNet_results=str(scratch / "results"),
               nnUNet_raw=str(scratch / "nnunet_raw"), nnUNet_preprocessed=str(scratch / "nnunet_preprocessed"),
               nnUNet_extTrainer=str(sub.resolve() / "vendor" / "nnunet_ext" / "trainers"),
               MPLCONFIGDIR=str(scratch / "matplotlib"),
               TMPDIR=str(scratch) if len(os.fsencode(str(scratch))) <= 60 else "/tmp")
    cmd = [sys.executable, str(sub / "entrypoint.py"), "--input", str(ro_input), "--output", str(out),
           "--device", device]
    t0 = time.monotonic()
    with open(log, "w") as lf:
        from nnunet_ext.core import guard

        # a process group of its own under the guard: it ends with this command, also on SIGKILL
        proc = guard.popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: the entrypoint and any workers it left behind end with the test
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    return rc, seconds, [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]


def _output_rows(cases) -> list[dict]:
    """The checks of each expected output: written, readable, the geometry of its reference input, binary."""
    import numpy as np
    import SimpleITK as sitk

    rows = []
    for c in cases:
        exists = c.output.is_file()
        rows.append({"case": c.case_id, "check": f"{c.output.name} written", "ok": exists, "detail": ""})
        if not exists:
            continue
        try:
            o, ref = sitk.ReadImage(str(c.output)), sitk.ReadImage(str(c.reference))
        except RuntimeError as e:
            rows.append({"case": c.case_id, "check": f"{c.output.name} readable", "ok": False,
                         "detail": str(e).strip().splitlines()[-1][:200]})
            continue
        for what, a, b in (("size", o.GetSize(), ref.GetSize()), ("spacing", o.GetSpacing(), ref.GetSpacing()),
                           ("origin", o.GetOrigin(), ref.GetOrigin()),
                           ("direction", o.GetDirection(), ref.GetDirection())):
            ok = len(a) == len(b) and bool(np.allclose(a, b, atol=1e-4))
            rows.append({"case": c.case_id, "check": f"{what} = reference", "ok": ok,
                         "detail": "" if ok else f"{a} vs {b}"})
        vals = np.unique(sitk.GetArrayViewFromImage(o))
        ok = bool(np.isin(vals, (0, 1)).all())
        rows.append({"case": c.case_id, "check": "binary values", "ok": ok, "detail": "" if ok else str(vals[:8])})
    return rows


def format_rows(rows: list[dict]) -> str:
    w = max([len(r["case"]) for r in rows] + [4])
    lines = [f"{'case':<{w}}  {'check':<28} result"]
    lines += [f"{r['case']:<{w}}  {r['check']:<28} {'PASS' if r['ok'] else 'FAIL'} {r['detail']}" for r in rows]
    return "\n".join(lines)
