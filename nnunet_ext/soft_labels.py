"""Soft targets through nnU-Net: preprocessing onto nnU-Net's grid, and transport through augmentation.

A raw dataset carries soft targets in [0, 1] as ``softlabelsTr/<case>.nii.gz`` beside its (binarized)
``labelsTr`` that nnU-Net plans and samples with. :func:`preprocess_soft_dataset` repeats nnU-Net's
geometry for them -- ``transpose_forward``, the crop ``bbox_used_for_cropping`` stored in each case's
``.pkl``, and resampling to the preprocessed shape with the configuration's *probability* resampling
function (linear) -- and stores them as uint8 in 1/255 steps, zlib-compressed, in
``<preprocessed config folder>/nnunet_ext_soft/<case>.npz``.

During training the dataset returns the soft map as segmentation channel 1 (values 0..255);
:class:`SoftTargetTransforms` moves it into batchgeneratorsv2's ``regression_target`` before nnU-Net's
training transforms (spatial transforms interpolate it linearly like the image, mirroring flips it,
intensity transforms leave it alone), then appends it, area-averaged to every deep-supervision scale, as
channel 1 of each segmentation target (float, in [0, 1]).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ext.training.plumbing import DatasetWrapper, WithExtraSegChannel

SOFT_FOLDER = "nnunet_ext_soft"
SOFT_SCALE = 255.0


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
    ending = json.loads((Path(nnUNet_raw) / name / "dataset.json").read_text())["file_ending"]
    out = soft_folder(pre) if out_name is None else pre / out_name
    out.mkdir(parents=True, exist_ok=True)
    rw = pm.image_reader_writer_class()
    cases = sorted(p.name[:-len("_seg.b2nd")] for p in pre.glob("*_seg.b2nd"))
    if not cases:
        raise FileNotFoundError(f"no preprocessed cases in {pre}")
    soft_bytes = hard_bytes = 0
    for k, case in enumerate(cases, 1):
        target = out / f"{case}.npz"
        hard_bytes += (pre / f"{case}_seg.b2nd").stat().st_size
        if not target.exists() or overwrite:
            path = src / f"{case}{ending}"
            if not path.is_file():
                raise FileNotFoundError(f"no soft label {path} for preprocessed case {case}")
            soft, _ = rw.read_images([str(path)])
            check_soft(soft, path)
            with open(pre / f"{case}.pkl", "rb") as f:
                props = pickle.load(f)
            seg_shape = blosc2.open(urlpath=str(pre / f"{case}_seg.b2nd"), mode="r").shape[1:]
            grid = soft_to_preprocessed_grid(soft[0], props, pm, cm, seg_shape)
            q = np.round(grid * SOFT_SCALE).astype(np.uint8)
            tmp = out / f".tmp_{os.getpid()}_{case}.npz"
            with open(tmp, "wb") as f:
                np.savez_compressed(f, soft=q)
            os.replace(tmp, target)
        soft_bytes += target.stat().st_size
        if progress:
            print(f"\rpreprocess-soft: {k}/{len(cases)}", end="", flush=True)
    if progress:
        print()
    return {"cases": len(cases), "folder": str(out), "soft_bytes": soft_bytes, "hard_label_bytes": hard_bytes}


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


def load_soft(folder: Path, case: str) -> np.ndarray:
    path = Path(folder) / f"{case}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run nnunet-ext preprocess-soft for this dataset and configuration")
    with np.load(path) as f:
        return f["soft"]


class WithSoftTargets(WithExtraSegChannel):
    """Wraps an nnU-Net dataset; ``load_case`` returns the segmentation with the soft map (0..255) as
    channel 1."""

    remedy = "rerun nnunet-ext preprocess-soft with --overwrite"

    def __init__(self, base, folder: Path):
        super().__init__(base)
        self.folder = Path(folder)

    def load_extra(self, identifier):
        return load_soft(self.folder, identifier)


class WithRandomRater(DatasetWrapper):
    """Wraps an nnU-Net dataset; every ``load_case`` replaces the label map by one rater's mask drawn at
    random (Lemay et al.'s "no fusion" strategy). Voxels outside nnU-Net's crop (-1) stay -1."""

    def __init__(self, base, folders):
        super().__init__(base)
        self.folders = [Path(f) for f in folders]
        if not self.folders:
            raise FileNotFoundError("no preprocessed rater folders: run nnunet-ext preprocess-soft --raters")

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        rater = self.folders[np.random.randint(len(self.folders))]
        mask = load_soft(rater, identifier) >= 128
        seg = np.array(seg[:])
        seg[0] = np.where(seg[0] == -1, -1, mask).astype(seg.dtype)
        return data, seg, seg_prev, properties


def area_resize(soft: torch.Tensor, shape) -> torch.Tensor:
    """(1, *spatial) soft map resized to ``shape`` by area averaging (deep-supervision targets)."""
    if tuple(soft.shape[1:]) == tuple(shape):
        return soft
    return F.interpolate(soft[None], size=tuple(shape), mode="area")[0]


class SoftTargetTransforms:
    """Wraps nnU-Net's training transforms so that segmentation channel 1 (soft map, 0..255) travels as a
    linearly interpolated ``regression_target`` and comes back, per deep-supervision scale, as float
    channel 1 of the target next to the hard labels (channel 0)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, **data):
        seg = data["segmentation"]
        if seg.shape[0] < 2:
            return self.inner(**data)
        soft = (seg[1:2].float() / SOFT_SCALE).clamp(min=0.0)  # padding (-1) -> 0
        data["segmentation"] = seg[:1]
        data["regression_target"] = soft
        out = self.inner(**data)
        soft = out.pop("regression_target").float().clamp(0.0, 1.0)
        segs = out["segmentation"]
        if isinstance(segs, (list, tuple)):
            out["segmentation"] = [torch.cat([s.float(), area_resize(soft, s.shape[1:])]) for s in segs]
        else:
            out["segmentation"] = torch.cat([segs.float(), area_resize(soft, segs.shape[1:])])
        return out
