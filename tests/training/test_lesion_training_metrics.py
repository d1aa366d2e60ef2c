"""Lesion metrics while training (nnunet_ext.training.lesion_monitor): pooled metric on hand-made validation
patches, the EMA and checkpoint selection, and a short real training."""
import math
import os

import numpy as np
import pytest

from nnunet_ext.training.lesion_monitor import (BEST_CHECKPOINT, EVERY_VARIABLE, LesionMonitor, batch_counts,
                                                lesion_every, pooled_lesion_metrics)


def _two_patches():
    """(ref, pred) of a validation batch of two 8^3 patches with known lesions."""
    ref, pred = np.zeros((2, 8, 8, 8), bool), np.zeros((2, 8, 8, 8), bool)
    # patch 0: R1 4 voxels (small), touched by a 1-voxel prediction -> detected
    ref[0, 1, 1:3, 1:3] = True
    pred[0, 1, 1, 1] = True
    # R2 3x3x2 = 18 voxels (not small), not predicted -> missed
    ref[0, 4:7, 4:7, 0:2] = True
    # a 2-voxel prediction touching no reference voxel -> false positive
    pred[0, 6, 0, 6:8] = True
    # patch 1: R3 3 voxels (small), not predicted -> missed
    ref[1, 0, 0, 0:3] = True
    # R4 1 voxel (below the 3-10 bin), inside a 27-voxel prediction -> detected
    ref[1, 5, 5, 5] = True
    pred[1, 4:7, 4:7, 4:7] = True
    return ref, pred


def test_pooled_metric_on_two_hand_made_patches():
    ref, pred = _two_patches()
    c = batch_counts(ref, pred)
    # reference lesions R1..R4: detected R1, R4; missed R2, R3. Predicted: 3 components, 1 touches nothing.
    assert {k: c[k] for k in ("patches", "ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp",
                              "small_ref", "small_tp")} == \
        {"patches": 2, "ref_lesions": 4, "pred_lesions": 3, "lesion_tp": 2, "lesion_fn": 2, "lesion_fp": 1,
         "small_ref": 2, "small_tp": 1}
    m = pooled_lesion_metrics(c)
    # pooled: TPR 2/4, PPV (3-1)/3 = 2/3, F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7
    # (the mean of the per-patch F1s, (1/2 + 2/3) / 2 = 7/12, would differ)
    assert m["lesion_f1"] == pytest.approx(4 / 7)
    # small lesions (3-10 voxels): R1 (4, detected) and R3 (3, missed): 1/2
    assert m["small_lesion_tpr"] == pytest.approx(0.5)
    # no small reference lesion: the TPR is undefined, not 0 or 1
    assert pooled_lesion_metrics(batch_counts(ref[:, :, 4:], pred[:, :, 4:]))["small_lesion_tpr"] is None


def test_every_from_the_environment():
    assert lesion_every(5, {}) == 5
    assert lesion_every(5, {EVERY_VARIABLE: "0"}) == 0
    assert lesion_every(5, {EVERY_VARIABLE: "2"}) == 2
    for bad in ("-1", "two"):
        with pytest.raises(ValueError, match=EVERY_VARIABLE):
            lesion_every(5, {EVERY_VARIABLE: bad})


def _counts(tp, fn, npred, fp):
    return {"patches": 1, "ref_lesions": tp + fn, "pred_lesions": npred, "lesion_tp": tp, "lesion_fn": fn,
            "lesion_fp": fp, "small_ref": 0, "small_tp": 0}


# epoch -> counts (None: not computed). F1: 0.5 (TPR 1/2, PPV 1/2), -, 0.25 (1/4, 1/4), 1.0
SEQUENCE = [_counts(1, 1, 2, 1), None, _counts(1, 3, 4, 3), _counts(1, 0, 1, 0)]
# EMA with every = 1 (weight 1 - 0.9 = 0.1): 0.5; -; 0.9 * 0.5 + 0.1 * 0.25 = 0.475; 0.9 * 0.475 + 0.1 = 0.5275
EMA = [0.5, None, 0.475, 0.5275]
IMPROVED = [True, False, False, True]


def test_ema_and_improvement_on_the_bare_methods(tmp_path, monkeypatch):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    monkeypatch.delenv("nnUNet_wandb_enabled", raising=False)
    m = LesionMonitor()
    m.logger, m.current_epoch, m.lesion_every = MetaLogger(str(tmp_path), False), 0, 1
    m.add_lesion_keys()
    for epoch, counts in enumerate(SEQUENCE):
        m.current_epoch = epoch
        m.log_lesion_metrics(counts)
        ema = m.logger.get_value("lesion_f1_ema", epoch)
        assert math.isnan(ema) if EMA[epoch] is None else ema == pytest.approx(EMA[epoch])
        assert m.lesion_improved(epoch) is IMPROVED[epoch], epoch
    assert m.logger.get_value("lesion_f1", None)[2] == pytest.approx(0.25)


