"""Conditional instance norms (resolution FiLM, SCIN), cohorts.json handling and the phantom's cohorts."""
import copy
import json

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.networks.cohorts import assign_slots, check_cases, read_cohorts, slot_of
from nnunet_ext.metrics.lesions import label_components
from nnunet_ext.networks.conditional_norm import (CohortInstanceNorm, FiLMInstanceNorm, cohort_table_of_state_dict,
                                                  condition_network, condition_state, kind_of_state_dict)
from nnunet_ext.data.phantom import PhantomConfig, apply_protocol, generate_case, write_phantom_dataset
from nnunet_ext.nnunet_adapter import pretrained_weights_of_running_training


def plain2d(norm=nn.InstanceNorm2d):
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), nn.Conv2d, 3, (1, 2, 2), 2, 2, (2, 2), True, norm,
                         {"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                         deep_supervision=True)


def residual3d():
    torch.manual_seed(0)
    return ResidualEncoderUNet(2, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 2, 2), 2, (2, 2), True,
                               nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True}, deep_supervision=False)


def spacing(*rows):
    return torch.tensor(rows, dtype=torch.float32)


CONDITIONS = {"spacing": spacing([1.0, 1.0, 3.0], [0.5, 0.8, 0.8]), "cohort": torch.tensor([0, 2])}


@pytest.mark.parametrize("make,shape", [(plain2d, (2, 1, 32, 32)), (residual3d, (2, 2, 16, 16, 16))])
@pytest.mark.parametrize("kind", ["spacing", "cohort"])
def test_starts_equal_to_the_unconditioned_network(make, shape, kind):
    net = make()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
        cond = condition_network(copy.deepcopy(net), kind, n_cohorts=4)
        cond.ext_condition.set(CONDITIONS[kind])
        out = cond(x)
    ref, out = (ref[0], out[0]) if isinstance(ref, (list, tuple)) else (ref, out)
    assert torch.allclose(out, ref, atol=1e-6)
    n_norms = sum(isinstance(m, nn.InstanceNorm3d | nn.InstanceNorm2d) for m in net.modules())
    cls = FiLMInstanceNorm if kind == "spacing" else CohortInstanceNorm
    assert sum(isinstance(m, cls) for m in cond.modules()) == n_norms > 0
    assert not any(isinstance(m, nn.InstanceNorm3d | nn.InstanceNorm2d) for m in cond.modules())


def test_a_norm_referenced_twice_stays_one_module():
    net = condition_network(plain2d(), "cohort", 2)
    block = net.encoder.stages[0][0].convs[0]
    assert block.norm is block.all_modules[1] and isinstance(block.norm, CohortInstanceNorm)


def test_film_formula_by_hand():
    norm = FiLMInstanceNorm(2, eps=1e-12, hidden=1, weight=torch.tensor([2.0, 1.0]), bias=torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        norm.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))  # hidden = relu(log2 s_z)
        norm.mlp[0].bias.zero_()
        norm.mlp[2].weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [2.0]]))  # gamma_r0 = h, beta_r1 = 2h
    net = nn.Sequential(norm)
    net.ext_condition = condition_network(nn.Sequential(nn.InstanceNorm1d(1, affine=True)), "spacing").ext_condition
    norm.attach(net.ext_condition)
    x = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])  # (B=1, C=2, L=2): xhat = [-1, 1] in both channels
    net.ext_condition.set(spacing([4.0, 1.0, 1.0]))  # log2 4 = 2 -> h = 2
    out = norm(x)
    # channel 0: (2 + 2) * [-1, 1] + 0 ; channel 1: (1 + 0) * [-1, 1] + (1 + 4)
    assert torch.allclose(out, torch.tensor([[[-4.0, 4.0], [4.0, 6.0]]]), atol=1e-6)


def test_gradients_reach_only_the_used_cohort():
    net = condition_network(plain2d(), "cohort", 4)
    net.ext_condition.set(torch.tensor([1, 1]))
    out = net(torch.randn(2, 1, 32, 32))
    out[0].square().mean().backward()
    norms = [m for m in net.modules() if isinstance(m, CohortInstanceNorm)]
    assert all(m.weight[1].grad.abs().sum() > 0 and m.bias[1].grad.abs().sum() > 0 for m in norms)
    for m in norms:
        for s in (0, 2, 3):
            for p in (m.weight[s], m.bias[s]):
                assert p.grad is None  # not even a zero gradient: weight decay and momentum skip them


