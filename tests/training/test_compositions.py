"""Every named trainer, built in-process on the shared planned phantom: 2 training steps through nnU-Net's
real data loader and augmentation; one fixed batch's loss against an independent numpy computation; the
composition rules (NotImplementedError naming both parts); the model contract each trainer writes."""
import json

import numpy as np
import pytest
import torch

from conftest import PLANNED_ID, nnunet_paths
from nnunet_ext.preprocessing.maps import read_map
from nnunet_ext.training import named
from nnunet_ext.training.composed import ComposedTrainer, check_composition
from nnunet_ext.training.parts import (LSRBCE, CohortNorm, DiceCE, FiLM, FocalTversky, LesionSizes, RandomRater,
                                       SoftDiceBCE, SoftSegAW, SoftTargets)

TRAINERS = [n for n in named.__all__ if n not in ("DiceCE", "SCINNormFineTuneTrainer")]


def test_composition_rules_name_both_parts():
    with pytest.raises(NotImplementedError, match=r"LSRBCE\(alpha=4.0, beta=4.0\) needs the 'sizes' map: add LesionSizes"):
        check_composition(LSRBCE(4, 4), (), None)
    with pytest.raises(NotImplementedError, match=r"DiceCE\(\) does not use SoftTargets\(\)"):
        check_composition(DiceCE(), (SoftTargets(),), None)
    with pytest.raises(NotImplementedError, match=r"FocalTversky.*does not use LesionSizes\(connectivity=18\)"):
        check_composition(FocalTversky(), (LesionSizes(),), None)
    with pytest.raises(NotImplementedError, match="SoftSegAW.*needs the 'soft' map"):
        check_composition(SoftSegAW(), (RandomRater(),), None)
    with pytest.raises(NotImplementedError, match="two network parts"):
        check_composition(DiceCE(), (), (FiLM(), CohortNorm()))
    with pytest.raises(NotImplementedError, match="twice"):
        check_composition(SoftDiceBCE(), (SoftTargets(), SoftTargets()), None)
    specs = check_composition(LSRBCE(4, 4), (RandomRater(), SoftTargets(), LesionSizes(6)), FiLM())
    assert [(s.name, s.exact) for s in specs] == [("soft", False), ("sizes", True)]
    with pytest.raises(ValueError, match="alpha must be <= beta"):
        LSRBCE(8, 4)


def _trainer(cls, env, configuration="2d"):
    from nnunet_ext.nnunet_adapter import build_trainer

    t = build_trainer(cls, PLANNED_ID, configuration, 0)
    t.batch_size = 2  # keeps each step cheap; the data path is the same
    t.initialize()
    t.dataloader_train, t.dataloader_val = t.get_dataloaders()
    if t.network_part is not None:
        t.network_part.prepare(t)
    return t


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_two_training_steps_through_nnunets_data_path(planned_phantom, name):
    work, env, root = planned_phantom
    with nnunet_paths(env):
        t = _trainer(getattr(named, name), env)
        losses = []
        for _ in range(2):
            batch = next(t.dataloader_train)
            k = 1 + len(t.map_specs)
            assert batch["target"][0].shape[1] == k  # labels + the composition's maps, at every scale
            assert all(s.shape[1] == k for s in batch["target"])
            losses.append(t.train_step(batch)["loss"])
        assert all(np.isfinite(losses))
        # the targets keep the stored dtype (int16, as nnU-Net's labels); soft maps in 1/255 steps
        assert all(s.dtype == torch.int16 for s in batch["target"])
        if "soft" in t.layout:
            soft = batch["target"][0][:, t.layout["soft"]]
            assert float(soft.min()) >= 0 and float(soft.max()) <= 255
            if "RandomRater" not in name:  # (with a random rater the soft map is the drawn rater's 0/255 mask)
                assert ((soft > 0) & (soft < 255)).any()  # soft values, not a binary mask
        if "sizes" in t.layout:
            sizes, lab = batch["target"][0][:, t.layout["sizes"]], batch["target"][0][:, 0]
            assert float(sizes[lab == 1].max()) >= 1  # lesion voxels carry whole-case sizes
        if name.startswith("Rater"):  # the fused raters are the labels of every load, whatever the draw
            tr = t.get_tr_and_val_datasets()[0]
            assert tr.fuse == name[len("Rater"):-len("Trainer")].lower()
            key = tr.identifiers[0]
            lab = np.asarray(tr.load_case(key)[1])[0]
            votes = sum((read_map(r, key) >= 128).astype(int) for r in tr.rater_folders)
            want = votes >= (1 if tr.fuse == "union" else len(tr.rater_folders))
            np.testing.assert_array_equal(lab[lab != -1], want[lab != -1])
        c = t.contract()
        assert c.activation == t.loss_part.activation
        assert c.condition == (None if t.network_part is None else t.network_part.kind)
        if c.condition == "cohort":
            assert set(c.cohorts) == {"cohort0_all", "cohort1_no_small"}


