"""Phantom statistics: lesion size distribution and median per-lesion contrast-to-noise ratio per size bin,
for each difficulty, and generation time.

    python benchmarks/phantom_stats.py --cases 20 --shape 48 -o benchmarks/results/phantom_stats.json
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from nnunet_ext.metrics.lesions import label_components
from nnunet_ext.data.phantom import PhantomConfig, contrast_to_noise, generate_case


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    out = {}
    for name, d in (("easy", 0.0), ("medium", 0.5), ("hard", 1.0)):
        cfg = PhantomConfig(shape=(args.shape,) * 3, difficulty=d)
        t = time.perf_counter()
        cases = [generate_case(cfg, i) for i in range(args.cases)]
        secs = (time.perf_counter() - t) / args.cases
        sizes, cnr = [], {}
        for c in cases:
            lab, n = label_components(c.label, 26)
            sizes += list(np.bincount(lab.ravel())[1:])
            for k, v in contrast_to_noise(c.images[0], c.label).items():
                if not np.isnan(v):
                    cnr.setdefault(k, []).append(v)
        sizes = np.array(sizes)
        out[name] = {"seconds_per_case": secs, "lesions": int(len(sizes)),
                     "empty_cases": int(sum(c.label.sum() == 0 for c in cases)),
                     "share_3_10": float(((sizes >= 3) & (sizes <= 10)).mean()),
                     "size_percentiles_0_25_50_75_100": np.percentile(sizes, [0, 25, 50, 75, 100]).tolist(),
                     "median_cnr_of_case_medians": {k: float(np.median(v)) for k, v in cnr.items()}}
        print(name, json.dumps(out[name]), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "results": out}, indent=1))


if __name__ == "__main__":
    main()
