"""Seconds per training step (forward, loss, backward, SGD step) of a planned nnU-Net network, with torch's
deterministic algorithms on or off: does a seeded training (``NNUNET_EXT_SEED``) cost compute?

    nnUNet_raw=... nnUNet_preprocessed=... python benchmarks/bench_train_step.py -d 501 -c 2d --deterministic 0
    nnUNet_raw=... nnUNet_preprocessed=... python benchmarks/bench_train_step.py -d 501 -c 2d --deterministic 1

One random batch of the planned batch and patch size, nnU-Net's deep-supervision loss, ``--steps`` steps, the
median of all but the first two. Run the two settings alternately on idle cores (docs/demo.md).
"""
import argparse
import time

import numpy as np
import torch

from nnunet_ext.nnunet_adapter import build_trainer
from nnunet_ext.training.base import ExtBaselineTrainer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="2d")
    p.add_argument("--deterministic", type=int, choices=(0, 1), required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(bool(a.deterministic))
    torch.set_num_threads(a.threads)
    t = build_trainer(ExtBaselineTrainer, a.d, a.c, 0, device="cpu")
    t.initialize()
    ps = t.configuration_manager.patch_size
    x = torch.randn(t.batch_size, t.num_input_channels, *ps)
    scales = [[int(round(p * s)) for p, s in zip(ps, sc)] for sc in t._get_deep_supervision_scales()]
    y = [torch.randint(0, 2, (t.batch_size, 1, *shape)).float() for shape in scales]
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        t.optimizer.zero_grad()
        t.loss(t.network(x), y).backward()
        t.optimizer.step()
        times.append(time.perf_counter() - t0)
    print(f"deterministic={a.deterministic} batch {t.batch_size} patch {ps}: median "
          f"{np.median(times[2:]):.3f} s/step ({', '.join(f'{v:.2f}' for v in times)})")


if __name__ == "__main__":
    main()
