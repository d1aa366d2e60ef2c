from nnunet_ext.training.base import ExtBaselineTrainer  # noqa: F401
