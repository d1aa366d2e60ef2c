"""What the submission's entrypoint runs: install the packaged model (once), predict the challenge's input,
write the challenge's outputs in the reference input's geometry."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path


def _members(cfg: dict) -> list[dict]:
    """The packaged models: one, the ensemble's members (``submission.json``: ``ensemble.members``), or a
    consensus cascade's consensus model and rater models (``cascade``; each with its own dataset and folds)."""
    cascade = cfg.get("cascade")
    if cascade:
        return [dict(cascade["consensus"])] + [dict(m) for m in cascade["raters"]]
    ens = cfg.get("ensemble")
    if ens:
        return [dict(m) for m in ens["members"]]
    return [{"trainer": cfg["trainer"], "plans": cfg["plans"], "configuration": cfg["configuration"],
             "zip": "model.zip", "extras": "model_extras"}]


def _extras(sub: Path, cfg: dict, extras_name: str = "model_extras", folds=None) -> list[tuple[Path, str]]:
    """(packaged file, its place relative to the model folder): the model contract and every fold's
    ``nnunet_ext_*.json`` that ``submission build`` put in ``model_extras/``."""
    extras = sub / extras_name
    out = [(p, p.name) for p in sorted(extras.glob("*.json"))] if extras.is_dir() else []
    for f in (cfg["folds"] if folds is None else folds):
        d = extras / f"fold_{f}"
        if d.is_dir():
            out += [(p, f"fold_{f}/{p.name}") for p in sorted(d.glob("*.json"))]
    return out


def _installed(mdir: Path, cfg: dict, extras, folds=None) -> bool:
    if not all((mdir / f"fold_{f}" / cfg["checkpoint"]).is_file() for f in (cfg["folds"] if folds is None else folds)):
        return False
    return all((mdir / rel).is_file() and (mdir / rel).read_bytes() == src.read_bytes() for src, rel in extras)


