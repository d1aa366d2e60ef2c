"""The LSR thesis (Nichyporuk 2021) as the package offers it, against hand-worked values:

* its lesion rule (section 3.4.2; ``--preset nichyporuk``, alias ``lsr``): TP/FP on predicted lesions, FN on
  reference lesions, 18-connected, Tiny/Small/Medium/Large bins, per-scan and dataset-level conventions,
  curves at fixed thresholds, voxel-level average precision;
* LSR weights of 18-connected lesions (``LSRTrainer``; ``_cc26`` variants keep 26);
* the Fig. 5.1 baselines WBCE, FL and BCE+IW."""
import json
import math
import types

import numpy as np
import pytest
import torch

from nnunet_ext.core.io import write_image
from nnunet_ext.metrics.evaluate import PRESETS, evaluate_folders, resolve_options
from nnunet_ext.metrics.lesions import RULE_PRESETS, lesion_counts
from nnunet_ext.metrics.operating_points import sweep


# ----------------------------------------------------------------------------------- item 7: the lesion rule
def _scenarios():
    """Reference / prediction rows along x (rows 3 voxels apart: separate lesions in any connectivity):

    A  R 10 voxels x0-9,            P x9-15 (7 voxels, 1 shared)      -> P FP, R FN
    B  R 4 (x0-3) and R 4 (x5-8),   P x0-8 (9 voxels) covering both     -> P TP, both R matched
    C  R 10 x0-9,                   P x0-2 (3) and P x5-7 (3)           -> both P TP (3 shared each), R matched
    D  R 10 x0-9,                   P x0-1 (2) and P x5-6 (2)           -> both P FP (2 < 3, 20 %), R FN
    E  R 2 x0-1,                    P x0 (1)                            -> P FP (50 % is not > 50 %), R FN
    F  R 2 x0-1,                    P x0-1 (2)                          -> P TP
    G  -                            P x0-3 (4)                          -> P FP
    """
    ref = np.zeros((3, 22, 20), np.uint8)
    pred = np.zeros_like(ref)
    rows = dict(zip("ABCDEFG", range(1, 22, 3)))
    ref[1, rows["A"], 0:10] = 1
    pred[1, rows["A"], 9:16] = 1
    ref[1, rows["B"], 0:4] = 1
    ref[1, rows["B"], 5:9] = 1
    pred[1, rows["B"], 0:9] = 1
    ref[1, rows["C"], 0:10] = 1
    pred[1, rows["C"], 0:3] = 1
    pred[1, rows["C"], 5:8] = 1
    ref[1, rows["D"], 0:10] = 1
    pred[1, rows["D"], 0:2] = 1
    pred[1, rows["D"], 5:7] = 1
    ref[1, rows["E"], 0:2] = 1
    pred[1, rows["E"], 0:1] = 1
    ref[1, rows["F"], 0:2] = 1
    pred[1, rows["F"], 0:2] = 1
    pred[1, rows["G"], 0:4] = 1
    return ref, pred


def _preset_counts(ref, pred, name="nichyporuk"):
    p = RULE_PRESETS[name]
    return lesion_counts(ref, pred, p["connectivity"], bins=p["bins"], detection=p["detection"],
                         counting=p["counting"])


