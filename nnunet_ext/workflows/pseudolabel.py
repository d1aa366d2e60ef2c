"""Teacher-student pseudo-labelling with test-time-augmentation entropy filtering (Sedai et al.; Bar-Ilan).

For every unlabeled scan the teacher (a trained nnU-Net) predicts under all flip combinations (8 in 3D,
4 for 2d models); P is the mean of the flips' *probabilities* (nnU-Net itself averages logits):
the one predictor (nnunet_ext.inference.predictor) with ``tta="mean_probabilities"`` overrides nnU-Net's one
mirroring step so this costs no extra network pass, and filters each case inside nnU-Net's export workers. Then, per voxel,

* entropy ``H = -sum_c P_c ln P_c`` (nats), confidence ``omega = exp(-alpha H)`` (alpha 0.3),
* confidence-weighted lesion map ``m = P_lesion * omega``; voxels with ``m < VPT`` (0.3) are zeroed,
* the case is dropped when ``sum(m) < TST`` (100 voxels' worth): it holds almost no confident lesion,
* pseudo-label = ``m >= 0.5``; with ``ignore_uncertain`` voxels with ``VPT <= m < 0.5`` (some lesion
  evidence, not enough for the label) become nnU-Net's ignore label instead of background, so the student
  is not taught the teacher's doubts as negatives.

This is our reading of the thesis' "confidence-weighted lesion map"; ``omega`` and ``m`` are written for
every case (``confidenceTr/``, ``lesionmapTr/``) so other readings are one step away.

Inside one sliding-window tile the flips' probabilities are averaged exactly; nnU-Net then blends
overlapping tiles (Gaussian weights) and several folds by averaging what the mirroring step returns, here
log-probabilities, i.e. a normalised geometric mean across tiles and folds.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np


PARAMS = {"alpha": 0.3, "vpt": 0.3, "tst": 100.0}


def entropy(prob: np.ndarray) -> np.ndarray:
    """Voxel entropy (nats) of class probabilities ``prob`` (C, ...)."""
    p = np.clip(prob.astype(np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(0)


def confidence_filter(prob: np.ndarray, alpha: float = 0.3, vpt: float = 0.3, tst: float = 100.0,
                      lesion_channel: int = 1) -> dict:
    """omega, m (after VPT), the case's sum of m, whether it is kept, the pseudo-label and the uncertain
    voxels, from class probabilities ``prob`` (C, ...)."""
    if alpha < 0 or not 0 <= vpt <= 1 or tst < 0:
        raise ValueError(f"need alpha >= 0, 0 <= VPT <= 1, TST >= 0; got alpha={alpha}, vpt={vpt}, tst={tst}")
    omega = np.exp(-alpha * entropy(prob))
    m_raw = prob[lesion_channel].astype(np.float64) * omega
    m = np.where(m_raw >= vpt, m_raw, 0.0)
    total = float(m.sum())
    return {"omega": omega.astype(np.float32), "m": m.astype(np.float32), "sum_m": total, "keep": total >= tst,
            "label": (m >= 0.5).astype(np.uint8), "uncertain": (m_raw >= vpt) & (m_raw < 0.5)}


def _cases_of(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith(ending))
    cases: dict[str, list[Path]] = {}
    for p in files:
        stem = p.name[: -len(ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise ValueError(f"{p}: image names must be <case>_<channel:04d>{ending} (nnU-Net's naming)")
        cases.setdefault(stem[:-5], []).append(p)
    for c, lst in cases.items():
        chans = sorted(int(p.name[len(c) + 1:len(c) + 5]) for p in lst)
        if chans != list(range(n_channels)):
            raise ValueError(f"case {c} in {folder} has channels {chans}, the teacher expects {list(range(n_channels))}")
    return {c: sorted(lst) for c, lst in cases.items()}


def _check_geometry(files: list[Path]) -> None:
    import SimpleITK as sitk

    from nnunet_ext.core.io import check_same_geometry

    imgs = [sitk.ReadImage(str(f)) for f in files]
    for f, img in zip(files[1:], imgs[1:]):
        check_same_geometry(files[0], imgs[0], f, img)
    if imgs[0].GetDimension() != 3:
        raise ValueError(f"{files[0]}: expected a 3D image")


def _write_dataset_json(root: Path, teacher_ds: dict, ignore: bool) -> None:
    labels = dict(teacher_ds["labels"])
    if ignore:
        labels["ignore"] = max(v for v in labels.values() if isinstance(v, int)) + 1
    n = len([p for p in (root / "labelsTr").iterdir() if p.name.endswith(teacher_ds["file_ending"])])
    ds = {k: v for k, v in teacher_ds.items() if k not in ("labels", "numTraining")}
    ds.update({"labels": labels, "numTraining": n,
               "description": "nnunet-ext student dataset: teacher's labeled cases + kept pseudo-labeled cases"})
    tmp = root / f".tmp_dataset.json.{_host_tag()}.{os.getpid()}"  # one per process: shards run at the same time
    tmp.write_text(json.dumps(ds, indent=2))
    os.replace(tmp, root / "dataset.json")


_TMP = re.compile(r"^\.tmp_(?P<pid>\d+)_(?:[0-9a-f]{8}_)?(?P<name>.+)$")
CASE_FOLDERS = ("imagesTr", "labelsTr", "softlabelsTr", "confidenceTr", "lesionmapTr")


def _case_files(root: Path, case: str, ending: str) -> list[Path]:
    """Every file of ``case`` in the student dataset (images, labels, soft label, omega, m), finished or
    temporary (``.tmp_<pid>_[<uuid8>_]<name>`` of a killed run)."""
    names = {f"{case}{ending}"}
    out = []
    for d in CASE_FOLDERS:
        folder = root / d
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            n = p.name
            m = _TMP.match(n)
            if m:
                n = m["name"]
            if n in names or (d == "imagesTr" and n.startswith(case + "_") and n.endswith(ending)
                              and len(n) == len(case) + 5 + len(ending) and n[len(case) + 1:len(case) + 5].isdigit()):
                out.append(p)
    prog = root / ".nnunet_ext_progress"
    if prog.is_dir():
        out += [p for p in prog.iterdir() if (m := _TMP.match(p.name)) and m["name"] == f"{case}.json"]
    return out


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _clean_own_host_tmp(root: Path) -> None:
    """Remove ``.tmp_<file>.<host>.<pid>`` files of dead processes of this host (dataset.json/provenance
    writes of a killed run; other hosts' shards may still be writing theirs)."""
    host = _host_tag()
    for p in root.glob(".tmp_*"):
        parts = p.name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] == host and parts[2].isdigit() and not _alive(int(parts[2])):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settings(mdir: Path, folds, checkpoint: str, params: dict, include_labeled: bool, unlabeled_dir) -> dict:
    return {"teacher_model": str(mdir), "folds": [str(f) for f in folds], "checkpoint": checkpoint,
            "parameters": params, "include_labeled": include_labeled,
            "unlabeled": str(Path(unlabeled_dir).resolve())}


