"""Seed-system compositions end to end with real nnU-Net commands on the shared planned phantom (1 epoch of
2 iterations on CPU): LSRFiLMTrainer at native resolution (nnunet-ext plan-native, nnUNetv2_train,
nnunet-ext predict) and SoftSegRandomRaterTrainer (nnUNetv2_train with soft random-rater targets, its
stored threshold and normalized-ReLU soft output applied by the one predictor)."""
import json
import pickle

import numpy as np
import pytest

from conftest import PLANNED_ID, run_nnunet
from nnunet_ext.core.io import read_geometry, read_image
from nnunet_ext.core.paths import nnunet_command

pytestmark = pytest.mark.slow


sh = run_nnunet  # real nnU-Net commands, in this process


@pytest.mark.heavy  # native-resolution planning, a training and a prediction (about 20 s): CI's heavy part
def test_lsr_film_at_native_resolution(planned_phantom, tmp_path):
    work, env, root = planned_phantom
    sh([nnunet_command("nnunet-ext"), "plan-native", "-d", PLANNED_ID, "-c", "3d_fullres", "-np", "2"], env)
    pre = next((work / "nnUNet_preprocessed").glob(f"Dataset{PLANNED_ID}_*"))
    plans = json.loads((pre / "nnUNetPlans_native.json").read_text())
    assert plans["configurations"]["3d_fullres"]["nnunet_ext_native_resolution"] is True
    # every case kept its own grid: preprocessed shape = cropped shape, for both sites (1 and 2 mm slices)
    spacings = set()
    for pkl in sorted((pre / "nnUNetPlans_native_3d_fullres").glob("*.pkl")):
        props = pickle.loads(pkl.read_bytes())
        import blosc2

        shape = blosc2.open(str(pkl.with_suffix(".b2nd")), mode="r").shape[1:]
        assert tuple(shape) == tuple(props["shape_after_cropping_and_before_resampling"])
        spacings.add(tuple(props["spacing"]))
    assert len(spacings) == 2
    sh([nnunet_command("nnUNetv2_train"), PLANNED_ID, "3d_fullres", "0", "-tr", "LSRFiLMTrainer", "-p",
        "nnUNetPlans_native", "-device", "cpu"], env)
    mdir = next((work / "nnUNet_results").glob(f"Dataset{PLANNED_ID}_*")) / "LSRFiLMTrainer__nnUNetPlans_native__3d_fullres"
    contract = json.loads((mdir / "nnunet_ext_model.json").read_text())
    assert contract["condition"] == "spacing" and contract["activation"] == "softmax"
    pred = tmp_path / "pred"
    sh([nnunet_command("nnunet-ext"), "predict", "-i", root / "imagesTs", "-o", pred, "-d", PLANNED_ID, "-c",
        "3d_fullres", "-tr", "LSRFiLMTrainer", "-p", "nnUNetPlans_native", "-f", "0", "-device", "cpu"], env)
    for img in sorted((root / "imagesTs").glob("*_0000.nii.gz")):
        case = img.name[:-len("_0000.nii.gz")]
        g, gp = read_geometry(img), read_geometry(pred / f"{case}.nii.gz")
        assert g["size"] == gp["size"] and np.allclose(g["spacing"], gp["spacing"])
        soft, _ = read_image(pred / "soft" / f"{case}.nii.gz")
        assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    # nnU-Net's own predictor cannot supply the condition: it fails and writes no mask
    out = tmp_path / "nnunet"
    r = sh([nnunet_command("nnUNetv2_predict"), "-i", root / "imagesTs", "-o", out, "-d", PLANNED_ID, "-c",
            "3d_fullres", "-tr", "LSRFiLMTrainer", "-p", "nnUNetPlans_native", "-f", "0", "-device", "cpu", "-npp", "1",
            "-nps", "1"], env, ok=False)
    assert r.returncode != 0 and "nnunet-ext predict" in (r.stdout + r.stderr)
    assert not list(out.glob("*.nii.gz"))


def test_softseg_random_rater_end_to_end(planned_phantom, tmp_path):
    work, env, root = planned_phantom
    sh([nnunet_command("nnUNetv2_train"), PLANNED_ID, "2d", "0", "-tr", "SoftSegRandomRaterTrainer", "-device", "cpu"],
       env)
    mdir = next((work / "nnUNet_results").glob(f"Dataset{PLANNED_ID}_*")) / "SoftSegRandomRaterTrainer__nnUNetPlans__2d"
    contract = json.loads((mdir / "nnunet_ext_model.json").read_text())
    assert contract["activation"] == "normalized_relu_case" and contract["condition"] is None
    th = json.loads((mdir / "fold_0" / "nnunet_ext_threshold.json").read_text())
    assert th["activation"] == "normalized_relu_case"
    # nnU-Net's end-of-training validation ran the network with its un-normalised ReLU output (divided by the
    # constant CASE_SCALE), as the predictor does: the exported softmax is that of [0, R] with R >= 0, and the
    # soft map is R over the case's maximum, in [0, 1] with maximum 1 (or 0 everywhere)
    from nnunet_ext.inference.thresholds import soft_output

    vals = sorted((mdir / "fold_0" / "validation").glob("*.npz"))
    assert vals
    for npz in vals:
        with np.load(npz) as f:
            p = f["probabilities"].astype(np.float64)
        inside = p[1] > 0  # (outside nnU-Net's crop it writes p = (1, 0))
        q = np.log(p[1][inside]) - np.log(p[0][inside])
        assert q.min() >= -2e-3 and np.isfinite(q).all()
        m = soft_output(p, "normalized_relu_case")
        assert m.min() >= 0 and (m.max() == pytest.approx(1.0) or m.max() == 0)
    settings = json.loads((mdir / "fold_0" / "nnunet_ext_settings.json").read_text())
    assert settings["target_layout"] == {"soft": 1} and "RandomRater()" in settings["targets"]
    pred = tmp_path / "pred"
    sh([nnunet_command("nnunet-ext"), "predict", "-i", root / "imagesTs", "-o", pred, "-d", PLANNED_ID, "-c", "2d",
        "-tr", "SoftSegRandomRaterTrainer", "-f", "0", "-device", "cpu", "--save_probabilities"], env)
    summary = json.loads((pred / "nnunet_ext_predict.json").read_text())
    assert summary["activation"] == "normalized_relu_case" and summary["threshold"] == th["best_threshold"]

    for npz in sorted(pred.glob("*.npz")):
        case = npz.name[:-4]
        with np.load(npz) as f:
            want = soft_output(f["probabilities"], "normalized_relu_case")
        soft, _ = read_image(pred / "soft" / f"{case}.nii.gz")
        np.testing.assert_allclose(soft, want, atol=1e-6)
        mask, _ = read_image(pred / f"{case}.nii.gz")
        np.testing.assert_array_equal(mask, (want >= th["best_threshold"]).astype(mask.dtype))