def test_thesis_rule_counts_predicted_lesions_pair_by_pair():
    ref, pred = _scenarios()
    m = _preset_counts(ref, pred)
    # predicted lesions: A, B, C1, C2, D1, D2, E, F, G = 9; TP: B, C1, C2, F = 4; FP: A, D1, D2, E, G = 5
    # reference lesions: A, B1, B2, C, D, E, F = 7; FN: A, D, E = 3 (matched: B1, B2, C, F)
    assert (m["pred_lesions"], m["lesion_tp"], m["lesion_fp"]) == (9, 4, 5)
    assert (m["ref_lesions"], m["lesion_fn"], m["lesion_tp_ref"]) == (7, 3, 4)
    # eq. 3.1-3.3: TPR = 4 / (4 + 3), PPV = 4 / (4 + 5), F1 = 8 / (8 + 5 + 3) = 0.5
    assert m["lesion_tpr"] == pytest.approx(4 / 7) and m["lesion_ppv"] == pytest.approx(4 / 9)
    assert m["lesion_f1"] == pytest.approx(0.5)
    # size bins, each lesion by its own size (TP/FP: predicted, FN: reference):
    # Tiny 1-2: TP F (2), FP D1 D2 (2 each) E (1); FN E (2) -> TPR 1/2, PPV 1/4, F1 2/(2 + 3 + 1) = 1/3
    # Small 3-10: TP B (9) C1 C2 (3); FP A (7) G (4); FN A D (10) -> TPR 3/5, PPV 3/5, F1 0.6
    tiny, small = m["bins"]["1-2"], m["bins"]["3-10"]
    assert (tiny["lesion_tp"], tiny["lesion_fp"], tiny["lesion_fn"]) == (1, 3, 1)
    assert tiny["lesion_tpr"] == pytest.approx(0.5) and tiny["lesion_ppv"] == pytest.approx(0.25)
    assert tiny["lesion_f1"] == pytest.approx(1 / 3)
    assert (small["lesion_tp"], small["lesion_fp"], small["lesion_fn"]) == (3, 2, 2)
    assert small["lesion_tpr"] == pytest.approx(0.6) and small["lesion_f1"] == pytest.approx(0.6)
    assert list(m["bins"]) == ["1-2", "3-10", "11-50", "51+"]  # Tiny, Small, Medium, Large


def test_lsr_preset_is_the_thesis_rule(tmp_path):
    ref, pred = _scenarios()
    write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / "a.nii.gz")
    write_image(pred, (1.0, 1.0, 1.0), tmp_path / "pred" / "a.nii.gz")
    m = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="lsr", progress=False)["per_case"]["a"]
    # as above (the rule applied to reference lesions only, a predicted lesion FP only when it touches
    # nothing, would give TP 5 (B1 B2 C D F), FN 2 (A E), FP 1 (G), and no Tiny bin)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (4, 3, 5)
    assert list(m["bins"]) == ["1-2", "3-10", "11-50", "51+"]
    assert RULE_PRESETS["lsr"] == RULE_PRESETS["nichyporuk"] and PRESETS["lsr"] == PRESETS["nichyporuk"]
    assert resolve_options("lsr") == resolve_options("nichyporuk")
    assert resolve_options("lsr")["connectivity"] == 18 and resolve_options("lsr")["counting"] == "prediction"


def test_symmetric_does_not_combine_with_prediction_counting():
    ref, pred = _scenarios()
    with pytest.raises(ValueError, match="symmetric"):
        lesion_counts(ref, pred, 18, counting="prediction", symmetric=True)
    with pytest.raises(ValueError, match="counting"):
        lesion_counts(ref, pred, 18, counting="predicted")


