from nnunet_ext.training.soft_trainers import SoftDiceTrainer, SoftSegTrainer  # noqa: F401