def _check_settings(root: Path, settings: dict) -> None:
    """The student dataset is made with one set of options: a re-run (resumption, another shard) with other
    options would mix two filters in one dataset, so it is refused naming what differs."""
    f = root / ".nnunet_ext_progress" / "settings.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
            raise ValueError(f"{root} was started with other options ({', '.join(diff) or 'unreadable settings'}: "
                             f"see {f}); re-run with the same options to continue it, or write a new -o dataset")
        return
    tmp = f.with_name(f".tmp_{os.getpid()}_settings.json")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, f)


def pseudolabel(teacher_dataset, configuration: str, unlabeled_dir, output_dataset: str, trainer: str = "nnUNetTrainer",
                plans: str = "nnUNetPlans", folds=(0,), checkpoint: str = "checkpoint_final.pth", alpha: float = 0.3,
                vpt: float = 0.3, tst: float = 100.0, ignore_uncertain: bool = False, num_parts: int = 1,
                part_id: int = 0, device: str = "cuda", include_labeled: bool = True,
                progress: bool = True, soft_rim_gamma: float | None = None, soft_rim_mm: float = 1.0,
                npp: int = 1, nps: int = 1) -> dict:
    """Write (or continue) the student dataset ``output_dataset`` (``DatasetXXX_Name`` under nnUNet_raw).
    Returns this part's provenance.

    Soft labels: the teacher dataset's ``softlabelsTr`` of its labeled cases are copied into the student's
    ``softlabelsTr``; each kept pseudo-label gets its soft label there too -- the hard pseudo-label, plus,
    with ``soft_rim_gamma``, an intensity-gated soft rim of ``soft_rim_mm`` around it (nnunet_ext.data.fusion's
    ``soft_rim``) -- so the student can train with the soft-label trainers (``nnunet-ext preprocess-soft``
    on the student dataset, then e.g. ``SoftDiceTrainer``). When the teacher dataset has no soft labels,
    ``softlabelsTr`` is written only with ``soft_rim_gamma``; labeled cases then get their hard labels."""
    from nnunet_ext.inference.predict import model_folder
    from nnunet_ext.nnunet_adapter import dataset_name, nnunet_setting

    nnUNet_raw = nnunet_setting("nnUNet_raw")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in 0..{num_parts - 1}, got {part_id}")
    confidence_filter(np.full((2, 1), 0.5), alpha, vpt, tst)  # validates the parameters
    if soft_rim_gamma is not None and not 0 < soft_rim_gamma <= 1:
        raise ValueError(f"soft_rim_gamma must be in (0, 1], got {soft_rim_gamma}")
    if not soft_rim_mm > 0:
        raise ValueError(f"soft_rim_mm must be > 0, got {soft_rim_mm}")
    mdir = model_folder(teacher_dataset, configuration, trainer, plans)
    teacher_name = dataset_name(teacher_dataset)
    teacher_ds = json.loads((mdir / "dataset.json").read_text())
    ending, n_ch = teacher_ds["file_ending"], len(teacher_ds["channel_names"])
    if not re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", str(output_dataset)) or output_dataset[7:10] == "000":
        raise ValueError(f"-o: the student dataset must be named DatasetXXX_Name (XXX 001-999, Name of letters, "
                         f"digits, _ and -), got {output_dataset!r}")
    root = Path(nnUNet_raw) / output_dataset
    if output_dataset[7:10] == teacher_name[7:10]:
        raise ValueError("the student dataset needs its own id")
    unl = _cases_of(Path(unlabeled_dir), ending, n_ch)
    if not unl:
        raise ValueError(f"no images ending in {ending} in {unlabeled_dir}")
    from nnunet_ext.core.checks import check_image, check_prediction_inputs

    # every image this part will predict and copy: whole, finite, 3-D, one grid per case -- before any work
    check_prediction_inputs([unl[c] for c in sorted(unl)[part_id::num_parts]
                             if not (root / ".nnunet_ext_progress" / f"{c}.json").exists()], ending, n_ch)
    teacher_raw = Path(nnUNet_raw) / teacher_name
    from nnunet_ext.core.safety import check_output_not_input

    check_output_not_input(root, [unlabeled_dir, teacher_raw, mdir], what="-o (student dataset)")
    soft = (teacher_raw / "softlabelsTr").is_dir() or soft_rim_gamma is not None
    for d in ("imagesTr", "labelsTr", "confidenceTr", "lesionmapTr", ".nnunet_ext_progress") + \
            (("softlabelsTr",) if soft else ()):
        (root / d).mkdir(parents=True, exist_ok=True)
    params = {"alpha": alpha, "vpt": vpt, "tst": tst, "ignore_uncertain": ignore_uncertain,
              "soft_rim_gamma": soft_rim_gamma, "soft_rim_mm": soft_rim_mm}
    from nnunet_ext.core.safety import output_lock

    with output_lock(root / ".nnunet_ext_progress" / f"part{part_id}of{num_parts}.lock",
                     what=f"student dataset {root} (part {part_id} of {num_parts})"):
        _check_settings(root, _settings(mdir, folds, checkpoint, params, include_labeled, unlabeled_dir))
        _clean_own_host_tmp(root)
        # the labeled cases of the teacher's dataset (copied once; same names), with their soft labels
        if include_labeled and part_id == 0:
            for lab in sorted((teacher_raw / "labelsTr").glob(f"*{ending}")):
                case = lab.name[: -len(ending)]
                if case in unl:
                    raise ValueError(f"unlabeled case {case} has the name of a labeled case of {teacher_name}")
                if not (root / "labelsTr" / lab.name).exists():  # the label is copied last: absent = unfinished
                    for p in _case_files(root, case, ending):
                        p.unlink(missing_ok=True)
                    copies = [(img, root / "imagesTr" / img.name) for img in
                              sorted((teacher_raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))]
                    if soft:
                        sl = teacher_raw / "softlabelsTr" / lab.name
                        copies.append((sl if sl.is_file() else lab, root / "softlabelsTr" / lab.name))
                    for src, dst in copies + [(lab, root / "labelsTr" / lab.name)]:
                        check_image(src)  # never copy a damaged file into the student dataset
                        tmp = dst.with_name(f".tmp_{os.getpid()}_{dst.name}")
                        shutil.copyfile(src, tmp)
                        os.replace(tmp, dst)
        mine = sorted(unl)[part_id::num_parts]
        done_dir = root / ".nnunet_ext_progress"
        todo = [c for c in mine if not (done_dir / f"{c}.json").exists()]
        if progress:
            print(f"pseudolabel part {part_id}/{num_parts}: {len(mine)} cases, {len(mine) - len(todo)} already done")
        for c in todo:
            _check_geometry(unl[c])
        if todo:
            # a dataset.json says the dataset is complete: not while cases are being (re)done
            (root / "dataset.json").unlink(missing_ok=True)
            for c in todo:  # files of unfinished cases (a killed run) are never trusted: redone from scratch
                for p in _case_files(root, c, ending):
                    p.unlink(missing_ok=True)
            from nnunet_ext.inference.predictor import predict_cases

            # the one predictor, flips averaged in probability space; each case is finished inside nnU-Net's
            # export worker from its probabilities (no probability file is written and read back)
            ignore = max(v for v in teacher_ds["labels"].values() if isinstance(v, int)) + 1
            hook_args = {"root": str(root), "ending": ending, "alpha": alpha, "vpt": vpt, "tst": tst,
                         "ignore_label": ignore if ignore_uncertain else None, "files": {c: [str(p) for p in unl[c]] for c in todo},
                         "soft": soft, "soft_rim_gamma": soft_rim_gamma, "soft_rim_mm": soft_rim_mm}
            scratch = root / ".nnunet_ext_scratch"
            predict_cases(mdir, list(folds), [unl[c] for c in todo], scratch, checkpoint=checkpoint, device=device,
                          tta="mean_probabilities", write_soft=False, write_mask=False, npp=npp, nps=nps,
                          hook="nnunet_ext.workflows.pseudolabel:finish_case", hook_args=hook_args)
            shutil.rmtree(scratch, ignore_errors=True)
            if progress:
                for c in todo:
                    print(f"  {c}: {json.loads((done_dir / f'{c}.json').read_text())['decision']}", flush=True)
        prov = {"teacher": {"model": str(mdir), "dataset": teacher_name, "configuration": configuration,
                            "trainer": trainer, "plans": plans, "folds": list(folds), "checkpoint": checkpoint},
                "parameters": params,
                "part": [part_id, num_parts],
                "cases": {c: json.loads((done_dir / f"{c}.json").read_text()) for c in mine}}
        part_file = root / f"provenance_part{part_id}of{num_parts}.json"
        tmp = part_file.with_name(f".tmp_{os.getpid()}_{part_file.name}")
        tmp.write_text(json.dumps(prov, indent=1))
        os.replace(tmp, part_file)
        _merge_provenance(root, prov)
        if all((done_dir / f"{c}.json").exists() for c in unl):  # every shard done: nnU-Net may use the dataset
            _write_dataset_json(root, teacher_ds, ignore_uncertain)
            student_split(root, teacher_raw, ending, progress)
        elif progress:
            print(f"pseudolabel part {part_id}/{num_parts} done; dataset.json is written when every part has finished")
        return prov