def _np_lsr_bce(logits, target, alpha, beta, soft_channel=None):
    """Independent LSR-weighted two-class cross-entropy (numpy, float64)."""
    z = logits.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    lab, sizes = target[:, 0], target[:, 1 if soft_channel != 1 else 2]
    w = np.ones_like(lab, dtype=np.float64)
    fg = (lab > 0) & (sizes > 0)
    w[fg] = 1 + alpha / sizes[fg] * np.exp(-(sizes[fg] - 1) / beta)
    if soft_channel is None:
        ce = -np.where(lab == 1, logp[:, 1], logp[:, 0])
    else:
        s = target[:, soft_channel] / 255.0  # integer targets carry soft maps in 1/255 steps
        ce = -(s * logp[:, 1] + (1 - s) * logp[:, 0])
    return (w * ce).sum() / lab.size


@pytest.mark.slow
@pytest.mark.parametrize("name,soft", [("LSRTrainer", False), ("LSRSoftTrainer", True)])
def test_fixed_batch_loss_by_hand(planned_phantom, name, soft):
    from nnunet_ext.nnunet_adapter import deep_supervision_weights

    work, env, root = planned_phantom
    with nnunet_paths(env):
        t = _trainer(getattr(named, name), env)
        size_ch = t.layout["sizes"]
        # a batch with small lesions, where the LSR weights are far from 1 (random patches may hold only
        # large ones: weight 1 + 4/32 exp(-31/4) = 1.00005 at 32 voxels)
        for _ in range(20):
            batch = next(t.dataloader_train)
            g = batch["target"][0]
            if ((g[:, 0] == 1) & (g[:, size_ch] > 0) & (g[:, size_ch] <= 10)).any():
                break
        else:
            pytest.fail("20 batches without a lesion of 10 voxels or fewer")
        torch.manual_seed(0)
        with torch.no_grad():
            out = t.network(batch["data"])
            got = float(t.loss(out, batch["target"]))
        w = deep_supervision_weights(len(out))
        want = sum(wk * _np_lsr_bce(o.numpy(), g.numpy(), 4.0, 4.0, t.layout.get("soft"))
                   for wk, o, g in zip(w, out, batch["target"]) if wk > 0)
        # the weights matter: with alpha = 0 the loss differs by far more than the float32 rounding of ours
        plain = sum(wk * _np_lsr_bce(o.numpy(), g.numpy(), 0.0, 4.0, t.layout.get("soft"))
                    for wk, o, g in zip(w, out, batch["target"]) if wk > 0)
        assert abs(got - want) < 1e-6 * abs(want) + 1e-7
        assert abs(plain - want) > 20 * abs(got - want)


def test_user_combination_in_a_few_lines():
    class MyTrainer(ComposedTrainer):
        loss_part = SoftSegAW()
        target_parts = (RandomRater(), SoftTargets(), )

    assert [s.name for s in check_composition(MyTrainer.loss_part, MyTrainer.target_parts, None)] == ["soft"]
    assert json.dumps(MyTrainer.loss_part.settings())
