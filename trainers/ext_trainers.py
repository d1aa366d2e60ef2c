from nnunet_ext.training.lsr_trainers import (  # noqa: F401
    BCETrainer, FocalTverskyTrainer, FocalTverskyTrainer_a085, LSRDiceTrainer, LSRTrainer, LSRTrainer_alpha1_beta4,
    LSRTrainer_alpha8_beta8)
