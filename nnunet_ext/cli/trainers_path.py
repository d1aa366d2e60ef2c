"""``nnunet-ext trainers-path``: the folder to put in ``nnUNet_extTrainer``."""
from __future__ import annotations

from nnunet_ext.cli import options

COMMANDS = ("trainers-path",)


def register(sub) -> None:
    options.verb(sub, "trainers-path", "print the folder to put in nnUNet_extTrainer",
                 "export nnUNet_extTrainer=$(nnunet-ext trainers-path)")


def run(args) -> int:
    from nnunet_ext.core.paths import trainers_path

    print(trainers_path())
    return 0
