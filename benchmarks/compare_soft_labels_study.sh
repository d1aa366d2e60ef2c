#!/usr/bin/env bash
# The Bar-Ilan thesis' Table 2 through `nnunet-ext compare`: nnU-Net trained on the intersection of two raters'
# masks, on their union, and Kats et al.'s soft Dice on "intersection + soft union" labels (docs/results.md).
#
#   bash benchmarks/compare_soft_labels_study.sh [WORKDIR] [EPOCHS] [ITERATIONS]     # CPU, 2d (default 40 x 20)
#
# Phantom Dataset580 (48^3, medium difficulty, seed 4, 2 raters: each draws a lesion wider (probability 0.3)
# or, above 10 voxels, narrower (0.3), and misses 3-10-voxel lesions with probability 0.1 / 0.2), 20 training
# cases, 72 held-out cases (127 / 114 lesions of 3-10 voxels for rater 1 / 2, 155 in the phantom's truth).
#   labelsTr      the raters' intersection (nnunet-ext fuse --method intersection; the phantom's truth is kept
#                 in labelsTr_truth, unused in training)
#   softlabelsTr  intersection + soft union (fuse --method inter_soft_union_rim --gamma 0.3 --radius-mm 1,
#                 the thesis' Table 2 settings)
# Arms, same fold-0 split (nnU-Net's default, seed 12345) and budget:
#   ExtBaselineTrainer   "Intersection (baseline)": nnU-Net's default on labelsTr
#   RaterUnionTrainer    "Union (baseline)": nnU-Net's default on the raters' union (fused on loading)
#   SoftDiceTrainer      "Inter. + soft union labels": Kats et al.'s soft Dice alone on softlabelsTr
# The thesis scores each model against each rater (Table 2): one report per rater of the held-out cases
# (ratersTs/rater1, ratersTs/rater2), and one against the phantom's truth (labelsTs); predictions without
# mirroring, made once and reused by the later reports.
# Every step is resumable: run the script again after an interruption.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/soft_labels_compare}")
EPOCHS=${2:-40}
ITERS=${3:-20}
source "$(dirname "$(realpath "$0")")/study_env.sh"
D=580; NAME=RaterPairPhantom
DS=$nnUNet_raw/Dataset${D}_$NAME
PRE=$nnUNet_preprocessed/Dataset${D}_$NAME
[ -f "$DS/phantom.json" ] || "$BIN/nnunet-ext" phantom -d "$D" --name "$NAME" --cases 20 --test-cases 72 --raters 2 \
    --seed 4 --shape 48 48 48 --difficulty medium -np "$NPROC"
two_rater_labels 0.3  # labelsTr: the raters' intersection; softlabelsTr: + soft union 0.3
[ -d "$PRE/nnUNetPlans_2d" ] || "$BIN/nnUNetv2_plan_and_preprocess" -d "$D" -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
[ -d "$PRE/nnUNetPlans_2d/nnunet_ext_soft" ] || "$BIN/nnunet-ext" preprocess-soft -d "$D" -c 2d
[ -d "$PRE/nnUNetPlans_2d/nnunet_ext_raters" ] || "$BIN/nnunet-ext" preprocess-soft -d "$D" -c 2d --raters
read -r -a ARMS <<< "${ARMS:-ExtBaselineTrainer RaterUnionTrainer SoftDiceTrainer}"
run_compare rater1 "$DS/ratersTs/rater1" "${ARMS[@]}"
run_compare rater2 "$DS/ratersTs/rater2" "${ARMS[@]}"
run_compare truth "$DS/labelsTs" "${ARMS[@]}"
