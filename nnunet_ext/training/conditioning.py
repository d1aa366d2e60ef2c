"""How a conditioned network gets each case's condition during nnU-Net's end-of-training validation."""
from __future__ import annotations


def conditioning_dataset_class(base_cls, on_load):
    """``base_cls`` (an nnU-Net dataset class) whose ``load_case(k)`` also calls ``on_load(k)``: nnU-Net's
    validation reads every case through ``trainer.dataset_class`` before predicting it."""

    class ConditioningDataset(base_cls):
        def load_case(self, identifier):
            out = super().load_case(identifier)
            on_load(identifier)
            return out

    ConditioningDataset.__name__ = f"Conditioning{base_cls.__name__}"
    return ConditioningDataset
