"""``nnunet-ext predict`` with ``nnUNetv2_predict``'s options gives ``nnUNetv2_predict``'s files for a plain
nnU-Net model (ExtBaselineTrainer: nnU-Net's default trainer with the CPU budget; argmax, no post-processing
in its contract): the same masks and probabilities; ``-num_parts 2`` halves cover every case once;
``--continue_prediction`` predicts only what is missing; ``-step_size`` reaches nnU-Net's predictor."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.slow  # real nnU-Net training (1 epoch x 2 iterations) and predictions

TRAINER = "ExtBaselineTrainer"


def _same_image(a, b) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetPixelID() == ib.GetPixelID(), (a, b)
    assert ia.GetSize() == ib.GetSize() and ia.GetSpacing() == ib.GetSpacing()
    assert ia.GetOrigin() == ib.GetOrigin() and ia.GetDirection() == ib.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)), (a, b)


@pytest.mark.heavy  # a training, nnUNetv2_predict and four predictions (about 30 s): CI's heavy part
def test_predict_matches_nnunetv2_predict_and_parts_cover_every_case(planned_phantom, tmp_path):
    from conftest import PLANNED_ID, run_nnunet
    from nnunet_ext.core.paths import nnunet_command
    from nnunet_ext.inference.predictor import load_predictor

    work, env, root = planned_phantom
    model = work / "nnUNet_results" / root.name / f"{TRAINER}__nnUNetPlans__2d"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():  # else another test trained it already
        run_nnunet([nnunet_command("nnUNetv2_train"), str(PLANNED_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"],
                   env)
    # 5 cases: the 2 test cases and 3 training cases
    inp = tmp_path / "in"
    inp.mkdir()
    for f in sorted(root.glob("imagesTs/*_0000.nii.gz")) + sorted(root.glob("imagesTr/*_0000.nii.gz"))[:3]:
        os.symlink(f, inp / f.name)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in inp.iterdir())
    assert len(cases) == 5
    common = ["-i", str(inp), "-d", str(PLANNED_ID), "-c", "2d", "-tr", TRAINER, "-f", "0", "-device", "cpu",
              "-step_size", "0.75", "-npp", "1", "-nps", "1", "--save_probabilities", "--disable_progress_bar"]
    theirs, ours = tmp_path / "nnunet", tmp_path / "ours"
    run_nnunet([nnunet_command("nnUNetv2_predict"), *common, "-o", str(theirs)], env)
    r = run_nnunet([nnunet_command("nnunet-ext"), "predict", *common, "-o", str(ours)], env)
    assert "predict:" not in r.stdout  # --disable_progress_bar: no progress lines
    for c in cases:
        _same_image(theirs / f"{c}.nii.gz", ours / f"{c}.nii.gz")
        pa, pb = np.load(theirs / f"{c}.npz")["probabilities"], np.load(ours / f"{c}.npz")["probabilities"]
        assert pa.dtype == pb.dtype and np.array_equal(pa, pb), c
    summary = json.loads((ours / "nnunet_ext_predict.json").read_text())
    assert summary["cases"] == cases and summary["threshold"] is None  # nnU-Net's argmax

    # -num_parts 2: part 0 predicts cases 0, 2, 4 of nnU-Net's sorted list, part 1 cases 1, 3; together every
    # case once, each the same file as the single run
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for k, out in enumerate(parts):
        run_nnunet([nnunet_command("nnunet-ext"), "predict", *common[:-2], "-o", str(out), "-num_parts", "2",
                    "-part_id", str(k)], env)
    got = [sorted(p.name[:-7] for p in out.glob("*.nii.gz")) for out in parts]
    assert got == [cases[0::2], cases[1::2]]
    assert json.loads((parts[1] / "nnunet_ext_predict_part1of2.json").read_text())["cases"] == cases[1::2]
    for k, out in enumerate(parts):
        for c in got[k]:
            _same_image(ours / f"{c}.nii.gz", out / f"{c}.nii.gz")

    # --continue_prediction: only the missing case is predicted again, the others are left as they are
    (ours / f"{cases[2]}.nii.gz").unlink()
    stamps = {c: (ours / f"{c}.nii.gz").stat().st_mtime_ns for c in cases if c != cases[2]}
    run_nnunet([nnunet_command("nnunet-ext"), "predict", *common, "-o", str(ours), "--continue_prediction"], env)
    assert {c: (ours / f"{c}.nii.gz").stat().st_mtime_ns for c in stamps} == stamps
    _same_image(theirs / f"{cases[2]}.nii.gz", ours / f"{cases[2]}.nii.gz")

    # -step_size reaches nnU-Net's predictor (this phantom's 2d patch covers a whole slice, so the masks above
    # cannot show it); out of range and a previous stage for a plain model are one-line errors
    assert load_predictor(model, [0], device="cpu", step_size=0.3).tile_step_size == 0.3
    for bad, what in ((["-step_size", "1.5"], "-step_size must be in (0, 1]"),
                      (["-prev_stage_predictions", str(theirs)], "-prev_stage_predictions applies to cascade"),
                      (["-num_parts", "2", "-part_id", "2"], "-part_id must be in 0..num_parts-1")):
        r = run_nnunet([nnunet_command("nnunet-ext"), "predict", *common[:12], "-o", str(tmp_path / "bad"), *bad],
                       env, ok=False)
        assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
