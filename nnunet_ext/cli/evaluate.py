"""``nnunet-ext evaluate`` (voxel- and lesion-wise metrics of predicted masks) and ``nnunet-ext
operating-points`` (TPR/FDR per lesion size over probability thresholds). Each writes one result JSON
(``-o FILE.json``) and its companions beside it under the same name."""
from __future__ import annotations

from pathlib import Path

from nnunet_ext.cli import options

COMMANDS = ("evaluate", "operating-points")
PRESETS = ("wmh2017", "msseg2", "isbi2015", "nichyporuk", "lsr", "focal_tversky")
RULE_PRESETS = ("wmh2017", "nichyporuk", "lsr", "focal_tversky")  # presets that are a lesion rule only


def add_rule_options(p, detailed: bool = True, detection: bool = True) -> None:
    """The lesion rule: connectivity, detection, size bins (and, ``detailed``, the unit of the bins)."""
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26),
                   help="lesion connectivity (default 26, as the WMH 2017 challenge)")
    if detection:
        p.add_argument("--detection", default=None,
                       help="when a reference lesion counts as detected, e.g. 'any' (default), 'voxels>=3 or "
                            "fraction>0.5' (LSR thesis), 'fraction>=0.6' (focal-Tversky thesis); overrides --min-overlap")
    p.add_argument("--bins", default="3-10,11-50,51+",
                   help="lesion size bins: inclusive 3-10,11-50,51+ (default) or half-open [0,10),[10,400),[400,inf); "
                        "the first is the small-lesion bin")
    if detailed:
        p.add_argument("--size-unit", choices=("voxels", "mm3"), default="voxels",
                       help="unit of --bins: lesion size in voxels (default) or volume in mm3")


def _add_eval_options(p) -> None:
    add_rule_options(p)
    p.add_argument("--min-overlap", type=float, default=0.0,
                   help="fraction of a reference lesion that must be covered to count as detected "
                        "(default 0: any voxel, as the WMH 2017 challenge)")
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


def register(sub) -> None:
    p = options.verb(sub, "evaluate", "voxel- and lesion-wise evaluation of predicted masks",
                     "nnunet-ext evaluate --ref labelsTs --pred predictions -o results.json")
    p.add_argument("--ref", required=True, help="folder of reference masks (.nii.gz)")
    p.add_argument("--pred", required=True, help="folder of predicted masks with the same file names")
    options.add_output(p, "file", help="the results; FILE.csv (and FILE.reliability.png with --prob) beside it")
    _add_eval_options(p)
    p.add_argument("--prob", default=None,
                   help="folder of probability maps (nnU-Net <case>.npz): adds soft Dice, Brier, ECE (10 bins on [0,1]) "
                        "and reliability PNGs")
    p.add_argument("--soft-ref", default=None, help="folder of rater-average soft references (adds the image-entropy "
                                                    "MAE; soft Dice, Brier and ECE then use it)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="score as a challenge or seed paper does (docs/evaluation.md): wmh2017 = the organisers' "
                        "evaluation.py (label 2 masked, their thresholding of predictions, HD95 on their 3x3 in-plane "
                        "border); msseg2 = current Anima lesion detection + MSSEG-2 summary; isbi2015 = Carass et al. "
                        "2017 score and components; nichyporuk (alias lsr) = the LSR thesis: 18-connected, a predicted "
                        "lesion is a TP when it covers >=3 or >50%% of a reference lesion's voxels, bins 1-2,3-10,"
                        "11-50,51+; focal_tversky = >=60%%, "
                        "bins [0,10),[10,400),[400,1000),[1000,inf); overrides --connectivity/--detection")
    p.add_argument("--isbi-rater-score", type=float, default=None,
                   help="isbi2015: raw inter-rater score that normalises to 90 (gives the normalized score)")
    options.add_processes(p, 1)
    options.add_file_ending(p, "reference and predicted masks (and NIfTI-like --prob maps, --soft-ref)")

    p = options.verb(sub, "operating-points", "TPR/FDR per lesion size over probability thresholds, with a PNG",
                     ["nnUNetv2_predict ... --save_probabilities -o pred",
                      "nnunet-ext operating-points --ref labelsTs --prob pred -o ops.json"])
    p.add_argument("--ref", required=True, help="folder of reference masks (.nii.gz)")
    p.add_argument("--prob", required=True, help="folder of nnU-Net probability files (<case>.npz) or NIfTI maps")
    options.add_output(p, "file", help="the sweep; the curves FILE.png beside it unless --png")
    p.add_argument("--png", default=None, help="the curves' PNG elsewhere than beside -o")
    options.add_thresholds(p, "probability thresholds in (0, 1) (default 0.01 ... 0.98)")
    p.add_argument("--class-index", type=int, default=1, help="probability channel of the lesion class (default 1)")
    p.add_argument("--title", default="", help="title of the PNG")
    _add_eval_options(p)
    p.add_argument("--preset", choices=RULE_PRESETS, default=None,
                   help="a seed paper's lesion rule (connectivity, detection, counting, bins; docs/evaluation.md); "
                        "overrides --connectivity/--detection/--bins/--counting")
    options.add_file_ending(p, "reference masks and of probability maps that are not nnU-Net's .npz")


