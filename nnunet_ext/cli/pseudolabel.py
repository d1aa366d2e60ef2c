"""``nnunet-ext pseudolabel``: a teacher model pseudo-labels unlabeled scans (flip-TTA entropy filter) into a
student dataset; shards run one by one, together (``-j``) or on Slurm."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.cluster.launcher import add_launcher_arguments, launcher_options

COMMANDS = ("pseudolabel",)


def register(sub) -> None:
    p = options.verb(sub, "pseudolabel", "teacher pseudo-labels unlabeled scans (flip-TTA entropy filter) -> student "
                                         "dataset", [
        "nnunet-ext pseudolabel -d 501 -c 3d_fullres -tr LSRTrainer -f 0 1 2 3 4 -i unlabeled/ "
        "--student Dataset601_MSStudent",
        "# cluster array job, part 3 of 8 (rerun after a kill continues):",
        "nnunet-ext pseudolabel ... -num_parts 8 -part_id 3"])
    options.add_dataset(p, help="teacher's dataset id or name")
    options.add_configuration(p, help="teacher's configuration")
    options.add_trainer(p, help="teacher's trainer class (default nnUNetTrainer)")
    options.add_plans(p)
    options.add_folds(p, help="teacher folds, ensembled")
    options.add_checkpoint(p)
    options.add_input(p, "folder of unlabeled images (<case>_<channel>.nii.gz)")
    student = p.add_argument("--student", default=None, metavar="DatasetXXX_Name",
                             help="the student dataset to write under nnUNet_raw (required)")
    options.deprecated(p, "-o", student)
    p.add_argument("--alpha", type=float, default=0.3, help="confidence omega = exp(-alpha H) (default 0.3)")
    p.add_argument("--vpt", type=float, default=0.3, help="voxel threshold on m = P_lesion * omega (default 0.3)")
    p.add_argument("--tst", type=float, default=100.0, help="drop a case when sum(m) < TST (default 100)")
    p.add_argument("--ignore-uncertain", action="store_true",
                   help="voxels with VPT <= m < 0.5 become nnU-Net's ignore label instead of background")
    p.add_argument("--no-labeled", action="store_true", help="do not copy the teacher's labeled cases")
    p.add_argument("-num_parts", type=int, default=None,
                   help="shards (default 1; with --launcher slurm or -j N the launcher runs them all, default N = -j)")
    p.add_argument("-part_id", type=int, default=None, help="run only this shard (default 0)")
    options.add_device(p)
    options.add_prediction_processes(p)
    p.add_argument("--soft-rim", type=float, default=None, metavar="GAMMA", dest="soft_rim",
                   help="write softlabelsTr for the kept pseudo-labels with an intensity-gated soft rim of GAMMA "
                        "(labeled cases keep the teacher dataset's softlabelsTr)")
    p.add_argument("--soft-rim-mm", type=float, default=1.0, help="rim width in mm (default 1)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the finished shards' provenance into provenance.json/dataset.json (the launcher's "
                        "last step)")
    p.add_argument("--workdir", default=None, help="launcher scripts, markers and logs (default: "
                                                   "$nnUNet_results/nnunet_ext_jobs/<student>/pseudolabel)")
    add_launcher_arguments(p)


def check(args) -> None:
    import re

    s = args.student
    if s is None:
        raise ValueError("pseudolabel needs --student DatasetXXX_Name (the student dataset to write)")
    if not re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", s) or s[7:10] == "000":
        raise ValueError(f"--student (-o): the student dataset must be named DatasetXXX_Name (XXX 001-999, Name of "
                         f"letters, digits, _ and -), got {s!r}")


def run(args) -> int:
    from nnunet_ext.nnunet_adapter import ModelRef
    from nnunet_ext.workflows import pseudolabel as pl

    launch = launcher_options(args)
    if args.merge:
        prov = pl.merge_parts(output_dataset=args.student, num_parts=args.num_parts or 1)
        print(f"merged {args.num_parts or 1} part(s): {len(prov['kept'])} of {len(prov['cases'])} cases kept "
              f"-> {args.student}")
        return 0
    teacher = ModelRef(str(args.dataset), args.configuration, args.trainer, args.plans,
                       checkpoint=args.checkpoint).with_folds(args.folds)  # -f, else every trained fold
    npp, nps = options.prediction_processes(args)
    settings = pl.PseudolabelOptions(alpha=args.alpha, vpt=args.vpt, tst=args.tst,
                                     ignore_uncertain=args.ignore_uncertain, include_labeled=not args.no_labeled,
                                     soft_rim_gamma=args.soft_rim, soft_rim_mm=args.soft_rim_mm, device=args.device,
                                     npp=npp, nps=nps)
    if launch.launcher == "slurm" or launch.jobs > 1 or launch.dry_run:
        from nnunet_ext.cli.common import print_launched

        if args.part_id is not None:
            raise ValueError("-part_id is chosen by the launcher; drop it (or drop --launcher/-j to run one shard)")
        pl.check_launch(teacher, args.input, args.workdir)  # before any script is written, dry runs too
        print_launched(pl.launch(teacher, args.input, args.student, settings, num_parts=args.num_parts or launch.jobs,
                                 launcher=launch, workdir=args.workdir))
        return 0
    prov = pl.pseudolabel(teacher, args.input, args.student, settings, num_parts=args.num_parts or 1,
                          part_id=args.part_id or 0)
    kept = sum(v["kept"] for v in prov["cases"].values())
    print(f"part {args.part_id or 0}: {kept} of {len(prov['cases'])} cases kept -> {args.student}")
    return 0
