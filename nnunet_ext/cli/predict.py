"""``nnunet-ext predict``: prediction with a model's stored contract (condition, soft map, threshold,
post-processing), or with what ``nnunet-ext select`` chose (``--selection``)."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.cli.common import SELECTION_CHOOSES, add_selection_option, refuse_beside
from nnunet_ext.core import validate

COMMANDS = ("predict",)


def register(sub) -> None:
    p = options.verb(sub, "predict", "predict with a model's stored contract: condition, soft map, threshold, "
                                     "post-processing", [
        "nnunet-ext predict -i imagesTs -o pred -d 502 -c 2d -tr SoftDiceTrainer -f 0",
        "nnunet-ext predict -i imagesTs -o pred -d 505 -c 2d -tr SCINTrainer --cohort cohort0_all",
        "nnunet-ext predict -i imagesTs -o pred -d 504 -c 2d -tr ResolutionFiLMTrainer",
        "nnunet-ext predict -i imagesTs -o pred -d 501 --selection   # what `select` chose"])
    options.add_input(p, "images (<case>_<channel> files, as nnUNetv2_predict)")
    options.add_output(p, "folder", help="<case> masks, soft/ maps, nnunet_ext_predict.json")
    options.add_dataset(p)
    options.add_configuration(p, required=False, help="nnU-Net configuration (required unless --selection)")
    options.add_trainer(p, default=None, help="trainer class (default nnUNetTrainer)")
    options.add_plans(p, default=None, help="plans identifier (default nnUNetPlans)")
    options.add_folds(p, help="folds whose models are ensembled")
    add_selection_option(p, "predict with")
    options.add_checkpoint(p)
    options.add_device(p)
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time (as nnUNetv2_predict)")
    p.add_argument("--save_probabilities", action="store_true", help="keep nnU-Net's <case>.npz files")
    p.add_argument("--cohort", default=None,
                   help="SCIN models: the cohort (from the training cohorts.json) whose labelling style to predict in")
    options.add_processes(p, None, "processes for both -npp and -nps")
    options.add_prediction_processes(p)
    p.add_argument("--min-lesion-mm3", type=float, default=None,
                   help="remove predicted lesions smaller than this (mm^3); default: the model's stored post-processing")
    p.add_argument("--threshold", type=float, default=None,
                   help="lesion-probability threshold; default: the model's stored threshold, else nnU-Net's argmax")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <case>_entropy.nii.gz (float32, the prediction's geometry): per voxel the entropy "
                        "-sum_c P_c ln P_c, in nats, of the predicted class distribution P the mask is made from, "
                        "built from the test-time flips the prediction already runs (no extra network pass); "
                        "SoftSeg models: the binary entropy of the soft map; --selection ensembles: of the members' "
                        "mean lesion probability. 0 = certain, ln 2 = 0.693 = a lesion probability of 0.5")
    p.add_argument("--lesion-table", action="store_true",
                   help="also write lesions.csv (one row per predicted lesion, a connected component of the final "
                        "mask with the model's connectivity: voxels, volume_mm3, world centroid x_mm y_mm z_mm, "
                        "mean/max lesion probability, mean entropy) and cases.csv (lesion count and volume per case)")
    g = p.add_argument_group("as nnUNetv2_predict (docs/predict.md)")
    g.add_argument("-step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch size, in (0, 1] (default 0.5)")
    g.add_argument("--continue_prediction", action="store_true",
                   help="skip the cases whose mask exists in -o (resume an interrupted run)")
    g.add_argument("-num_parts", type=int, default=1,
                   help="split the sorted cases into this many parts, e.g. one per job (default 1)")
    g.add_argument("-part_id", type=int, default=0,
                   help="the part this call predicts: cases part_id, part_id + num_parts, ... (0 .. num_parts-1)")
    g.add_argument("-prev_stage_predictions", default=None, metavar="FOLDER",
                   help="cascade configurations (3d_cascade_fullres): the previous stage's masks, <case><ending>")
    g.add_argument("--disable_progress_bar", action="store_true", help="no progress output (non-interactive jobs)")


def check(args) -> None:
    if args.threshold is not None:
        validate.finite(args.threshold, "--threshold")
        if not 0 < args.threshold < 1:
            raise ValueError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.min_lesion_mm3 is not None:
        validate.finite(args.min_lesion_mm3, "--min-lesion-mm3", low=0.0)
    if not 0 < args.step_size <= 1:
        raise ValueError(f"-step_size must be in (0, 1], got {args.step_size}")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"-part_id must be in 0..num_parts-1 and -num_parts >= 1, got -part_id {args.part_id} "
                         f"-num_parts {args.num_parts}")
    if args.continue_prediction and args.lesion_table:
        raise NotImplementedError("--continue_prediction with --lesion-table: the skipped cases would have no rows; "
                                  "drop one of them")
    if args.selection is not None:
        refuse_beside("--selection", args, {**SELECTION_CHOOSES, "save_probabilities": "--save_probabilities",
                                            "continue_prediction": "--continue_prediction",
                                            "prev_stage_predictions": "-prev_stage_predictions"})
        if args.num_parts != 1 or args.step_size != 0.5:
            raise NotImplementedError("-num_parts / -step_size with --selection: a selection is predicted whole, "
                                      "with nnU-Net's default step; drop them")
    elif args.configuration is None:
        raise ValueError("predict needs -c CONFIGURATION (or --selection)")


def run(args) -> int:
    from nnunet_ext.inference.options import PredictOptions

    npp, nps = options.prediction_processes(args)
    common = PredictOptions(device=args.device, disable_tta=args.disable_tta, npp=npp, nps=nps,
                            threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3,
                            uncertainty=args.uncertainty, lesion_table=args.lesion_table)
    if args.selection is not None:
        return _predict_selection(args, common)
    from dataclasses import replace

    from nnunet_ext.inference.predict import predict
    from nnunet_ext.nnunet_adapter import ModelRef

    model = ModelRef(str(args.dataset), args.configuration, args.trainer or "nnUNetTrainer",
                     args.plans or "nnUNetPlans", args.folds, args.checkpoint)
    o = replace(common, cohort=args.cohort, save_probabilities=args.save_probabilities, step_size=args.step_size,
                overwrite=not args.continue_prediction, num_parts=args.num_parts, part_id=args.part_id,
                prev_stage_predictions=args.prev_stage_predictions, progress=not args.disable_progress_bar)
    res = predict(args.input, args.output, model, options=o)
    print(f"{len(res['cases'])} cases -> {args.output} (threshold: {res['threshold']}, {res['threshold_source']})")
    return 0


def _predict_selection(args, o) -> int:
    from nnunet_ext.inference.ensemble import predict_selection

    if o.npp != o.nps:
        raise NotImplementedError(f"-npp {o.npp} and -nps {o.nps} with --selection: its prediction uses one process "
                                  f"count for both; give -np N")
    res = predict_selection(args.input, args.output, args.dataset, args.selection or None, o,
                            checkpoint=args.checkpoint)
    print(f"{len(res['cases'])} cases -> {args.output} (selection {res['selection']}; threshold "
          f"{res['threshold']}, {res['threshold_source']}; min lesion {res['postprocessing']['min_lesion_mm3']} mm3)")
    return 0
