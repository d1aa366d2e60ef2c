#!/usr/bin/env bash
# SoftSeg calibration study (Lemay 2022, ch. 5) through `nnunet-ext compare --soft-reference` (docs/results.md).
#
#   bash benchmarks/compare_softseg_calibration.sh [WORKDIR] [EPOCHS] [ITERATIONS] [TEST_CASES]  # CPU, defaults 30 x 20, 24
#   ARMS="ExtBaselineTrainer SoftSegTrainer" TAG=baseline bash benchmarks/compare_softseg_calibration.sh ...
#   # other arms; TAG names their report (report_<EPOCHS>x<ITERS>_<DEVICE>_<TEST_CASES>_<TAG>)
#
# Phantom Dataset542_RaterPhantom (48^3, 3 raters, seed 2): 20 training and 64 held-out cases.
# Hard labels (labelsTr, labelsTs) are the STAPLE of the raters, the soft labels the rater average
# (averageTr for training, averageTs as the calibration reference), put on nnU-Net's grid by preprocess-soft.
# Arms (default): ConvDiceTrainer (sigmoid Dice on the hard labels, the thesis' "Conv" baseline) and SoftSegTrainer
# (normalized ReLU + Adaptive Wing on the soft labels), both with SoftSeg's optimizer (Adam 5e-4, cosine).
# The first TEST_CASES held-out cases are evaluated (a folder of links). Every step is resumable.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/softseg_calibration}")
EPOCHS=${2:-30}
ITERS=${3:-20}
NTEST=${4:-24}
source "$(dirname "$(realpath "$0")")/study_env.sh"
DS=$nnUNet_raw/Dataset542_RaterPhantom
if [ ! -f "$DS/phantom.json" ]; then
    "$BIN/nnunet-ext" phantom -d 542 --name RaterPhantom --cases 20 --test-cases 64 --shape 48 48 48 --raters 3 \
        --seed 2 -np "$NPROC"
fi
for S in Tr Ts; do
    R=("$DS/raters$S"/rater*)
    [ -d "$DS/average$S" ] || "$BIN/nnunet-ext" fuse --method mean --raters "${R[@]}" -o "$DS/average$S"
    if [ ! -f "$DS/labels$S/.staple" ]; then
        "$BIN/nnunet-ext" fuse --method staple --raters "${R[@]}" -o "$DS/staple$S"
        cp "$DS/staple$S"/*.nii.gz "$DS/labels$S/" && touch "$DS/labels$S/.staple"
    fi
done
[ -d "$nnUNet_preprocessed/Dataset542_RaterPhantom/nnUNetPlans_2d" ] || \
    "$BIN/nnUNetv2_plan_and_preprocess" -d 542 -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
[ -d "$nnUNet_preprocessed/Dataset542_RaterPhantom/nnUNetPlans_2d/nnunet_ext_soft" ] || \
    "$BIN/nnunet-ext" preprocess-soft -d 542 -c 2d --soft-dir averageTr > "$W/soft.log" 2>&1
SUB=$W/test$NTEST
mkdir -p "$SUB/images" "$SUB/labels" "$SUB/average"
for f in $(ls "$DS/labelsTs" | grep '\.nii\.gz$' | head -n "$NTEST"); do
    c=${f%.nii.gz}
    ln -sf "$DS/imagesTs/${c}_0000.nii.gz" "$SUB/images/"
    ln -sf "$DS/labelsTs/$f" "$SUB/labels/"
    ln -sf "$DS/averageTs/$f" "$SUB/average/"
done
read -r -a ARMS <<< "${ARMS:-ConvDiceTrainer SoftSegTrainer}"
"$BIN/nnunet-ext" compare -d 542 -c 2d -tr "${ARMS[@]}" -f 0 \
    --epochs "$EPOCHS" --iterations "$ITERS" --val-iterations 4 -device "$DEVICE" -np "$NPROC" \
    --test-images "$SUB/images" --test-labels "$SUB/labels" --soft-reference "$SUB/average" --create-split \
    -o "$W/report_${EPOCHS}x${ITERS}_${DEVICE}_$NTEST${TAG:+_$TAG}"
