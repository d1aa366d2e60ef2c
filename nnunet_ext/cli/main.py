"""``nnunet-ext`` command line: thin argument parsing over importable functions."""
from __future__ import annotations

import argparse
import signal
import sys

from nnunet_ext import __version__
from nnunet_ext.cluster.launcher import add_launcher_arguments, launcher_options


EXAMPLES = """examples:
  export nnUNet_extTrainer=$(nnunet-ext trainers-path)
  nnunet-ext phantom -d 501 --cases 20 --test-cases 6 --shape 64 64 64 --seed 0
  nnUNetv2_plan_and_preprocess -d 501 -c 2d -np 2
  nnUNetv2_train 501 2d 0 -tr ExtBaselineTrainer -device cpu
  nnUNetv2_predict -i $nnUNet_raw/Dataset501_MSPhantom/imagesTs -o pred -d 501 -c 2d -f 0 \\
      -tr ExtBaselineTrainer --save_probabilities -device cpu
  nnunet-ext evaluate --ref $nnUNet_raw/Dataset501_MSPhantom/labelsTs --pred pred -o results.json
  nnunet-ext operating-points --ref $nnUNet_raw/Dataset501_MSPhantom/labelsTs --prob pred -o ops.json
  nnunet-ext demo
"""


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26),
                   help="lesion connectivity (default 26, as the WMH 2017 challenge)")
    p.add_argument("--min-overlap", type=float, default=0.0,
                   help="fraction of a reference lesion that must be covered to count as detected "
                        "(default 0: any voxel, as the WMH 2017 challenge)")
    p.add_argument("--bins", default="3-10,11-50,51+",
                   help="lesion size bins: inclusive 3-10,11-50,51+ (default) or half-open [0,10),[10,400),[400,inf)")
    p.add_argument("--size-unit", choices=("voxels", "mm3"), default="voxels",
                   help="unit of --bins: lesion size in voxels (default) or volume in mm3")
    p.add_argument("--detection", default=None,
                   help="when a reference lesion counts as detected, e.g. 'any' (default), 'voxels>=3 or fraction>0.5' "
                        "(LSR thesis), 'fraction>=0.6' (focal-Tversky thesis); overrides --min-overlap")
    p.add_argument("--symmetric", action="store_true",
                   help="apply the detection rule to predicted components too (default: a predicted component is a "
                        "false positive only when it touches no reference lesion)")
    p.add_argument("--counting", choices=("reference", "prediction"), default="reference",
                   help="what a lesion TP is: a detected reference lesion (default) or a predicted lesion that meets "
                        "the rule with a reference lesion (Nichyporuk thesis; TPR = TP / (TP + FN))")
    p.add_argument("--label", type=int, default=None,
                   help="evaluate this label value of multi-label masks (default: masks must be binary)")
    p.add_argument("--allow-missing", action="store_true",
                   help="count a reference case without prediction as an empty prediction instead of failing")


def _add_selection_option(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--selection", nargs="?", const="", default=None, metavar="FILE",
                   help=f"{verb} the model or ensemble `nnunet-ext select` chose, with its threshold and minimum "
                        f"lesion size (default file $nnUNet_results/<Dataset>/nnunet_ext_selection.json); "
                        f"replaces -c -tr -p -f")


def _refuse_beside_selection(args, **extra) -> None:
    """``--selection`` chooses the model(s) and folds: options that would choose them too are an error."""
    opts = {"configuration": "-c", "trainer": "-tr", "plans": "-p", "folds": "-f", "cohort": "--cohort", **extra}
    given = [flag for dest, flag in opts.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ValueError(f"--selection chooses the model(s) and folds; drop {' '.join(given)}")


def _add_rule_options(p: argparse.ArgumentParser, bins_only: bool = False) -> None:
    """Lesion-rule options of ``lesion-metrics`` / ``select``."""
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26))
    p.add_argument("--detection", default=None, help="detection rule, e.g. 'voxels>=3 or fraction>0.5' (default any)")
    p.add_argument("--bins", default="3-10,11-50,51+", help="size bins (the first is the small-lesion bin)")
    if not bins_only:
        p.add_argument("--size-unit", choices=("voxels", "mm3"), default="voxels")