def finish_case(case, probabilities, mask, properties, root, ending, alpha, vpt, tst, ignore_label, files, soft,
                soft_rim_gamma, soft_rim_mm):
    """Confidence filter and student files of one case (the predictor's per-case hook; runs in nnU-Net's
    export worker with the teacher's flip-averaged probabilities in the input geometry)."""
    from nnunet_ext.inference.predictor import _write

    root = Path(root)
    res = confidence_filter(probabilities, alpha, vpt, tst)
    _write(res["omega"], properties, str(root / "confidenceTr" / f"{case}{ending}"))
    _write(res["m"], properties, str(root / "lesionmapTr" / f"{case}{ending}"))
    reason = "kept" if res["keep"] else f"dropped: sum(m) = {res['sum_m']:.1f} < TST = {tst:g}"
    if res["keep"]:
        label = res["label"]
        if soft:
            soft_label = label.astype(np.float32)
            if soft_rim_gamma is not None:
                from nnunet_ext.data.fusion import soft_rim
                from nnunet_ext.core.io import read_image

                image, spacing = read_image(files[case][0])
                soft_label = soft_rim(label, image, spacing, soft_rim_mm, soft_rim_gamma).astype(np.float32)
            _write(soft_label, properties, str(root / "softlabelsTr" / f"{case}{ending}"))
        if ignore_label is not None:
            label = np.where(res["uncertain"], ignore_label, label).astype(np.uint8)
        for p in files[case]:
            tmp = root / "imagesTr" / f".tmp_{os.getpid()}_{Path(p).name}"
            shutil.copyfile(p, tmp)
            os.replace(tmp, root / "imagesTr" / Path(p).name)
        _write(label, properties, str(root / "labelsTr" / f"{case}{ending}"))
    info = {"decision": reason, "kept": bool(res["keep"]), "sum_m": res["sum_m"],
            "mean_omega": float(res["omega"].mean()), "label_voxels": int(res["label"].sum()),
            "uncertain_voxels": int(res["uncertain"].sum())}
    tmp = root / ".nnunet_ext_progress" / f".tmp_{os.getpid()}_{case}.json"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, root / ".nnunet_ext_progress" / f"{case}.json")


