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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.nnunet_adapter import ModelRef


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
    from nnunet_ext.core.safety import atomic_write_text

    labels = dict(teacher_ds["labels"])
    if ignore:
        labels["ignore"] = max(v for v in labels.values() if isinstance(v, int)) + 1
    n = len([p for p in (root / "labelsTr").iterdir() if p.name.endswith(teacher_ds["file_ending"])])
    ds = {k: v for k, v in teacher_ds.items() if k not in ("labels", "numTraining")}
    ds.update({"labels": labels, "numTraining": n,
               "description": "nnunet-ext student dataset: teacher's labeled cases + kept pseudo-labeled cases"})
    atomic_write_text(root / "dataset.json", json.dumps(ds, indent=2), host=True)  # shards run at the same time


CASE_FOLDERS = ("imagesTr", "labelsTr", "softlabelsTr", "confidenceTr", "lesionmapTr")


def _case_files(root: Path, case: str, ending: str) -> list[Path]:
    """Every file of ``case`` in the student dataset (images, labels, soft label, omega, m), finished or
    temporary (a killed run's, nnunet_ext.core.safety.parse_temporary)."""
    from nnunet_ext.core.safety import parse_temporary

    names = {f"{case}{ending}"}
    out = []
    for d in CASE_FOLDERS:
        folder = root / d
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            n = p.name
            t = parse_temporary(n)
            if t:
                n = t["name"]
            if n in names or (d == "imagesTr" and n.startswith(case + "_") and n.endswith(ending)
                              and len(n) == len(case) + 5 + len(ending) and n[len(case) + 1:len(case) + 5].isdigit()):
                out.append(p)
    prog = root / ".nnunet_ext_progress"
    if prog.is_dir():
        out += [p for p in prog.iterdir() if (t := parse_temporary(p.name)) and t["name"] == f"{case}.json"]
    return out


def _clean_own_host_tmp(root: Path) -> None:
    """Remove host-tagged temporary files of dead processes of this host (dataset.json/provenance writes of a
    killed run; other hosts' shards may still be writing theirs)."""
    from nnunet_ext.core.safety import host_tag, parse_temporary

    host = host_tag()
    for p in root.iterdir():
        t = parse_temporary(p.name)
        if t and t["host"] == host and not _alive(t["pid"]):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class PseudolabelOptions:
    """The confidence filter (``alpha``, ``vpt``, ``tst``, ``ignore_uncertain``; module docstring), the soft
    labels (``soft_rim_gamma``, ``soft_rim_mm``), ``include_labeled`` (the teacher's labeled cases join the
    student dataset), and how the teacher predicts (``device``, ``npp``/``nps`` pre-/post-processing
    workers) and reports (``progress``)."""
    alpha: float = 0.3
    vpt: float = 0.3
    tst: float = 100.0
    ignore_uncertain: bool = False
    include_labeled: bool = True
    soft_rim_gamma: float | None = None
    soft_rim_mm: float = 1.0
    device: str = "cuda"
    npp: int = 1
    nps: int = 1
    progress: bool = True

    def check(self) -> "PseudolabelOptions":
        confidence_filter(np.full((2, 1), 0.5), self.alpha, self.vpt, self.tst)  # validates the parameters
        if self.soft_rim_gamma is not None and not 0 < self.soft_rim_gamma <= 1:
            raise ValueError(f"soft_rim_gamma must be in (0, 1], got {self.soft_rim_gamma}")
        if not self.soft_rim_mm > 0:
            raise ValueError(f"soft_rim_mm must be > 0, got {self.soft_rim_mm}")
        return self

    def params(self) -> dict:
        """The filter's parameters as provenance and settings record them."""
        return {"alpha": self.alpha, "vpt": self.vpt, "tst": self.tst, "ignore_uncertain": self.ignore_uncertain,
                "soft_rim_gamma": self.soft_rim_gamma, "soft_rim_mm": self.soft_rim_mm}


def _settings(mdir: Path, teacher: ModelRef, o: PseudolabelOptions, unlabeled_dir) -> dict:
    return {"teacher_model": str(mdir), "folds": [str(f) for f in teacher.folds], "checkpoint": teacher.checkpoint,
            "parameters": o.params(), "include_labeled": o.include_labeled,
            "unlabeled": str(Path(unlabeled_dir).resolve())}


