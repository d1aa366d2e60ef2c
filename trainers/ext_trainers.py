from nnunet_ext.training.named import *  # noqa: F401,F403 - re-exports every named trainer for nnU-Net's lookup