def test_per_scan_and_dataset_level_conventions(tmp_path):
    ref, pred = _scenarios()
    write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / "a.nii.gz")
    write_image(pred, (1.0, 1.0, 1.0), tmp_path / "pred" / "a.nii.gz")
    fp_only = np.zeros_like(ref)
    fp_only[1, 1, 0:4] = 1  # no reference lesion, one predicted lesion: TP 0, FP 1, FN 0
    write_image(np.zeros_like(ref), (1.0, 1.0, 1.0), tmp_path / "ref" / "b.nii.gz")
    write_image(fp_only, (1.0, 1.0, 1.0), tmp_path / "pred" / "b.nii.gz")
    res = evaluate_folders(tmp_path / "ref", tmp_path / "pred", preset="nichyporuk", progress=False)
    b = res["per_case"]["b"]
    # scan b: TPR = 0 / 0 undefined, PPV = 0 / 1 = 0, F1 = 0 / (0 + 1 + 0) = 0
    assert b["lesion_tpr"] is None and b["lesion_ppv"] == 0.0 and b["lesion_f1"] == 0.0
    mean, pooled = res["aggregate"]["mean"], res["aggregate"]["pooled"]
    # per-scan: TPR mean of a only (b undefined, skipped) = 4/7; PPV (4/9 + 0) / 2; F1 (0.5 + 0) / 2
    assert mean["lesion_tpr"] == pytest.approx(4 / 7) and mean["n_undefined"]["lesion_tpr"] == 1
    assert mean["lesion_fdr"] == pytest.approx(1 - 2 / 9) and mean["lesion_f1"] == pytest.approx(0.25)
    # dataset-level: TP 4, FP 5 + 1, FN 3 -> TPR 4/7, PPV 4/10, F1 8 / (8 + 6 + 3)
    assert (pooled["lesion_tp"], pooled["lesion_fp"], pooled["lesion_fn"]) == (4, 6, 3)
    assert pooled["lesion_tpr"] == pytest.approx(4 / 7) and pooled["lesion_ppv"] == pytest.approx(0.4)
    assert pooled["lesion_f1"] == pytest.approx(8 / 17)
    assert res["settings"]["counting"] == "prediction" and res["settings"]["connectivity"] == 18


def _prob_cases(tmp_path):
    """Case 1: two 4-voxel lesions at p = 0.9. Case 2: a 4-voxel lesion at p = 0.3 and a 4-voxel
    non-lesion blob at p = 0.6. Everything else p = 0."""
    shape = (3, 12, 12)
    for name, lesions, blobs in (("c1", [((1, 2), 0.9), ((1, 8), 0.9)], []), ("c2", [((1, 2), 0.3)], [((1, 8), 0.6)])):
        ref = np.zeros(shape, np.uint8)
        prob = np.zeros((2,) + shape, np.float32)
        for (z, y), p in lesions:
            ref[z, y, 2:6] = 1
            prob[1][z, y, 2:6] = p
        for (z, y), p in blobs:
            prob[1][z, y, 2:6] = p
        prob[0] = 1 - prob[1]
        write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / f"{name}.nii.gz")
        (tmp_path / "prob").mkdir(exist_ok=True)
        np.savez_compressed(tmp_path / "prob" / f"{name}.npz", probabilities=prob)
    return tmp_path / "ref", tmp_path / "prob"


def test_curves_per_scan_at_fixed_thresholds_and_voxel_ap(tmp_path):
    ref_dir, prob_dir = _prob_cases(tmp_path)
    res = sweep(ref_dir, prob_dir, thresholds=[0.5], preset="nichyporuk", progress=False)
    pt = res["points"][0]
    # at t = 0.5: case 1 TP 2 FP 0 FN 0 (TPR 1, PPV 1, F1 1); case 2 TP 0 FP 1 FN 1 (all 0)
    assert pt["per_scan"]["lesion_tpr"] == pytest.approx(0.5) and pt["per_scan"]["lesion_fdr"] == pytest.approx(0.5)
    assert pt["per_scan"]["lesion_f1"] == pytest.approx(0.5)
    # dataset level: TP 2, FP 1, FN 1 -> TPR 2/3, PPV 2/3
    assert pt["lesion_tpr"] == pytest.approx(2 / 3) and pt["lesion_fdr"] == pytest.approx(1 / 3)
    # voxels at 0.5: case 1 tp 8 (TPR 1, PPV 1), case 2 tp 0 fp 4 fn 4 (0, 0) -> per-scan 0.5; pooled TPR 8/12
    assert pt["per_scan"]["voxel_tpr"] == pytest.approx(0.5) and pt["per_scan"]["voxel_f1"] == pytest.approx(0.5)
    assert pt["voxel_tpr"] == pytest.approx(8 / 12)
    # AP: case 1 = 1 (its 8 lesion voxels rank first); case 2: at 0.6 4 non-lesion voxels, at 0.3 its 4 lesion
    # voxels with precision 4/8 -> 0.5; per-scan mean 0.75. Pooled: at 0.9 recall 8/12 at precision 1, at 0.3
    # recall 12/12 at precision 12/16 -> AP = 8/12 * 1 + 4/12 * 0.75 = 11/12
    assert res["voxel_ap_per_scan"]["mean"] == pytest.approx(0.75)
    assert res["voxel_ap"] == pytest.approx(11 / 12)
    assert res["rule"]["counting"] == "prediction" and res["rule"]["bins"][0] == [1, 2]
    with pytest.raises(ValueError, match="unknown preset 'msseg2'"):
        sweep(ref_dir, prob_dir, preset="msseg2", progress=False)


