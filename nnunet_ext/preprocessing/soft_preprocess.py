"""Soft targets and rater masks onto nnU-Net's preprocessed grid (offline, ``nnunet-ext preprocess-soft``).

A raw dataset carries soft targets in [0, 1] as ``softlabelsTr/<case>.nii.gz`` beside its (binarized)
``labelsTr`` that nnU-Net plans and samples with. :func:`preprocess_soft_dataset` repeats nnU-Net's
geometry for them -- ``transpose_forward``, the crop ``bbox_used_for_cropping`` stored in each case's
``.pkl``, and resampling to the preprocessed shape with the configuration's *probability* resampling
function (linear) -- and stores them as uint8 in 1/255 steps, zlib-compressed, in
``<preprocessed config folder>/nnunet_ext_soft/<case>.npz``.

How they travel through augmentation during training: :mod:`nnunet_ext.training.targets`.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from nnunet_ext.preprocessing.maps import SOFT_SCALE, map_path, read_map, save_map_like_seg
from nnunet_ext.core.progress import step

SOFT_FOLDER = "nnunet_ext_soft"


def soft_folder(preprocessed_config_folder) -> Path:
    return Path(preprocessed_config_folder) / SOFT_FOLDER


def check_soft(arr: np.ndarray, where) -> None:
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: soft labels contain NaN or infinite values")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"{where}: soft labels must lie in [0, 1], found [{arr.min():g}, {arr.max():g}]")


def soft_to_preprocessed_grid(soft: np.ndarray, properties: dict, plans_manager, configuration_manager,
                              target_shape) -> np.ndarray:
    """``soft`` (z, y, x) in raw geometry -> float32 (z', y', x') on nnU-Net's preprocessed grid."""
    tf = plans_manager.transpose_forward
    s = soft[None].astype(np.float32).transpose([0, *[i + 1 for i in tf]])
    bbox = properties["bbox_used_for_cropping"]
    s = s[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]
    original_spacing = [properties["spacing"][i] for i in tf]
    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < s.ndim - 1:
        target_spacing = [original_spacing[0]] + target_spacing  # 2d: slices are not resampled
    if tuple(s.shape[1:]) != tuple(target_shape):
        s = configuration_manager.resampling_fn_probabilities(s, tuple(target_shape), original_spacing, target_spacing)
    return np.clip(np.asarray(s[0], dtype=np.float32), 0.0, 1.0)


RATER_FOLDER = "nnunet_ext_raters"


def rater_folders(preprocessed_config_folder) -> list[Path]:
    return sorted(p for p in (Path(preprocessed_config_folder) / RATER_FOLDER).glob("*") if p.is_dir())


def preprocess_soft_dataset(dataset: str | int, configuration: str, plans: str = "nnUNetPlans",
                            soft_dir: str = "softlabelsTr", overwrite: bool = False, progress: bool = True,
                            out_name: str | None = None) -> dict:
    """Put ``<raw>/<dataset>/<soft_dir>/*.nii.gz`` on the preprocessed grid of ``configuration``, into
    ``nnunet_ext_soft/`` (or ``out_name``) of the preprocessed folder. Requires
    ``nnUNetv2_plan_and_preprocess`` to have run for that configuration. Returns a summary with the bytes
    of the stored soft and hard labels."""
    import blosc2
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(dataset)
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    pm = PlansManager(str(plans_file))
    cm = pm.get_configuration(configuration)
    pre = Path(nnUNet_preprocessed) / name / cm.data_identifier
    if not pre.is_dir():
        raise FileNotFoundError(f"{pre} not found: run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}")
    src = Path(nnUNet_raw) / name / soft_dir
    if not src.is_dir():
        raise FileNotFoundError(f"soft label folder {src} not found")
    from nnunet_ext.core.io import read_json

    ending = read_json(Path(nnUNet_raw) / name / "dataset.json", required=("file_ending",))["file_ending"]
    out = soft_folder(pre) if out_name is None else pre / out_name
    rw = pm.image_reader_writer_class()
    cases = sorted(p.name[:-len("_seg.b2nd")] for p in pre.glob("*_seg.b2nd"))
    if not cases:
        raise FileNotFoundError(f"no preprocessed cases in {pre}")
    from nnunet_ext.core.safety import check_output_not_input, output_lock

    check_output_not_input(out, [src, Path(nnUNet_raw) / name])
    out.mkdir(parents=True, exist_ok=True)
    # the lock lives inside the output folder: nnU-Net infers its dataset class from every file ending in
    # the configuration folder, so nothing of ours may sit there beside the cases
    with output_lock(out / ".nnunet_ext.lock", what=f"preprocess-soft output {out}"):
        manifest_file = out / MANIFEST
        manifest = {} if overwrite or not manifest_file.is_file() else _read_manifest(manifest_file)
        _clean(out, cases, overwrite)
        soft_bytes = hard_bytes = 0
        for k, case in enumerate(cases, 1):
            target = map_path(out, case)
            seg_file = pre / f"{case}_seg.b2nd"
            hard_bytes += seg_file.stat().st_size
            path = src / f"{case}{ending}"
            if not path.is_file():
                raise FileNotFoundError(f"no soft label {path} for preprocessed case {case}")
            stamp = _fingerprint(path, seg_file)
            if overwrite or not target.exists() or manifest.get(case) != stamp:
                check_soft_file(path, Path(nnUNet_raw) / name, case, ending)
                soft, _ = rw.read_images([str(path)])
                check_soft(soft, path)
                with open(pre / f"{case}.pkl", "rb") as f:
                    props = pickle.load(f)
                seg_shape = blosc2.open(urlpath=str(seg_file), mode="r").shape[1:]
                grid = soft_to_preprocessed_grid(soft[0], props, pm, cm, seg_shape)
                manifest.pop(case, None)
                save_map_like_seg(np.round(grid * SOFT_SCALE).astype(np.uint8), seg_file, target)
                manifest[case] = stamp
                _write_manifest(manifest_file, manifest)
            soft_bytes += target.stat().st_size
            step("preprocess-soft", k, len(cases), progress, item=case)
    return {"cases": len(cases), "folder": str(out), "soft_bytes": soft_bytes, "hard_label_bytes": hard_bytes}


MANIFEST = "sources.json"


def _fingerprint(source: Path, seg_file: Path) -> dict:
    """What a stored map was made from: the soft label file and the case's preprocessed segmentation."""
    a, b = source.stat(), seg_file.stat()
    return {"source": str(source), "size": a.st_size, "mtime_ns": a.st_mtime_ns,
            "seg_size": b.st_size, "seg_mtime_ns": b.st_mtime_ns}


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:  # damaged: trust nothing, redo every case
        return {}


def _write_manifest(path: Path, manifest: dict) -> None:
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(path, json.dumps(manifest, indent=0, sort_keys=True))


def _clean(out: Path, cases: list[str], overwrite: bool) -> None:
    """Remove temporary files of killed runs; with ``overwrite`` also maps of cases no longer preprocessed."""
    from nnunet_ext.core.safety import parse_temporary

    for p in out.iterdir():
        if parse_temporary(p.name) is not None and p.is_file():
            p.unlink()
    if overwrite:
        keep = {map_path(out, c).name for c in cases}
        for p in out.glob("*.b2nd"):
            if p.name not in keep:
                p.unlink()
        if (out / MANIFEST).is_file():
            (out / MANIFEST).unlink()


def check_soft_file(path: Path, raw_dataset: Path, case: str, ending: str) -> None:
    """A soft label file must be readable (no truncated gzip, no NaN/Inf), 3-D like nnU-Net's images,
    share the geometry of the case's raw label (or first channel) and lie in [0, 1]."""
    from nnunet_ext.core.io import check_3d, check_range, check_same_geometry, read_sitk

    img = read_sitk(path)
    ref_path = raw_dataset / "labelsTr" / f"{case}{ending}"
    if not ref_path.is_file():
        ref_path = raw_dataset / "imagesTr" / f"{case}_0000{ending}"
    if ref_path.is_file() and ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        ref = read_sitk(ref_path)
        check_same_geometry(ref_path, ref, path, img)
    check_3d(path, img)
    import SimpleITK as sitk

    check_range(sitk.GetArrayViewFromImage(img), path, 0.0, 1.0)


def preprocess_raters(dataset: str | int, configuration: str, plans: str = "nnUNetPlans",
                      raters_dir: str = "ratersTr", overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Every ``<raw>/<dataset>/<raters_dir>/<rater>/`` onto the grid (linear resampling; the random-rater
    dataset thresholds at 0.5), into ``nnunet_ext_raters/<rater>/``."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    base = Path(nnUNet_raw) / maybe_convert_to_dataset_name(dataset) / raters_dir
    raters = sorted(p.name for p in base.glob("*") if p.is_dir())
    if not raters:
        raise FileNotFoundError(f"no rater folders in {base}")
    return [preprocess_soft_dataset(dataset, configuration, plans, f"{raters_dir}/{r}", overwrite, progress,
                                    out_name=f"{RATER_FOLDER}/{r}") for r in raters]


REMEDY = "run nnunet-ext preprocess-soft for this dataset and configuration"


def load_soft(folder: Path, case: str) -> np.ndarray:
    """The whole preprocessed soft map (uint8, 0..255) of ``case``."""
    return read_map(folder, case, REMEDY)