@pytest.mark.slow
def test_lesion_checkpoint_saved_only_when_the_ema_improves(planned_phantom, monkeypatch):
    """A real ExtBaselineTrainer driven through nnU-Net's on_epoch_end with a made-up epoch sequence."""
    import torch

    from conftest import PLANNED_ID, nnunet_paths
    from nnunet_ext.nnunet_adapter import build_trainer
    from nnunet_ext.training.base import ExtBaselineTrainer

    work, env, root = planned_phantom
    monkeypatch.delenv("nnUNet_wandb_enabled", raising=False)
    with nnunet_paths(env):
        t = build_trainer(ExtBaselineTrainer, PLANNED_ID, "2d", 0)
        t.initialize()
        os.makedirs(t.output_folder, exist_ok=True)
        t.num_epochs, t.lesion_every = 10, 1
        t.add_lesion_keys()
        best = os.path.join(t.output_folder, BEST_CHECKPOINT)
        saved_at = []
        for epoch, counts in enumerate(SEQUENCE):
            for k, v in (("epoch_start_timestamps", 0.0), ("lrs", 0.01), ("train_losses", 1.0),
                         ("val_losses", 1.0), ("mean_fg_dice", 0.5), ("dice_per_class_or_region", [0.5]),
                         ("epoch_end_timestamps", 1.0)):
                t.logger.log(k, v, epoch)
            t.log_lesion_metrics(counts)
            if counts is not None:
                t.lesion_seconds = 0.0
            t.on_epoch_end()
            assert t.current_epoch == epoch + 1
            saved_at.append(torch.load(best, weights_only=False)["current_epoch"] if os.path.isfile(best) else None)
    # saved after epochs 0 and 3 (a checkpoint records the next epoch to train, as nnU-Net's)
    assert saved_at == [1, 1, 1, 4]
    ck = torch.load(best, weights_only=False)
    assert ck["logging"]["lesion_f1_ema"][3] == pytest.approx(0.5275)


@pytest.mark.slow
def test_two_epochs_with_lesion_metrics(planned_phantom, tmp_path):
    """2 epochs x 2 iterations of ExtBaselineTrainer with NNUNET_EXT_LESION_EVERY=1."""
    from PIL import Image

    from conftest import PLANNED_ID, run_nnunet
    from nnunet_ext.core.paths import nnunet_command

    work, env, root = planned_phantom
    env = {**env, "NNUNET_EXT_NUM_EPOCHS": "2", "NNUNET_EXT_ITERATIONS": "2", "NNUNET_EXT_VAL_ITERATIONS": "2",
           EVERY_VARIABLE: "1", "nnUNet_results": str(tmp_path / "results")}
    run_nnunet([nnunet_command("nnUNetv2_train"), str(PLANNED_ID), "2d", "0", "-tr", "ExtBaselineTrainer",
                "-device", "cpu"], env)
    fold = next((tmp_path / "results").rglob("fold_0"))
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "lesion metrics while training: every 1 epochs" in log
    assert log.count("lesion F1 (validation patches)") == 2
    assert "TPR of 3-10-voxel lesions" in log
    assert (fold / "checkpoint_best_lesion.pth").is_file() and (fold / "checkpoint_best.pth").is_file()
    # nnU-Net's figure (30 x 54 inches at 100 dpi) with a fourth panel at the bottom: the lesion F1's colour
    # (PANEL_COLORS[0], 148 0 211) only in the bottom quarter (from row 5400 * 3 / 4 = 4050, its legend
    # slightly above)
    img = np.asarray(Image.open(fold / "progress.png").convert("RGB")).astype(int)
    assert img.shape == (5400, 3000, 3)
    violet = (np.abs(img - [148, 0, 211]).sum(-1) < 30).sum(1)
    assert violet[4050:].sum() > 100 and violet[:3900].sum() == 0

    # the lesion checkpoint is an nnU-Net checkpoint: both predict commands load it with -chk
    common = ["-i", str(root / "imagesTs"), "-d", str(PLANNED_ID), "-c", "2d", "-tr", "ExtBaselineTrainer",
              "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", "-chk", BEST_CHECKPOINT]
    run_nnunet([nnunet_command("nnUNetv2_predict"), *common, "-o", str(tmp_path / "theirs")], env)
    run_nnunet([nnunet_command("nnunet-ext"), "predict", *common, "-o", str(tmp_path / "ours")], env)
    cases = sorted(p.name for p in (tmp_path / "theirs").glob("*.nii.gz"))
    assert len(cases) == 2 and cases == sorted(p.name for p in (tmp_path / "ours").glob("*.nii.gz"))
    import SimpleITK as sitk

    for c in cases:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / c))) for d in ("theirs", "ours"))
        assert np.array_equal(a, b), c