def _check_settings(root: Path, settings: dict) -> None:
    """The student dataset is made with one set of options: a re-run (resumption, another shard) with other
    options would mix two filters in one dataset, so it is refused naming what differs."""
    from nnunet_ext.core.safety import atomic_write_text

    f = root / ".nnunet_ext_progress" / "settings.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
            raise ValueError(f"{root} was started with other options ({', '.join(diff) or 'unreadable settings'}: "
                             f"see {f}); re-run with the same options to continue it, or write a new --student dataset")
        return
    atomic_write_text(f, json.dumps(settings, indent=1))


def _teacher(teacher) -> ModelRef:
    """The teacher as a ModelRef (also from its JSON, as a launcher task passes it), with its folds."""
    ref = ModelRef.from_json(teacher, "teacher") if isinstance(teacher, dict) else teacher
    if not isinstance(ref, ModelRef):
        raise TypeError(f"teacher must be a ModelRef, got {type(teacher).__name__}")
    return ref if ref.folds is not None else ref.with_folds((0,))


@dataclass
class _Student:
    """What one pseudolabel part works with (the checks' results)."""
    root: Path
    mdir: Path
    teacher_name: str
    teacher_raw: Path
    teacher_ds: dict
    ending: str
    unlabeled: dict
    soft: bool


def _student(teacher: ModelRef, unlabeled_dir, output_dataset: str, o: PseudolabelOptions, num_parts: int,
             part_id: int) -> _Student:
    """Every check before a part writes anything; the student's folders."""
    from nnunet_ext.core.checks import check_prediction_inputs
    from nnunet_ext.core.safety import check_output_not_input
    from nnunet_ext.nnunet_adapter import dataset_name, nnunet_setting

    nnUNet_raw = nnunet_setting("nnUNet_raw")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in 0..{num_parts - 1}, got {part_id}")
    o.check()
    mdir = teacher.folder()
    teacher_name = dataset_name(teacher.dataset)
    teacher_ds = json.loads((mdir / "dataset.json").read_text())
    ending, n_ch = teacher_ds["file_ending"], len(teacher_ds["channel_names"])
    if not re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", str(output_dataset)) or output_dataset[7:10] == "000":
        raise ValueError(f"--student: the student dataset must be named DatasetXXX_Name (XXX 001-999, Name of letters, "
                         f"digits, _ and -), got {output_dataset!r}")
    root = Path(nnUNet_raw) / output_dataset
    if output_dataset[7:10] == teacher_name[7:10]:
        raise ValueError("the student dataset needs its own id")
    unl = _cases_of(Path(unlabeled_dir), ending, n_ch)
    if not unl:
        raise ValueError(f"no images ending in {ending} in {unlabeled_dir}")
    # every image this part will predict and copy: whole, finite, 3-D, one grid per case -- before any work
    check_prediction_inputs([unl[c] for c in sorted(unl)[part_id::num_parts]
                             if not (root / ".nnunet_ext_progress" / f"{c}.json").exists()], ending, n_ch)
    teacher_raw = Path(nnUNet_raw) / teacher_name
    check_output_not_input(root, [unlabeled_dir, teacher_raw, mdir], what="--student (student dataset)")
    soft = (teacher_raw / "softlabelsTr").is_dir() or o.soft_rim_gamma is not None
    for d in ("imagesTr", "labelsTr", "confidenceTr", "lesionmapTr", ".nnunet_ext_progress") + \
            (("softlabelsTr",) if soft else ()):
        (root / d).mkdir(parents=True, exist_ok=True)
    return _Student(root, mdir, teacher_name, teacher_raw, teacher_ds, ending, unl, soft)


