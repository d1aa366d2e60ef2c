"""Lesion metrics while training: lesion F1 and small-lesion TPR on nnU-Net's validation patches.

Every ``N`` epochs (``LesionMonitor.lesion_metrics_every``, default 5, or the environment variable
``NNUNET_EXT_LESION_EVERY``; 0 = off) the trainer counts lesions on the validation patches that nnU-Net
already predicts in ``validation_step`` for its pseudo Dice:

* prediction: the argmax of the full-resolution output, foreground = any label above 0 (as nnU-Net's pseudo
  Dice reads the output); reference: the patch's target, foreground = any label above 0; voxels of an ignore
  label are left out of both;
* lesions: connected components of each patch (26-connected; in-plane 8-connected for 2d patches), matched
  by :func:`nnunet_ext.metrics.lesions.lesion_counts` under the default :class:`LesionRule` (a reference
  lesion is detected when the prediction touches it; a predicted lesion touching no reference voxel is a
  false positive; WMH 2017 conventions);
* the counts are summed over the epoch's validation patches (and DDP ranks), then
  ``lesion_f1`` = 2 TP / (2 TP + FP + FN) in the ``"wmh"`` convention of
  :func:`nnunet_ext.metrics.lesions.lesion_rates`, and ``small_lesion_tpr`` = detected / all reference
  lesions of 3-10 voxels (NaN without any);
* ``lesion_f1_ema``: an exponential moving average of ``lesion_f1`` over the epochs where it is computed,
  with the time constant of nnU-Net's pseudo-Dice average (0.9 per epoch): a new value weighs
  ``1 - 0.9 ** N``.

Patches are random crops: lesions cut by the patch border count as lesions of the patch, and the numbers
differ from the whole-case ``validation/lesion_summary.json`` written after training. They are for following
a training and choosing its checkpoint, not for reporting.

The values go through nnU-Net's logger (``lesion_f1``, ``lesion_f1_ema``, ``small_lesion_tpr``: in the
checkpoints' logging, in Weights & Biases when ``nnUNet_wandb_enabled=1``, as NaN locally on epochs without
them), into the training log, and into an extra bottom panel of ``progress.png``. When the EMA lesion F1
improves, the model is saved as ``checkpoint_best_lesion.pth`` beside nnU-Net's ``checkpoint_best.pth``
(selectable with ``-chk checkpoint_best_lesion.pth`` in ``nnUNetv2_predict`` and ``nnunet-ext predict``).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from nnunet_ext.metrics.lesions import LesionRule, lesion_rates

EVERY_VARIABLE = "NNUNET_EXT_LESION_EVERY"
BEST_CHECKPOINT = "checkpoint_best_lesion.pth"
KEYS = ("lesion_f1", "lesion_f1_ema", "small_lesion_tpr")
COUNTS = ("patches", "ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp", "small_ref", "small_tp")
SMALL_LESIONS = (3, 10)  # voxels, inclusive
RULE = LesionRule(bins=(SMALL_LESIONS,))
NNUNET_EMA_DECAY = 0.9  # nnU-Net's pseudo-Dice moving average, per epoch
PANEL_COLORS = ("#9400d3", "#ff8c00")  # lesion F1, small-lesion TPR in progress.png


def lesion_every(default: int, environ=None) -> int:
    """Epochs between lesion metrics: ``NNUNET_EXT_LESION_EVERY`` when set, else ``default`` (0 = off)."""
    environ = os.environ if environ is None else environ
    text = environ.get(EVERY_VARIABLE, "")
    value = default if text.strip() == "" else text
    try:
        every = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{EVERY_VARIABLE} must be an integer >= 0 (0 = off), got {value!r}") from None
    if every < 0:
        raise ValueError(f"{EVERY_VARIABLE} must be an integer >= 0 (0 = off), got {every}")
    return every


def ema_weight(every: int) -> float:
    """Weight of a new lesion F1 in the moving average when it is computed every ``every`` epochs."""
    return 1.0 - NNUNET_EMA_DECAY ** max(1, every)


def patch_counts(ref: np.ndarray, pred: np.ndarray) -> dict:
    """Lesion counts of one patch (binary ``ref`` and ``pred`` of one shape, 2D or 3D), keys :data:`COUNTS`."""
    c = RULE.counts(np.asarray(ref, bool), np.asarray(pred, bool))
    small = next(iter(c["bins"].values()))
    return {"patches": 1, "ref_lesions": c["ref_lesions"], "pred_lesions": c["pred_lesions"],
            "lesion_tp": c["lesion_tp"], "lesion_fn": c["lesion_fn"], "lesion_fp": c["lesion_fp"],
            "small_ref": small["ref_lesions"], "small_tp": small["lesion_tp"]}


def batch_counts(ref: np.ndarray, pred: np.ndarray) -> dict:
    """Summed :func:`patch_counts` of a batch: ``ref`` and ``pred`` binary of shape ``(B, *patch)``."""
    if ref.shape != pred.shape:
        raise ValueError(f"ref and pred must have one shape, got {ref.shape} and {pred.shape}")
    return sum_counts(patch_counts(r, p) for r, p in zip(ref, pred))


def sum_counts(counts) -> dict:
    total = dict.fromkeys(COUNTS, 0)
    for c in counts:
        for k in COUNTS:
            total[k] += int(c[k])
    return total


def pooled_lesion_metrics(counts: dict) -> dict:
    """``lesion_f1`` (``"wmh"`` convention) and ``small_lesion_tpr`` (None without small reference lesions)
    of counts summed over patches."""
    tp, fn, fp, npred = counts["lesion_tp"], counts["lesion_fn"], counts["lesion_fp"], counts["pred_lesions"]
    f1 = lesion_rates(tp, tp + fn, npred - fp, npred, "wmh")["lesion_f1"]
    small = counts["small_tp"] / counts["small_ref"] if counts["small_ref"] else None
    return {"lesion_f1": f1, "small_lesion_tpr": small}


def _finite(values) -> list:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


class _PanelPyplot:
    """``matplotlib.pyplot`` with one more row in the next one-column ``subplots`` call, drawn by ``draw`` (the
    figure keeps its size, so that writing it costs no more pixels)."""

    def __init__(self, plt, draw):
        self._plt, self._draw = plt, draw

    def __getattr__(self, name):
        return getattr(self._plt, name)

    def subplots(self, nrows=1, ncols=1, **kwargs):
        if ncols != 1 or self._draw is None:
            return self._plt.subplots(nrows, ncols, **kwargs)
        fig, axes = self._plt.subplots(nrows + 1, 1, **kwargs)
        draw, self._draw = self._draw, None
        draw(axes[-1])
        return fig, (axes[0] if nrows == 1 else axes[:-1])


class LesionMonitor:
    """Trainer mixin (before nnU-Net's trainer in the bases): lesion metrics on the validation patches every
    :attr:`lesion_metrics_every` epochs, logged, plotted and used to keep ``checkpoint_best_lesion.pth``
    (module docstring)."""

    lesion_metrics_every: int = 5

    # ------------------------------------------------------------------------------------------ set-up
    def on_train_start(self):
        super().on_train_start()
        self.lesion_every = lesion_every(self.lesion_metrics_every)
        if self.lesion_every and self.label_manager.has_regions:
            self.lesion_every = 0
            self.print_to_log_file("lesion metrics while training: off (region-based training)")
        self.add_lesion_keys()
        if self.lesion_every:
            self.print_to_log_file(f"lesion metrics while training: every {self.lesion_every} epochs on the "
                                   f"validation patches ({EVERY_VARIABLE}; best EMA lesion F1 -> {BEST_CHECKPOINT})")

    def add_lesion_keys(self) -> None:
        """Give nnU-Net's local logger the lesion keys, NaN for the epochs already logged (a resumed run)."""
        local = getattr(self.logger, "local_logger", self.logger)
        log = local.my_fantastic_logging
        for k in KEYS:
            values = log.setdefault(k, [])
            values.extend([float("nan")] * (self.current_epoch - len(values)))

    def lesion_epoch(self, epoch: int | None = None) -> bool:
        every = getattr(self, "lesion_every", 0)
        epoch = self.current_epoch if epoch is None else epoch
        return bool(every) and ((epoch + 1) % every == 0 or epoch == self.num_epochs - 1)

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.lesion_counts, self.lesion_seconds = dict.fromkeys(COUNTS, 0), 0.0

    def validation_step(self, batch: dict) -> dict:
        if not self.lesion_epoch():
            return super().validation_step(batch)
        start = time.perf_counter()
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        target = target[:, 0].detach().cpu().numpy()  # before nnU-Net zeroes the ignore label in place
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        valid = None if ignore is None else target != ignore
        ref = target > 0 if valid is None else (target > 0) & valid
        grabbed = {}

        def grab(module, inputs, output):
            out = output[0] if isinstance(output, (list, tuple)) else output
            grabbed["pred"] = out.detach().argmax(1) > 0

        spent = time.perf_counter() - start
        handle = self.network.register_forward_hook(grab)
        try:
            result = super().validation_step(batch)
        finally:
            handle.remove()
        start = time.perf_counter()
        pred = grabbed["pred"].cpu().numpy()
        if valid is not None:
            pred &= valid
        c = batch_counts(ref, pred)
        self.lesion_counts = sum_counts((self.lesion_counts, c))
        self.lesion_seconds += spent + time.perf_counter() - start
        return result

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        if self.lesion_epoch():
            counts = self.lesion_counts
            if self.is_ddp:
                import torch.distributed as dist

                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, counts)
                counts = sum_counts(gathered)
            self.log_lesion_metrics(counts)
        else:
            self.log_lesion_metrics(None)

    def log_lesion_metrics(self, counts: dict | None) -> dict | None:
        """Log this epoch's lesion metrics from summed patch counts (None: not computed this epoch, NaN in
        the local log only). Returns the logged values."""
        epoch, local = self.current_epoch, getattr(self.logger, "local_logger", self.logger)
        if counts is None:
            for k in KEYS:
                local.log(k, float("nan"), epoch)
            return None
        m = pooled_lesion_metrics(counts)
        before = _finite(local.get_value("lesion_f1_ema", None)[:epoch])
        w = ema_weight(getattr(self, "lesion_every", 1))
        m["lesion_f1_ema"] = m["lesion_f1"] if not before else (1 - w) * before[-1] + w * m["lesion_f1"]
        for k in KEYS:
            if m[k] is None:
                local.log(k, float("nan"), epoch)
            else:
                self.logger.log(k, float(m[k]), epoch)  # nnU-Net forwards to W&B when enabled
        self.lesion_last = {**m, **counts}
        return m

    # ------------------------------------------------------------------------------------------ epoch end
    def lesion_improved(self, epoch: int) -> bool:
        """Whether the EMA lesion F1 of ``epoch`` is above every earlier one (read from the logger, so a
        resumed run continues the comparison)."""
        local = getattr(self.logger, "local_logger", self.logger)
        values = local.get_value("lesion_f1_ema", None)
        if len(values) <= epoch or not _finite([values[epoch]]):
            return False
        before = _finite(values[:epoch])
        return not before or values[epoch] > max(before)

    def lesion_log_line(self) -> str:
        m = self.lesion_last

        def r(v):
            return "n/a" if v is None else f"{v:.4f}"

        return (f"lesion F1 (validation patches) {r(m['lesion_f1'])}, EMA {r(m['lesion_f1_ema'])}; "
                f"TPR of {SMALL_LESIONS[0]}-{SMALL_LESIONS[1]}-voxel lesions {r(m['small_lesion_tpr'])} "
                f"({m['small_tp']} of {m['small_ref']}); {m['patches']} patches, {m['ref_lesions']} reference / "
                f"{m['pred_lesions']} predicted lesions; {self.lesion_seconds:.2f} s")

    def on_epoch_end(self):
        epoch = self.current_epoch
        if self.lesion_epoch(epoch):
            self.print_to_log_file(self.lesion_log_line())
        improved = self.lesion_improved(epoch)
        with self.lesion_panel():
            super().on_epoch_end()
        if improved:
            local = getattr(self.logger, "local_logger", self.logger)
            best = local.get_value("lesion_f1_ema", epoch)
            self.print_to_log_file(f"New best EMA lesion F1: {np.round(best, decimals=4)} -> {BEST_CHECKPOINT}")
            after, self.current_epoch = self.current_epoch, epoch  # the checkpoint records the epoch it is of
            try:
                self.save_checkpoint(os.path.join(self.output_folder, BEST_CHECKPOINT))
            finally:
                self.current_epoch = after

    @contextmanager
    def lesion_panel(self):
        """While active, nnU-Net's ``plot_progress_png`` draws one more bottom panel with the lesion metrics."""
        local = getattr(self.logger, "local_logger", self.logger)
        series = {k: local.get_value(k, None) for k in KEYS} if KEYS[0] in local.my_fantastic_logging else {}
        module = _logger_module(local)
        if module is None or not any(_finite(v) for v in series.values()):
            yield
            return

        def draw(ax):
            styles = {"lesion_f1": (PANEL_COLORS[0], "dotted", "lesion F1"),
                      "lesion_f1_ema": (PANEL_COLORS[0], "-", "lesion F1 (mov. avg.)"),
                      "small_lesion_tpr": (PANEL_COLORS[1], "-", f"TPR {SMALL_LESIONS[0]}-{SMALL_LESIONS[1]} voxels")}
            for k, (color, ls, label) in styles.items():
                pts = [(i, v) for i, v in enumerate(series[k]) if _finite([v])]
                if pts:
                    ax.plot(*zip(*pts), color=color, ls=ls, marker="o", label=label, linewidth=3)
            ax.set(ylim=(0, 1.02))
            ax.set_xlabel("epoch")
            ax.set_ylabel("lesion metrics (validation patches)")
            ax.legend(loc=(0, 1))

        plt = module.plt
        module.plt = _PanelPyplot(plt, draw)
        try:
            yield
        finally:
            module.plt = plt


def _logger_module(local):
    """The module of nnU-Net's local logger class when it plots through a module-level ``plt``."""
    import sys

    module = sys.modules.get(type(local).__module__)
    return module if module is not None and hasattr(module, "plt") else None