def test_voxel_ap_equals_an_independent_implementation():
    from nnunet_ext.metrics.soft import average_precision

    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    ref = rng.random((6, 7, 8)) < 0.2
    p = np.clip(np.round(rng.random(ref.shape) * 0.6 + 0.4 * ref, 3), 0, 1)  # rounded: ties
    assert average_precision(p, ref) == pytest.approx(sklearn_metrics.average_precision_score(ref.ravel(), p.ravel()))
    assert average_precision(p, np.zeros_like(ref)) is None


def test_voxel_ap_in_evaluate_with_probabilities(tmp_path):
    ref_dir, prob_dir = _prob_cases(tmp_path)
    for c in ("c1", "c2"):  # predictions: the maps at 0.5
        prob = np.load(prob_dir / f"{c}.npz")["probabilities"][1]
        write_image((prob >= 0.5).astype(np.uint8), (1.0, 1.0, 1.0), tmp_path / "pred" / f"{c}.nii.gz")
    res = evaluate_folders(ref_dir, tmp_path / "pred", prob_dir=prob_dir, progress=False)
    assert res["per_case"]["c1"]["voxel_ap"] == pytest.approx(1.0)
    assert res["per_case"]["c2"]["voxel_ap"] == pytest.approx(0.5)
    assert res["aggregate"]["mean"]["voxel_ap"] == pytest.approx(0.75)
    assert res["aggregate"]["pooled"]["voxel_ap"] == pytest.approx(11 / 12)


# ------------------------------------------------------------------------- item 8: 18-connected LSR weights
def _corner_touching_label():
    """A 3-voxel run and a 2-voxel run that touch only at a corner: one 26-connected lesion of 5 voxels,
    two 18-connected lesions of 3 and 2 voxels."""
    seg = np.zeros((1, 4, 4, 8), np.int16)
    seg[0, 1, 1, 1:4] = 1
    seg[0, 2, 2, 4:6] = 1
    return seg