def _merge_provenance(root: Path, prov: dict) -> None:
    merged = {k: v for k, v in prov.items() if k not in ("cases", "part")}
    merged["cases"] = {}
    for f in sorted(root.glob("provenance_part*of*.json")):
        merged["cases"].update(json.loads(f.read_text())["cases"])
    merged["kept"] = sorted(c for c, v in merged["cases"].items() if v["kept"])
    merged["dropped"] = sorted(c for c, v in merged["cases"].items() if not v["kept"])
    tmp = root / f".tmp_provenance.json.{_host_tag()}.{os.getpid()}"  # one per process: shards run at the same time
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, root / "provenance.json")


# ---------------------------------------------------------------------------------------------- launcher


def merge_parts(output_dataset: str, num_parts: int) -> dict:
    """After all ``num_parts`` shards finished: ``provenance.json`` and ``dataset.json`` of the student
    dataset from every part's ``provenance_part<K>of<N>.json`` (the launcher's last step; each shard also
    updates them, but concurrent shards only see what had finished). Returns the merged provenance."""
    from nnunet_ext.nnunet_adapter import nnunet_setting

    nnUNet_raw = nnunet_setting("nnUNet_raw")
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    root = Path(nnUNet_raw) / output_dataset
    parts = [root / f"provenance_part{k}of{num_parts}.json" for k in range(num_parts)]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_parts} part(s) have not finished, e.g. {missing[0]}")
    provs = [json.loads(p.read_text()) for p in parts]
    first = provs[0]
    for p, prov in zip(parts[1:], provs[1:]):
        if prov["teacher"] != first["teacher"] or prov["parameters"] != first["parameters"]:
            raise ValueError(f"{p} was written with another teacher or other parameters than {parts[0]}")
    _merge_provenance(root, first)
    teacher_ds = json.loads((Path(first["teacher"]["model"]) / "dataset.json").read_text())
    _write_dataset_json(root, teacher_ds, first["parameters"]["ignore_uncertain"])
    student_split(root, Path(nnUNet_raw) / first["teacher"]["dataset"], teacher_ds["file_ending"])
    return json.loads((root / "provenance.json").read_text())


