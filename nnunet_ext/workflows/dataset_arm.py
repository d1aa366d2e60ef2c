"""A trainer on another dataset as one arm of ``nnunet-ext compare``.

``-d 583 -tr SoftDiceTrainer 584:SoftDiceTrainer`` compares the trainer on the compared dataset (583) with the
same trainer on dataset 584 -- a student dataset written by ``nnunet-ext pseudolabel``, the same images with
other labels, a dataset with more cases -- on one held-out test set (``--test-images/--test-labels``).
The arm's dataset has the compared dataset's channels and file ending, is planned and preprocessed with the
same plans identifier and configuration, and has a ``splits_final.json`` holding the compared folds
(``--create-split`` writes nnU-Net's default split there too). Fold ``f`` of the arm is fold ``f`` of its own
dataset's split, trained with the comparison's budget and seed. Evaluation on the validation folds is refused:
the two datasets' validation cases are not the same cases.

The arm is written ``DATASET:TRAINER`` with ``DATASET`` an id (``584``) or a name (``Dataset584_Student``).
"""
from __future__ import annotations

from dataclasses import dataclass

SEP = ":"


def parse(arm: str) -> tuple[str, str] | None:
    """(dataset, trainer) of a ``DATASET:TRAINER`` arm; None for any other arm (``cascade:TRAINER`` included)."""
    head, sep, trainer = str(arm).partition(SEP)
    if not sep or not (head.isdigit() or head.startswith("Dataset")):
        return None
    if not trainer:
        raise ValueError(f"arm {arm!r}: name the trainer after the dataset, e.g. {head}:ExtBaselineTrainer")
    return head, trainer


def is_other_dataset(arm: str) -> bool:
    return parse(arm) is not None


@dataclass
class DatasetArm:
    """An arm on another dataset after the checks: that dataset's name, the trainer, its plans and split."""
    arm: str
    dataset: str  # DatasetXXX_Name
    trainer: str
    plans_json: dict
    split: list


def check_arm(arm: str, compared: str, test_set: bool) -> tuple[str, str]:
    """The arm's (dataset as given, trainer), refusing what cannot be compared: no test set, or the compared
    dataset itself."""
    dataset, trainer = parse(arm)
    if not test_set:
        raise NotImplementedError(f"compare's validation-fold evaluation with the arm {arm}: its dataset's validation "
                                  f"cases are not those of {compared}; give --test-images/--test-labels")
    return dataset, trainer


def check_same_files(arm: str, name: str, compared: str, channels: int, ending: str, arm_channels: int,
                     arm_ending: str) -> None:
    """The arm's dataset is another dataset with the compared dataset's channels and file ending."""
    if name == compared:
        raise ValueError(f"arm {arm}: {name} is the compared dataset; name the trainer alone")
    if (arm_channels, arm_ending) != (channels, ending):
        raise ValueError(f"arm {arm}: {name} has {arm_channels} channel(s) and files ending {arm_ending!r}, the "
                         f"compared dataset {compared} {channels} and {ending!r}: the test images fit one of them only")
