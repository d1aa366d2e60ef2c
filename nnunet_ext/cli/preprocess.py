"""``nnunet-ext preprocess-soft`` (soft labels onto nnU-Net's grid) and ``nnunet-ext plan-native`` (planning
without resampling)."""
from __future__ import annotations

from nnunet_ext.cli import options

COMMANDS = ("preprocess-soft", "plan-native")


def register(sub) -> None:
    p = options.verb(sub, "preprocess-soft", "put a dataset's soft labels on nnU-Net's preprocessed grid", [
        "nnUNetv2_plan_and_preprocess -d 502 -c 2d", "nnunet-ext preprocess-soft -d 502 -c 2d",
        "nnUNetv2_train 502 2d 0 -tr SoftDiceTrainer"])
    options.add_dataset(p)
    options.add_configuration(p)
    options.add_plans(p)
    p.add_argument("--soft-dir", default="softlabelsTr",
                   help="name of the raw dataset's folder with <case>.nii.gz soft labels (default softlabelsTr)")
    p.add_argument("--raters", action="store_true",
                   help="instead: every ratersTr/<rater>/ folder (for RandomRaterTrainer)")
    options.add_overwrite(p, "existing preprocessed soft labels")

    p = options.verb(sub, "plan-native", "plan and preprocess at native resolution (no resampling; for FiLM trainers)", [
        "nnunet-ext plan-native -d 504 -c 3d_fullres -np 2",
        "nnUNetv2_train 504 3d_fullres 0 -tr LSRFiLMTrainer -p nnUNetPlans_native",
        "nnunet-ext predict -i imagesTs -o pred -d 504 -c 3d_fullres -tr LSRFiLMTrainer -p nnUNetPlans_native"])
    options.add_dataset(p)
    options.add_configuration(p, many=True, required=False, default=["3d_fullres"],
                              help="configurations to plan and preprocess (default 3d_fullres)")
    options.add_plans(p, "nnUNetPlans_native", old="--plans-name")
    options.add_processes(p, 2, "preprocessing processes")
    p.add_argument("--verify_dataset_integrity", action="store_true", dest="verify",
                   help="run nnU-Net's dataset integrity check first")


def check(args) -> None:
    if args.command != "preprocess-soft":
        return
    if args.raters and args.soft_dir != "softlabelsTr":
        raise NotImplementedError("--soft-dir and --raters exclude each other (--raters reads ratersTr/<rater>/)")
    if ".." in args.soft_dir.split("/") or args.soft_dir.startswith("/"):
        raise ValueError(f"--soft-dir: the name of a folder of the raw dataset (e.g. averageTr), got {args.soft_dir!r}")


def run(args) -> int:
    if args.command == "plan-native":
        from nnunet_ext.preprocessing.native import plan_native

        f = plan_native(dataset=args.dataset, configurations=tuple(args.configurations), plans_name=args.plans,
                        n_proc=args.num_processes, verify=args.verify)
        print(f"native-resolution plans: {f}")
        return 0
    from nnunet_ext.preprocessing.soft_preprocess import preprocess_raters, preprocess_soft_dataset

    if args.raters:
        results = preprocess_raters(dataset=args.dataset, configuration=args.configuration, plans=args.plans,
                                    overwrite=args.overwrite)
    else:
        results = [preprocess_soft_dataset(dataset=args.dataset, configuration=args.configuration, plans=args.plans,
                                           soft_dir=args.soft_dir, overwrite=args.overwrite)]
    for res in results:
        print(f"{res['cases']} cases -> {res['folder']}: {res['soft_bytes']} bytes "
              f"(hard labels: {res['hard_label_bytes']} bytes)")
    return 0
