"""NNUNET_EXT_SEED: a seeded training is reproducible (nnunet_ext.training.base, nnunet_ext.core.budget)."""
import json
import os
import subprocess

import pytest

from nnunet_ext.core.budget import SEED_VARIABLE, seed_in


def test_seed_variable_is_read_and_checked():
    assert seed_in({}) is None and seed_in({SEED_VARIABLE: ""}) is None
    assert seed_in({SEED_VARIABLE: "0"}) == 0 and seed_in({SEED_VARIABLE: " 4294967295 "}) == 2 ** 32 - 1
    for bad in ("-1", "4294967296", "1.5", "seven"):
        with pytest.raises(ValueError, match=f"NNUNET_EXT_SEED must be a whole number in 0..4294967295, got '{bad}'"):
            seed_in({SEED_VARIABLE: bad})


class _Draws:
    """A batchgenerators data loader whose batches are one numpy, one torch and one python random draw."""

    def __init__(self):
        from batchgenerators.dataloading.data_loader import DataLoader

        class Loader(DataLoader):
            def generate_train_batch(self):
                import random

                import numpy as np
                import torch
                return {"draws": (float(np.random.rand()), float(torch.rand(1)), random.random()),
                        "threads": torch.get_num_threads()}

        self.loader = Loader(None, 1, num_threads_in_multithreaded=2)


def _batches(seed, n=6):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from nnunet_ext.nnunet_adapter import seeded_worker_augmentation

    with seeded_worker_augmentation(seed):
        # built as nnUNetTrainer.get_dataloaders builds its training loader
        aug = trainer_module.NonDetMultiThreadedAugmenter(data_loader=_Draws().loader, transform=None, num_processes=2,
                                                          num_cached=2, seeds=None, pin_memory=False, wait_time=0.002)
    try:
        batches = [next(aug) for _ in range(n)]
        assert {b["threads"] for b in batches} == {1}  # one torch thread per worker, as nnU-Net's workers
        return [b["draws"] for b in batches]
    finally:
        aug._finish()


def test_training_mismatch_reads_what_the_fold_recorded(tmp_path):
    from nnunet_ext.core.budget import training_mismatch

    fold = tmp_path / "fold_0"
    fold.mkdir()
    assert training_mismatch(fold, {"epochs": 3}, 7) is not None  # nothing recorded: not seeded
    assert training_mismatch(fold, {"epochs": 3}, None) is None  # no budget recorded, no seed asked
    (fold / "debug.json").write_text(json.dumps({"num_epochs": "40", "num_iterations_per_epoch": "20"}))
    (fold / "nnunet_ext_settings.json").write_text(json.dumps({"seed": 5}))
    assert training_mismatch(fold, {"epochs": 40, "iterations": 20, "val_iterations": 9}, 5) is None
    assert training_mismatch(fold, {"epochs": 40, "iterations": 10}, None) == \
        "has 40 epochs x 20 iterations, requested {'epochs': 40, 'iterations': 10}"
    assert training_mismatch(fold, {}, 6) == "was trained with training seed 5, requested training seed 6"
    (fold / "nnunet_ext_settings.json").write_text(json.dumps({}))
    assert training_mismatch(fold, {}, 6) == "was trained without a training seed, requested training seed 6"


def test_seeded_worker_augmentation_fixes_the_batches_of_nnunets_workers():
    """Two workers, as nnU-Net builds them: the same seed gives the same batches in the same order, another
    seed other batches; the two workers draw different torch and python numbers (forked workers would share the
    parent's torch state) and run one torch thread each; nnU-Net's augmenter class is restored after the block."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from nnunet_ext.nnunet_adapter import worker_seeds

    before = trainer_module.NonDetMultiThreadedAugmenter
    a, b, c = _batches(7), _batches(7), _batches(8)
    assert trainer_module.NonDetMultiThreadedAugmenter is before
    assert a == b and a != c
    for k in range(3):  # batches alternate between worker 0 and worker 1
        assert a[0][k] != a[1][k] and a[0][k] != a[2][k]
    assert len(set(worker_seeds(7, 0, 4) + worker_seeds(7, 1, 4) + worker_seeds(8, 0, 4))) == 12


def test_compare_passes_the_training_seed_to_every_training():
    from nnunet_ext.workflows.compare import CompareConfig, _compare_argv

    cfg = CompareConfig("501", "2d", ["ExtBaselineTrainer", "LSRDiceTrainer"], epochs=2, train_seed=3).validate()
    assert cfg.training_env == {"NNUNET_EXT_NUM_EPOCHS": "2", "NNUNET_EXT_SEED": "3"}
    assert _compare_argv(cfg)[-4:] == ["--epochs", "2", "--train-seed", "3"]
    assert CompareConfig("501", "2d", ["A", "B"]).validate().training_env == {}  # unseeded by default
    for bad in (-1, 2 ** 32, 1.5, True):
        with pytest.raises(ValueError, match="train_seed must be a whole number"):
            CompareConfig("501", "2d", ["A", "B"], train_seed=bad).validate()


def _final_weights(results):
    import torch

    ck = next(results.rglob("fold_0/checkpoint_final.pth"))
    return torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.slow
@pytest.mark.heavy  # three trainings (about 55 s): CI's heavy part
def test_same_seed_same_weights_other_seed_other_weights(planned_phantom, tmp_path):
    """ExtBaselineTrainer, 2 epochs x 3 iterations, trained three times in fresh processes with nnU-Net's
    multi-process data augmentation (nnUNet_n_proc_DA=2, seeded workers): seeds 7, 7 and 8. The two seed-7 runs
    end with bit-identical weights, the seed-8 run with other weights; the settings record and the training log
    name the seed."""
    from conftest import PLANNED_ID
    from nnunet_ext.core.paths import nnunet_command

    work, env, root = planned_phantom
    weights, logs = [], []
    for k, seed in enumerate(("7", "7", "8")):
        results = tmp_path / f"results_{k}"
        run_env = {**os.environ, **env, "nnUNet_results": str(results), "nnUNet_n_proc_DA": "2",
                   "NNUNET_EXT_NUM_EPOCHS": "2", "NNUNET_EXT_ITERATIONS": "3", "NNUNET_EXT_VAL_ITERATIONS": "1",
                   SEED_VARIABLE: seed}
        r = subprocess.run([nnunet_command("nnUNetv2_train"), str(PLANNED_ID), "2d", "0", "-tr", "ExtBaselineTrainer",
                            "-device", "cpu"], env=run_env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        weights.append(_final_weights(results))
        fold = next(results.rglob("fold_0"))
        assert json.loads((fold / "nnunet_ext_settings.json").read_text())["seed"] == int(seed)
        logs.append(next(fold.glob("training_log_*.txt")).read_text())
    assert ("nnunet-ext seed: NNUNET_EXT_SEED=7 seeds random, numpy and torch; 2 seeded augmentation workers, "
            "batches in a fixed order (nnUNet_n_proc_DA=2)") in logs[0]
    same = [n for n in weights[0] if (weights[0][n] == weights[1][n]).all()]
    assert same == list(weights[0]), f"seed 7 twice: {len(weights[0]) - len(same)} tensors differ"
    differ = [n for n in weights[0] if weights[0][n].dtype.is_floating_point
              and not (weights[0][n] == weights[2][n]).all()]
    assert len(differ) > len(weights[0]) // 2, "seeds 7 and 8 gave (nearly) the same weights"
