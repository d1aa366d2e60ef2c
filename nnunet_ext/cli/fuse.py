"""``nnunet-ext fuse``: several raters' masks -> one (majority, STAPLE, soft labels, ...)."""
from __future__ import annotations

from nnunet_ext.cli import options
from nnunet_ext.core import validate

COMMANDS = ("fuse",)
METHODS = ("majority", "intersection", "union", "staple", "staple_soft", "mean", "inter_soft_union", "soft_rim",
           "inter_soft_union_rim")
RIM = ("soft_rim", "inter_soft_union_rim")


def register(sub) -> None:
    p = options.verb(sub, "fuse", "fuse several raters' masks (majority, STAPLE, soft labels, ...)", [
        "nnunet-ext fuse --method majority --raters r1 r2 r3 -o fused",
        "nnunet-ext fuse --method staple_soft --raters r1 r2 r3 -o soft",
        "nnunet-ext fuse --method soft_rim --raters r1 r2 r3 --images imagesTr -o rim"])
    p.add_argument("--method", required=True, choices=METHODS, help="how the raters' masks are fused "
                                                                    "(docs/soft_labels.md)")
    p.add_argument("--raters", nargs="+", required=True, help="one folder of <case>.nii.gz masks per rater")
    options.add_output(p, "folder", help="one fused <case>.nii.gz per case")
    p.add_argument("--gamma", type=float, default=0.5,
                   help="soft value of inter_soft_union / soft_rim / inter_soft_union_rim (default 0.5)")
    p.add_argument("--radius-mm", type=float, default=1.0, help="rim dilation radius in mm (default 1)")
    p.add_argument("--images", default=None,
                   help="soft_rim, inter_soft_union_rim: folder of <case>_<channel>.nii.gz images")
    p.add_argument("--channel", type=int, default=0, help="rim methods: image channel holding FLAIR (default 0)")
    options.add_overwrite(p)
    options.add_file_ending(p, "raters' masks, the --images and the fused masks")


def check(args) -> None:
    validate.probability(args.gamma, "--gamma")
    validate.finite(args.radius_mm, "--radius-mm", high=20.0, positive=True)
    validate.integer(args.channel, "--channel", 0, 9999)
    rim = args.method in RIM
    if rim and args.images is None:
        raise ValueError(f"--method {args.method} needs --images (the FLAIR its rim is gated by)")
    if not rim and args.images is not None:
        raise NotImplementedError(f"--images is only used by --method soft_rim / inter_soft_union_rim, "
                                  f"not by {args.method}")
    if not rim and args.channel != 0:
        raise NotImplementedError(f"--channel is only used by the rim methods, not by {args.method}")
    if not rim and args.radius_mm != 1.0:
        raise NotImplementedError(f"--radius-mm is only used by the rim methods, not by {args.method}")
    if args.method not in ("inter_soft_union",) + RIM and args.gamma != 0.5:
        raise NotImplementedError(f"--gamma is not used by --method {args.method}")
    from nnunet_ext.core.safety import check_output_not_input

    check_output_not_input(args.output, list(args.raters) + [args.images], what="-o/--output")


def run(args) -> int:
    from nnunet_ext.data.fusion import fuse_folders

    cases = fuse_folders(method=args.method, rater_dirs=args.raters, output_dir=args.output, image_dir=args.images,
                         channel=args.channel, gamma=args.gamma, radius_mm=args.radius_mm, overwrite=args.overwrite,
                         file_ending=args.file_ending)
    print(f"wrote {len(cases)} fused masks to {args.output}")
    return 0