def _fold(text: str):
    """nnU-Net's fold argument: an integer or ``all``."""
    return text if text == "all" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ext", description="MS-lesion segmentation methods for nnU-Net v2.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output, only results and errors (also accepted after the command)")
    parser.add_argument("--verbose", action="store_true",
                        help="one progress line per case, and nnU-Net's own per-case output during prediction "
                             "(also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer",
                   epilog="example:\n  export nnUNet_extTrainer=$(nnunet-ext trainers-path)",
                   formatter_class=argparse.RawDescriptionHelpFormatter)

    p = sub.add_parser("phantom", help="write a synthetic MS-lesion dataset in nnU-Net raw format",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext phantom -d 501 --cases 20 --shape 64 64 64 --seed 0\n"
                              "  nnunet-ext phantom -d 502 --cases 10 --raters 3 --soft\n"
                              "  nnunet-ext phantom -d 503 --cases 10 --timepoints 2\n"
                              "  nnunet-ext phantom -d 504 --cases 10 --site-spacing 1 1 1 --site-spacing 1 1 3\n"
                              "  nnunet-ext phantom -d 505 --cases 12 --cohort all --cohort no_small")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default="MSPhantom", help="dataset name (folder Dataset<ID>_<NAME>)")
    p.add_argument("--cases", type=int, default=20, help="training cases (imagesTr/labelsTr)")
    p.add_argument("--test-cases", type=int, default=0, help="held-out cases (imagesTs/labelsTs)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm")
    p.add_argument("--difficulty", default="medium", help="easy, medium (default), hard, or a number in [0, 1]")
    p.add_argument("--raters", type=int, default=0, help="also write this many rater masks per case")
    p.add_argument("--soft", action="store_true", help="also write partial-volume soft labels in [0, 1]")
    p.add_argument("--timepoints", type=int, default=1, choices=(1, 2),
                   help="2: two FLAIR channels, label = new lesions at time point 2")
    p.add_argument("--site-spacing", type=float, nargs=3, action="append", default=None, metavar=("X", "Y", "Z"),
                   help="add a site with this spacing (repeat); cases are assigned to sites in turn")
    p.add_argument("--cohort", action="append", default=None, choices=("all", "no_small"),
                   help="add a cohort with this labelling protocol (repeat); cases are assigned to cohorts in turn, "
                        "no_small training labels omit lesions of <= 10 voxels; writes cohorts.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty dataset folder as a whole (default: refuse)")

    p = sub.add_parser("evaluate", help="voxel- and lesion-wise evaluation of predicted masks",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnunet-ext evaluate --ref labelsTs --pred predictions -o results.json")
    p.add_argument("--ref", required=True, help="folder of reference masks (.nii.gz)")
    p.add_argument("--pred", required=True, help="folder of predicted masks with the same file names")
    p.add_argument("-o", "--output", required=True, help="results JSON (a CSV is written beside it)")
    _add_eval_options(p)
    p.add_argument("--prob", default=None,
                   help="folder of probability maps (nnU-Net <case>.npz): adds soft Dice, Brier, ECE (10 bins on [0,1]) "
                        "and reliability PNGs")
    p.add_argument("--soft-ref", default=None, help="folder of rater-average soft references (adds the image-entropy "
                                                    "MAE; soft Dice, Brier and ECE then use it)")
    p.add_argument("--preset", choices=("wmh2017", "msseg2", "isbi2015", "nichyporuk", "lsr", "focal_tversky"),
                   default=None,
                   help="score as a challenge or seed paper does (docs/evaluation.md): wmh2017 = the organisers' "
                        "evaluation.py (label 2 masked, their thresholding of predictions, HD95 on their 3x3 in-plane "
                        "border); msseg2 = current Anima lesion detection + MSSEG-2 summary; isbi2015 = Carass et al. "
                        "2017 score and components; nichyporuk (alias lsr) = the LSR thesis: 18-connected, a predicted "
                        "lesion is a TP when it covers >=3 or >50%% of a reference lesion's voxels, bins 1-2,3-10,"
                        "11-50,51+; focal_tversky = >=60%%, "
                        "bins [0,10),[10,400),[400,1000),[1000,inf); overrides --connectivity/--detection")
    p.add_argument("--isbi-rater-score", type=float, default=None,
                   help="isbi2015: raw inter-rater score that normalises to 90 (gives the normalized score)")
    p.add_argument("-np", "--num-processes", type=int, default=1)

    p = sub.add_parser("operating-points", help="TPR/FDR per lesion size over probability thresholds, with a PNG",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnUNetv2_predict ... --save_probabilities -o pred\n"
                              "  nnunet-ext operating-points --ref labelsTs --prob pred -o ops.json")
    p.add_argument("--ref", required=True, help="folder of reference masks (.nii.gz)")
    p.add_argument("--prob", required=True, help="folder of nnU-Net probability files (<case>.npz) or NIfTI maps")
    p.add_argument("-o", "--output", required=True, help="results JSON; the PNG goes beside it unless --png")
    p.add_argument("--png", default=None)
    p.add_argument("--thresholds", type=float, nargs="+", default=None, help="default 0.01 ... 0.98")
    p.add_argument("--class-index", type=int, default=1, help="probability channel of the lesion class")
    p.add_argument("--title", default="")
    _add_eval_options(p)
    p.add_argument("--preset", choices=("wmh2017", "nichyporuk", "lsr", "focal_tversky"), default=None,
                   help="a seed paper's lesion rule (connectivity, detection, counting, bins; docs/evaluation.md); "
                        "overrides --connectivity/--detection/--bins/--counting")

    p = sub.add_parser("lesion-metrics", help="lesion-wise metrics of a trained model's validation folds "
                                              "(fold_k/validation/lesion_summary.json beside nnU-Net's summary.json)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnunet-ext lesion-metrics -d 501 -c 2d -tr ExtBaselineTrainer -f 0 1 2 3 4")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--folds", nargs="+", type=_fold, default=[0, 1, 2, 3, 4])
    p.add_argument("--preset", choices=("wmh2017", "msseg2", "isbi2015", "nichyporuk", "lsr", "focal_tversky"),
                   default=None)
    _add_rule_options(p)

    p = sub.add_parser("select", help="choose model/ensemble, probability threshold and minimum lesion size on "
                                      "validation folds by a lesion metric; store them in the model contract",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnUNetv2_train 501 2d 0 -tr ExtBaselineTrainer --val --npz   # each fold\n"
                              "  nnunet-ext select -d 501 -c 2d 3d_fullres -tr ExtBaselineTrainer -f 0 1 2 3 4 "
                              "--metric small_lesion_f1")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configurations", nargs="+", required=True)
    p.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer"])
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--folds", nargs="+", type=_fold, default=[0, 1, 2, 3, 4])
    p.add_argument("--metric", default="lesion_f1",
                   choices=("lesion_f1", "small_lesion_f1", "lesion_tpr", "lesion_ppv", "dice"))
    p.add_argument("--thresholds", type=float, nargs="+", default=None, help="default 0.05, 0.10, ..., 0.95")
    p.add_argument("--min-sizes-mm3", type=float, nargs="+", default=None,
                   help="candidate minimum lesion sizes in mm3 (default 0 1 2 3 4 5 6 8 10 15 20)")
    p.add_argument("--no-ensembles", action="store_true", help="do not try pairs of models")
    p.add_argument("--no-contract", action="store_true", help="only write the selection JSON")
    p.add_argument("-o", "--output", default=None, help="selection JSON (default $nnUNet_results/<Dataset>/"
                                                        "nnunet_ext_selection.json)")
    _add_rule_options(p, bins_only=True)

    p = sub.add_parser("fuse", help="fuse several raters' masks (majority, STAPLE, soft labels, ...)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext fuse --method majority --raters r1 r2 r3 -o fused\n"
                              "  nnunet-ext fuse --method staple_soft --raters r1 r2 r3 -o soft\n"
                              "  nnunet-ext fuse --method soft_rim --raters r1 r2 r3 --images imagesTr -o rim")
    p.add_argument("--method", required=True,
                   choices=("majority", "intersection", "union", "staple", "staple_soft", "mean", "inter_soft_union",
                            "soft_rim", "inter_soft_union_rim"))
    p.add_argument("--raters", nargs="+", required=True, help="one folder of <case>.nii.gz masks per rater")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--gamma", type=float, default=0.5,
                   help="soft value of inter_soft_union / soft_rim / inter_soft_union_rim (default 0.5)")
    p.add_argument("--radius-mm", type=float, default=1.0, help="rim dilation radius in mm (default 1)")
    p.add_argument("--images", default=None,
                   help="soft_rim, inter_soft_union_rim: folder of <case>_<channel>.nii.gz images")
    p.add_argument("--channel", type=int, default=0, help="rim methods: image channel holding FLAIR (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder as a whole (default: refuse)")

    p = sub.add_parser("preprocess-soft", help="put a dataset's soft labels on nnU-Net's preprocessed grid",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnUNetv2_plan_and_preprocess -d 502 -c 2d\n"
                              "  nnunet-ext preprocess-soft -d 502 -c 2d\n"
                              "  nnUNetv2_train 502 2d 0 -tr SoftDiceTrainer")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--soft-dir", default="softlabelsTr", help="folder of the raw dataset with <case>.nii.gz soft labels")
    p.add_argument("--raters", action="store_true",
                   help="instead: every ratersTr/<rater>/ folder (for RandomRaterTrainer)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("plan-native", help="plan and preprocess at native resolution (no resampling; for FiLM trainers)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnunet-ext plan-native -d 504 -c 3d_fullres -np 2\n"
                              "  nnUNetv2_train 504 3d_fullres 0 -tr LSRFiLMTrainer -p nnUNetPlans_native\n"
                              "  nnunet-ext predict -i imagesTs -o pred -d 504 -c 3d_fullres -tr LSRFiLMTrainer "
                              "-p nnUNetPlans_native")
    p.add_argument("-d", required=True, dest="dataset")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], dest="configurations")
    p.add_argument("-p", "--plans-name", default="nnUNetPlans_native", dest="plans_name")
    p.add_argument("-np", type=int, default=2, dest="n_proc")
    p.add_argument("--verify_dataset_integrity", action="store_true", dest="verify")

    p = sub.add_parser("predict", help="predict with a model's stored contract: condition, soft map, threshold, post-processing",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext predict -i imagesTs -o pred -d 502 -c 2d -tr SoftDiceTrainer -f 0\n"
                              "  nnunet-ext predict -i imagesTs -o pred -d 505 -c 2d -tr SCINTrainer --cohort cohort0_all\n"
                              "  nnunet-ext predict -i imagesTs -o pred -d 504 -c 2d -tr ResolutionFiLMTrainer\n"
                              "  nnunet-ext predict -i imagesTs -o pred -d 501 --selection   # what `select` chose")
    p.add_argument("-i", required=True, dest="input")
    p.add_argument("-o", required=True, dest="output")
    p.add_argument("-d", required=True, dest="dataset")
    p.add_argument("-c", default=None, dest="configuration", help="required unless --selection")
    p.add_argument("-tr", default=None, dest="trainer", help="default nnUNetTrainer")
    p.add_argument("-p", default=None, dest="plans", help="default nnUNetPlans")
    p.add_argument("-f", nargs="+", type=_fold, default=None, dest="folds", help="default: every trained fold")
    _add_selection_option(p, "predict with")
    p.add_argument("-chk", default="checkpoint_final.pth", dest="checkpoint")
    p.add_argument("-device", default="cuda")
    p.add_argument("--disable_tta", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="keep nnU-Net's <case>.npz files")
    p.add_argument("--cohort", default=None,
                   help="SCIN models: the cohort (from the training cohorts.json) whose labelling style to predict in")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("-npp", type=int, default=None, help="preprocessing processes (default: -np)")
    p.add_argument("-nps", type=int, default=None, help="segmentation export processes (default: -np)")
    p.add_argument("--min-lesion-mm3", type=float, default=None,
                   help="remove predicted lesions smaller than this (mm^3); default: the model's stored post-processing")
    p.add_argument("--threshold", type=float, default=None,
                   help="lesion-probability threshold; default: the model's stored threshold, else nnU-Net's argmax")

    p = sub.add_parser("pseudolabel", help="teacher pseudo-labels unlabeled scans (flip-TTA entropy filter) -> student dataset",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext pseudolabel -d 501 -c 3d_fullres -tr LSRTrainer -f 0 1 2 3 4 "
                              "-i unlabeled/ -o Dataset601_MSStudent\n"
                              "  # cluster array job, part 3 of 8 (rerun after a kill continues):\n"
                              "  nnunet-ext pseudolabel ... -num_parts 8 -part_id 3")
    p.add_argument("-d", required=True, dest="dataset", help="teacher's dataset id or name")
    p.add_argument("-c", required=True, dest="configuration")
    p.add_argument("-tr", default="nnUNetTrainer", dest="trainer")
    p.add_argument("-p", default="nnUNetPlans", dest="plans")
    p.add_argument("-f", nargs="+", type=int, default=[0], dest="folds")
    p.add_argument("-chk", default="checkpoint_final.pth", dest="checkpoint")
    p.add_argument("-i", required=True, dest="input", help="folder of unlabeled images (<case>_<channel>.nii.gz)")
    p.add_argument("-o", required=True, dest="output", help="student dataset name, DatasetXXX_Name (under nnUNet_raw)")
    p.add_argument("--alpha", type=float, default=0.3, help="confidence omega = exp(-alpha H) (default 0.3)")
    p.add_argument("--vpt", type=float, default=0.3, help="voxel threshold on m = P_lesion * omega (default 0.3)")
    p.add_argument("--tst", type=float, default=100.0, help="drop a case when sum(m) < TST (default 100)")
    p.add_argument("--ignore-uncertain", action="store_true",
                   help="voxels with VPT <= m < 0.5 become nnU-Net's ignore label instead of background")
    p.add_argument("--no-labeled", action="store_true", help="do not copy the teacher's labeled cases")
    p.add_argument("-num_parts", type=int, default=None,
                   help="shards (default 1; with --launcher slurm or -j N the launcher runs them all, default N = -j)")
    p.add_argument("-part_id", type=int, default=None, help="run only this shard (default 0)")
    p.add_argument("-device", default="cuda")
    p.add_argument("--soft-rim", type=float, default=None, metavar="GAMMA", dest="soft_rim",
                   help="write softlabelsTr for the kept pseudo-labels with an intensity-gated soft rim of GAMMA "
                        "(labeled cases keep the teacher dataset's softlabelsTr)")
    p.add_argument("--soft-rim-mm", type=float, default=1.0, help="rim width in mm (default 1)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the finished shards' provenance into provenance.json/dataset.json (the launcher's last step)")
    p.add_argument("--workdir", default=None, help="launcher scripts, markers and logs (default: "
                                                   "$nnUNet_results/nnunet_ext_jobs/<output>/pseudolabel)")
    add_launcher_arguments(p)

    p = sub.add_parser("submission", help="package a trained model as a challenge submission; test it locally",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext submission build -d 521 -c 3d_fullres -tr LSRTrainer -f 0 1 2 3 4 "
                              "--challenge wmh2017 -o wmh_submission\n"
                              "  nnunet-ext submission build -d 540 --consensus --challenge msseg2 -o msseg2_cascade\n"
                              "  nnunet-ext submission test wmh_submission --input sample_subject/")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = ssub.add_parser("build", help="write the submission folder (model, Dockerfile, entrypoint, README)")
    b.add_argument("-d", required=True, dest="dataset")
    b.add_argument("-c", default=None, dest="configuration", help="required unless --selection")
    b.add_argument("-tr", default=None, dest="trainer", help="default nnUNetTrainer")
    b.add_argument("-p", default=None, dest="plans", help="default nnUNetPlans")
    b.add_argument("-f", nargs="+", type=int, default=None, dest="folds", help="default 0 1 2 3 4")
    _add_selection_option(b, "package")
    b.add_argument("--consensus", nargs="?", const="", default=None, metavar="FILE",
                   help="package the trained consensus cascade of -d (every rater model, the consensus model; run as "
                        "`nnunet-ext consensus predict` does): its consensus.json (default: the one in the dataset's raw "
                        "folder) or the folder holding it; replaces -c -tr -p -f")
    b.add_argument("-chk", default="checkpoint_final.pth", dest="checkpoint")
    b.add_argument("--challenge", required=True, choices=("generic", "wmh2017", "msseg2", "isbi2015"))
    b.add_argument("--tag", default="nnunet-ext-submission", help="docker image tag used in the README")
    b.add_argument("--cohort", default=None,
                   help="cohort-conditioned (SCIN) models: the cohort whose labelling style the submission predicts in")
    b.add_argument("-o", required=True, dest="output")
    t = ssub.add_parser("test", help="run the entrypoint locally (no Docker) and check names, geometry, values")
    t.add_argument("folder")
    t.add_argument("--input", required=True, help="sample input in the challenge's layout")
    t.add_argument("--work", default=None,
                   help="keep each run in a fresh WORK/run_<n>/ (output/, entrypoint.log); default: temporary")
    t.add_argument("--timeout", type=float, default=3600.0, help="seconds before the entrypoint is killed (default 3600)")
    t.add_argument("-device", default="cpu")

    p = sub.add_parser("convert", help="convert a public challenge dataset to an nnU-Net raw dataset",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext convert wmh2017 -i WMH/training -d 521 [--test-input WMH/test]\n"
                              "  nnunet-ext convert msseg2 -i segmentation_challenge_miccai21/training -d 540")
    p.add_argument("challenge", choices=("wmh2017", "isbi2015", "msseg2016", "msseg2"))
    p.add_argument("-i", "--input", required=True, help="the challenge's training folder (never modified)")
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("--name", default=None, help="dataset name (default: the challenge's)")
    p.add_argument("--test-input", default=None,
                   help="wmh2017, msseg2: a labelled test folder -> imagesTs/labelsTs (never modified)")
    p.add_argument("--label", default=None, choices=("rater1", "rater2", "intersection", "union"),
                   help="isbi2015 only: which rater mask(s) become labelsTr (default rater1; both are kept in ratersTr)")
    p.add_argument("--subtraction", action="store_true",
                   help="msseg2 only: add channel 2, follow-up minus baseline after z-scoring each time point over "
                        "its nonzero voxels (0 where either is 0); nnU-Net does not normalise it again (noNorm)")
    p.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty dataset folder as a whole (default: refuse)")

    p = sub.add_parser("split", help="cross-validation folds that keep every subject (or site) whole -> nnU-Net's "
                                     "splits_final.json; pseudo-labelled cases only ever in training",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext split -d 531                      # subjects from case_groups.json "
                              "(nnunet-ext convert)\n"
                              "  nnunet-ext split -d 521 --group-by site -nfolds 3   # leave one site out\n"
                              "  nnunet-ext split -d 531 --pattern '^(training\\d+)_'  # subject = the first (...) group\n"
                              "  nnunet-ext split -d 531 --csv subjects.csv      # columns case,subject\n"
                              "  nnunet-ext split -d 531 --check                 # validate the existing splits_final.json")
    p.add_argument("-d", required=True, dest="dataset", help="dataset id or name")
    p.add_argument("--group-by", choices=("subject", "site"), default="subject",
                   help="what must never be on both sides of a fold (default subject)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pattern", default=None, help="regular expression searched in each case id: its first (...) "
                                                   "group (or whole match) is the case's subject/site")
    g.add_argument("--csv", default=None, dest="csv_file", help="CSV with a header and the columns case and "
                                                                "subject (or site)")
    p.add_argument("-nfolds", "--nfolds", type=int, default=None, dest="n_folds", help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fold assignment (default 12345, nnU-Net's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing splits_final.json that differs")
    p.add_argument("--check", action="store_true",
                   help="only validate the existing splits_final.json (no subject on both sides of a fold, no "
                        "pseudo-labelled case in val)")

    p = sub.add_parser("consensus", help="multi-rater consensus cascade: one nnU-Net per rater, then a consensus nnU-Net",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  nnunet-ext consensus split-raters -d 540 --folds 5\n"
                              "  nnunet-ext consensus train -d 540 --stage 1 -c 3d_fullres -tr LSRTrainer\n"
                              "  nnunet-ext consensus build-stage2 -d 540\n"
                              "  nnunet-ext consensus train -d 540 --stage 2 -c 3d_fullres\n"
                              "  nnunet-ext consensus predict -d 540 -i imagesTs -o pred --keep-rater-predictions\n"
                              "  nnunet-ext consensus evaluate -d 540 --pred pred -o cascade_eval.json")
    csub = p.add_subparsers(dest="consensus_command", required=True, metavar="STEP")
    c = csub.add_parser("split-raters", help="one raw dataset per ratersTr/<rater>/ folder, shared K-fold split")
    c.add_argument("-d", required=True, dest="dataset", help="source dataset (id or name) with ratersTr/")
    c.add_argument("--folds", type=int, default=5, help="K of the shared K-fold split (default 5)")
    c.add_argument("--first-id", type=int, default=None, help="first new dataset id (default: after the highest used)")
    c.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    c = csub.add_parser("train", help="plan/preprocess and train every fold of stage 1 (rater models) or stage 2 with nnU-Net",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  nnunet-ext consensus train -d 540 --stage 1 -c 3d_fullres -tr LSRTrainer -j 2\n"
                               "  # on Slurm: rater x fold array, build-stage2, stage-2 folds, chained with afterok\n"
                               "  nnunet-ext consensus train -d 540 --stage all -c 3d_fullres --launcher slurm "
                               "--gpus-per-task 1 --cpus-per-task 8 --mem 48G --time 1-00:00:00\n"
                               "  nnunet-ext jobs status $nnUNet_results/nnunet_ext_jobs/Dataset540_*/consensus_train_stageall")
    c.add_argument("-d", required=True, dest="dataset")
    c.add_argument("--stage", required=True, choices=("1", "2", "all"),
                   help="1: rater models, 2: consensus model, all: 1 + build-stage2 + 2")
    c.add_argument("-c", required=True, dest="configuration")
    c.add_argument("-tr", default="nnUNetTrainer", dest="trainer")
    c.add_argument("-p", default="nnUNetPlans", dest="plans")
    c.add_argument("-f", nargs="+", type=int, default=None, dest="folds",
                   help="default: every fold of the split; with --stage all the stage-2 folds (stage 1 always trains "
                        "every fold: stage 2's inputs are out of fold)")
    c.add_argument("-device", default="cuda")
    c.add_argument("-np", "--num-processes", type=int, default=2, help="planning/preprocessing processes")
    c.add_argument("--id", type=int, default=None, dest="stage2_id", help="--stage all: id of the consensus dataset")
    c.add_argument("-num_gpus", type=int, default=1, help="nnU-Net DDP: GPUs per fold training, inside one task "
                                                          "(with --gpus-per-task N on Slurm)")
    c.add_argument("--workdir", default=None, help="launcher scripts, markers and logs (default: "
                                                   "$nnUNet_results/nnunet_ext_jobs/<dataset>/consensus_train_stage<S>)")
    c.add_argument("--record-only", action="store_true",
                   help="only record the trained stage's settings in consensus.json (the launcher's last step)")
    add_launcher_arguments(c)
    c = csub.add_parser("prepare", help="launcher step before concurrent folds: plan/preprocess, split, one-off unpacking")
    c.add_argument("-d", required=True, dest="dataset")
    c.add_argument("--stage", type=int, required=True, choices=(1, 2))
    c.add_argument("-c", required=True, dest="configuration")
    c.add_argument("-p", default="nnUNetPlans", dest="plans")
    c.add_argument("--rater", nargs="+", default=None, dest="raters", help="stage 1: only these raters (default all)")
    c.add_argument("-np", "--num-processes", type=int, default=2)
    c = csub.add_parser("build-stage2", help="consensus dataset: images + out-of-fold probability of each rater model")
    c.add_argument("-d", required=True, dest="dataset")
    c.add_argument("-c", default=None, dest="configuration", help="stage-1 configuration (default: as trained)")
    c.add_argument("-tr", default=None, dest="trainer", help="stage-1 trainer (default: as trained)")
    c.add_argument("-p", default=None, dest="plans")
    c.add_argument("--id", type=int, default=None, dest="stage2_id", help="dataset id of the consensus dataset")
    c.add_argument("-device", default="cuda", help="for re-predicting held-out cases trained without --npz")
    c.add_argument("-np", "--num-processes", type=int, default=2)
    c = csub.add_parser("predict", help="rater models, then the consensus model, on new cases")
    c.add_argument("-d", required=True, dest="dataset")
    c.add_argument("-i", required=True, dest="input", help="nnU-Net input folder (<case>_0000.nii.gz, ...)")
    c.add_argument("-o", required=True, dest="output")
    c.add_argument("-chk", default="checkpoint_final.pth", dest="checkpoint")
    c.add_argument("-device", default="cuda")
    c.add_argument("--save_probabilities", action="store_true")
    c.add_argument("--keep-rater-predictions", action="store_true", help="also write <out>/raters/<rater>/ masks")
    c.add_argument("-np", "--num-processes", type=int, default=2)
    c.add_argument("--workdir", default=None, help="--launcher slurm: scripts, markers, logs (default <output>/.nnunet_ext_jobs)")
    add_launcher_arguments(c)  # -j N: rater models predicted at once (also inside the one Slurm job)
    c = csub.add_parser("evaluate", help="each rater model and the consensus model vs the consensus and each rater")
    c.add_argument("-d", required=True, dest="dataset")
    c.add_argument("--pred", required=True, help="output folder of `consensus predict --keep-rater-predictions`")
    c.add_argument("--ref", default=None, help="consensus references (default: the source's labelsTs)")
    c.add_argument("--raters", default=None, help="folder of <rater>/ references (default: the source's ratersTs)")
    c.add_argument("-o", "--output", default=None)

    p = sub.add_parser("compare", help="train/predict/evaluate trainers side by side: same split, budget and data; "
                                       "paired bootstrap CIs; Markdown + JSON + PNG report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext compare -d 501 -c 2d -tr ExtBaselineTrainer LSRTrainer LSRDiceTrainer "
                              "-f 0 1 2 3 4 -o cmp\n"
                              "  nnunet-ext compare -d 501 -c 2d -tr ExtBaselineTrainer LSRDiceTrainer -f 0 --epochs 20 "
                              "--iterations 20 -device cpu \\\n      --test-images imagesTs --test-labels labelsTs -o cmp\n"
                              "The first trainer is the reference arm. Re-running continues where a run stopped.")
    p.add_argument("-d", required=True, dest="dataset", help="dataset id or name")
    p.add_argument("-c", required=True, dest="configuration")
    p.add_argument("-tr", nargs="+", required=True, dest="trainers", help="trainers (arms); the first is the reference")
    p.add_argument("-f", nargs="+", type=_fold, default=[0], dest="folds", help="folds (default 0)")
    p.add_argument("-p", default="nnUNetPlans", dest="plans")
    p.add_argument("--test-images", default=None, help="held-out images (<case>_0000.nii.gz); default: validation folds")
    p.add_argument("--test-labels", default=None, help="their labels (<case>.nii.gz)")
    p.add_argument("-o", "--output", default=None, help="report folder (default compare_<dataset>_<configuration>)")
    p.add_argument("--epochs", type=int, default=None, help="training budget for every arm (NNUNET_EXT_NUM_EPOCHS)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (NNUNET_EXT_ITERATIONS)")
    p.add_argument("--val-iterations", type=int, default=None, help="NNUNET_EXT_VAL_ITERATIONS")
    p.add_argument("-device", "--device", default="cuda")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="nnU-Net pre/post-processing processes")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, help="sweep thresholds (default 0.01 ... 0.98)")
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26))
    p.add_argument("--bins", default="3-10,11-50,51+", help="lesion size bins in voxels; the first is 'small'")
    p.add_argument("--create-split", action="store_true",
                   help="write nnU-Net's default 5-fold split when splits_final.json is missing")
    p.add_argument("--cohort", default=None, help="cohort to predict SCIN arms in")
    add_launcher_arguments(p)

    p = sub.add_parser("jobs", help="state of a launcher work folder (local or Slurm); resume its unfinished tasks",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  nnunet-ext jobs status WORKDIR          # done / running / pending / failed (+ log)\n"
                              "  nnunet-ext jobs status WORKDIR --wait   # until nothing is pending or running\n"
                              "  nnunet-ext jobs resume WORKDIR          # re-run/re-submit only unfinished or failed tasks\n"
                              "See docs/cluster.md.")
    p.add_argument("action", choices=("status", "resume"))
    p.add_argument("workdir", help="the work folder a command printed (it holds jobs.json)")
    p.add_argument("--wait", action="store_true", help="status: poll until no task is pending or running")
    p.add_argument("--dry-run", action="store_true", help="resume: print what would be run/submitted")

    p = sub.add_parser("demo", help="nnU-Net's default trainer vs LSRDiceTrainer on the phantom, same CPU budget: "
                                    "comparison table, report and overlaid curves",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  nnunet-ext demo --workdir nnunet_ext_demo")
    p.add_argument("--workdir", default="nnunet_ext_demo",
                   help="nnUNet_raw/preprocessed/results go here unless those variables are set")
    p.add_argument("-d", "--dataset-id", type=int, default=501)
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-tr", "--trainers", nargs="+", default=["ExtBaselineTrainer", "LSRDiceTrainer"],
                   help="arms (default ExtBaselineTrainer = nnU-Net's default + budget variables, LSRDiceTrainer)")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--test-cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--difficulty", default="medium")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    return parser