def test_named_lsr_trainers_weigh_18_connected_lesions(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_ext.preprocessing.maps import read_map
    from nnunet_ext.training import named
    from nnunet_ext.training.parts import LesionSizes, compute_size_maps

    assert LesionSizes().connectivity == 18
    thesis = ("LSRTrainer", "LSRTrainer_alpha1_beta4", "LSRTrainer_alpha8_beta8", "LSRDiceTrainer",
              "LSRRandomRaterTrainer", "LSRSoftTrainer", "LSRFiLMTrainer", "LSRSCINTrainer", "BCEIWTrainer")
    for name in thesis:
        parts = [t for t in getattr(named, name).target_parts if isinstance(t, LesionSizes)]
        assert [t.connectivity for t in parts] == [18], name
    for name in ("LSRTrainer_cc26", "LSRDiceTrainer_cc26"):
        assert [t.connectivity for t in getattr(named, name).target_parts] == [26], name
    seg = _corner_touching_label()
    nnUNetDatasetBlosc2.save_case(np.zeros(seg.shape, np.float32), seg, {}, str(tmp_path / "case"))
    ds = nnUNetDatasetBlosc2(str(tmp_path))
    holder = types.SimpleNamespace(preprocessed_dataset_folder=str(tmp_path))
    got = {}
    for name in ("LSRTrainer", "LSRTrainer_cc26"):
        part = getattr(named, name).target_parts[0]
        folder = part.base(holder)
        assert compute_size_maps(ds, tmp_path, folder, [1], part.connectivity) == 1
        got[folder.name] = read_map(folder, "case")
    # the size maps are cached per connectivity, in folders named after it
    assert sorted(got) == ["nnunet_ext_lesion_sizes_cc18", "nnunet_ext_lesion_sizes_cc26"]
    cc18, cc26 = got["nnunet_ext_lesion_sizes_cc18"], got["nnunet_ext_lesion_sizes_cc26"]
    assert list(cc18[1, 1, 1:4]) == [3, 3, 3] and list(cc18[2, 2, 4:6]) == [2, 2]
    assert np.all(cc26[seg[0] == 1] == 5)


# ----------------------------------------------------------------------------- item 9: Fig. 5.1 baselines
def _two_voxels():
    """Sample of two voxels: a lesion voxel with lesion logit - background logit 0 (p = 0.5) and a background
    voxel with ln 3 (p = 0.75)."""
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = math.log(3.0)
    target = torch.tensor([[[[1, 0]]]], dtype=torch.int16)
    return logits, target


def test_weighted_bce_by_hand():
    from nnunet_ext.training.losses import WeightedBCELoss

    logits, target = _two_voxels()
    # lesion voxel: 5 * ln 2; background voxel: -ln(1 - 0.75) = ln 4; mean over the 2 voxels
    assert float(WeightedBCELoss(5.0)(logits, target)) == pytest.approx((5 * math.log(2) + math.log(4)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="pos_weight"):
        WeightedBCELoss(0.0)


def test_focal_loss_by_hand_and_against_torchvision():
    from nnunet_ext.training.losses import FocalLoss

    logits, target = _two_voxels()
    # lesion voxel: p_t 0.5 -> 0.25 * (1 - 0.5)^2 * ln 2; background: p_t 0.25 -> 0.75 * 0.75^2 * ln 4
    want = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2
    assert float(FocalLoss()(logits, target)) == pytest.approx(want, rel=1e-6)
    assert float(FocalLoss(alpha=None)(logits, target)) == pytest.approx((0.25 * math.log(2) + 0.5625 * math.log(4)) / 2,
                                                                        rel=1e-6)
    tv = pytest.importorskip("torchvision.ops")
    rng = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 2, 3, 4, 5, generator=rng)
    tg = (torch.rand(2, 1, 3, 4, 5, generator=rng) < 0.3).to(torch.int16)
    ref = tv.sigmoid_focal_loss(lg[:, 1] - lg[:, 0], tg[:, 0].float(), alpha=0.25, gamma=2.0, reduction="mean")
    assert float(FocalLoss(2.0, 0.25)(lg, tg)) == pytest.approx(float(ref), rel=1e-5)


def test_inverse_weights_by_hand_and_per_sample():
    from nnunet_ext.training.losses import InverseWeightedBCELoss

    # sample 0 (12 voxels): lesion a of 1 voxel, lesion b of 3 voxels; P = 4 lesion voxels, K = 1 + 3 * 1/3 = 2
    # -> w_a = 4 / (2 * 1) = 2, w_b = 4 / (2 * 3) = 2/3: each lesion carries 2, together 4 = P
    # sample 1: one lesion of 2 voxels -> P = 2, K = 1, w = 2 / 2 = 1
    target = torch.zeros(2, 2, 1, 12, dtype=torch.int16)
    target[0, 0, 0, 0] = 1
    target[0, 1, 0, 0] = 1
    target[0, 0, 0, 4:7] = 1
    target[0, 1, 0, 4:7] = 3
    target[1, 0, 0, 0:2] = 1
    target[1, 1, 0, 0:2] = 2
    loss = InverseWeightedBCELoss(size_channel=1)
    w = loss.voxel_weights(target)
    assert float(w[0, 0, 0]) == pytest.approx(2.0) and torch.allclose(w[0, 0, 4:7], torch.full((3,), 2 / 3))
    assert torch.allclose(w[1, 0, 0:2], torch.ones(2)) and float(w[0, 0, 1]) == 1.0
    # logits: lesion a p = 0.5 (BCE ln 2), lesion b p = 0.75 (ln 4/3), background p = 0.25 (ln 4/3)
    logits = torch.zeros(1, 2, 1, 12)
    logits[0, 1] = -math.log(3.0)
    logits[0, 1, 0, 0] = 0.0
    logits[0, 1, 0, 4:7] = math.log(3.0)
    # (8 background * ln 4/3 + 2 * ln 2 + 3 * 2/3 * ln 4/3) / 12 voxels
    want = (10 * math.log(4 / 3) + 2 * math.log(2)) / 12
    assert float(loss(logits, target[:1])) == pytest.approx(want, rel=1e-6)
    assert float(loss(logits, target[:1, :1])) == pytest.approx((11 * math.log(4 / 3) + math.log(2)) / 12, rel=1e-6)


def test_inverse_weights_equal_shirokikh_weights_from_components():
    """With whole lesions in the patch, the weights equal Shirokikh et al.'s (their iw/torch.py cc2weights:
    n_positive / (n_components * |component|)), computed here from 18-connected components."""
    import cc3d

    from nnunet_ext.training.losses import InverseWeightedBCELoss
    from nnunet_ext.training.lsr import lesion_size_map

    rng = np.random.default_rng(3)
    lab = np.zeros((2, 10, 12, 14), np.int16)
    for b in range(2):
        for _ in range(6):
            z, y, x = rng.integers(1, 8), rng.integers(1, 10), rng.integers(1, 12)
            lab[b, z:z + rng.integers(1, 3), y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = 1
    want = np.ones(lab.shape, np.float64)
    sizes = np.zeros_like(lab)
    for b in range(2):
        cc, n = cc3d.connected_components(lab[b].astype(np.uint8), connectivity=18, return_N=True)
        pos = (cc > 0).sum()
        for i in range(1, n + 1):
            want[b][cc == i] = pos / (n * (cc == i).sum())
        sizes[b] = lesion_size_map(lab[b], [1], 18)
    target = torch.from_numpy(np.stack([lab, sizes], 1))
    got = InverseWeightedBCELoss(size_channel=1).voxel_weights(target).numpy()
    assert np.allclose(got, want, rtol=1e-5)


def test_negative_positive_ratio_counts_inside_the_nonzero_region(tmp_path):
    from nnunet_ext.training.class_weights import CACHE_FILE, negative_positive_ratio

    class Cases:  # the load_case interface of nnU-Net's datasets, on two label arrays
        def __init__(self, segs):
            self.segs = segs

        def load_case(self, key):
            return None, self.segs[key][None], None, {}

    segs = {"a": np.array([-1, -1, 0, 0, 0, 1]), "b": np.array([0, 0, 0, 0, 1, 1, 2])}
    # inside the nonzero region (-1 outside): 3 + 4 background, 1 + 2 lesion voxels (label 2 not counted)
    ratio, counts = negative_positive_ratio(Cases(segs), ["a", "b"], tmp_path)
    assert ratio == pytest.approx(7 / 3) and counts == {"outside": 2, "negative": 7, "positive": 3}
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert cached["a"] == {"outside": 2, "negative": 3, "positive": 1}
    with pytest.raises(ValueError, match="no lesion voxel"):
        negative_positive_ratio(Cases({"c": np.zeros(4, int)}), ["c"])


def test_fig51_baseline_trainers():
    from nnunet_ext.training import named
    from nnunet_ext.training.composed import check_composition
    from nnunet_ext.training.parts import BCEIW, WBCE, FocalBCE, LesionSizes

    assert isinstance(named.WBCETrainer.loss_part, WBCE) and named.WBCETrainer.loss_part.pos_weight is None
    assert isinstance(named.FocalLossTrainer.loss_part, FocalBCE)
    assert (named.FocalLossTrainer.loss_part.gamma, named.FocalLossTrainer.loss_part.alpha) == (2.0, 0.25)
    assert isinstance(named.BCEIWTrainer.loss_part, BCEIW)
    for name in ("WBCETrainer", "FocalLossTrainer", "BCEIWTrainer", "BCETrainer", "LSRTrainer"):
        assert getattr(named, name).loss_part.prior_bias is True, name
    with pytest.raises(NotImplementedError, match="BCEIW.*needs the 'sizes' map"):
        check_composition(BCEIW(), (), None)
    assert [s.name for s in check_composition(BCEIW(), (LesionSizes(),), None)] == ["sizes"]


@pytest.mark.slow
def test_wbce_trainer_weight_from_its_training_cases(planned_phantom):
    """WBCETrainer built in-process on the planned phantom: its positive weight is #0 / #1 over the
    preprocessed labels of its fold's training cases (counted here directly from the b2nd files)."""
    import blosc2

    from conftest import PLANNED_ID, nnunet_paths
    from nnunet_ext.nnunet_adapter import build_trainer
    from nnunet_ext.training import named

    work, env, root = planned_phantom
    with nnunet_paths(env):
        t = build_trainer(named.WBCETrainer, PLANNED_ID, "2d", 0)
        t.initialize()
        tr_keys, _ = t.do_split()
        neg = pos = 0
        for k in tr_keys:
            seg = np.asarray(blosc2.open(f"{t.preprocessed_dataset_folder}/{k}_seg.b2nd", mode="r")[:])
            neg, pos = neg + int((seg == 0).sum()), pos + int((seg == 1).sum())
        inner = getattr(t.loss, "loss", t.loss)  # inside nnU-Net's deep-supervision wrapper
        assert pos > 0 and inner.pos_weight == pytest.approx(neg / pos)


def test_cli_presets_and_counting(tmp_path, capsys):
    from nnunet_ext.cli import run

    ref_dir, prob_dir = _prob_cases(tmp_path)
    out = tmp_path / "ops.json"
    assert run(["operating-points", "--ref", str(ref_dir), "--prob", str(prob_dir), "-o", str(out),
                "--thresholds", "0.5", "--preset", "lsr"]) == 0
    res = json.loads(out.read_text())
    assert res["rule"]["counting"] == "prediction" and res["voxel_ap"] == pytest.approx(11 / 12)
    assert res["points"][0]["per_scan"]["lesion_f1"] == pytest.approx(0.5)
    assert "voxel average precision: 0.917" in capsys.readouterr().out
    for c in ("c1", "c2"):
        prob = np.load(prob_dir / f"{c}.npz")["probabilities"][1]
        write_image((prob >= 0.5).astype(np.uint8), (1.0, 1.0, 1.0), tmp_path / "pred" / f"{c}.nii.gz")
    assert run(["evaluate", "--ref", str(ref_dir), "--pred", str(tmp_path / "pred"), "-o", str(tmp_path / "e.json"),
                "--counting", "prediction"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["aggregate"]["pooled"]["lesion_fp"] == 1
    with pytest.raises(ValueError, match="symmetric applies to counting='reference' only"):
        run(["evaluate", "--ref", str(ref_dir), "--pred", str(tmp_path / "pred"), "-o", str(tmp_path / "f.json"),
             "--counting", "prediction", "--symmetric"])
    assert not (tmp_path / "f.json").exists()
