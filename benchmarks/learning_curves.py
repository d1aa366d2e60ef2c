"""Per-iteration learning curves of nnU-Net trainers: loss, lesion probability on lesion and background voxels,
output-head bias and the gradient norm of each loss term (docs/results.md, "Do the trainers learn?").

Each trainer is built exactly as ``nnUNetv2_train`` builds it and trained with nnU-Net's own ``train_step``
on nnU-Net's data loader; the measurements wrap its loss (they change nothing it computes):

* ``loss``: the training loss of the iteration (with nnU-Net's deep-supervision weights);
* ``p_lesion`` / ``p_background``: mean soft lesion output (the loss part's activation: softmax or SoftSeg's
  normalized ReLU) over the reference lesion / background voxels of the batch, at full resolution;
* ``lesion_recall_05`` / ``background_fpr_05``: fraction of those voxels whose output is at least 0.5;
* ``bias``: lesion-minus-background bias of the full-resolution output head;
* ``grad_<term>``: norm of the gradient of each loss term w.r.t. the full-resolution logits (terms: ``dice``
  and ``ce`` of nnU-Net's Dice + CE and of Dice + LSR; the loss itself otherwise).

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=/tmp/lc_results \\
    .venv/bin/python benchmarks/learning_curves.py -d 520 -c 2d -tr ExtBaselineTrainer BCETrainer_zeroBias \\
        BCETrainer --iterations 300 -o benchmarks/results/learning_curves_lsr.json --png docs/img/learning_curves_lsr.png

Writes the JSON (one list per trainer and quantity) and, with ``--png``, a figure of the curves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _soft(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """The output the loss sees: softmax, or SoftSeg's normalized ReLU per patch (``normalized_relu``) or over
    the batch (``normalized_relu_case``, trained with the batch maximum)."""
    if activation in ("normalized_relu", "normalized_relu_case"):
        from nnunet_ext.networks.activations import normalized_relu

        over = "sample" if activation == "normalized_relu" else "batch"
        return normalized_relu(logits[:, 1].float() - logits[:, 0].float(), max_over=over)
    return torch.softmax(logits.float(), 1)[:, 1]


def _terms(loss, top: torch.Tensor, tgt: torch.Tensor) -> dict:
    """The named terms of a loss at full resolution (the loss itself when it has no named terms)."""
    inner = getattr(loss, "loss", loss)  # inside nnU-Net's DeepSupervisionWrapper
    if hasattr(inner, "dc") and hasattr(inner, "ce"):  # nnU-Net's DC_and_CE_loss
        return {"dice": inner.dc(top, tgt[:, :1]), "ce": inner.ce(top, tgt[:, :1])}
    if hasattr(inner, "dice") and hasattr(inner, "lsr"):  # Dice + LSR
        return {"dice": inner.dice(top, tgt[:, :1].long()), "ce": inner.lsr(top, tgt)}
    return {"loss": inner(top, tgt)}


class Recorder(torch.nn.Module):
    """Wraps a trainer's (deep-supervised) loss; records the measurements of each call."""

    def __init__(self, loss, activation: str, trainer):
        super().__init__()
        self.loss, self.activation, self.trainer = loss, activation, trainer
        self.rows: list[dict] = []

    def forward(self, output, target):
        value = self.loss(output, target)
        top = output[0] if isinstance(output, (list, tuple)) else output
        tgt = target[0] if isinstance(target, (list, tuple)) else target
        with torch.no_grad():
            seg = tgt[:, 0]
            p = _soft(top.detach(), self.activation)
            les, bg = seg == 1, seg == 0
            row = {"loss": float(value.detach()),
                   "p_lesion": float(p[les].mean()) if les.any() else None,
                   "p_background": float(p[bg].mean()) if bg.any() else None,
                   "lesion_recall_05": float((p[les] >= 0.5).float().mean()) if les.any() else None,
                   "background_fpr_05": float((p[bg] >= 0.5).float().mean()) if bg.any() else None}
        for name, term in _terms(self.loss, top, tgt).items():
            g, = torch.autograd.grad(term, top, retain_graph=True)
            row[f"grad_{name}"] = float(g.norm())
        from nnunet_ext.training.prior import output_heads

        heads = output_heads(self.trainer.network)
        if heads:
            b = heads[-1].bias.detach()
            row["bias"] = float(b[1] - b[0]) if len(b) > 1 else float(b[0])
        self.rows.append(row)
        return value


