"""Cost of the lesion metrics while training (nnunet_ext.training.lesion_monitor) per epoch.

Target: under 5 % of an epoch with the default ``NNUNET_EXT_LESION_EVERY=5``.

Steps (real nnU-Net, CPU):

1. a phantom (``nnunet-ext phantom``, 8 training cases of 48^3) planned for ``2d``
   (``nnUNetv2_plan_and_preprocess -c 2d -np 2``);
2. in this process, one ``ExtBaselineTrainer`` (built as nnU-Net builds it) trained for ``--epochs`` epochs of
   ``--iterations`` training and ``--iterations / 5`` validation iterations (nnU-Net's 250 : 50) with the
   lesion metrics every 2 epochs: odd epochs compute them, even epochs do not (same process, same trainer,
   alternating); the wall time of every whole epoch (``on_epoch_start`` to the end of ``on_epoch_end``:
   training, validation, logging, nnU-Net's checkpoints and ``progress.png``) is measured;
3. the parts of the cost measured directly: the seconds spent on lesion metrics in the validation steps
   (counted by the trainer), the extra ``progress.png`` panel (nnU-Net's plot with and without it, repeated),
   the ``checkpoint_best_lesion.pth`` writes;
4. the lesion metrics of one validation epoch of nnU-Net's common ``3d_fullres`` shape (50 batches of 2
   patches of 128^3 with 20 lesions each), to size the cost where the network runs on a GPU (the lesion
   metrics always run on the CPU).

Writes ``benchmarks/results/lesion_metrics_overhead.json``. Run:
``python benchmarks/bench_lesion_metrics.py [--work /tmp/bench_lesion] [--epochs 8] [--iterations 25]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET = 875
OUT = Path(__file__).resolve().parent / "results" / "lesion_metrics_overhead.json"


def sh(cmd, env, log: Path) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "a") as f:
        rc = subprocess.call([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{cmd[0]} failed (exit {rc}); see {log}")


def prepare(work: Path, dataset: int = DATASET) -> dict:
    """nnU-Net's folders under ``work``, with the phantom ``dataset`` made and planned for 2d unless there."""
    from nnunet_ext.core.paths import nnunet_command, nnunet_env

    env = nnunet_env(work, n_proc=2)
    env.update({"nnUNet_def_n_proc": "2"})
    log = work / "prepare.log"
    found = sorted(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset}_*"))
    raw = found[0] if found else Path(env["nnUNet_raw"]) / f"Dataset{dataset}_MSPhantom"
    if not (raw / "dataset.json").is_file():
        sh([nnunet_command("nnunet-ext"), "phantom", "-d", dataset, "--cases", 8, "--test-cases", 0,
            "--shape", 48, 48, 48, "--seed", 0, "--quiet"], env, log)
    if not (Path(env["nnUNet_preprocessed"]) / raw.name / "nnUNetPlans.json").is_file():
        sh([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", "2d", "-np", "2"], env, log)
    return env


def timed_trainer_class():
    from nnunet_ext.training.base import ExtBaselineTrainer
    from nnunet_ext.training.lesion_monitor import BEST_CHECKPOINT

    class TimedTrainer(ExtBaselineTrainer):
        """Records each epoch's wall time, lesion seconds and best-lesion checkpoint writes."""

        def on_epoch_start(self):
            self._t0 = time.perf_counter()
            super().on_epoch_start()

        def on_epoch_end(self):
            epoch, on = self.current_epoch, self.lesion_epoch()
            super().on_epoch_end()
            self.records.append({"epoch": epoch, "lesion_metrics": on, "wall_s": time.perf_counter() - self._t0,
                                 "lesion_validation_s": self.lesion_seconds if on else 0.0})

        def save_checkpoint(self, filename: str) -> None:
            t0 = time.perf_counter()
            super().save_checkpoint(filename)
            if os.path.basename(filename) == BEST_CHECKPOINT:
                self.lesion_checkpoint_s.append(time.perf_counter() - t0)

    return TimedTrainer


def panel_seconds(trainer, repeats: int = 5) -> dict:
    """nnU-Net's progress.png with and without the lesion panel (alternating, medians)."""
    plain, panel = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.logger.plot_progress_png(trainer.output_folder)
        t1 = time.perf_counter()
        with trainer.lesion_panel():
            trainer.logger.plot_progress_png(trainer.output_folder)
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        panel.append(t2 - t1)
    return {"nnunet_plot_s": statistics.median(plain), "with_lesion_panel_s": statistics.median(panel)}


def fullres_validation_epoch(batches: int = 50, lesions: int = 20, seed: int = 0) -> dict:
    """Seconds of the lesion metrics of one validation epoch of 2 x 128^3 patches (prediction = reference
    shifted by one voxel, one extra false positive per patch)."""
    from nnunet_ext.training.lesion_monitor import batch_counts

    rng = np.random.default_rng(seed)
    ref = np.zeros((2, 128, 128, 128), bool)
    for b in range(2):
        for _ in range(lesions):
            c = rng.integers(4, 124, 3)
            r = int(rng.integers(1, 4))
            ref[b, c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r] = True
    pred = np.roll(ref, 1, axis=1)
    pred[:, 2:5, 2:5, 2:5] = True
    times = []
    for _ in range(min(batches, 10)):
        t0 = time.perf_counter()
        batch_counts(ref, pred)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {"patch": [128, 128, 128], "batch_size": 2, "batches": batches, "lesions_per_patch": lesions,
            "seconds_per_batch": round(per_batch, 4), "seconds_per_validation_epoch": round(per_batch * batches, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_lesion_metrics"))
    ap.add_argument("--epochs", type=int, default=8, help="epochs (even; half with lesion metrics)")
    ap.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    ap.add_argument("-d", "--dataset", type=int, default=DATASET,
                    help=f"dataset id in --work (default {DATASET}: made and planned for 2d when missing)")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()
    if args.epochs < 2 or args.epochs % 2:
        sys.exit("--epochs must be an even number >= 2")
    args.work.mkdir(parents=True, exist_ok=True)
    env = prepare(args.work, args.dataset)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = env[k]
    os.environ["nnUNet_n_proc_DA"] = "2"
    os.environ.pop("nnUNet_wandb_enabled", None)
    val_iterations = max(1, args.iterations // 5)
    os.environ.update({"NNUNET_EXT_NUM_EPOCHS": str(args.epochs), "NNUNET_EXT_ITERATIONS": str(args.iterations),
                       "NNUNET_EXT_VAL_ITERATIONS": str(val_iterations), "NNUNET_EXT_LESION_EVERY": "2"})
    import torch

    from nnunet_ext.nnunet_adapter import build_trainer

    torch.set_num_threads(2)
    t = build_trainer(timed_trainer_class(), args.dataset, "2d", 0)
    t.records, t.lesion_checkpoint_s = [], []
    t.run_training()
    rec = t.records[1:]  # the first epoch also warms up (data loader start)
    on = [r["wall_s"] for r in rec if r["lesion_metrics"]]
    off = [r["wall_s"] for r in rec if not r["lesion_metrics"]]
    lesion = [r["lesion_validation_s"] for r in rec if r["lesion_metrics"]]
    panel = panel_seconds(t)
    extra_panel = panel["with_lesion_panel_s"] - panel["nnunet_plot_s"]
    ck = statistics.median(t.lesion_checkpoint_s) if t.lesion_checkpoint_s else 0.0
    epoch_off = statistics.median(off)
    # amortised cost per epoch with the default (every 5 epochs): lesion metrics + (at most) one checkpoint
    # write every 5 epochs, the panel every epoch
    every5 = (statistics.median(lesion) + ck) / 5 + max(0.0, extra_panel)
    full = fullres_validation_epoch()
    result = {
        "machine": f"{os.cpu_count()} CPUs (shared), torch threads 2, CPU training",
        "command": " ".join(["python benchmarks/bench_lesion_metrics.py", *sys.argv[1:]]),
        "configuration": "2d", "patch_size": list(t.configuration_manager.patch_size),
        "batch_size": t.configuration_manager.batch_size,
        "epochs": args.epochs, "iterations": args.iterations, "val_iterations": val_iterations,
        "per_epoch": t.records,
        "median_epoch_s_without": round(epoch_off, 3), "median_epoch_s_with": round(statistics.median(on), 3),
        "epoch_difference_s": round(statistics.median(on) - epoch_off, 3),
        "lesion_validation_s_median": round(statistics.median(lesion), 4),
        "lesion_validation_fraction_of_epoch": round(statistics.median(lesion) / epoch_off, 5),
        "progress_png": {k: round(v, 4) for k, v in panel.items()},
        "best_lesion_checkpoint_s_median": round(ck, 4),
        "best_lesion_checkpoint_writes": len(t.lesion_checkpoint_s),
        "amortised_every_5_s": round(every5, 4),
        "amortised_every_5_fraction_of_epoch": round(every5 / epoch_off, 5),
        "fullres_3d_validation_epoch": full,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.output)
    print(json.dumps({k: v for k, v in result.items() if k != "per_epoch"}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
