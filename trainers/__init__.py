"""Trainer shims for nnU-Net's ``nnUNet_extTrainer`` discovery (see ``nnunet-ext trainers-path``).

nnU-Net imports every module in this folder as a flat module when it looks up a trainer by name, so the
modules here only re-export classes that live in the installed ``nnunet_ext`` package (they then pickle
and import normally) and must stay cheap to import.
"""
