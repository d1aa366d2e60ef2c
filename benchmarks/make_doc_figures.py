"""Draw every picture under docs/img/ with the package's own code.

    python benchmarks/make_doc_figures.py                       # from the stored results
    python benchmarks/make_doc_figures.py --demo nnunet_ext_demo  # first store a finished demo's results

Pictures (each < 150 KB):

* ``docs/img/demo_curves.png``: the demo's comparison, lesion TPR against FDR over probability thresholds
  (all lesions, lesions of 3-10 voxels) and the voxel curve, with 95 % paired-bootstrap bands
  (``nnunet_ext.workflows.compare.plot_curves``), from ``benchmarks/results/demo_report.json`` and the per-case counts
  ``benchmarks/results/demo_counts.json``;
* ``docs/img/phantom_case.png``: one phantom case (``nnunet_ext.data.phantom.generate_case``, 64^3, 3 raters,
  soft label): the FLAIR-like slice, the reference, the raters' masks and the soft label;
* ``docs/img/reliability_<arm>.png``: reliability diagrams of the demo's two arms on its held-out cases
  (``nnunet_ext.metrics.soft.probability_reliability_diagram``), from ``benchmarks/results/demo_calibration.json``.

``docs/img/learning_curves_lsr.png`` is drawn by ``benchmarks/learning_curves.py``.

``--demo WORKDIR`` reads a finished ``nnunet-ext demo --workdir WORKDIR`` (its report folder, the per-case
counts cached there, the soft predictions and the held-out labels) and rewrites the three result files first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMG = REPO / "docs" / "img"
MAX_BYTES = 150_000


def store_demo(workdir: Path) -> None:
    """Copy what the pictures need out of a finished demo run into benchmarks/results/."""
    from nnunet_ext.core.io import read_image
    from nnunet_ext.metrics.soft import add_counts, probability_calibration_counts

    report_dir = workdir / "report"
    report = json.loads((report_dir / "report.json").read_text())
    counts, calibration = {}, {}
    labels = sorted((workdir / "nnUNet_raw").glob("Dataset*/labelsTs"))
    if len(labels) != 1:
        raise SystemExit(f"expected one Dataset*/labelsTs under {workdir / 'nnUNet_raw'}, found {labels}")
    for arm in report["arms"]:
        cache = report_dir / "arms" / arm / f"{report['eval_set']}_counts.json"
        counts[arm] = json.loads(cache.read_text())["cases"]
        c = None
        for case in report["cases"]:
            ref, _ = read_image(labels[0] / f"{case}.nii.gz")
            p, _ = read_image(report_dir / "arms" / arm / report["eval_set"] / "soft" / f"{case}.nii.gz")
            c = add_counts(c, probability_calibration_counts(np.clip(p, 0, 1), (ref == 1).astype(np.float32)))
        calibration[arm] = c
    report = {k: v for k, v in report.items() if k not in ("files", "commands")}  # paths of that machine
    (RESULTS / "demo_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "demo_counts.json").write_text(json.dumps(counts, separators=(",", ":")) + "\n")
    (RESULTS / "demo_calibration.json").write_text(json.dumps(calibration, indent=1) + "\n")


def demo_curves(png: Path) -> Path:
    from nnunet_ext.workflows.compare import plot_curves

    report = json.loads((RESULTS / "demo_report.json").read_text())
    records = json.loads((RESULTS / "demo_counts.json").read_text())
    small = report["bins"][0]
    return plot_curves(report, png, records, panels=[("lesion", None), ("lesion", small), ("voxel", None)], dpi=72)


def phantom_case(png: Path) -> Path:
    from nnunet_ext.data.phantom import PhantomConfig, generate_case
    from nnunet_ext.core.plotting import pyplot, save_figure

    case = generate_case(PhantomConfig(shape=(64, 64, 64), raters=3, soft=True, seed=0, empty_fraction=0.0), 0)
    z = int(np.argmax(case.label.sum((1, 2))))  # the axial slice with the most lesion voxels
    img, label, soft = case.images[0][z], case.label[z], case.soft[z]
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    for ax in axes:
        ax.imshow(img, cmap="gray", vmin=0, vmax=float(np.percentile(case.images[0], 99.8)))
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("FLAIR-like image", fontsize=10)
    axes[1].contour(label, levels=[0.5], colors="yellow", linewidths=1)
    axes[1].set_title("reference lesions", fontsize=10)
    for r, color in zip(case.raters, ("tab:red", "tab:green", "tab:cyan")):
        axes[2].contour(r[z], levels=[0.5], colors=color, linewidths=1)
    axes[2].set_title("3 raters (red, green, cyan)", fontsize=10)
    im = axes[3].imshow(np.ma.masked_where(soft <= 0.01, soft), cmap="magma", vmin=0, vmax=1)
    axes[3].set_title("soft label (partial volume)", fontsize=10)
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.04)
    fig.suptitle(f"nnunet-ext phantom, case 0, axial slice {z} of 64 (medium difficulty)", fontsize=11)
    return save_figure(fig, png, dpi=90)


def reliability(png_pattern: str) -> list[Path]:
    from nnunet_ext.metrics.soft import probability_reliability_diagram

    calibration = json.loads((RESULTS / "demo_calibration.json").read_text())
    report = json.loads((RESULTS / "demo_report.json").read_text())
    out = []
    for arm, counts in calibration.items():
        png = Path(png_pattern.format(arm=arm))
        out.append(probability_reliability_diagram(
            counts, png, title=f"{arm}, demo ({report['n_cases']} held-out phantom cases)"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=None, help="a finished demo's --workdir: store its results first")
    ap.add_argument("--out", type=Path, default=IMG, help="folder of the pictures (default docs/img)")
    args = ap.parse_args(argv)
    if args.demo is not None:
        store_demo(args.demo)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    made = [demo_curves(out / "demo_curves.png"), phantom_case(out / "phantom_case.png"),
            *reliability(str(out / "reliability_{arm}.png"))]
    too_big = []
    for p in made:
        size = p.stat().st_size
        print(f"{p}: {size // 1000} KB")
        if size > MAX_BYTES:
            too_big.append(p)
    if too_big:
        print(f"over {MAX_BYTES // 1000} KB: {', '.join(map(str, too_big))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
