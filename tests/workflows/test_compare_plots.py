"""The comparison figure: pointwise bootstrap bands of each arm's curve and axes zoomed to the data."""
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_ext.workflows.compare import _zoomed_limits, curve_bands, plot_curves

REPO = Path(__file__).resolve().parents[2]


def _sweep(vtp, vfn, vfp, ltp, lref, lfp, lpred, b):
    return {"voxel_tp": vtp, "voxel_fn": vfn, "voxel_fp": vfp, "lesion_tp": ltp, "ref_lesions": lref,
            "lesion_fp": lfp, "pred_lesions": lpred, "lesion_fn": lref - ltp,
            "bins": {"x": dict(zip(("lesion_tp", "ref_lesions", "lesion_fp", "pred_lesions"), b))}}


# two cases, two thresholds
RECORDS = {"a": {"sweep": [_sweep(3, 1, 1, 1, 2, 0, 1, (1, 1, 0, 1)), _sweep(2, 2, 0, 1, 2, 0, 1, (1, 1, 0, 1))]},
           "b": {"sweep": [_sweep(1, 1, 2, 0, 1, 2, 2, (0, 0, 0, 0)), _sweep(0, 2, 0, 0, 1, 0, 0, (0, 0, 0, 0))]}}
IDX = np.array([[0, 0], [1, 1], [0, 1]])  # resamples: a+a, b+b, a+b


def test_voxel_band_by_hand():
    # threshold 0: aa: TP 6, FN 2, FP 2 -> TPR .75, FDR .25; bb: TP 2, FN 2, FP 4 -> .5, 4/6; ab: TP 4, FN 2,
    # FP 3 -> 4/6, 3/7. level .5 -> 25th / 75th percentiles of 3 values (linear): midpoints of neighbours.
    b = curve_bands(RECORDS, "voxel", None, IDX, level=0.5)
    assert b["tpr_lo"][0] == pytest.approx((0.5 + 4 / 6) / 2) and b["tpr_hi"][0] == pytest.approx((4 / 6 + 0.75) / 2)
    assert b["fdr_lo"][0] == pytest.approx((0.25 + 3 / 7) / 2) and b["fdr_hi"][0] == pytest.approx((3 / 7 + 4 / 6) / 2)
    # threshold 1: aa: TP 4, FN 4, FP 0 -> TPR .5, FDR 0; bb: TP 0, FN 4 -> TPR 0, FDR undefined (0/0); ab:
    # TP 2, FN 4 -> TPR 1/3, FDR 0
    assert b["tpr_lo"][1] == pytest.approx(1 / 6) and b["tpr_hi"][1] == pytest.approx(5 / 12)
    assert b["fdr_lo"][1] == 0 and b["fdr_hi"][1] == 0  # only the two resamples where it is defined


def test_lesion_bands_overall_and_per_bin():
    # all lesions, threshold 0: aa: TP 2 of 4, FP 0 of 2 -> TPR .5, FDR 0; bb: 0 of 2, FP 4 of 4 -> 0, 1;
    # ab: 1 of 3, FP 2 of 3 -> 1/3, 2/3
    b = curve_bands(RECORDS, "lesion", None, IDX, level=0.5)
    assert b["tpr_lo"][0] == pytest.approx(1 / 6) and b["tpr_hi"][0] == pytest.approx(5 / 12)
    assert b["fdr_lo"][0] == pytest.approx(1 / 3) and b["fdr_hi"][0] == pytest.approx(5 / 6)
    # bin x: a has 1 of 1 detected, no FP; b has no lesion of the bin: undefined in bb, 1 elsewhere
    x = curve_bands(RECORDS, "lesion", "x", IDX, level=0.5)
    assert list(x["tpr_lo"]) == [1, 1] and list(x["fdr_hi"]) == [0, 0]
    nothing = {c: {"sweep": [_sweep(0, 0, 0, 0, 0, 0, 0, (0, 0, 0, 0))]} for c in "ab"}
    assert np.isnan(curve_bands(nothing, "lesion", "x", IDX)["tpr_lo"][0])
    with pytest.raises(ValueError, match="kind"):
        curve_bands(RECORDS, "pixel", None, IDX)
    with pytest.raises(ValueError, match="bin_"):
        curve_bands(RECORDS, "voxel", "x", IDX)


def test_zoomed_limits():
    # span .2 -> margin .06 * .2 = .012 on each side
    assert _zoomed_limits([0.5, 0.6, 0.7]) == pytest.approx((0.488, 0.712))
    # span .1 < .15: widened to .875..1.025, margin .009 -> .866..1.034, shifted down to end at 1.02
    assert _zoomed_limits([0.9, 1.0, None]) == pytest.approx((0.852, 1.02))
    assert _zoomed_limits([]) == (-0.02, 1.02)


@pytest.mark.slow  # draws three figures (seconds)
def test_plot_with_bands_and_panel_choice(tmp_path):
    """A stored comparison report with synthetic per-case records: the figure is drawn, smaller with fewer
    panels; an unknown panel is refused."""
    report = json.loads((REPO / "benchmarks" / "results" / "compare_lsr_study.json").read_text())
    n_t = len(report["thresholds"])
    rng = np.random.default_rng(0)

    def rec():
        sweep = []
        for _ in range(n_t):
            s = _sweep(*rng.integers(1, 9, 7).tolist(), (1, 2, 0, 1))
            s["bins"] = {b: dict(s["bins"]["x"]) for b in report["bins"]}
            sweep.append(s)
        return {"sweep": sweep}

    records = {arm: {f"c{i}": rec() for i in range(4)} for arm in report["arms"]}
    full = plot_curves(report, tmp_path / "full.png", records)
    two = plot_curves(report, tmp_path / "two.png", records, panels=[("lesion", None), ("lesion", "3-10")], dpi=80)
    assert full.stat().st_size > two.stat().st_size > 10000
    with pytest.raises(ValueError, match="unknown panel"):
        plot_curves(report, tmp_path / "bad.png", panels=[("lesion", "1-2")])
