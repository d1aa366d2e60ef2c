#!/usr/bin/env bash
# The MSSEG-2 consensus cascade against one nnU-Net on the consensus labels, through `nnunet-ext compare`
# (docs/results.md).
#
#   bash benchmarks/compare_consensus_study.sh [WORKDIR] [EPOCHS] [ITERATIONS]     # CPU, 2d (default 40 x 20)
#
# Phantom Dataset585 (48^3, medium difficulty, seed 6): two FLAIR time points, the label is the new lesions
# (4-12 in 75 % of cases, none in the rest); 2 raters, each drawing a lesion wider (probability 0.3) or, above
# 10 voxels, narrower (0.3), and missing 3-10-voxel lesions with probability 0.1 / 0.2; labelsTr is the
# consensus. 32 training cases, 56 held-out cases (313 new lesions, 133 of 3-10 voxels).
# Arms, the same 2-fold consensus split (nnunet-ext consensus split-raters), every network with nnU-Net's
# default loss (ExtBaselineTrainer) and the same budget:
#   ExtBaselineTrainer                 one nnU-Net on the consensus labels, fold 0
#   cascade:ExtBaselineTrainer         one nnU-Net per rater (both folds: the consensus model's inputs are
#                                      out of fold), then the consensus nnU-Net on the two time points plus the
#                                      rater models' lesion probabilities, fold 0
# The cascade trains 5 networks to the single model's 1. Test cases predicted without mirroring.
# Every step is resumable: run the script again after an interruption.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/consensus_compare}")
EPOCHS=${2:-40}
ITERS=${3:-20}
source "$(dirname "$(realpath "$0")")/study_env.sh"
export nnUNet_extTrainer=${nnUNet_extTrainer:-$("$BIN/nnunet-ext" trainers-path)}
D=585; NAME=NewLesionRaters
DS=$nnUNet_raw/Dataset${D}_$NAME
PRE=$nnUNet_preprocessed/Dataset${D}_$NAME
[ -f "$DS/phantom.json" ] || "$BIN/nnunet-ext" phantom -d "$D" --name "$NAME" --cases 32 --test-cases 56 \
    --shape 48 48 48 --timepoints 2 --new-lesions 4 12 --raters 2 --seed 6 -np "$NPROC"
[ -f "$DS/consensus.json" ] || "$BIN/nnunet-ext" consensus split-raters -d "$D" -nfolds 2
[ -d "$PRE/nnUNetPlans_2d" ] || "$BIN/nnUNetv2_plan_and_preprocess" -d "$D" -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
"$BIN/nnunet-ext" compare -d "$D" -c 2d -tr ExtBaselineTrainer cascade:ExtBaselineTrainer -f 0 \
    --epochs "$EPOCHS" --iterations "$ITERS" --val-iterations 4 -device "$DEVICE" -np "$NPROC" \
    --test-images "$DS/imagesTs" --test-labels "$DS/labelsTs" --disable_tta -o "$W/report_${EPOCHS}x${ITERS}_${DEVICE}"
