"""Pseudo-labelling: entropy/omega/VPT/TST by hand, the flip-averaged probabilities on a tiny network."""
import itertools

import numpy as np
import pytest
import torch

from nnunet_ext.inference.contract import ModelContract
from nnunet_ext.inference.predictor import predictor_class
from nnunet_ext.workflows.pseudolabel import confidence_filter, entropy


def test_entropy_omega_vpt_tst_by_hand():
    # three voxels with lesion probability 0.9, 0.5, 0.2 (two classes)
    p1 = np.array([0.9, 0.5, 0.2])
    prob = np.stack([1 - p1, p1])
    h = np.array([-(0.1 * np.log(0.1) + 0.9 * np.log(0.9)), np.log(2), -(0.8 * np.log(0.8) + 0.2 * np.log(0.2))])
    assert np.allclose(entropy(prob), h)  # 0.325083, 0.693147, 0.500402
    r = confidence_filter(prob, alpha=0.3, vpt=0.3, tst=1.0)
    omega = np.exp(-0.3 * h)  # 0.907, 0.812, 0.861
    m_raw = p1 * omega  # 0.8164, 0.4061, 0.1722
    assert np.allclose(r["omega"], omega, atol=1e-6)
    assert np.allclose(r["m"], [m_raw[0], m_raw[1], 0.0], atol=1e-6)  # 0.172 < VPT zeroed
    assert r["sum_m"] == pytest.approx(m_raw[0] + m_raw[1]) and r["keep"]  # 1.2225 >= 1
    assert r["label"].tolist() == [1, 0, 0]
    assert r["uncertain"].tolist() == [False, True, False]  # 0.3 <= 0.406 < 0.5
    assert not confidence_filter(prob, tst=1.5)["keep"]


@pytest.mark.parametrize("kwargs", [dict(alpha=-1), dict(vpt=1.5), dict(tst=-1)])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        confidence_filter(np.full((2, 3), 0.5), **kwargs)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.skew = torch.nn.Parameter(torch.linspace(-1, 1, 6).view(1, 1, 6, 1, 1))  # breaks flip symmetry

    def forward(self, x):
        return self.conv(x) * 3 + self.skew


@pytest.mark.parametrize("axes", [(0, 1, 2), (0, 1)])
def test_flip_mean_of_probabilities(axes):
    pred = predictor_class()(device=torch.device("cpu"), use_mirroring=True)
    pred.contract = ModelContract(tta="mean_probabilities")  # what pseudolabel asks the one predictor for
    pred.network = _Tiny()
    pred.allowed_mirroring_axes = axes
    x = torch.randn(1, 1, 6, 5, 4)
    with torch.no_grad():
        out = pred._internal_maybe_mirror_and_predict(x)
        combos = [c for k in range(len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], k)]
        explicit = torch.stack([torch.flip(torch.softmax(pred.network(torch.flip(x, c)), 1), c) for c in combos]).mean(0)
        logit_mean = torch.stack([torch.flip(pred.network(torch.flip(x, c)), c) for c in combos]).mean(0)
    assert len(combos) == 2 ** len(axes)
    assert torch.allclose(out.exp(), explicit, atol=1e-5)
    assert not torch.allclose(torch.softmax(logit_mean, 1), explicit, atol=1e-4)  # nnU-Net's logit mean differs
