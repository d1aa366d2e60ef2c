"""Data sets: the synthetic phantom, multi-rater label fusion and the helpers that write nnU-Net raw
datasets (shared by the converters in nnunet_ext.dataset_conversion)."""
