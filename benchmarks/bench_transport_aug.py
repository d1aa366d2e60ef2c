"""Augmentation only (no data loading): nnU-Net's own training transforms with the spatial path forced
(rotation + scaling), 128^3 patch from a 180^3 region, 5 deep-supervision scales, one thread, labels only vs
+ lesion sizes (exact map) vs + soft map vs both (LSR on soft targets), interleaved with the same random state per sample
(order rotated), the first map packed into the label channel as ComposedTrainer does. The case is given to the
transforms as a tensor (no data loader: see bench_transport.py for nnU-Net's loader).

    .venv/bin/python benchmarks/bench_transport_aug.py --lesions 5 30 100 300 --samples 7 -o benchmarks/results/transport_aug.json
    .venv/bin/python benchmarks/bench_transport_aug.py --lesions 5 30 100 300 --samples 30 --p-spatial 0.2 \
        -o benchmarks/results/transport_aug_nnunet_p.json     # nnU-Net's own rotation/scaling probabilities

``ratio`` compares medians per sample; ``ratio_of_totals`` the summed time of the same samples (the figure
for a mix of spatial and crop-only samples).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None):
    import bench_transport as b
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ext.training.lsr import lesion_size_map
    from nnunet_ext.training.targets import MapSpec, MapTransport, Packing

    ap = argparse.ArgumentParser()
    ap.add_argument("--lesions", type=int, nargs="+", default=(5, 30, 100, 300))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--p-spatial", type=float, default=1.0)
    ap.add_argument("-o", "--output")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    patch = (128, 128, 128)
    ds = [[1, 1, 1], [.5, .5, .5], [.25, .25, .25], [.125, .125, .125], [.0625, .0625, .0625]]

    def tf():
        t = nnUNetTrainer.get_training_transforms(patch, (-0.52, 0.52), ds, (0, 1, 2), False,
                                                  use_mask_for_norm=[False], foreground_labels=[1])
        sp = [x for x in t.transforms if type(x).__name__ == "SpatialTransform"][0]
        sp.p_rotation = sp.p_scaling = a.p_spatial
        return t

    rows = []
    for n in a.lesions:
        img, seg = b.make_case((180, 180, 180), n, 1)
        img = img.astype(np.float32)
        sizes = lesion_size_map(seg, [1], 26).astype(np.int16)
        soft = (seg * 200).astype(np.int16)
        s_size, s_soft = MapSpec("sizes", True), MapSpec("soft", False, 255.0)
        pk = Packing.for_labels(1, s_size)  # as ComposedTrainer: the first map packed into the labels

        def packed(first, *rest):
            return np.concatenate([pk.pack_np(seg[None], first[None].copy())] + [r[None] for r in rest])

        arms = {"labels": (tf(), seg[None]), "lsr": (MapTransport(tf(), [s_size], pk), packed(sizes)),
                "soft": (MapTransport(tf(), [s_soft], pk), packed(soft)),
                "lsr_soft": (MapTransport(tf(), [s_soft, s_size], pk), packed(soft, sizes))}
        t = {k: [] for k in arms}
        for i in range(a.samples):
            for k in list(arms)[i % len(arms):] + list(arms)[:i % len(arms)]:  # rotated order
                T, m = arms[k]
                s = torch.from_numpy(m.copy())
                np.random.seed(i)
                torch.manual_seed(i)
                t0 = time.perf_counter()
                T(image=torch.from_numpy(img.copy()), segmentation=s)
                t[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in t.items()}
        tot = {k: float(np.sum(v)) for k, v in t.items()}
        row = {"lesions": n, "distinct_sizes": int(len(np.unique(sizes)) - 1), "median_s": med,
               "ratio": {k: med[k] / med["labels"] for k in med},
               "ratio_of_totals": {k: tot[k] / tot["labels"] for k in tot}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"command": "benchmarks/bench_transport_aug.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    if a.output:
        Path(a.output).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