STUDENT_FOLDS = 5


def _write_root_file(root: Path, name: str, text: str) -> None:
    """A file of the student's root folder, through a per-process temporary name that a later run removes
    when a kill left it (:func:`_clean_own_host_tmp`); shards may write the same file at the same time."""
    tmp = root / f".tmp_{name}.{_host_tag()}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, root / name)


def student_split(root, teacher_raw, ending: str = ".nii.gz", progress: bool = True) -> Path | None:
    """``case_groups.json`` and ``splits_final.json`` of a finished student dataset ``root`` (raw folder).

    The pseudo-labelled cases (``provenance.json``'s ``kept``) are flagged in ``case_groups.json`` and put in
    the training list of every fold, never in a validation list; the labelled cases are split into
    ``STUDENT_FOLDS`` folds (fewer when they hold fewer subjects) that keep each subject whole, subjects from
    the teacher dataset's ``case_groups.json`` (a case without one is its own subject; nnunet_ext.workflows.splits).
    The split goes to the raw dataset folder, from where ``nnUNetv2_plan_and_preprocess`` copies it into the
    preprocessed folder that nnU-Net's training reads, so the student is never validated on pseudo-labels.
    An existing ``splits_final.json`` that differs is kept when it names every case, validates on no
    pseudo-label and splits no subject; otherwise the error names the case. Returns the split file, or
    ``None`` when fewer than 2 labelled subjects leave nothing to validate on (train with fold ``all``)."""
    from nnunet_ext.workflows import splits as sp

    root, teacher_raw = Path(root), Path(teacher_raw)
    cases = sorted(p.name[: -len(ending)] for p in (root / "labelsTr").iterdir()
                   if p.name.endswith(ending) and not p.name.startswith("."))
    teacher_groups = sp.read_case_groups(teacher_raw)
    # this round's pseudo-labels, and an earlier round's that came with a student teacher's labelled cases
    pseudo = sorted(set(json.loads((root / "provenance.json").read_text())["kept"])
                    | {c for c in cases if teacher_groups.get(c, {}).get("pseudo_labelled")})
    labelled = [c for c in cases if c not in set(pseudo)]
    meta = {c: dict(teacher_groups.get(c, {})) for c in labelled}
    meta.update({c: {"pseudo_labelled": True} for c in pseudo})
    _write_root_file(root, sp.GROUPS_FILE, json.dumps({c: meta[c] for c in sorted(meta)}, indent=1))
    groups = {c: str(meta[c].get("subject", c)) for c in labelled}
    groups.update({c: c for c in pseudo})
    n_subjects = len(set(groups[c] for c in labelled))
    target = root / sp.SPLITS_FILE
    if n_subjects < 2:
        if progress:
            print(f"no {sp.SPLITS_FILE} written: {n_subjects} labelled subject(s) leave nothing to validate on "
                  f"without pseudo-labels; train the student with fold all")
        return None
    n_folds = min(STUDENT_FOLDS, n_subjects)
    splits = sp.grouped_splits({c: groups[c] for c in labelled}, n_folds, 12345, {c: c for c in pseudo})
    if target.is_file():
        try:
            old = json.loads(target.read_text())
        except ValueError:
            raise ValueError(f"{target}: not valid JSON; delete it to get the student split written again") from None
        if sp.same_split(old, splits):
            return target
        sp.check_splits(old, groups, cases, set(pseudo), source=str(target))
        missing = sp.unused_cases(old, cases)
        if missing:
            raise ValueError(f"{target} names no fold for case {missing[0]}; delete it to get the student split "
                             f"written again (or write one with nnunet-ext split -d {root.name} --overwrite)")
        if progress:
            print(f"keeping {target}: it differs from the default student split but validates on no pseudo-label")
        return target
    _write_root_file(root, sp.SPLITS_FILE, json.dumps(splits, indent=1))
    if progress:
        print(f"wrote {target}: {n_folds} folds of the {len(labelled)} labelled cases; the {len(pseudo)} "
              f"pseudo-labelled cases are in every fold's training list only")
    return target


