"""Prediction for models with conditional instance norms (ResolutionFiLMTrainer, SCINTrainer, ...).

nnU-Net's ``nnUNetv2_predict`` always builds a plain predictor that passes only the image to the network,
so it cannot supply a condition (and a conditioned network refuses to run without one).
:class:`ConditionedPredictor` is nnU-Net's predictor with one change: while nnU-Net iterates over the
preprocessed cases, the condition of each case is set on the network before the case is predicted, the
original voxel spacing from the case's image header (what ``data_properties['spacing']`` holds) for FiLM,
the requested cohort for SCIN. Used by ``nnunet-ext predict``; this module's command line is its worker.
"""
from __future__ import annotations

import argparse
import sys

import torch

from nnunet_ext.cohorts import slot_of
from nnunet_ext.networks.conditional_norm import cohort_table_of_state_dict, condition_state, spacing_condition


def predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ConditionedPredictor(nnUNetPredictor):
        """nnUNetPredictor that sets each case's condition (spacing, or the fixed cohort ``self.cohort``)."""

        cohort: str | None = None

        def _state(self):
            state = condition_state(self.network)
            if state is None:
                raise ValueError("this model is not conditioned: use nnUNetv2_predict or nnunet-ext predict without --cohort")
            return state

        def set_cohort(self, name: str | None) -> None:
            state = self._state()
            if state.kind != "cohort":
                if name is not None:
                    raise ValueError("--cohort applies to cohort-conditioned (SCIN) models; this model is conditioned "
                                     "on the voxel spacing read from each image")
                return
            tables = {tuple(cohort_table_of_state_dict(p)) for p in self.list_of_parameters}
            if len(tables) != 1:
                raise ValueError(f"the folds of this model disagree on their cohort tables: {sorted(tables)}")
            table = list(tables.pop())
            if name is None:
                raise ValueError(f"this SCIN model predicts in the style of one cohort: pass --cohort NAME, one of "
                                 f"{[n for n in table if n]}")
            self.cohort = name
            self.cohort_slot = slot_of(table, name)

        def _condition(self, properties: dict) -> torch.Tensor:
            state = self._state()
            if state.kind == "cohort":
                if self.cohort is None:
                    raise ValueError("no cohort chosen: call set_cohort(NAME) first (nnunet-ext predict --cohort NAME)")
                return torch.tensor([self.cohort_slot], dtype=torch.long)
            return spacing_condition([properties["spacing"]])

        def _conditioned(self, data_iterator):
            state = self._state()
            try:
                for item in data_iterator:
                    state.set(self._condition(item["data_properties"]))
                    yield item
            finally:
                state.clear()

        def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                       num_processes_segmentation_export: int = 2):
            return super().predict_from_data_iterator(self._conditioned(data_iterator), save_probabilities,
                                                      num_processes_segmentation_export)

        def predict_single_npy_array(self, input_image, image_properties, segmentation_previous_stage=None,
                                     output_file_truncated=None, save_or_return_probabilities=False):
            state = self._state()
            state.set(self._condition(image_properties))
            try:
                return super().predict_single_npy_array(input_image, image_properties, segmentation_previous_stage,
                                                        output_file_truncated, save_or_return_probabilities)
            finally:
                state.clear()

    return ConditionedPredictor


def predict_conditioned(input_dir, output_dir, model_dir, folds, checkpoint="checkpoint_final.pth", cohort=None,
                        device="cuda", disable_tta=False, save_probabilities=False, npp=2, nps=2) -> None:
    dev = torch.device(device)
    if dev.type == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    predictor = predictor_class()(tile_step_size=0.5, use_gaussian=True, use_mirroring=not disable_tta,
                                  perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                  allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), tuple(folds), checkpoint)
    predictor.set_cohort(cohort)
    predictor.predict_from_files(str(input_dir), str(output_dir), save_probabilities=save_probabilities,
                                 overwrite=True, num_processes_preprocessing=npp,
                                 num_processes_segmentation_export=nps)


def run(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nnunet_ext.conditioned_predict",
                                description="worker of `nnunet-ext predict` for conditioned models")
    p.add_argument("-i", required=True)
    p.add_argument("-o", required=True)
    p.add_argument("-m", required=True, help="trained model folder (Trainer__Plans__configuration)")
    p.add_argument("-f", nargs="+", required=True)
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("--cohort", default=None)
    p.add_argument("-device", default="cuda")
    p.add_argument("--disable_tta", action="store_true")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("-npp", type=int, default=2)
    p.add_argument("-nps", type=int, default=2)
    a = p.parse_args(argv)
    folds = [f if f == "all" else int(f) for f in a.f]
    predict_conditioned(a.i, a.o, a.m, folds, a.chk, a.cohort, a.device, a.disable_tta, a.save_probabilities,
                        a.npp, a.nps)


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1:])