def _written(args) -> tuple[list, list[Path]]:
    """(inputs, files written) of the command: -o and its companions."""
    out = Path(args.output)
    if args.command == "evaluate":
        extra = [out.with_suffix(".reliability.png")] if args.prob else []
        return [args.ref, args.pred, args.prob, args.soft_ref], [out, out.with_suffix(".csv")] + extra
    return [args.ref, args.prob], [out, Path(args.png) if args.png else out.with_suffix(".png")]


def check(args) -> None:
    if args.command == "evaluate" and args.soft_ref is not None and args.prob is None:
        raise NotImplementedError("--soft-ref without --prob: the soft reference is compared with predicted "
                                  "probabilities; add --prob FOLDER (or drop --soft-ref)")
    from nnunet_ext.core.safety import check_output_file, check_output_not_input

    inputs, written = _written(args)
    for w in written:  # a file path; never into an input folder, never onto an input
        what = "-o/--output" if w == written[0] else f"-o/--output's {w.name}"
        check_output_file(w, what)
        check_output_not_input(w, inputs, what=what)


def run(args) -> int:
    from nnunet_ext.metrics.lesions import parse_bins

    if args.command == "operating-points":
        return _operating_points(args, parse_bins(args.bins))
    from nnunet_ext.metrics.evaluate import evaluate_folders, format_table

    res = evaluate_folders(ref_dir=args.ref, pred_dir=args.pred, output=args.output, connectivity=args.connectivity,
                           min_overlap=args.min_overlap, bins=parse_bins(args.bins), allow_missing=args.allow_missing,
                           label=args.label, num_workers=args.num_processes, preset=args.preset,
                           prob_dir=args.prob, soft_ref_dir=args.soft_ref, detection=args.detection,
                           size_unit=args.size_unit, symmetric=args.symmetric, counting=args.counting,
                           isbi_rater_score=args.isbi_rater_score, file_ending=args.file_ending,
                           reliability_png=str(Path(args.output).with_suffix(".reliability.png")) if args.prob else None)
    print(format_table(res))
    print(f"wrote {args.output} and its .csv")
    return 0


def _operating_points(args, bins) -> int:
    from nnunet_ext.metrics.operating_points import sweep, write_sweep

    res = sweep(ref_dir=args.ref, prob_dir=args.prob, thresholds=args.thresholds, connectivity=args.connectivity,
                min_overlap=args.min_overlap, bins=bins, class_index=args.class_index, label=args.label,
                allow_missing=args.allow_missing, detection=args.detection, size_unit=args.size_unit,
                symmetric=args.symmetric, counting=args.counting, preset=args.preset, file_ending=args.file_ending)
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
    return 0
