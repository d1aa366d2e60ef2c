"""Conditioned networks under torch DDP (gloo, 2 CPU processes, DDP set up as nnU-Net sets it up, without
find_unused_parameters): one training step runs, and its gradients equal the single-process step on the
same batch (DDP averages the ranks' gradients; each rank holds one of the two samples)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnunet_ext.networks.conditional_norm import condition_network, condition_state

KINDS = {"spacing": (torch.tensor([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0]]), 0),
         "cohort": (torch.tensor([0, 1]), 8)}


class _Net(nn.Module):
    """conv - IN - act, twice, then a 1x1 head (the building block of nnU-Net's U-Nets)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(),
                                     nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(),
                                     nn.Conv2d(4, 2, 1)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _net(kind):
    torch.manual_seed(0)
    return condition_network(_Net(), kind, KINDS[kind][1])


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 12, 12, generator=g), torch.randint(0, 2, (2, 12, 12), generator=g)


def _grads(net):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}


def _worker(rank, kind, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    net = _net(kind)
    condition_state(net).ddp_safe = True  # what ComposedTrainer sets under DDP
    ddp = nn.parallel.DistributedDataParallel(net)
    x, y = _batch()
    cond = KINDS[kind][0]
    condition_state(net).set(cond[rank:rank + 1])
    loss = nn.functional.cross_entropy(ddp(x[rank:rank + 1]), y[rank:rank + 1])
    loss.backward()
    if rank == 0:
        torch.save(_grads(net), out_file)
    # both ranks leave together: a rank that tears gloo down while the other still holds the connection
    # can abort ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spacing", "cohort"])
def test_ddp_step_matches_single_process(kind, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(kind, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    net = _net(kind)  # single process, default (non-DDP) mode: only the batch's cohort slots in the graph
    x, y = _batch()
    condition_state(net).set(KINDS[kind][0])
    nn.functional.cross_entropy(net(x), y, reduction="none").mean((1, 2)).mean().backward()
    single = _grads(net)
    assert single.keys() == ddp_grads.keys()
    for n in single:
        torch.testing.assert_close(ddp_grads[n], single[n], atol=1e-6, rtol=1e-5, msg=n)
    if kind == "cohort":
        unused = [n for n in single if ".weight.5" in n or ".bias.5" in n]
        assert unused and all(float(ddp_grads[n].abs().max()) == 0.0 for n in unused)
        used = [n for n in single if n.endswith(".weight.1")]
        assert all(float(single[n].abs().max()) > 0 for n in used)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
