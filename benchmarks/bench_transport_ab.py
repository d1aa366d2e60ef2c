"""A/B of two versions of the map transport (nnunet_ext/training/targets.py) in one process, interleaved on
the same samples: nnU-Net's own training transforms, 128^3 patch from a 180^3 case, 5 deep-supervision scales,
one thread; labels only vs + soft map vs + lesion sizes, for the old (a file, e.g. from git) and the current
transport. Ratios of summed time against labels only.

    git show c2c161f~1:nnunet_ext/training/targets.py > /tmp/targets_old.py
    .venv/bin/python benchmarks/bench_transport_ab.py P_SPATIAL SAMPLES [/tmp/targets_old.py]
"""
import sys, time, importlib.util
sys.path.insert(0, "benchmarks")
import numpy as np, torch
import bench_transport as b
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_ext.training import targets as new
spec = importlib.util.spec_from_file_location("targets_old", sys.argv[3] if len(sys.argv) > 3 else "/tmp/targets_old.py"); old = importlib.util.module_from_spec(spec); sys.modules["targets_old"] = old; spec.loader.exec_module(old)
torch.set_num_threads(1)
patch=(128,128,128); ds=[[1,1,1],[.5,.5,.5],[.25,.25,.25],[.125,.125,.125],[.0625,.0625,.0625]]
P=float(sys.argv[1]); N=int(sys.argv[2])
def tf():
    t = nnUNetTrainer.get_training_transforms(patch, (-0.52,0.52), ds, (0,1,2), False, use_mask_for_norm=[False], foreground_labels=[1])
    sp = [x for x in t.transforms if type(x).__name__=="SpatialTransform"][0]; sp.p_rotation = sp.p_scaling = P
    return t
from nnunet_ext.training.lsr import lesion_size_map
for n in (30, 300):
    img, seg = b.make_case((180,180,180), n, 1); img = img.astype(np.float32)
    sizes = lesion_size_map(seg, [1], 26).astype(np.int16); soft = (seg*200).astype(np.int16)
    arms = {"labels": (tf(), None)}
    for tag, mod in (("old", old), ("new", new)):
        arms[f"soft_{tag}"] = (mod.MapTransport(tf(), [mod.MapSpec("soft", False, 255.0)]), soft)
        arms[f"lsr_{tag}"] = (mod.MapTransport(tf(), [mod.MapSpec("sizes", True)]), sizes)
    t = {k: [] for k in arms}
    for i in range(N):
        for k,(T,m) in arms.items():
            s = torch.from_numpy(seg[None])
            if m is not None: s = torch.cat([s, torch.from_numpy(m[None])])
            np.random.seed(i); torch.manual_seed(i)
            x = torch.from_numpy(img.copy()); t0=time.perf_counter(); out = T(image=x, segmentation=s); t[k].append(time.perf_counter()-t0)
    tot = {k: sum(v) for k,v in t.items()}
    print(n, "p", P, {k: round(tot[k]/tot["labels"],3) for k in tot}, {k: round(float(np.median(v)),4) for k,v in t.items()}, flush=True)
