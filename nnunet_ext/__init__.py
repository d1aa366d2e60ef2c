"""nnunet-ext: MS / white-matter-lesion segmentation methods as an nnU-Net v2 plugin."""

__version__ = "0.1.0"
