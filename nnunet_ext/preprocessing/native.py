"""Native-resolution planning: every case keeps its own voxel spacing (no resampling to a common grid).

McGill's MSSEG-2 stage-1 models condition their instance norms on each scan's voxel spacing (FiLM)
*instead of* resampling every scan to one grid. ``nnunet-ext plan-native -d D -c 3d_fullres`` makes such a
plan with nnU-Net's own machinery:

1. nnU-Net's fingerprint and experiment planner write a plans file ``nnUNetPlans_native.json`` (patch size,
   network and batch size planned for the median spacing, as usual);
2. the configuration is marked ``"nnunet_ext_native_resolution": true``;
3. :class:`NativeResolutionPreprocessor` -- nnU-Net's DefaultPreprocessor with the target spacing of every
   case set to the case's own spacing -- writes the preprocessed cases (transpose, crop to non-zero,
   normalisation exactly as nnU-Net; no resampling).

Train with nnU-Net's command (``nnUNetv2_train D 3d_fullres 0 -tr LSRFiLMTrainer -p nnUNetPlans_native``);
predict with ``nnunet-ext predict ... -p nnUNetPlans_native`` (the one predictor reads the mark and
preprocesses new cases without resampling too; ``nnUNetv2_predict`` would resample them to the median
spacing, which the model never saw).

What it gives up (docs/conditioning.md): one voxel grid for all cases (the network's receptive field and
the patch cover different physical extents on different scans), nnU-Net's resampling of anisotropic scans
towards isotropy, the lowres/cascade configurations, and ``nnUNetv2_predict`` / ``nnUNetv2_preprocess`` on
this plan (they would resample).
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

NATIVE_KEY = "nnunet_ext_native_resolution"
NATIVE_PLANS = "nnUNetPlans_native"


class _CaseSpacing:
    """A configuration manager whose target spacing is the case's own (everything else delegated)."""

    def __init__(self, cm, spacing):
        self._cm, self.spacing = cm, list(spacing)

    def __getattr__(self, name):
        return getattr(self._cm, name)


class NativeResolutionPreprocessor(DefaultPreprocessor):
    """nnU-Net's preprocessing without resampling: the target spacing of each case is its own spacing."""

    def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
        own = [properties["spacing"][i] for i in plans_manager.transpose_forward]
        if len(configuration_manager.spacing) < len(own):  # 2d: nnU-Net keeps the slice spacing anyway
            own = own[1:]
        return super().run_case_npy(data, seg, properties, plans_manager, _CaseSpacing(configuration_manager, own),
                                    dataset_json)


def is_native(configuration_manager) -> bool:
    return bool(configuration_manager.configuration.get(NATIVE_KEY, False))


def plan_native(dataset, configurations=("3d_fullres",), plans_name: str = NATIVE_PLANS, n_proc: int = 2,
                verify: bool = False) -> Path:
    """Plan ``configurations`` of ``dataset`` at native resolution and preprocess them; returns the plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess_dataset)

    from nnunet_ext.nnunet_adapter import dataset_id, dataset_name, env_folder

    if n_proc < 1:
        raise ValueError(f"n_proc must be >= 1, got {n_proc}")
    if not plans_name or "/" in plans_name:
        raise ValueError(f"invalid plans name {plans_name!r}")
    from nnunet_ext.core.checks import STANDARD_CONFIGURATIONS

    odd = [c for c in configurations if c not in STANDARD_CONFIGURATIONS[:3]]  # before anything is written
    if odd:
        raise ValueError(f"-c {' '.join(odd)}: nnU-Net's planner makes {', '.join(STANDARD_CONFIGURATIONS[:3])} "
                         f"(native-resolution planning takes no cascade configuration); choose from those")
    name = dataset_name(dataset)
    did = dataset_id(name)
    pre = env_folder("nnUNet_preprocessed") / name
    if not (pre / "dataset_fingerprint.json").is_file():
        extract_fingerprints([did], num_processes=n_proc, check_dataset_integrity=verify, verbose=False)
    plans_file = pre / f"{plans_name}.json"
    # configurations planned natively before (nnU-Net's planner rewrites the file) stay marked
    earlier = [c for c, v in json.loads(plans_file.read_text())["configurations"].items() if v.get(NATIVE_KEY)] \
        if plans_file.is_file() else []
    before = plans_file.read_bytes() if plans_file.is_file() else None
    plan_experiments([did], overwrite_plans_name=plans_name)
    plans = json.loads(plans_file.read_text())
    unknown = [c for c in configurations if c not in plans["configurations"]]
    if unknown:  # (3d_lowres is planned only for large images) the plans file is left as it was
        if before is None:
            plans_file.unlink()
        else:
            from nnunet_ext.core.safety import atomic_write_text

            atomic_write_text(plans_file, before.decode())
        raise ValueError(f"configuration(s) {unknown} not planned for {name}; planned: {sorted(plans['configurations'])}")
    for c in configurations:
        if "inherits_from" in plans["configurations"][c] or plans["configurations"][c].get("previous_stage"):
            raise NotImplementedError(f"native-resolution planning of the cascade configuration {c!r}")
        plans["configurations"][c][NATIVE_KEY] = True
    for c in earlier:
        if c in plans["configurations"]:
            plans["configurations"][c][NATIVE_KEY] = True
    from nnunet_ext.core.safety import atomic_write_text

    atomic_write_text(plans_file, json.dumps(plans, indent=4))
    for c in configurations:
        NativeResolutionPreprocessor(verbose=False).run(did, c, plans_name, n_proc)
    # nnU-Net's own last preprocessing step, without its preprocessors: the training labels copied to
    # gt_segmentations/, which the end-of-training validation scores against
    preprocess_dataset(did, plans_name, configurations=(), num_processes=())
    return plans_file


class NativeConfigurationManager(ConfigurationManager):
    """nnU-Net's configuration manager whose preprocessor is :class:`NativeResolutionPreprocessor` (what
    nnU-Net's inference data iterators instantiate for every new case)."""

    @property
    def preprocessor_class(self):
        return NativeResolutionPreprocessor


def use_native_preprocessing(predictor) -> bool:
    """Make a (loaded) nnU-Net predictor preprocess new cases without resampling when its plan is native."""
    if is_native(predictor.configuration_manager):
        predictor.configuration_manager.__class__ = NativeConfigurationManager
        return True
    return False