def pseudolabel_stages(argv: list[str], output_dataset: str, num_parts: int):
    """Launcher stages: ``num_parts`` shards (``nnunet-ext pseudolabel ARGV -num_parts N -part_id K``, one
    task each), then one merge task. ``argv``: the pseudolabel arguments without -num_parts/-part_id and
    without launcher options."""
    from nnunet_ext.cluster.launcher import Stage, Task, task_env
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    ext = nnunet_command("nnunet-ext")
    env = task_env({k: v for k, v in nnunet_env(None).items()
                    if k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    shards = [Task(f"part{k}of{num_parts}", [ext, "pseudolabel", *argv, "-num_parts", str(num_parts), "-part_id", str(k)],
                   env) for k in range(num_parts)]
    merge = Task("merge", [ext, "pseudolabel", *argv, "-num_parts", str(num_parts), "--merge"], env)
    return [Stage("pseudolabel_parts", shards), Stage("pseudolabel_merge", [merge], ["pseudolabel_parts"])]


def launch(argv: list[str], output_dataset: str, num_parts: int, launcher, workdir=None) -> dict:
    """Run the shards and the merge through the launcher (``launcher``: LauncherOptions); scripts, markers
    and logs in ``workdir`` (default ``$nnUNet_results/nnunet_ext_jobs/<output_dataset>/pseudolabel``).
    Returns ``{"launcher", "workdir", "stages"}``."""
    from nnunet_ext.cluster.launcher import run_stages
    from nnunet_ext.nnunet_adapter import nnunet_setting

    nnUNet_results = nnunet_setting("nnUNet_results")

    if not nnUNet_results and workdir is None:
        raise ValueError("set nnUNet_results or pass a work folder for the launcher")
    workdir = Path(workdir) if workdir else Path(nnUNet_results) / "nnunet_ext_jobs" / output_dataset / "pseudolabel"
    res = run_stages(pseudolabel_stages(argv, output_dataset, num_parts), workdir, launcher)
    return {"launcher": launcher.launcher, "workdir": str(workdir), "stages": res}


def check_launch(teacher_dataset, configuration: str, unlabeled_dir, trainer: str = "nnUNetTrainer",
                 plans: str = "nnUNetPlans", folds=(0,), checkpoint: str = "checkpoint_final.pth", workdir=None) -> None:
    """What ``pseudolabel --launcher ... / -j N / --dry-run`` checks before it writes a script: the teacher
    model exists with ``configuration`` in its plans and a checkpoint of every fold, every unlabeled image is
    sound (:func:`nnunet_ext.core.checks.check_prediction_inputs`), the work folder is writable."""
    from nnunet_ext.core.checks import check_configuration, check_prediction_inputs, check_writable_folder
    from nnunet_ext.core.io import read_json
    from nnunet_ext.inference.predict import model_folder

    mdir = model_folder(teacher_dataset, configuration, trainer, plans)
    check_configuration(mdir / "plans.json", configuration)
    for f in folds:
        ck = mdir / f"fold_{f}" / checkpoint
        if not ck.is_file():
            raise FileNotFoundError(f"{ck} not found: the teacher has no fold {f} ({checkpoint}); train it or choose "
                                    f"the trained folds with -f")
    ds = read_json(mdir / "dataset.json", required=("file_ending", "channel_names"))
    check_prediction_inputs(str(unlabeled_dir), ds["file_ending"], len(ds["channel_names"]))
    if workdir is not None:
        check_writable_folder(workdir, "--workdir")
