"""Per-epoch training curves of trained nnU-Net models, read from nnU-Net's own checkpoint log
(``checkpoint_final.pth`` or ``checkpoint_latest.pth``: train loss, validation loss, validation pseudo-Dice
and its moving average), for the arms of a study (docs/results.md).

    nnUNet_results=/work/studies/lsr/res python benchmarks/training_curves.py -d Dataset520_MSPhantom -c 2d \\
        -tr ExtBaselineTrainer LSRTrainer BCETrainer -o benchmarks/results/curves_lsr_study.json \\
        --png docs/img/curves_lsr_study.png --title "LSR study, 40 x 20 iterations"

Models of other datasets (a cascade's rater and consensus models) with ``--model LABEL=DATASET/TRAINER[:FOLD]``:

    nnUNet_results=/work/studies/cascade/res python benchmarks/training_curves.py -d Dataset585_NewLesionRaters \
        -tr ExtBaselineTrainer --model "rater 1 fold 0=Dataset586_NewLesionRaters_rater1/ExtBaselineTrainer:0" ...

The JSON holds, per trainer, one list per quantity and ``plateau``: the gain of the moving-average
pseudo-Dice over the last quarter of the epochs (a model that has stopped improving gains about 0).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch


def read_log(model_dir: Path, fold: int = 0) -> dict:
    """nnU-Net's per-epoch log of one fold (the ``logging`` entry of its checkpoint)."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        p = model_dir / f"fold_{fold}" / name
        if p.is_file():
            ck = torch.load(p, map_location="cpu", weights_only=False)
            log = ck["logging"]
            n = len(log["train_losses"])
            return {"checkpoint": name, "epochs": n,
                    "train_loss": [float(v) for v in log["train_losses"]],
                    "val_loss": [float(v) for v in log["val_losses"]][:n],
                    "pseudo_dice": [float(v) for v in log["mean_fg_dice"]][:n],
                    "ema_pseudo_dice": [float(v) for v in log["ema_fg_dice"]][:n],
                    "lr": [float(v) for v in log["lrs"]][:n]}
    raise FileNotFoundError(f"no checkpoint in {model_dir / f'fold_{fold}'}")


def plateau_gain(ema: list[float]) -> float:
    """Gain of the moving-average pseudo-Dice over the last quarter of the epochs."""
    k = max(2, len(ema) // 4)
    return float(ema[-1] - ema[-k])


def plot(result: dict, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, r) in enumerate(result["trainers"].items()):
        x = np.arange(1, r["epochs"] + 1)
        axes[0].plot(x, r["train_loss"], f"C{i}", label=name)
        axes[1].plot(x, r["pseudo_dice"], f"C{i}", alpha=0.35)
        axes[1].plot(x, r["ema_pseudo_dice"], f"C{i}", label=name)
    axes[0].set(xlabel="epoch", ylabel="training loss (each trainer's own loss)", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="validation pseudo-Dice", ylim=(0, 1),
                title="validation pseudo-Dice (faint: per epoch; bold: EMA)")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", required=True, help="dataset folder name in nnUNet_results (Dataset<ID>_<NAME>)")
    ap.add_argument("-c", default="2d")
    ap.add_argument("-p", default="nnUNetPlans")
    ap.add_argument("-f", type=int, default=0)
    ap.add_argument("-tr", nargs="+", default=[])
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=DATASET/TRAINER[:FOLD]",
                    help="a model of another dataset (same configuration and plans), shown as LABEL")
    ap.add_argument("-o", required=True, help="output JSON")
    ap.add_argument("--png")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    results = Path(os.environ["nnUNet_results"]) / a.d
    out = {"dataset": a.d, "configuration": a.c, "fold": a.f, "trainers": {}}
    models = [(t, results / f"{t}__{a.p}__{a.c}", a.f) for t in a.tr]
    for m in a.model:
        label, _, spec = m.partition("=")
        spec, _, fold = spec.partition(":")
        ds, _, t = spec.partition("/")
        if not (label and ds and t):
            raise SystemExit(f"--model {m!r}: expected LABEL=DATASET/TRAINER[:FOLD]")
        models.append((label, Path(os.environ["nnUNet_results"]) / ds / f"{t}__{a.p}__{a.c}", int(fold or a.f)))
    if not models:
        raise SystemExit("give -tr TRAINER ... and/or --model LABEL=DATASET/TRAINER[:FOLD]")
    for t, mdir, fold in models:
        r = read_log(mdir, fold)
        r["plateau"] = plateau_gain(r["ema_pseudo_dice"])
        out["trainers"][t] = r
        print(f"{t}: {r['epochs']} epochs, final EMA pseudo-Dice {r['ema_pseudo_dice'][-1]:.3f}, "
              f"gain over the last quarter {r['plateau']:+.3f}")
    Path(a.o).write_text(json.dumps(out, indent=1))
    if a.png:
        plot(out, Path(a.png), a.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