def _print_launched(res: dict) -> None:
    """What a launcher run did: Slurm job ids (or the dry run), or the local stages."""
    if res["launcher"] == "slurm":
        ids = {k: v for k, v in res["stages"].items() if v}
        print(("submitted " + ", ".join(f"{k}={v}" for k, v in ids.items())) if ids else "nothing submitted")
    print(f"scripts, markers and logs: {res['workdir']} (nnunet-ext jobs status {res['workdir']})")


def _raw_folder(args) -> str:
    """``--raw`` or ``$nnUNet_raw``; exits with a message when neither is given."""
    import os

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise SystemExit("error: set nnUNet_raw or pass --raw")
    return raw


def run(argv: list[str] | None = None) -> int:
    import os

    from nnunet_ext.core import progress

    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"--quiet", "--verbose"} & set(argv)
    if len(flags) == 2:
        raise ValueError("--quiet and --verbose exclude each other; give one")
    saved = os.environ.get(progress.ENV)
    if flags:  # accepted anywhere on the command line, like --debug; the processes the command starts follow it
        argv = [a for a in argv if a not in flags]
        progress.set_verbosity(progress.QUIET if "--quiet" in flags else progress.VERBOSE)
    try:
        return _run(argv)
    finally:
        progress.end()
        if flags:
            if saved is None:
                os.environ.pop(progress.ENV, None)
            else:
                os.environ[progress.ENV] = saved


