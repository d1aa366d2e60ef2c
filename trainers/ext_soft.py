from nnunet_ext.training.soft_trainers import RandomRaterTrainer, SoftDiceTrainer, SoftSegTrainer  # noqa: F401