def curves(dataset: str, configuration: str, trainer_name: str, iterations: int, fold: int = 0,
           plans: str = "nnUNetPlans", seed: int = 0) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = iterations
    trainer.num_epochs = 1
    trainer.on_train_start()
    activation = getattr(getattr(trainer, "loss_part", None), "activation", "softmax")
    rec = Recorder(trainer.loss, activation, trainer)
    trainer.loss = rec
    trainer.on_epoch_start()
    start = time.perf_counter()
    for i in range(iterations):
        trainer.train_step(next(trainer.dataloader_train))
        if (i + 1) % 50 == 0:
            print(f"{trainer_name}: {i + 1}/{iterations} iterations, loss {rec.rows[-1]['loss']:.4f}, "
                  f"p lesion {rec.rows[-1]['p_lesion']}, p background {rec.rows[-1]['p_background']:.5f}", flush=True)
    seconds = time.perf_counter() - start
    try:
        trainer.dataloader_train._finish() if hasattr(trainer.dataloader_train, "_finish") else None
        trainer.dataloader_val._finish() if hasattr(trainer.dataloader_val, "_finish") else None
    except Exception:  # noqa: BLE001 - measurement script: worker shutdown is best effort
        pass
    keys = sorted({k for r in rec.rows for k in r})
    return {"trainer": trainer_name, "iterations": iterations, "seconds": round(seconds, 1),
            "output_bias": getattr(trainer, "output_bias", None),
            **{k: [r.get(k) for r in rec.rows] for k in keys}}


def smooth(v, k: int = 20):
    a = np.array([np.nan if x is None else x for x in v], float)
    out = np.full_like(a, np.nan)
    for i in range(len(a)):
        w = a[max(0, i - k + 1): i + 1]
        w = w[~np.isnan(w)]
        out[i] = w.mean() if len(w) else np.nan
    return out


def plot(result: dict, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, r) in enumerate(result["trainers"].items()):
        c = f"C{i}"
        x = np.arange(1, len(r["loss"]) + 1)
        axes[0].plot(x, smooth(r["loss"]), c, label=name)
        axes[1].plot(x, smooth(r["p_lesion"]), c, label=f"{name}: lesion voxels")
        axes[1].plot(x, smooth(r["p_background"]), c, ls=":", label=f"{name}: background")
        if "bias" in r:
            axes[2].plot(x, r["bias"], c, label=name)
    axes[0].set(xlabel="iteration", ylabel="training loss (20-iteration mean)", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="mean lesion output", yscale="log")
    axes[2].set(xlabel="iteration", ylabel="output bias (lesion - background)")
    for a in axes:
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", required=True, help="dataset id or name (planned and preprocessed)")
    ap.add_argument("-c", default="2d", help="configuration (default 2d)")
    ap.add_argument("-tr", nargs="+", required=True, help="trainers to measure")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    ap.add_argument("-f", type=int, default=0, help="fold (default 0)")
    ap.add_argument("--iterations", type=int, default=300, help="training iterations per trainer (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", required=True, help="output JSON (merged with an existing one)")
    ap.add_argument("--png", help="figure of the curves")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    out = Path(a.o)
    result = json.loads(out.read_text()) if out.is_file() else {"trainers": {}}
    result.update({"dataset": a.d, "configuration": a.c, "fold": a.f, "torch_threads": torch.get_num_threads(),
                   "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))})
    for t in a.tr:
        result["trainers"][t] = curves(a.d, a.c, t, a.iterations, a.f, a.p, a.seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result))
    if a.png:
        plot(result, Path(a.png), a.title)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    sys.exit(main())
