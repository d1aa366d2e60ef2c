"""Preprocessing beyond nnU-Net's own: soft and multi-rater label maps stored beside nnU-Net's
preprocessed data, and native-resolution planning."""
