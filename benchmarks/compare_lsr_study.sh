#!/usr/bin/env bash
# LSR operating-point study through `nnunet-ext compare` (docs/benchmarks.md, "LSR study through compare").
#
#   bash benchmarks/compare_lsr_study.sh [WORKDIR] [EPOCHS] [ITERATIONS]          # CPU, 2d (defaults 40 x 20)
#   DEVICE=cuda NPROC=8 bash benchmarks/compare_lsr_study.sh /scratch/lsr 250 50  # GPU run (not done yet)
#
# Phantom Dataset520 (48^3, medium difficulty, seed 0): the same 20 training cases and the same fold-0 split
# (nnU-Net's default 5-fold split, seed 12345) as the earlier LSR study, and 64 held-out test cases (the
# earlier 12 among them) so that the test set holds more than 100 lesions of 3-10 voxels.
# Arms (ARMS to choose; default: the thesis' Fig. 5.1 arms after nnU-Net's default): ExtBaselineTrainer
# (nnU-Net's default + budget variables, the reference arm), LSRTrainer (BCE+LSR), BCETrainer, WBCETrainer,
# FocalLossTrainer, BCEIWTrainer.
# Every step is resumable: run the script again after an interruption.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/lsr_compare}")
EPOCHS=${2:-40}
ITERS=${3:-20}
source "$(dirname "$(realpath "$0")")/study_env.sh"
DS=$nnUNet_raw/Dataset520_MSPhantom
[ -f "$DS/phantom.json" ] || "$BIN/nnunet-ext" phantom -d 520 --cases 20 --test-cases 64 --shape 48 48 48 --seed 0 \
    --difficulty medium -np "$NPROC"
[ -d "$nnUNet_preprocessed/Dataset520_MSPhantom/nnUNetPlans_2d" ] || \
    "$BIN/nnUNetv2_plan_and_preprocess" -d 520 -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
read -r -a ARMS <<< "${ARMS:-ExtBaselineTrainer LSRTrainer BCETrainer WBCETrainer FocalLossTrainer BCEIWTrainer}"
"$BIN/nnunet-ext" compare -d 520 -c 2d -tr "${ARMS[@]}" -f 0 \
    --epochs "$EPOCHS" --iterations "$ITERS" --val-iterations 4 -device "$DEVICE" -np "$NPROC" \
    --test-images "$DS/imagesTs" --test-labels "$DS/labelsTs" --create-split -o "$W/report_${EPOCHS}x${ITERS}_${DEVICE}"
