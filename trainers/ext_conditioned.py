from nnunet_ext.training.conditioned_trainers import (  # noqa: F401
    ResolutionFiLMTrainer, SCINNormFineTuneTrainer, SCINTrainer, SCINTrainer_32cohorts)