def install(sub: Path, results: Path, cfg: dict, member: dict | None = None) -> Path:
    """Install the packaged model into ``results`` unless it is there already (checkpoints of every fold and
    every model extra, byte for byte): ``model.zip`` is extracted by ``safe_extract`` into a temporary folder
    inside ``results``, the extras (model contract ``nnunet_ext_model.json`` and ``fold_<k>/nnunet_ext_*.json``)
    are put beside the folds, and the complete model folder is renamed into place (an interrupted install
    leaves no half model behind). Returns the model folder."""
    from nnunet_ext.workflows.submission.archive import safe_extract

    sub, results = Path(sub), Path(results)
    member = member or _members(cfg)[0]
    from nnunet_ext.nnunet_adapter import ModelRef

    dataset, folds = member.get("dataset", cfg["dataset"]), member.get("folds", cfg["folds"])
    ref = ModelRef(dataset, member["configuration"], member["trainer"], member["plans"])
    name, mdir = ref.name, ref.folder(must_exist=False, results=results)
    extras = _extras(sub, cfg, member["extras"], folds)
    archive = sub / member["zip"]
    if _installed(mdir, cfg, extras, folds):
        return mdir
    results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=results))
    try:
        safe_extract(archive, tmp / "x")
        new = tmp / "x" / dataset / name
        for f in folds:
            if not (new / f"fold_{f}" / cfg["checkpoint"]).is_file():
                raise ValueError(f"{archive} has no {dataset}/{name}/fold_{f}/{cfg['checkpoint']}; "
                                 f"rebuild the submission")
        for src, rel in extras:
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, new / rel)
        mdir.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(mdir):
            os.rename(mdir, tmp / "old")
        os.rename(new, mdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return mdir


def main(sub_dir) -> int:
    ap = argparse.ArgumentParser(description="nnunet-ext challenge submission entrypoint")
    ap.add_argument("--input", default="/input")
    ap.add_argument("--output", default="/output")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--install-only", action="store_true", help="only install the model (Docker build step)")
    # for running the container yourself (docker run ... IMAGE --uncertainty --lesion-table); challenge platforms
    # start it without arguments, so their outputs stay the challenge's files only
    ap.add_argument("--uncertainty", action="store_true",
                    help="also write <output name>_entropy.nii.gz beside each output (as nnunet-ext predict)")
    ap.add_argument("--lesion-table", action="store_true",
                    help="also write lesions.csv and cases.csv into the output folder (as nnunet-ext predict)")
    args = ap.parse_args()
    sub = Path(sub_dir)
    cfg = json.loads((sub / "submission.json").read_text())
    if cfg.get("cascade") and (args.uncertainty or args.lesion_table):
        raise NotImplementedError("--uncertainty / --lesion-table with a consensus-cascade submission: the cascade "
                                  "predicts through `consensus predict`, which writes neither")
    results = Path(os.environ.get("nnUNet_results") or (sub / "results"))
    mdirs = [install(sub, results, cfg, m) for m in _members(cfg)]
    if args.install_only:
        print(f"model installed in {', '.join(map(str, mdirs))}")
        return 0

    from dataclasses import replace

    from nnunet_ext.inference.options import PredictOptions
    from nnunet_ext.inference.predictor import predict_cases
    from nnunet_ext.workflows.submission.layouts import cases_for

    cases = cases_for(cfg["challenge"], args.input, args.output, cfg["n_channels"], cfg["file_ending"])
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the one predictor: the model's contract (condition, cohort, TTA, threshold, post-processing)
        inputs, ids = [[str(p) for p in c.channels] for c in cases], [c.case_id for c in cases]
        ens, pred = cfg.get("ensemble"), Path(tmp)
        o = PredictOptions(device=args.device, write_soft=False, npp=1, nps=1, uncertainty=args.uncertainty,
                           lesion_table=args.lesion_table)
        if cfg.get("cascade"):  # rater models, their soft maps as channels, the consensus model: as consensus predict
            from nnunet_ext.workflows.consensus import predict_cascade

            folder, pred = Path(tmp) / "input", Path(tmp) / "cascade"
            folder.mkdir()
            for c in cases:  # nnU-Net's naming, which the cascade reads
                for k, p in enumerate(c.channels):
                    os.symlink(Path(p).resolve(), folder / f"{c.case_id}_{k:04d}{cfg['file_ending']}")
            members = _members(cfg)
            raters = [{"name": m["name"], "model_dir": d, "folds": m["folds"]}
                      for m, d in zip(members[1:], mdirs[1:])]
            res = predict_cascade(raters, {"model_dir": mdirs[0], "folds": members[0]["folds"]}, folder, pred, o,
                                  checkpoint=cfg["checkpoint"])["consensus"]
        elif ens:  # the mean of the members' soft maps at the selection's threshold and minimum size
            from nnunet_ext.inference.ensemble import predict_ensemble

            res = predict_ensemble(mdirs, cfg["folds"], inputs, tmp,
                                   replace(o, threshold=ens["threshold"], min_lesion_mm3=ens["min_lesion_mm3"]),
                                   connectivity=ens["connectivity"], checkpoint=cfg["checkpoint"], case_ids=ids)
        else:
            res = predict_cases(mdirs[0], cfg["folds"], inputs, tmp, replace(o, cohort=cfg.get("cohort")),
                                checkpoint=cfg["checkpoint"], case_ids=ids)
        _write_outputs(cases, pred, cfg, res, args.uncertainty)
        if args.lesion_table:
            from nnunet_ext.core.safety import atomic_write_text

            for name in ("lesions.csv", "cases.csv"):
                atomic_write_text(Path(args.output) / name, (pred / name).read_text())
    return 0


def _write_outputs(cases, pred: Path, cfg: dict, res: dict, uncertainty: bool) -> None:
    """Each case's mask (lesion label 1) from the prediction folder ``pred`` into the challenge's output file,
    in its reference image's geometry; with ``uncertainty`` the entropy map beside it."""
    import numpy as np
    import SimpleITK as sitk

    for c in cases:
        ref = sitk.ReadImage(str(c.reference))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{c.case_id}{cfg['file_ending']}")))
        seg = (np.asarray(seg) == 1).astype(np.uint8)  # lesion label 1; ignore-label models never predict it
        if seg.shape != sitk.GetArrayViewFromImage(ref).shape:
            raise RuntimeError(f"{c.case_id}: prediction shape {seg.shape} differs from {c.reference}")
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(ref)
        c.output.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(c.output), True)
        if uncertainty:  # the entropy map, in the same geometry, named after the challenge's output
            ent = sitk.ReadImage(str(pred / f"{c.case_id}_entropy{cfg['file_ending']}"))
            ent.CopyInformation(ref)
            sitk.WriteImage(ent, str(_beside(c.output, "_entropy")), True)
        print(f"{c.case_id} -> {c.output} (threshold: {res['threshold']}, {res['threshold_source']}; "
              f"min lesion {res['postprocessing']['min_lesion_mm3']} mm3)")


def _beside(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` before its ending: ``result.nii.gz`` -> ``result<suffix>.nii.gz``."""
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if path.name.endswith(ending):
            return path.with_name(path.name[:-len(ending)] + suffix + ending)
    return path.with_name(path.stem + suffix + path.suffix)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
