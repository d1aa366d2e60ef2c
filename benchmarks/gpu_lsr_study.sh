#!/usr/bin/env bash
# The LSR study of benchmarks/compare_lsr_study.sh on one GPU, sized for a 15-minute device lease
# (docs/benchmarks.md, "LSR study through compare"): the same phantom (Dataset520: 20 training cases, 64
# held-out), the same fold-0 split and the same four arms, trained side by side on the one GPU (4 tasks at
# once, 4 CPU cores each for nnU-Net's data augmentation), EPOCHS x ITERATIONS per arm (default 80 x 50 =
# 4000 iterations; the CPU study's 500 did not let plain BCE converge). A hard limit (LIMIT_S, default 780 s)
# stops the compare run and leaves what is finished (re-run the same command to continue: it resumes).
#
#   bash benchmarks/gpu_lsr_study.sh [WORKDIR] [EPOCHS] [ITERATIONS]
#
# Not yet run: no GPU was lent to the sessions that wrote it. Estimated from nnU-Net's 2d network on 48^3
# patches (tens of ms per GPU step; four runs share the GPU and augmentation is CPU-bound): about 8-10 min of
# training, 1-2 min of planning and prediction. If the limit stops it, lower EPOCHS.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/lsr_gpu}")
EPOCHS=${2:-80}
ITERS=${3:-50}
LIMIT_S=${LIMIT_S:-780}
BIN=$(dirname "$(realpath "$0")")/../.venv/bin
[ -x "$BIN/nnunet-ext" ] || BIN=$(dirname "$(command -v nnunet-ext)")
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res
export nnUNet_def_n_proc=4 nnUNet_n_proc_DA=4
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
start=$(date +%s)
DS=$nnUNet_raw/Dataset520_MSPhantom
[ -f "$DS/phantom.json" ] || "$BIN/nnunet-ext" phantom -d 520 --cases 20 --test-cases 64 --shape 48 48 48 --seed 0 \
    --difficulty medium -np 8
[ -d "$nnUNet_preprocessed/Dataset520_MSPhantom/nnUNetPlans_2d" ] || \
    "$BIN/nnUNetv2_plan_and_preprocess" -d 520 -c 2d -np 8 > "$W/plan.log" 2>&1
left=$(( LIMIT_S - ($(date +%s) - start) ))
timeout --signal=INT --kill-after=30 "$left" "$BIN/nnunet-ext" compare -d 520 -c 2d \
    -tr ExtBaselineTrainer BCETrainer LSRTrainer LSRDiceTrainer -f 0 \
    --epochs "$EPOCHS" --iterations "$ITERS" --val-iterations 4 -device cuda -np 4 -j 4 --cpus-per-task 4 \
    --test-images "$DS/imagesTs" --test-labels "$DS/labelsTs" --create-split -o "$W/report_${EPOCHS}x${ITERS}_cuda"
echo "gpu_lsr_study: finished in $(( $(date +%s) - start )) s; report in $W/report_${EPOCHS}x${ITERS}_cuda"