def _run(argv: list[str]) -> int:
    from nnunet_ext.core.platforms import check_command
    from nnunet_ext.core.validate import check_cli_args

    args = build_parser().parse_args(argv)
    from nnunet_ext.core.paths import resolve_nnunet_folders

    resolve_nnunet_folders()  # relative nnUNet_* folders: absolute from here on, for this command and its children
    check_command(args.command, getattr(args, "num_processes", None))
    check_cli_args(args)
    if args.command == "trainers-path":
        from nnunet_ext.core.paths import trainers_path

        print(trainers_path())
    elif args.command == "phantom":
        from nnunet_ext.data.phantom import PhantomConfig, parse_difficulty, write_phantom_dataset

        raw = _raw_folder(args)
        cfg = PhantomConfig(shape=args.shape, spacing=args.spacing, difficulty=parse_difficulty(args.difficulty),
                            raters=args.raters, soft=args.soft, timepoints=args.timepoints,
                            sites=tuple(args.site_spacing or ()), cohorts=tuple(args.cohort or ()), seed=args.seed)
        root = write_phantom_dataset(raw_root=raw, dataset_id=args.dataset_id, n_train=args.cases, cfg=cfg,
                                     n_test=args.test_cases, name=args.name, num_workers=args.num_processes,
                                     overwrite=args.overwrite)
        print(f"wrote {root}")
    elif args.command == "evaluate":
        from pathlib import Path

        from nnunet_ext.metrics.evaluate import evaluate_folders, format_table
        from nnunet_ext.metrics.lesions import parse_bins

        res = evaluate_folders(ref_dir=args.ref, pred_dir=args.pred, output=args.output, connectivity=args.connectivity,
                               min_overlap=args.min_overlap, bins=parse_bins(args.bins), allow_missing=args.allow_missing,
                               label=args.label, num_workers=args.num_processes, preset=args.preset,
                               prob_dir=args.prob, soft_ref_dir=args.soft_ref, detection=args.detection,
                               size_unit=args.size_unit, symmetric=args.symmetric, counting=args.counting,
                               isbi_rater_score=args.isbi_rater_score,
                               reliability_png=str(Path(args.output).with_suffix(".reliability.png")) if args.prob else None)
        print(format_table(res))
        print(f"wrote {args.output} and its .csv")
    elif args.command == "operating-points":
        from pathlib import Path

        from nnunet_ext.metrics.lesions import parse_bins
        from nnunet_ext.metrics.operating_points import sweep, write_sweep

        res = sweep(ref_dir=args.ref, prob_dir=args.prob, thresholds=args.thresholds, connectivity=args.connectivity,
                    min_overlap=args.min_overlap, bins=parse_bins(args.bins), class_index=args.class_index,
                    label=args.label, allow_missing=args.allow_missing, detection=args.detection,
                    size_unit=args.size_unit, symmetric=args.symmetric, counting=args.counting,
                    preset=args.preset)
        png = args.png or str(Path(args.output).with_suffix(".png"))
        write_sweep(res, args.output, png, args.title)
        bs, bd = res["best_segmentation"], res["best_detection"]
        print(f"best segmentation threshold {bs['threshold']:g}: voxel F1 {bs['voxel_f1']:.3f}, "
              f"lesion F1 {bs['lesion_f1']:.3f}")
        print(f"best detection threshold {bd['threshold']:g}: voxel F1 {bd['voxel_f1']:.3f}, "
              f"lesion F1 {bd['lesion_f1']:.3f}")
        if res["voxel_ap"] is not None:
            print(f"voxel average precision: {res['voxel_ap']:.3f} (all voxels pooled), per-scan mean "
                  f"{res['voxel_ap_per_scan']['mean']:.3f}")
        print(f"wrote {args.output} and {png}")
    elif args.command == "lesion-metrics":
        from nnunet_ext.metrics.lesions import parse_bins
        from nnunet_ext.metrics.validation import lesion_metrics_for_model

        out = lesion_metrics_for_model(dataset=args.dataset, configuration=args.configuration, trainer=args.trainer,
                                       plans=args.plans, folds=args.folds, preset=args.preset,
                                       connectivity=args.connectivity, detection=args.detection,
                                       bins=parse_bins(args.bins), size_unit=args.size_unit)
        for f, s in out.items():
            p = s["pooled"]
            f1 = "n/a" if p["lesion_f1"] is None else f"{p['lesion_f1']:.3f}"
            print(f"fold {f}: {s['n_cases']} cases, lesion F1 {f1}, TP {p['lesion_tp']} FN {p['lesion_fn']} "
                  f"FP {p['lesion_fp']}, Dice (pooled) {p['dice']:.3f} -> {s['path']}")
    elif args.command == "select":
        from nnunet_ext.metrics.lesions import parse_bins
        from nnunet_ext.workflows.selection import format_selection, select

        res = select(dataset=args.dataset, configurations=args.configurations, trainers=args.trainers,
                     plans=args.plans, folds=args.folds, metric=args.metric, thresholds=args.thresholds,
                     min_sizes_mm3=args.min_sizes_mm3, connectivity=args.connectivity, detection=args.detection,
                     bins=parse_bins(args.bins), ensembles=not args.no_ensembles,
                     write_contract=not args.no_contract, output=args.output)
        print(format_selection(res))
    elif args.command == "fuse":
        from nnunet_ext.data.fusion import fuse_folders

        cases = fuse_folders(method=args.method, rater_dirs=args.raters, output_dir=args.output,
                             image_dir=args.images, channel=args.channel, gamma=args.gamma, radius_mm=args.radius_mm,
                             overwrite=args.overwrite)
        print(f"wrote {len(cases)} fused masks to {args.output}")
    elif args.command == "preprocess-soft":
        from nnunet_ext.preprocessing.soft_preprocess import preprocess_raters, preprocess_soft_dataset

        results = preprocess_raters(dataset=args.dataset, configuration=args.configuration, plans=args.plans,
                                    overwrite=args.overwrite) \
            if args.raters else [preprocess_soft_dataset(dataset=args.dataset, configuration=args.configuration,
                                                         plans=args.plans, soft_dir=args.soft_dir,
                                                         overwrite=args.overwrite)]
        for res in results:
            print(f"{res['cases']} cases -> {res['folder']}: {res['soft_bytes']} bytes "
                  f"(hard labels: {res['hard_label_bytes']} bytes)")
    elif args.command == "plan-native":
        from nnunet_ext.preprocessing.native import plan_native

        f = plan_native(dataset=args.dataset, configurations=tuple(args.configurations), plans_name=args.plans_name,
                        n_proc=args.n_proc, verify=args.verify)
        print(f"native-resolution plans: {f}")
    elif args.command == "predict" and args.selection is not None:
        _refuse_beside_selection(args, save_probabilities="--save_probabilities")
        from nnunet_ext.inference.ensemble import predict_selection

        res = predict_selection(input_dir=args.input, output_dir=args.output, dataset=args.dataset,
                                selection=args.selection or None, checkpoint=args.checkpoint, device=args.device,
                                disable_tta=args.disable_tta, n_proc=args.num_processes,
                                min_lesion_mm3=args.min_lesion_mm3, threshold=args.threshold)
        print(f"{len(res['cases'])} cases -> {args.output} (selection {res['selection']}; threshold "
              f"{res['threshold']}, {res['threshold_source']}; min lesion {res['postprocessing']['min_lesion_mm3']} mm3)")
    elif args.command == "predict":
        from nnunet_ext.inference.predict import predict

        if args.configuration is None:
            raise ValueError("predict needs -c CONFIGURATION (or --selection)")
        args.trainer, args.plans = args.trainer or "nnUNetTrainer", args.plans or "nnUNetPlans"
        res = predict(input_dir=args.input, output_dir=args.output, dataset=args.dataset,
                      configuration=args.configuration, trainer=args.trainer, plans=args.plans, folds=args.folds,
                      checkpoint=args.checkpoint, device=args.device, disable_tta=args.disable_tta,
                      keep_probabilities=args.save_probabilities, n_proc=args.num_processes, cohort=args.cohort,
                      npp=args.npp, nps=args.nps, min_lesion_mm3=args.min_lesion_mm3, threshold=args.threshold)
        print(f"{len(res['cases'])} cases -> {args.output} (threshold: {res['threshold']}, {res['threshold_source']})")
    elif args.command == "pseudolabel":
        from nnunet_ext.workflows import pseudolabel as pl

        options = launcher_options(args)
        fan_out = options.launcher == "slurm" or options.jobs > 1 or options.dry_run
        if args.merge:
            prov = pl.merge_parts(output_dataset=args.output, num_parts=args.num_parts or 1)
            print(f"merged {args.num_parts or 1} part(s): {len(prov['kept'])} of {len(prov['cases'])} cases kept "
                  f"-> {args.output}")
        elif fan_out:
            if args.part_id is not None:
                raise ValueError("-part_id is chosen by the launcher; drop it (or drop --launcher/-j to run one shard)")
            from pathlib import Path

            pl.check_launch(args.dataset, args.configuration, args.input, args.trainer, args.plans, args.folds,
                            args.checkpoint, args.workdir)  # before any script is written, dry runs too
            argv = ["-d", str(args.dataset), "-c", args.configuration, "-tr", args.trainer, "-p", args.plans,
                    "-f", *map(str, args.folds), "-chk", args.checkpoint, "-i", str(Path(args.input).resolve()),
                    "-o", args.output, "--alpha", repr(args.alpha), "--vpt", repr(args.vpt), "--tst", repr(args.tst),
                    "-device", args.device] + (["--ignore-uncertain"] if args.ignore_uncertain else []) \
                + (["--no-labeled"] if args.no_labeled else []) \
                + (["--soft-rim", repr(args.soft_rim), "--soft-rim-mm", repr(args.soft_rim_mm)] if args.soft_rim else [])
            res = pl.launch(argv=argv, output_dataset=args.output, num_parts=args.num_parts or options.jobs,
                            launcher=options, workdir=args.workdir)
            _print_launched(res)
        else:
            prov = pl.pseudolabel(teacher_dataset=args.dataset, configuration=args.configuration,
                                  unlabeled_dir=args.input, output_dataset=args.output, trainer=args.trainer,
                                  plans=args.plans, folds=args.folds, checkpoint=args.checkpoint, alpha=args.alpha,
                                  vpt=args.vpt, tst=args.tst, ignore_uncertain=args.ignore_uncertain,
                                  num_parts=args.num_parts or 1, part_id=args.part_id or 0, device=args.device,
                                  include_labeled=not args.no_labeled, soft_rim_gamma=args.soft_rim,
                                  soft_rim_mm=args.soft_rim_mm)
            kept = sum(v["kept"] for v in prov["cases"].values())
            print(f"part {args.part_id or 0}: {kept} of {len(prov['cases'])} cases kept -> {args.output}")
    elif args.command == "submission":
        from nnunet_ext.workflows import submission

        if args.action == "build":
            if args.consensus is not None:
                given = [flag for dest, flag in (("configuration", "-c"), ("trainer", "-tr"), ("plans", "-p"),
                                                 ("folds", "-f"), ("cohort", "--cohort"), ("selection", "--selection"))
                         if getattr(args, dest) is not None]
                if given:
                    raise ValueError(f"--consensus chooses the models and folds; drop {' '.join(given)}")
                out = submission.build(out_dir=args.output, dataset=args.dataset, challenge=args.challenge,
                                       checkpoint=args.checkpoint, tag=args.tag, consensus=args.consensus)
            elif args.selection is not None:
                _refuse_beside_selection(args)
                out = submission.build(out_dir=args.output, dataset=args.dataset, challenge=args.challenge,
                                       checkpoint=args.checkpoint, tag=args.tag, selection=args.selection)
            else:
                if args.configuration is None:
                    raise ValueError("submission build needs -c CONFIGURATION (or --selection)")
                out = submission.build(out_dir=args.output, dataset=args.dataset, configuration=args.configuration,
                                       trainer=args.trainer or "nnUNetTrainer", plans=args.plans or "nnUNetPlans",
                                       folds=args.folds if args.folds is not None else [0, 1, 2, 3, 4],
                                       challenge=args.challenge, checkpoint=args.checkpoint, tag=args.tag,
                                       cohort=args.cohort)
            print(f"wrote {out} (see {out / 'README.md'})")
        else:
            res = submission.check_submission(sub_dir=args.folder, input_dir=args.input, work_dir=args.work,
                                              device=args.device, timeout=args.timeout)
            if not res.ok and res.log_tail and not res.rows[0]["ok"]:
                print("entrypoint output (last lines):\n" + res.log_tail)
            print(submission.format_rows(res.rows))
            if res.run_dir is not None:
                print(f"outputs and entrypoint.log in {res.run_dir}")
            print("PASS" if res.ok else "FAIL")
            return 0 if res.ok else 1
    elif args.command == "convert":
        from nnunet_ext.dataset_conversion import isbi2015, msseg2, msseg2016, wmh2017

        raw = _raw_folder(args)
        common = dict(source=args.input, raw_root=raw, dataset_id=args.dataset_id, overwrite=args.overwrite)
        if args.challenge == "wmh2017":
            root = wmh2017.convert(**common, name=args.name or "WMH2017", test_source=args.test_input)
        elif args.challenge == "isbi2015":
            root = isbi2015.convert(**common, name=args.name or "ISBI2015", label=args.label or "rater1")
        elif args.challenge == "msseg2":
            root = msseg2.convert(**common, name=args.name or "MSSEG2", test_source=args.test_input,
                                  subtraction=args.subtraction)
        else:
            root = msseg2016.convert(**common, name=args.name or "MSSEG2016")
        print(f"wrote {root}")
    elif args.command == "split":
        from nnunet_ext.workflows import splits

        if args.check:
            res = splits.check_existing(args.dataset, group_by=args.group_by, pattern=args.pattern,
                                        csv_file=args.csv_file)
            print(splits.format_split(res))
            if res["unused"]:
                print(f"note: {len(res['unused'])} training case(s) are in no fold, e.g. {res['unused'][0]}")
            print(f"{res['file']}: {len(res['splits'])} folds, no {args.group_by} on both sides of a fold, no "
                  f"pseudo-labelled case in val")
        else:
            res = splits.make_split(args.dataset, group_by=args.group_by, pattern=args.pattern,
                                    csv_file=args.csv_file, n_folds=5 if args.n_folds is None else args.n_folds,
                                    seed=12345 if args.seed is None else args.seed, overwrite=args.overwrite)
            print(splits.format_split(res))
            for f in res["written"]:
                print(f"wrote {f}")
            for f in res["unchanged"]:
                print(f"{f} already holds this split")
    elif args.command == "consensus":
        from nnunet_ext.workflows import consensus

        if args.consensus_command == "split-raters":
            state = consensus.split_raters(dataset=args.dataset, first_id=args.first_id, n_folds=args.folds,
                                           copy=args.copy)
            for r, v in state["raters"].items():
                print(f"{r}: dataset {v['id']} ({v['name']})")
            print(f"{state['n_folds']}-fold split shared by all rater datasets; mapping in "
                  f"{consensus.dataset_folder(args.dataset) / consensus.STATE}")
        elif args.consensus_command == "train":
            stage = args.stage if args.stage == "all" else int(args.stage)
            if args.record_only:
                if stage == "all":
                    raise ValueError("--record-only records one stage: --stage 1 or 2")
                consensus.record_training(dataset=args.dataset, stage=stage, configuration=args.configuration,
                                          trainer=args.trainer, plans=args.plans, folds=args.folds)
                print(f"recorded stage {stage} ({args.trainer}, {args.configuration}) in consensus.json")
            else:
                res = consensus.train(dataset=args.dataset, stage=stage, configuration=args.configuration,
                                      trainer=args.trainer, plans=args.plans, folds=args.folds, device=args.device,
                                      n_proc=args.num_processes, launcher=launcher_options(args), workdir=args.workdir,
                                      stage2_id=args.stage2_id, num_gpus=args.num_gpus)
                _print_launched(res)
        elif args.consensus_command == "prepare":
            names = consensus.prepare(dataset=args.dataset, stage=args.stage, configuration=args.configuration,
                                      plans=args.plans, raters=args.raters, n_proc=args.num_processes)
            print(f"prepared {', '.join(names)}")
        elif args.consensus_command == "build-stage2":
            out = consensus.build_stage2(args.dataset, args.configuration, args.trainer, args.plans, args.stage2_id,
                                         args.device, args.num_processes)
            print(f"wrote {out}")
        elif args.consensus_command == "predict":
            options = launcher_options(args)
            if options.launcher == "slurm" or options.dry_run:
                res = consensus.launch_predict(dataset=args.dataset, input_dir=args.input, output_dir=args.output,
                                               launcher=options, workdir=args.workdir, checkpoint=args.checkpoint,
                                               device=args.device, jobs=args.jobs, n_proc=args.num_processes,
                                               save_probabilities=args.save_probabilities,
                                               keep_rater_predictions=args.keep_rater_predictions)
                _print_launched(res)
            else:
                res = consensus.predict(dataset=args.dataset, input_dir=args.input, output_dir=args.output,
                                        device=args.device, jobs=args.jobs,
                                        keep_rater_predictions=args.keep_rater_predictions,
                                        save_probabilities=args.save_probabilities, n_proc=args.num_processes,
                                        checkpoint=args.checkpoint)
                print(f"{len(res['cases'])} case(s) -> {args.output}")
        else:
            res = consensus.evaluate(dataset=args.dataset, pred_dir=args.pred, output=args.output, ref_dir=args.ref,
                                     raters_dir=args.raters)
            print(consensus.format_table(res))
    elif args.command == "demo":
        from nnunet_ext.workflows.demo import DemoConfig, run_demo
        from nnunet_ext.data.phantom import parse_difficulty

        run_demo(DemoConfig(workdir=args.workdir, dataset_id=args.dataset_id, configuration=args.configuration,
                            trainers=tuple(args.trainers), fold=args.fold, epochs=args.epochs,
                            iterations=args.iterations, train_cases=args.cases, test_cases=args.test_cases,
                            shape=tuple(args.shape), difficulty=parse_difficulty(args.difficulty), device=args.device,
                            n_proc=args.num_processes))
    elif args.command == "jobs":
        from nnunet_ext.cluster import jobs

        if args.action == "status":
            st = jobs.wait(workdir=args.workdir) if args.wait else jobs.status(workdir=args.workdir)
            print(jobs.format_status(st))
            return 1 if jobs.failed_tasks(st) else 0
        res = jobs.resume(workdir=args.workdir, dry_run=args.dry_run)
        _print_launched(res)
    elif args.command == "compare":
        import shlex

        from nnunet_ext.workflows.compare import CompareConfig, compare
        from nnunet_ext.metrics.lesions import parse_bins

        try:
            options = launcher_options(args)
            compare(CompareConfig(
                dataset=args.dataset, configuration=args.configuration, trainers=args.trainers, folds=args.folds,
                plans=args.plans, test_images=args.test_images, test_labels=args.test_labels, output=args.output,
                epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
                device=args.device, n_proc=args.num_processes, n_bootstrap=args.bootstrap, seed=args.seed,
                thresholds=args.thresholds, connectivity=args.connectivity, bins=parse_bins(args.bins),
                create_split=args.create_split, cohort=args.cohort, launcher_options=options,
                command_line="nnunet-ext compare " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])[1:])))
        except NotImplementedError as e:
            raise ValueError(str(e)) from None
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors -> one line and exit status 2, Ctrl-C -> 130, ``--debug``
    (anywhere) keeps the traceback (see :mod:`nnunet_ext.core.errors`)."""
    from nnunet_ext.core.errors import run_cli

    rc = run_cli(run, list(sys.argv[1:] if argv is None else argv), console=argv is None)
    # The console command has finished: a late Ctrl-C must not turn success into a traceback. Not when called
    # from Python: ignored signals would be inherited by every process the caller starts later, and
    # nnU-Net's pools (terminate, then join) would then wait forever for their workers.
    if argv is None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    sys.exit(rc)


if __name__ == "__main__":
    main()
