"""Optimizer parts: the optimizer and learning-rate schedule a paper trained its method with, where nnU-Net's
own (SGD, Nesterov momentum 0.99, initial learning rate 0.01, polynomial decay) does not train that method.

A composed trainer uses nnU-Net's optimizer unless it names an optimizer part::

    class MySoftSegTrainer(ComposedTrainer):
        loss_part = SoftSegAW()
        target_parts = (SoftTargets(),)
        optimizer_part = AdamCosine(lr=5e-4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import _LRScheduler


class CosineAnnealing(_LRScheduler):
    """``lr(e) = lr0 (1 + cos(pi e / T)) / 2`` at epoch ``e`` of ``T`` (PyTorch's ``CosineAnnealingLR`` with
    ``eta_min = 0`` in closed form), stepped as nnU-Net steps its schedulers: ``step(current_epoch)`` at the start
    of every epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, current_step: int | None = None):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.initial_lr, self.max_steps, self.ctr = initial_lr, max_steps, 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step: int | None = None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.initial_lr * (1 + math.cos(math.pi * min(current_step, self.max_steps) / self.max_steps)) / 2
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]


@dataclass(frozen=True)
class AdamCosine:
    """Adam (no weight decay) from ``lr``, cosine annealing to 0 over the training's epochs, stepped once per
    epoch: the training loop SoftSeg was published with (ivadomed's ``training.py``: ``optim.Adam(params,
    lr=initial_lr)`` and ``CosineAnnealingLR(optimizer, num_epochs)``; Lemay 2022, Table 4.1: initial learning
    rate 0.0005 for the brain MS lesion dataset)."""
    lr: float = 5e-4

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr!r}")

    def build(self, parameters, num_epochs: int):
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        return optimizer, CosineAnnealing(optimizer, self.lr, num_epochs)

    def __repr__(self) -> str:
        return f"AdamCosine(lr={self.lr:g})"