def _copy_labeled(st: _Student) -> None:
    """The labeled cases of the teacher's dataset (copied once; same names), with their soft labels."""
    from nnunet_ext.core.checks import check_image
    from nnunet_ext.core.safety import atomic_copy

    root, ending = st.root, st.ending
    for lab in sorted((st.teacher_raw / "labelsTr").glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        if case in st.unlabeled:
            raise ValueError(f"unlabeled case {case} has the name of a labeled case of {st.teacher_name}")
        if (root / "labelsTr" / lab.name).exists():  # the label is copied last: absent = unfinished
            continue
        for p in _case_files(root, case, ending):
            p.unlink(missing_ok=True)
        copies = [(img, root / "imagesTr" / img.name) for img in
                  sorted((st.teacher_raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))]
        if st.soft:
            sl = st.teacher_raw / "softlabelsTr" / lab.name
            copies.append((sl if sl.is_file() else lab, root / "softlabelsTr" / lab.name))
        for src, dst in copies + [(lab, root / "labelsTr" / lab.name)]:
            check_image(src)  # never copy a damaged file into the student dataset
            atomic_copy(src, dst)


def _predict_part(st: _Student, teacher: ModelRef, todo: list, o: PseudolabelOptions, part: tuple[int, int]) -> None:
    """The teacher on this part's unfinished cases: the one predictor, flips averaged in probability space;
    each case is finished inside nnU-Net's export worker from its probabilities (:func:`finish_case`; no
    probability file is written and read back)."""
    from nnunet_ext.inference.predictor import predict_cases

    root = st.root
    # a dataset.json says the dataset is complete: not while cases are being (re)done
    (root / "dataset.json").unlink(missing_ok=True)
    for c in todo:  # files of unfinished cases (a killed run) are never trusted: redone from scratch
        for p in _case_files(root, c, st.ending):
            p.unlink(missing_ok=True)
    ignore = max(v for v in st.teacher_ds["labels"].values() if isinstance(v, int)) + 1
    hook_args = {"root": str(root), "ending": st.ending, "alpha": o.alpha, "vpt": o.vpt, "tst": o.tst,
                 "ignore_label": ignore if o.ignore_uncertain else None,
                 "files": {c: [str(p) for p in st.unlabeled[c]] for c in todo}, "soft": st.soft,
                 "soft_rim_gamma": o.soft_rim_gamma, "soft_rim_mm": o.soft_rim_mm}
    # each part predicts into its own scratch folder: parts run at the same time, and one that finishes
    # removes only its own
    scratch = root / ".nnunet_ext_scratch" / f"part{part[0]}of{part[1]}"
    predict_cases(st.mdir, list(teacher.folds), [st.unlabeled[c] for c in todo], scratch,
                  checkpoint=teacher.checkpoint, device=o.device, tta="mean_probabilities", write_soft=False,
                  write_mask=False, npp=o.npp, nps=o.nps, hook=finish_case, hook_args=hook_args)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.parent.rmdir()  # the last part to finish removes the empty parent
    except OSError:
        pass


def pseudolabel(teacher, unlabeled_dir, output_dataset: str, options: PseudolabelOptions | None = None,
                num_parts: int = 1, part_id: int = 0, **fields) -> dict:
    """Write (or continue) part ``part_id`` of ``num_parts`` of the student dataset ``output_dataset``
    (``DatasetXXX_Name`` under nnUNet_raw) with the ``teacher`` (a :class:`ModelRef`, folds default 0).
    ``options``: :class:`PseudolabelOptions`, or its fields as keywords. Returns this part's provenance.

    Soft labels: the teacher dataset's ``softlabelsTr`` of its labeled cases are copied into the student's
    ``softlabelsTr``; each kept pseudo-label gets its soft label there too -- the hard pseudo-label, plus,
    with ``soft_rim_gamma``, an intensity-gated soft rim of ``soft_rim_mm`` around it (nnunet_ext.data.fusion's
    ``soft_rim``) -- so the student can train with the soft-label trainers (``nnunet-ext preprocess-soft``
    on the student dataset, then e.g. ``SoftDiceTrainer``). When the teacher dataset has no soft labels,
    ``softlabelsTr`` is written only with ``soft_rim_gamma``; labeled cases then get their hard labels."""
    from nnunet_ext.core.safety import atomic_write_text, output_lock
    from nnunet_ext.core.validate import options_of

    teacher = _teacher(teacher)
    o = options_of(PseudolabelOptions, PseudolabelOptions(**options) if isinstance(options, dict) else options,
                   fields, "pseudolabel")
    st = _student(teacher, unlabeled_dir, output_dataset, o, num_parts, part_id)
    root, done_dir = st.root, st.root / ".nnunet_ext_progress"
    with output_lock(done_dir / f"part{part_id}of{num_parts}.lock",
                     what=f"student dataset {root} (part {part_id} of {num_parts})"):
        _check_settings(root, _settings(st.mdir, teacher, o, unlabeled_dir))
        _clean_own_host_tmp(root)
        if o.include_labeled and part_id == 0:
            _copy_labeled(st)
        mine = sorted(st.unlabeled)[part_id::num_parts]
        todo = [c for c in mine if not (done_dir / f"{c}.json").exists()]
        if o.progress:
            print(f"pseudolabel part {part_id}/{num_parts}: {len(mine)} cases, {len(mine) - len(todo)} already done")
        for c in todo:
            _check_geometry(st.unlabeled[c])
        if todo:
            _predict_part(st, teacher, todo, o, (part_id, num_parts))
            if o.progress:
                for c in todo:
                    print(f"  {c}: {json.loads((done_dir / f'{c}.json').read_text())['decision']}", flush=True)
        prov = {"teacher": {"model": str(st.mdir), "dataset": st.teacher_name, "configuration": teacher.configuration,
                            "trainer": teacher.trainer, "plans": teacher.plans, "folds": list(teacher.folds),
                            "checkpoint": teacher.checkpoint},
                "parameters": o.params(), "part": [part_id, num_parts],
                "cases": {c: json.loads((done_dir / f"{c}.json").read_text()) for c in mine}}
        atomic_write_text(root / f"provenance_part{part_id}of{num_parts}.json", json.dumps(prov, indent=1))
        _merge_provenance(root, prov)
        # the last part to finish writes dataset.json and the split; a shard whose cases are all done but whose
        # provenance is not yet written counts as unfinished (its pseudo-labels are not yet known as such)
        finished = all((done_dir / f"{c}.json").exists() for c in st.unlabeled) and \
            _finish(root, num_parts, o.progress) is not None
        if not finished and o.progress:
            print(f"pseudolabel part {part_id}/{num_parts} done; dataset.json is written when every part has finished")
        return prov


def finish_case(case, probabilities, mask, properties, root, ending, alpha, vpt, tst, ignore_label, files, soft,
                soft_rim_gamma, soft_rim_mm):
    """Confidence filter and student files of one case (the predictor's per-case hook; runs in nnU-Net's
    export worker with the teacher's flip-averaged probabilities in the input geometry)."""
    from nnunet_ext.core.safety import atomic_copy, atomic_write_text
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
            atomic_copy(p, root / "imagesTr" / Path(p).name)
        _write(label, properties, str(root / "labelsTr" / f"{case}{ending}"))
    info = {"decision": reason, "kept": bool(res["keep"]), "sum_m": res["sum_m"],
            "mean_omega": float(res["omega"].mean()), "label_voxels": int(res["label"].sum()),
            "uncertain_voxels": int(res["uncertain"].sum())}
    atomic_write_text(root / ".nnunet_ext_progress" / f"{case}.json", json.dumps(info))


def _merge_provenance(root: Path, prov: dict) -> None:
    merged = {k: v for k, v in prov.items() if k not in ("cases", "part")}
    merged["cases"] = {}
    for f in sorted(root.glob("provenance_part*of*.json")):
        merged["cases"].update(json.loads(f.read_text())["cases"])
    merged["kept"] = sorted(c for c, v in merged["cases"].items() if v["kept"])
    merged["dropped"] = sorted(c for c, v in merged["cases"].items() if not v["kept"])
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(root / "provenance.json", json.dumps(merged, indent=1), host=True)  # shards run at once


# ---------------------------------------------------------------------------------------------- launcher


def merge_parts(output_dataset: str, num_parts: int) -> dict:
    """After all ``num_parts`` shards finished: ``provenance.json``, ``dataset.json`` and the split of the
    student dataset from every part's ``provenance_part<K>of<N>.json`` (the launcher's last step; the last
    shard to finish does the same). Returns the merged provenance."""
    from nnunet_ext.nnunet_adapter import nnunet_setting

    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    root = Path(nnunet_setting("nnUNet_raw")) / output_dataset
    merged = _finish(root, num_parts)
    if merged is None:
        missing = [p for p in _part_files(root, num_parts) if not p.is_file()]
        raise FileNotFoundError(f"{len(missing)} of {num_parts} part(s) have not finished, e.g. {missing[0]}")
    return merged


def _part_files(root: Path, num_parts: int) -> list[Path]:
    return [root / f"provenance_part{k}of{num_parts}.json" for k in range(num_parts)]


def _finish(root: Path, num_parts: int, progress: bool = True) -> dict | None:
    """``provenance.json``, ``dataset.json`` and the split of the student dataset ``root`` once every one of
    the ``num_parts`` parts has written its provenance (``None`` before: nothing is written). Parts that
    finish at the same time both get here and write the same files (atomically, from the same parts)."""
    from nnunet_ext.nnunet_adapter import nnunet_setting

    parts = _part_files(root, num_parts)
    if not all(p.is_file() for p in parts):
        return None
    provs = [json.loads(p.read_text()) for p in parts]
    first = provs[0]
    for p, prov in zip(parts[1:], provs[1:]):
        if prov["teacher"] != first["teacher"] or prov["parameters"] != first["parameters"]:
            raise ValueError(f"{p} was written with another teacher or other parameters than {parts[0]}")
    _merge_provenance(root, first)
    teacher_ds = json.loads((Path(first["teacher"]["model"]) / "dataset.json").read_text())
    _write_dataset_json(root, teacher_ds, first["parameters"]["ignore_uncertain"])
    student_split(root, Path(nnunet_setting("nnUNet_raw")) / first["teacher"]["dataset"], teacher_ds["file_ending"],
                  progress)
    return json.loads((root / "provenance.json").read_text())


STUDENT_FOLDS = 5


def _write_root_file(root: Path, name: str, text: str) -> None:
    """A file of the student's root folder, through a host-tagged temporary name that a later run removes
    when a kill left it (:func:`_clean_own_host_tmp`); shards may write the same file at the same time."""
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(root / name, text, host=True)


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


def pseudolabel_stages(teacher: ModelRef, unlabeled_dir, output_dataset: str, options: PseudolabelOptions,
                       num_parts: int):
    """Launcher stages: ``num_parts`` shards (:func:`pseudolabel` with ``part_id`` K, one task each, in a
    process spawned on the function), then one :func:`merge_parts` task."""
    from nnunet_ext.cluster.call import function_argv
    from nnunet_ext.cluster.launcher import Stage, Task, task_env
    from nnunet_ext.core.paths import NNUNET_FOLDERS, nnunet_env

    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    env = task_env({k: v for k, v in nnunet_env(None).items() if k in NNUNET_FOLDERS + ("nnUNet_extTrainer",)})
    teacher = _teacher(teacher)
    common = {"teacher": teacher.to_json(), "unlabeled_dir": str(Path(unlabeled_dir).resolve()),
              "output_dataset": output_dataset, "options": asdict(options), "num_parts": num_parts}
    shards = [Task(f"part{k}of{num_parts}", function_argv(pseudolabel, **common, part_id=k), env)
              for k in range(num_parts)]
    merge = Task("merge", function_argv(merge_parts, output_dataset=output_dataset, num_parts=num_parts), env)
    return [Stage("pseudolabel_parts", shards), Stage("pseudolabel_merge", [merge], ["pseudolabel_parts"])]


def launch(teacher: ModelRef, unlabeled_dir, output_dataset: str, options: PseudolabelOptions, num_parts: int,
           launcher, workdir=None) -> dict:
    """Run the shards and the merge through the launcher (``launcher``: LauncherOptions); scripts, markers
    and logs in ``workdir`` (default ``$nnUNet_results/nnunet_ext_jobs/<output_dataset>/pseudolabel``).
    Returns ``{"launcher", "workdir", "stages"}``."""
    from nnunet_ext.cluster.launcher import run_stages
    from nnunet_ext.nnunet_adapter import nnunet_setting

    nnUNet_results = nnunet_setting("nnUNet_results")

    if not nnUNet_results and workdir is None:
        raise ValueError("set nnUNet_results or pass a work folder for the launcher")
    workdir = Path(workdir) if workdir else Path(nnUNet_results) / "nnunet_ext_jobs" / output_dataset / "pseudolabel"
    stages = pseudolabel_stages(teacher, unlabeled_dir, output_dataset, options, num_parts)
    res = run_stages(stages, workdir, launcher)
    return {"launcher": launcher.launcher, "workdir": str(workdir), "stages": res}


def check_launch(teacher: ModelRef, unlabeled_dir, workdir=None) -> None:
    """What ``pseudolabel --launcher ... / -j N / --dry-run`` checks before it writes a script: the teacher
    model exists with its configuration in its plans and a checkpoint of every fold, every unlabeled image is
    sound (:func:`nnunet_ext.core.checks.check_prediction_inputs`), the work folder is writable."""
    from nnunet_ext.core.checks import check_configuration, check_prediction_inputs, check_writable_folder
    from nnunet_ext.core.io import read_json

    teacher = _teacher(teacher)
    mdir = teacher.folder()
    check_configuration(mdir / "plans.json", teacher.configuration)
    for f in teacher.folds:
        ck = mdir / f"fold_{f}" / teacher.checkpoint
        if not ck.is_file():
            raise FileNotFoundError(f"{ck} not found: the teacher has no fold {f} ({teacher.checkpoint}); train it or "
                                    f"choose the trained folds with -f")
    ds = read_json(mdir / "dataset.json", required=("file_ending", "channel_names"))
    check_prediction_inputs(str(unlabeled_dir), ds["file_ending"], len(ds["channel_names"]))
    if workdir is not None:
        check_writable_folder(workdir, "--workdir")
