"""``nnunet-ext lesion-metrics`` (lesion-wise metrics of a model's validation folds) and ``nnunet-ext select``
(model or ensemble, threshold and minimum lesion size chosen on the validation folds)."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.cli.evaluate import PRESETS, add_rule_options

COMMANDS = ("lesion-metrics", "select")


def register(sub) -> None:
    p = options.verb(sub, "lesion-metrics", "lesion-wise metrics of a trained model's validation folds "
                                            "(fold_k/validation/lesion_summary.json beside nnU-Net's summary.json)",
                     "nnunet-ext lesion-metrics -d 501 -c 2d -tr ExtBaselineTrainer -f 0 1 2 3 4")
    options.add_dataset(p)
    options.add_configuration(p)
    options.add_trainer(p)
    options.add_plans(p)
    options.add_folds(p, help="folds whose validation predictions are scored")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="a challenge's or seed paper's lesion rule (as evaluate --preset; docs/evaluation.md)")
    add_rule_options(p)

    p = options.verb(sub, "select", "choose model/ensemble, probability threshold and minimum lesion size on "
                                    "validation folds by a lesion metric; store them in the model contract",
                     ["nnUNetv2_train 501 2d 0 -tr ExtBaselineTrainer --val --npz   # each fold",
                      "nnunet-ext select -d 501 -c 2d 3d_fullres -tr ExtBaselineTrainer -f 0 1 2 3 4 "
                      "--metric small_lesion_f1"])
    options.add_dataset(p)
    options.add_configuration(p, many=True, old="--configurations")
    options.add_trainer(p, many=True, default=["nnUNetTrainer"], help="trainer classes (default nnUNetTrainer)")
    options.add_plans(p)
    options.add_folds(p, help="validation folds to choose on (every model must have them)")
    p.add_argument("--metric", default="lesion_f1",
                   choices=("lesion_f1", "small_lesion_f1", "lesion_tpr", "lesion_ppv", "dice"),
                   help="what is maximised (default lesion_f1)")
    options.add_thresholds(p, "candidate probability thresholds in (0, 1) (default 0.05, 0.10, ..., 0.95)")
    p.add_argument("--min-sizes-mm3", type=float, nargs="+", default=None,
                   help="candidate minimum lesion sizes in mm3 (default 0 1 2 3 4 5 6 8 10 15 20)")
    p.add_argument("--no-ensembles", action="store_true", help="do not try pairs of models")
    p.add_argument("--no-contract", action="store_true", help="only write the selection JSON")
    options.add_output(p, "file", required=False,
                       help="the selection (default $nnUNet_results/<Dataset>/nnunet_ext_selection.json)")
    add_rule_options(p, detailed=False)


def _folds(args) -> list:
    """-f, else the folds trained for every model."""
    if args.folds is not None:
        return args.folds
    if args.command == "lesion-metrics":
        return options.trained_folds(args.dataset, args.configuration, args.trainer, args.plans)
    sets = [options.trained_folds(args.dataset, c, t, args.plans) for t in args.trainers for c in args.configurations]
    common = [f for f in sets[0] if all(f in s for s in sets)]
    if not common:
        raise ValueError(f"no fold is trained for every model ({', '.join(args.trainers)} x "
                         f"{', '.join(args.configurations)}); choose folds with -f")
    return common


def run(args) -> int:
    from nnunet_ext.metrics.lesions import parse_bins

    folds = _folds(args)
    if args.command == "select":
        from nnunet_ext.workflows.selection import format_selection, select

        res = select(dataset=args.dataset, configurations=args.configurations, trainers=args.trainers,
                     plans=args.plans, folds=folds, metric=args.metric, thresholds=args.thresholds,
                     min_sizes_mm3=args.min_sizes_mm3, connectivity=args.connectivity, detection=args.detection,
                     bins=parse_bins(args.bins), ensembles=not args.no_ensembles,
                     write_contract=not args.no_contract, output=args.output)
        print(format_selection(res))
        return 0
    from nnunet_ext.metrics.validation import lesion_metrics_for_model

    out = lesion_metrics_for_model(dataset=args.dataset, configuration=args.configuration, trainer=args.trainer,
                                   plans=args.plans, folds=folds, preset=args.preset, connectivity=args.connectivity,
                                   detection=args.detection, bins=parse_bins(args.bins), size_unit=args.size_unit)
    for f, s in out.items():
        p = s["pooled"]
        f1 = "n/a" if p["lesion_f1"] is None else f"{p['lesion_f1']:.3f}"
        print(f"fold {f}: {s['n_cases']} cases, lesion F1 {f1}, TP {p['lesion_tp']} FN {p['lesion_fn']} "
              f"FP {p['lesion_fp']}, Dice (pooled) {p['dice']:.3f} -> {s['path']}")
    return 0