@pytest.mark.parametrize("kind,a,b", [("cohort", torch.tensor([0]), torch.tensor([1])),
                                      ("spacing", spacing([1.0, 1.0, 1.0]), spacing([3.0, 1.0, 1.0]))])
def test_condition_changes_output_after_a_training_step(kind, a, b):
    net = condition_network(plain2d(), kind, 2)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        net.ext_condition.set(a)
        before_a = net(x)[0]
        net.ext_condition.set(b)
        assert torch.allclose(net(x)[0], before_a, atol=1e-6)  # untrained: the condition does nothing yet
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for cond in (a, b, a):
        net.ext_condition.set(cond)
        opt.zero_grad()
        (net(x)[0][:, 1] - torch.linspace(-1, 1, 32)).square().mean().backward()
        opt.step()
    with torch.no_grad():
        net.ext_condition.set(a)
        out_a = net(x)[0]
        net.ext_condition.set(b)
        out_b = net(x)[0]
    assert (out_a - out_b).abs().max() > 1e-4


def test_unset_condition_is_a_clear_error():
    net = condition_network(plain2d(), "cohort", 2)
    with pytest.raises(RuntimeError, match="nnunet-ext predict"):
        net(torch.randn(1, 1, 32, 32))
    net.ext_condition.set(torch.tensor([0]))
    net.ext_condition.clear()
    with pytest.raises(RuntimeError, match="no condition was set"):
        net(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("kind,value", [("cohort", torch.tensor([5])), ("cohort", torch.tensor([0.0])),
                                        ("cohort", torch.tensor([[0]])), ("spacing", spacing([1.0, 1.0])),
                                        ("spacing", spacing([1.0, 0.0, 1.0])), ("spacing", torch.tensor([[1, 1, 1]]))])
def test_bad_conditions_are_rejected(kind, value):
    net = condition_network(plain2d(), kind, 4)
    with pytest.raises(ValueError):
        net.ext_condition.set(value)


def test_batch_size_mismatch_and_broadcast():
    net = condition_network(plain2d(), "cohort", 2)
    net.ext_condition.set(torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="3 samples, batch of 2"):
        net(torch.randn(2, 1, 32, 32))
    net.ext_condition.set(torch.tensor([1]))  # one condition for the whole batch
    assert net(torch.randn(2, 1, 32, 32))[0].shape[0] == 2


def test_networks_without_instance_norm_are_refused():
    with pytest.raises(NotImplementedError, match="no InstanceNorm"):
        condition_network(plain2d(norm=nn.BatchNorm2d), "spacing")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        condition_network(plain2d(), "cohort", 0)
    with pytest.raises(ValueError):
        condition_network(plain2d(), "site")
    with pytest.raises(ValueError):
        FiLMInstanceNorm(4, hidden=0)
    with pytest.raises(ValueError):
        CohortInstanceNorm(4, 0)


def test_cohort_table_travels_in_the_state_dict():
    net = condition_network(plain2d(), "cohort", 4)
    net.ext_condition.set_cohort_table(["siteA", None, "siteB"])
    sd = net.state_dict()
    assert kind_of_state_dict(sd) == "cohort"
    assert cohort_table_of_state_dict(sd) == ["siteA", None, "siteB", None]
    other = condition_network(plain2d(), "cohort", 4)
    other.load_state_dict(sd)
    assert other.ext_condition.cohort_table() == ["siteA", None, "siteB", None]
    assert kind_of_state_dict(condition_network(plain2d(), "spacing").state_dict()) == "spacing"
    assert kind_of_state_dict(plain2d().state_dict()) is None
    with pytest.raises(ValueError, match="cohort slots"):
        net.ext_condition.set_cohort_table(["a"] * 5)
    with pytest.raises(ValueError, match="bytes"):
        net.ext_condition.set_cohort_table(["x" * 65])


def test_condition_state_through_wrappers():
    net = condition_network(plain2d(), "spacing")

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert condition_state(Wrapper(net)) is net.ext_condition
    assert condition_state(plain2d()) is None


# ---------------------------------------------------------------------------------------------- cohorts.json


def test_read_cohorts_errors(tmp_path):
    f = tmp_path / "cohorts.json"
    with pytest.raises(FileNotFoundError):
        read_cohorts(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_cohorts(f)
    f.write_text(json.dumps({"a": "siteA", "b": ""}))
    with pytest.raises(ValueError, match="non-empty strings"):
        read_cohorts(f)
    f.write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match="JSON object"):
        read_cohorts(f)
    f.write_text(json.dumps({"a": "siteA"}))
    assert read_cohorts(f) == {"a": "siteA"}


def test_every_case_needs_a_cohort():
    with pytest.raises(ValueError, match="1 case.*c3"):
        check_cases({"c1": "A", "c2": "B"}, ["c1", "c2", "c3"])
    check_cases({"c1": "A", "c2": "B"}, ["c1"])


def test_slots_keep_known_cohorts_and_fill_free_ones():
    assert assign_slots([], ["b", "a", "b"], 4) == ["a", "b", None, None]
    assert assign_slots(["x", None, "a"], ["a", "new"], 4) == ["x", "new", "a", None]
    with pytest.raises(ValueError, match="no free cohort slot"):
        assign_slots(["x", "y"], ["z"], 2)
    assert slot_of(["x", "new", "a"], "a") == 2
    with pytest.raises(ValueError, match="unknown cohort 'q'.*'x'"):
        slot_of(["x", None], "q")


def test_pretrained_weights_found_on_nnunets_call_stack():
    """No sys.argv: the file is nnU-Net's run_training(pretrained_weights=...) argument, found from inside."""
    import sys

    # a module named like nnU-Net's, whose run_training calls our lookup from inside (as a trainer would)
    fake = type(sys)("nnunetv2.run.run_training")
    exec(compile("def run_training(pretrained_weights=None):\n    return f({})\n", "run_training.py", "exec"),
         fake.__dict__)
    fake.f = pretrained_weights_of_running_training
    assert fake.run_training("/m/c.pth") == "/m/c.pth"
    assert pretrained_weights_of_running_training({"NNUNET_EXT_PRETRAINED_WEIGHTS": "/x.pth"}) == "/x.pth"
    assert pretrained_weights_of_running_training({}) is None


# ---------------------------------------------------------------------------------------------- phantom


def test_protocol_drops_small_lesions_only():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[1:3, 1:3, 1:3] = 1  # 8 voxels: dropped by no_small
    lab[10:13, 10:13, 10:12] = 1  # 18 voxels: kept
    lab[5, 15, 15:16] = 1  # 1 voxel
    out = apply_protocol(lab, "no_small")
    assert out.sum() == 18 and out[11, 11, 11] == 1
    assert np.array_equal(apply_protocol(lab, "all"), lab)


def test_phantom_cohorts(tmp_path):
    cfg = PhantomConfig(shape=(48, 48, 48), seed=2, empty_fraction=0.0, cohorts=("all", "no_small"))
    root = write_phantom_dataset(tmp_path, 540, 4, cfg, n_test=2, progress=False)
    cohorts = json.loads((root / "cohorts.json").read_text())
    assert cohorts == {f"phantom_{i:03d}": ("cohort0_all", "cohort1_no_small")[i % 2] for i in range(6)}
    from nnunet_ext.core.io import read_image

    sizes, dropped = {}, 0
    for split, ids in (("labelsTr", range(4)), ("labelsTs", range(4, 6))):
        for i in ids:
            lab, _ = read_image(root / split / f"phantom_{i:03d}.nii.gz")
            full = generate_case(cfg, i).label
            comps, n = label_components(lab, 26)
            sizes[i] = np.bincount(comps.ravel())[1:]
            if split == "labelsTr" and i % 2 == 1:
                assert (sizes[i] > 10).all() and lab.sum() <= full.sum()
                dropped += int(full.sum() - lab.sum())
            else:
                assert np.array_equal(lab, full)  # original protocol
    assert dropped > 0  # the protocol removed lesions that exist in the images
    with pytest.raises(ValueError, match="protocols"):
        PhantomConfig(cohorts=("some",))
