"""The focal-Tversky thesis (Røvang 2021) settings: Omega = 2 in every experiment (section 7), alpha/beta
0.7/0.3 (default) and 0.85/0.15, gamma 4/3 as the exponent (eq. 4.12), TP/FN/FP over the flattened
mini-batch (Fig. 4.2, section 7): hand-worked values."""
import math

import pytest
import torch

from nnunet_ext.training.losses import FocalTverskyLoss


def _batch():
    """Two samples of two voxels (2-class logits; the lesion probability is the softmax):
    sample 1: lesion p = 0.75, background p = 0.25; sample 2: lesion p = 0.5, lesion p = 0.25."""
    d = torch.tensor([[math.log(3), -math.log(3)], [0.0, -math.log(3)]])  # lesion minus background logit
    logits = torch.stack([torch.zeros_like(d), d], 1)[:, :, None, :]  # (2, 2, 1, 2)
    target = torch.tensor([[1, 0], [1, 1]], dtype=torch.int16)[:, None, None, :]
    return logits, target


def test_thesis_loss_on_the_flattened_batch_with_omega_2():
    logits, target = _batch()
    # flattened: TP = 0.75 + 0.5 + 0.25 = 1.5, FN = 0.25 + 0.5 + 0.75 = 1.5, FP = 0.25
    # 0.7/0.3: TI = (1.5 + 2) / (1.5 + 0.7 * 1.5 + 0.3 * 0.25 + 2) = 3.5 / 4.625; loss (1 - TI)^(4/3)
    ti = 3.5 / 4.625
    assert float(FocalTverskyLoss(0.7, 0.3, 4 / 3, 2.0, batch=True)(logits, target)) == \
        pytest.approx((1 - ti) ** (4 / 3), rel=1e-5)  # 0.151841
    # 0.85/0.15: TI = 3.5 / (1.5 + 1.275 + 0.0375 + 2) = 3.5 / 4.8125
    ti = 3.5 / 4.8125
    assert float(FocalTverskyLoss(0.85, 0.15, 4 / 3, 2.0, batch=True)(logits, target)) == \
        pytest.approx((1 - ti) ** (4 / 3), rel=1e-5)  # 0.176863
    # per sample instead (what a plan without batch Dice gave): sample 1 TI = 2.75 / 3, sample 2 TI = 2.75 / 3.625
    per_sample = ((1 - 2.75 / 3) ** (4 / 3) + (1 - 2.75 / 3.625) ** (4 / 3)) / 2  # 0.093345
    assert float(FocalTverskyLoss(0.7, 0.3, 4 / 3, 2.0, batch=False)(logits, target)) == \
        pytest.approx(per_sample, rel=1e-5)
    assert abs(per_sample - (1 - 3.5 / 4.625) ** (4 / 3)) > 0.05


def test_thesis_trainers_settings():
    from nnunet_ext.training import named

    for name, (a, b) in (("FocalTverskyTrainer_thesis_a07", (0.7, 0.3)), ("FocalTverskyTrainer_thesis", (0.85, 0.15))):
        p = getattr(named, name).loss_part
        assert (p.a, p.b, p.gamma, p.smooth, p.batch) == (a, b, 4 / 3, 2.0, True), name


@pytest.mark.slow
@pytest.mark.parametrize("name,a", [("FocalTverskyTrainer_thesis_a07", 0.7), ("FocalTverskyTrainer_thesis", 0.85)])
def test_thesis_trainers_pool_the_batch_on_a_3d_plan(planned_phantom, name, a):
    """Built in-process on the planned phantom's 3d_fullres plan, whose batch_dice is False: the thesis
    variants still pool TP/FN/FP over the mini-batch; the loss of the hand batch is the flattened one."""
    from conftest import PLANNED_ID, nnunet_paths
    from nnunet_ext.nnunet_adapter import build_trainer
    from nnunet_ext.training import named

    work, env, root = planned_phantom
    with nnunet_paths(env):
        t = build_trainer(getattr(named, name), PLANNED_ID, "3d_fullres", 0)
        assert t.configuration_manager.batch_dice is False
        loss = t.loss_part.build(t, t.layout)[0]
    assert loss.batch is True and (loss.a, loss.smooth) == (a, 2.0)
    logits, target = _batch()
    ti = 3.5 / (1.5 + a * 1.5 + (1 - a) * 0.25 + 2)
    assert float(loss(logits, target)) == pytest.approx((1 - ti) ** (4 / 3), rel=1e-5)
