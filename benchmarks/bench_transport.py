"""Cost of carrying lesion sizes, soft targets and a random rater's labels through nnU-Net's data path.

Generated 3D cases (default 160^3) with 5, 30, 100 and 300 irregular lesions are stored as nnU-Net's
preprocessed blosc2 cases (nnU-Net's own chunking); each arm reads them with nnU-Net's
``nnUNetDataLoader`` (3d_fullres-shaped 128^3 patch, batch 1) and nnU-Net's own training transforms
(``nnUNetTrainer.get_training_transforms``, rotation, scaling, mirroring, 5 deep-supervision scales) on one
thread. Arms, interleaved sample by sample with the same random state (so every arm draws the same patch
and the same augmentation):

* ``labels``: nnU-Net as is (the reference);
* ``lsr``: + whole-case lesion sizes (exact map, nnunet_ext.training.targets);
* ``soft``: + a soft target map (linear);
* ``rater``: labels from one of 2 raters drawn per sample (+ nothing else).

Per sample time (median over samples) and the ratio to ``labels`` per lesion count, for all samples and
for those that took the spatial (rotation/scaling) path; peak RSS of a worker process running each arm
alone. ``--iterations N`` adds the whole-iteration figure: a small 3d_fullres-like network, forward +
backward + SGD step on each arm's batches, interleaved, ratio LSR/nnU-Net.

    .venv/bin/python benchmarks/bench_transport.py --shape 160 160 160 --patch 128 128 128 --samples 12 \
        --iterations 20 -o benchmarks/results/transport.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_case(shape, n_lesions, seed):
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int16)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for k in range(n_lesions):
        r = rng.choice([1, 1.5, 2, 3, 4, 6]) if k % 3 else rng.uniform(0.6, 1.2)
        c = [rng.integers(int(r) + 2, s - int(r) - 2) for s in shape]
        ax = rng.uniform(0.6, 1.6, 3)
        sl = tuple(slice(max(0, ci - int(3 * r) - 2), ci + int(3 * r) + 3) for ci in c)
        d = (((zz[sl[0]] - c[0]) / ax[0]) ** 2 + ((yy[:, sl[1]] - c[1]) / ax[1]) ** 2 +
             ((xx[:, :, sl[2]] - c[2]) / ax[2]) ** 2)
        blob = d <= r * r * (1 + 0.3 * rng.standard_normal(d.shape))
        seg[sl][blob] = 1
    image = rng.normal(size=(1, *shape)).astype(np.float32) + seg[None] * 1.5
    return image, seg


def write_cases(folder: Path, shape, n_lesions, patch, n_cases=2):
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from nnunet_ext.training.lsr import lesion_size_map
    from nnunet_ext.preprocessing.maps import map_path, save_map_like_seg

    folder.mkdir(parents=True, exist_ok=True)
    distinct = []
    for i in range(n_cases):
        image, seg = make_case(shape, n_lesions, 100 * n_lesions + i)
        locs = {1: np.argwhere(seg[None] == 1)}
        # chunked as nnU-Net's preprocessor chunks them for this patch size
        bd, cd = comp_blosc2_params(image.shape, tuple(patch), image.itemsize)
        bs, cs = comp_blosc2_params(seg[None].shape, tuple(patch), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(image, seg[None], {"class_locations": locs}, str(folder / f"c{i}"),
                                      chunks=cd, blocks=bd, chunks_seg=cs, blocks_seg=bs)
        seg_file = folder / f"c{i}_seg.b2nd"
        sizes = lesion_size_map(seg, [1], 26).astype(np.int16)
        distinct.append(len(np.unique(sizes)) - 1)
        save_map_like_seg(sizes, seg_file, map_path(folder / "sizes", f"c{i}"))
        soft = (seg * 200).astype(np.uint8)
        save_map_like_seg(soft, seg_file, map_path(folder / "soft", f"c{i}"))
        for r in range(2):
            rng = np.random.default_rng(r)
            drop = rng.random(seg.shape) < 0.02
            save_map_like_seg(((seg > 0) & ~drop).astype(np.uint8) * 255, seg_file, map_path(folder / f"r{r}", f"c{i}"))
    return distinct


def loader(folder: Path, arm: str, patch, p_spatial: float | None = None):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_ext.training.targets import (MapSpec, MapTransport, Packing, WithTargetMaps, packed_folder,
                                             write_packed_maps)

    ds = nnUNetDatasetBlosc2(str(folder))
    ds_scales = [[1, 1, 1], [.5, .5, .5], [.25, .25, .25], [.125, .125, .125], [.0625, .0625, .0625]]
    t = nnUNetTrainer.get_training_transforms(patch, (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi), ds_scales,
                                              (0, 1, 2), False, use_mask_for_norm=[False], foreground_labels=[1])
    if p_spatial is not None:
        sp = [x for x in t.transforms if type(x).__name__ == "SpatialTransform"][0]
        sp.p_rotation = sp.p_scaling = p_spatial
    if arm in ("lsr", "soft", "lsr_read", "soft_read"):
        # as ComposedTrainer does: the labels with the map packed in, stored once per case ("_read": packed
        # while reading instead; NNUNET_EXT_BENCH_NO_PACKING=1: not packed)
        spec = MapSpec("sizes", True) if arm.startswith("lsr") else MapSpec("soft", False, 255.0)
        pk = None if os.environ.get("NNUNET_EXT_BENCH_NO_PACKING") else Packing.for_labels(1, spec)
        stored = None
        if pk is not None and not arm.endswith("_read"):
            write_packed_maps(ds.identifiers, folder, folder / spec.name, pk)
            stored = packed_folder(folder, folder / spec.name, pk)
        ds = WithTargetMaps(ds, [folder / spec.name], packing=None if stored else pk, packed_folders=stored)
        t = MapTransport(t, [spec], pk)
    elif arm == "rater":
        ds = WithTargetMaps(ds, [], [folder / "r0", folder / "r1"])
    lm = LabelManager({"background": 0, "lesion": 1}, regions_class_order=None)
    # nnU-Net's planned 3d_fullres set-up: the data loader crops a larger region for rotation
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    initial = get_patch_size(patch, *([(-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)] * 3), (0.7, 1.4))
    return nnUNetDataLoader(ds, 1, initial, patch, lm, oversample_foreground_percent=0.33, transforms=t)


def time_arms(folder, arms, patch, n, seed0=0):
    import torch

    torch.set_num_threads(1)
    loaders = {a: loader(folder, a, patch) for a in arms}
    times = {a: [] for a in arms}
    for i in range(n):
        for a in arms[i % len(arms):] + arms[:i % len(arms)]:  # rotated: no arm always runs first
            np.random.seed(seed0 + i)
            torch.manual_seed(seed0 + i)
            t = time.perf_counter()
            next(loaders[a])
            times[a].append(time.perf_counter() - t)
    return times


def worker_peak(folder, arm, patch, n):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_transport as b, numpy as np, "
            f"torch, resource, pathlib; torch.set_num_threads(1); l = b.loader(pathlib.Path({str(folder)!r}), {arm!r}, "
            f"{tuple(patch)!r}, 1.0)\nfor i in range({n}):\n    np.random.seed(i); torch.manual_seed(i); next(l)\n"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024  # MiB


def whole_iterations(folder, patch, n):
    """Small 3d U-Net (nnU-Net's PlainConvUNet, 4 stages, 8 base features), forward + backward + SGD step on
    each arm's batch, interleaved; the LSR arm uses our loss, the labels arm nnU-Net's cross-entropy."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_ext.training.losses import LSRCrossEntropyLoss

    torch.set_num_threads(1)
    arms = ["labels", "lsr"]
    loaders = {a: loader(folder, a, patch) for a in arms}
    nets = {}
    for a in arms:
        torch.manual_seed(0)
        nets[a] = PlainConvUNet(1, 4, (8, 16, 32, 64), torch.nn.Conv3d, 3, (1, 2, 2, 2), (1, 1, 1, 1), 2,
                                (1, 1, 1), False, torch.nn.InstanceNorm3d, {"affine": True}, None, None,
                                torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False)
    opt = {a: torch.optim.SGD(nets[a].parameters(), 1e-2, momentum=0.99, nesterov=True) for a in arms}
    ce = torch.nn.CrossEntropyLoss()
    lsr = LSRCrossEntropyLoss(4, 4)
    times = {a: [] for a in arms}
    for i in range(n):
        for a in arms[i % 2:] + arms[:i % 2]:
            np.random.seed(i)
            torch.manual_seed(i)
            t = time.perf_counter()
            b = next(loaders[a])
            out = nets[a](b["data"])
            target = b["target"][0]
            loss = ce(out, target[:, 0].long().clamp(min=0)) if a == "labels" else lsr(out, target)
            opt[a].zero_grad()
            loss.backward()
            opt[a].step()
            times[a].append(time.perf_counter() - t)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
    ap.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
    ap.add_argument("--lesions", type=int, nargs="+", default=(5, 30, 100, 300))
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--memory-samples", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=0)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    arms = ["labels", "lsr", "soft", "rater"]
    res = {"command": " ".join(["benchmarks/bench_transport.py"] + (argv or sys.argv[1:])), "shape": a.shape,
           "patch": a.patch, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.lesions:
            folder = Path(tmp) / f"l{n}"
            distinct = write_cases(folder, tuple(a.shape), n, a.patch)
            times = time_arms(folder, arms, a.patch, a.samples)
            # samples that took the spatial path, per arm the same seeds: forced with p=1 for a second pass
            ts = {arm: [] for arm in arms}
            import torch
            lds = {arm: loader(folder, arm, a.patch, 1.0) for arm in arms}
            for i in range(max(4, a.samples // 2)):
                for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
                    np.random.seed(1000 + i)
                    torch.manual_seed(1000 + i)
                    t = time.perf_counter()
                    next(lds[arm])
                    ts[arm].append(time.perf_counter() - t)
            mem = {arm: worker_peak(folder, arm, a.patch, a.memory_samples) for arm in arms}
            row = {"lesions": n, "distinct_sizes": distinct,
                   "median_s": {arm: float(np.median(v)) for arm, v in times.items()},
                   "ratio": {arm: float(np.median(v) / np.median(times["labels"])) for arm, v in times.items()},
                   "paired_ratio": {arm: float(np.median(np.array(v) / np.array(times["labels"]))) for arm, v in times.items()},
                   "spatial_median_s": {arm: float(np.median(v)) for arm, v in ts.items()},
                   "spatial_ratio": {arm: float(np.median(v) / np.median(ts["labels"])) for arm, v in ts.items()},
                   "spatial_paired_ratio": {arm: float(np.median(np.array(v) / np.array(ts["labels"])))
                                            for arm, v in ts.items()},
                   "ratio_of_totals": {arm: float(np.sum(v) / np.sum(times["labels"])) for arm, v in times.items()},
                   "peak_rss_mib": mem, "rss_ratio": {arm: mem[arm] / mem["labels"] for arm in arms}}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.iterations:
            folder = Path(tmp) / f"l{a.lesions[-1]}"
            it = whole_iterations(folder, a.patch, a.iterations)
            res["whole_iteration"] = {"iterations": a.iterations, "median_s": {k: float(np.median(v)) for k, v in it.items()},
                                      "ratio_lsr": float(np.median(it["lsr"]) / np.median(it["labels"])),
                                      "total_ratio_lsr": float(np.sum(it["lsr"]) / np.sum(it["labels"]))}
            print(json.dumps(res["whole_iteration"]), flush=True)
    if a.output:
        Path(a.output).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
