#!/usr/bin/env bash
# The soft-label, SCIN and FiLM method studies through `nnunet-ext compare` (docs/benchmarks.md, "Method
# studies through compare"). The LSR study is benchmarks/compare_lsr_study.sh.
#
#   bash benchmarks/compare_studies.sh soft|scin|film|film_native [WORKDIR] [EPOCHS] [ITERATIONS]   # CPU, 2d (25 x 20)
#
# Each study builds its phantom with `nnunet-ext phantom` (48^3, the same seeds and training cases as the
# earlier studies in docs/benchmarks.md, more held-out cases: 30), plans it with nnU-Net, and compares its arms
# with the same fold-0 split (nnU-Net's default, seed 12345), the same budget and the same test set:
#   soft  Dataset540 (--soft, seed 1, 20 training cases): ExtBaselineTrainer SoftDiceTrainer SoftSegTrainer
#   scin  Dataset560 (--cohort all --cohort no_small, seed 0, 16 cases): ExtBaselineTrainer (naive pooling)
#         SCINTrainer, predicted once as cohort0_all and once as cohort1_no_small (two reports, one training)
#   film  Dataset570 (--site-spacing 1 1 1 --site-spacing 1 1 3, seed 1, 16 cases): ExtBaselineTrainer
#         ResolutionFiLMTrainer
#   film_native  Dataset571 (--site-spacing 1 1 1 --site-spacing 1.5 1.5 2, seed 3, 20 cases, 64 held-out
#         cases: TEST_CASES=64), planned at native resolution (`nnunet-ext plan-native -c 2d`, both arms on
#         nnUNetPlans_native: the second site's slices stay 1.5 x 1.5 mm), predicted without mirroring:
#         ExtBaselineTrainer ResolutionFiLMTrainer
# Every step is resumable: run the script again after an interruption.
set -euo pipefail
STUDY=${1:?usage: compare_studies.sh soft|scin|film|film_native [WORKDIR] [EPOCHS] [ITERATIONS]}
W=$(realpath -m "${2:-/tmp/compare_$STUDY}")
EPOCHS=${3:-25}
ITERS=${4:-20}
TEST=${TEST_CASES:-30}
source "$(dirname "$(realpath "$0")")/study_env.sh"
PLANS=nnUNetPlans; EXTRA=()
case "$STUDY" in
  soft) D=540; NAME=SoftPhantom; PH=(--cases 20 --seed 1 --soft); ARMS=(ExtBaselineTrainer SoftDiceTrainer SoftSegTrainer) ;;
  scin) D=560; NAME=CohortPhantom; PH=(--cases 16 --seed 0 --cohort all --cohort no_small); ARMS=(ExtBaselineTrainer SCINTrainer) ;;
  film) D=570; NAME=MixedSpacingPhantom; PH=(--cases 16 --seed 1 --site-spacing 1 1 1 --site-spacing 1 1 3)
        ARMS=(ExtBaselineTrainer ResolutionFiLMTrainer) ;;
  film_native) D=571; NAME=NativeSpacingPhantom; PH=(--cases 20 --seed 3 --site-spacing 1 1 1 --site-spacing 1.5 1.5 2)
        ARMS=(ExtBaselineTrainer ResolutionFiLMTrainer); PLANS=nnUNetPlans_native; EXTRA=(--disable_tta) ;;
  *) echo "compare_studies.sh: unknown study '$STUDY' (soft, scin, film or film_native)" >&2; exit 2 ;;
esac
DS=$nnUNet_raw/Dataset${D}_$NAME
[ -f "$DS/phantom.json" ] || "$BIN/nnunet-ext" phantom -d "$D" --name "$NAME" "${PH[@]}" --test-cases "$TEST" \
    --shape 48 48 48 --difficulty medium -np "$NPROC"
if [ "$PLANS" = nnUNetPlans_native ]; then
  [ -d "$nnUNet_preprocessed/Dataset${D}_$NAME/${PLANS}_2d" ] || \
      "$BIN/nnunet-ext" plan-native -d "$D" -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
else
  [ -d "$nnUNet_preprocessed/Dataset${D}_$NAME/nnUNetPlans_2d" ] || \
      "$BIN/nnUNetv2_plan_and_preprocess" -d "$D" -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
fi
if [ "$STUDY" = soft ] && [ ! -d "$nnUNet_preprocessed/Dataset${D}_$NAME/nnUNetPlans_2d/nnunet_ext_soft" ]; then
  "$BIN/nnunet-ext" preprocess-soft -d "$D" -c 2d
fi
run_compare() {  # $1 report suffix, rest: extra compare options
  local out=$W/report_${EPOCHS}x${ITERS}_${DEVICE}$1; shift
  "$BIN/nnunet-ext" compare -d "$D" -c 2d -p "$PLANS" -tr "${ARMS[@]}" -f 0 --epochs "$EPOCHS" --iterations "$ITERS" \
      --val-iterations 4 -device "$DEVICE" -np "$NPROC" --test-images "$DS/imagesTs" --test-labels "$DS/labelsTs" \
      --create-split -o "$out" "${EXTRA[@]}" "$@"
}
if [ "$STUDY" = scin ]; then
  run_compare _cohort0_all --cohort cohort0_all
  run_compare _cohort1_no_small --cohort cohort1_no_small
else
  run_compare ""
fi
