#!/usr/bin/env bash
# The Bar-Ilan thesis' semi-supervised step (section 3.3, Tables 5-6) through `nnunet-ext compare`: does a
# student trained on the labelled cases' soft labels plus a teacher's filtered pseudo-labels of unlabeled scans
# beat its teacher (docs/results.md)?
#
#   bash benchmarks/compare_ssl_study.sh [WORKDIR] [EPOCHS] [ITERATIONS]     # CPU, 2d (default 40 x 20)
#
# Phantom Dataset583 (48^3, medium difficulty, seed 4, 2 raters: the cases of the soft-label study's
# Dataset580), 20 labelled training cases, 72 held-out cases, and 60 more cases of the same phantom whose
# images are the unlabeled scans (their labels are deleted).
#   labelsTr      the raters' intersection (nnunet-ext fuse --method intersection)
#   softlabelsTr  intersection + soft union, soft label value 0.5, 1 mm ball (the thesis' teacher of section 3.3)
# Arms, same budget, fold 0 of nnU-Net's default split of the 20 labelled cases:
#   SoftDiceTrainer                 the teacher: Kats et al.'s soft Dice on softlabelsTr
#   ExtBaselineTrainer              nnU-Net's default on the intersection (Table 2's baseline)
#   584:SoftDiceTrainer             the student: the same trainer on Dataset584, written by
#                                   `nnunet-ext pseudolabel` from the teacher (8-flip TTA in 3d, 4 in 2d;
#                                   alpha 0.3, voxel threshold 0.3, case threshold 100, pseudo-labels m >= 0.5
#                                   with a 0.5 soft rim of 1 mm: Table 6's "pseudo-labels + soft labels"), the
#                                   labelled cases keeping their soft labels; pseudo-labelled cases are in
#                                   training only; planned with the teacher's plans (same network and batch)
# Scored against each rater of the held-out cases (ratersTs/rater1, ratersTs/rater2) and the phantom's truth;
# predictions without mirroring, made once and reused by the later reports. Resumable: run it again after an
# interruption.
set -euo pipefail
W=$(realpath -m "${1:-/tmp/ssl_compare}")
EPOCHS=${2:-40}
ITERS=${3:-20}
source "$(dirname "$(realpath "$0")")/study_env.sh"
D=583; NAME=RaterPairSSL; S=584; SNAME=RaterPairSSLStudent
DS=$nnUNet_raw/Dataset${D}_$NAME
PRE=$nnUNet_preprocessed/Dataset${D}_$NAME
UNL=$W/unlabeled
if [ ! -f "$DS/phantom.json" ]; then
  "$BIN/nnunet-ext" phantom -d "$D" --name "$NAME" --cases 20 --test-cases 132 --raters 2 \
      --seed 4 --shape 48 48 48 --difficulty medium -np "$NPROC"
fi
if [ ! -d "$UNL" ]; then  # held-out cases 92-151 become the unlabeled scans: images only
  mkdir -p "$UNL.tmp"
  for k in $(seq 92 151); do
    c=$(printf 'phantom_%03d' "$k")
    mv "$DS/imagesTs/${c}_0000.nii.gz" "$UNL.tmp/"
    rm -f "$DS/labelsTs/$c.nii.gz" "$DS"/ratersTs/rater*/"$c.nii.gz" "$DS/softlabelsTs/$c.nii.gz"
  done
  mv "$UNL.tmp" "$UNL"
fi
two_rater_labels 0.5  # labelsTr: the raters' intersection; softlabelsTr: + soft union 0.5
[ -d "$PRE/nnUNetPlans_2d" ] || "$BIN/nnUNetv2_plan_and_preprocess" -d "$D" -c 2d -np "$NPROC" > "$W/plan.log" 2>&1
[ -d "$PRE/nnUNetPlans_2d/nnunet_ext_soft" ] || "$BIN/nnunet-ext" preprocess-soft -d "$D" -c 2d
# 1. the teacher (and the intersection baseline), trained through compare
[ -f "$W/report_${EPOCHS}x${ITERS}_${DEVICE}_teacher/report.json" ] || \
  run_compare teacher "$DS/ratersTs/rater1" SoftDiceTrainer ExtBaselineTrainer
FIRST=$W/report_${EPOCHS}x${ITERS}_${DEVICE}_teacher
# 2. the student dataset: pseudo-labels of the unlabeled scans, soft rim 0.5, labelled cases with their soft labels
SDS=$nnUNet_raw/Dataset${S}_$SNAME
[ -f "$SDS/dataset.json" ] && [ -f "$SDS/splits_final.json" ] || \
  "$BIN/nnunet-ext" pseudolabel -d "$D" -c 2d -tr SoftDiceTrainer -f 0 -i "$UNL" --student "Dataset${S}_$SNAME" \
      --alpha 0.3 --vpt 0.3 --tst 100 --soft-rim 0.5 --soft-rim-mm 1 -device "$DEVICE" -npp "$NPROC" -nps "$NPROC"
# the student gets the teacher's plans: nnU-Net would plan the larger dataset with a 3.4x larger 2d batch
# (its batch is capped at 5 % of the dataset's voxels, which binds on these small phantoms, not on real scans),
# so the arms would differ in more than their training data
SPRE=$nnUNet_preprocessed/Dataset${S}_$SNAME
if [ ! -f "$SPRE/teacher_plans.done" ]; then
  rm -rf "$SPRE"
  "$BIN/nnUNetv2_extract_fingerprint" -d "$S" -np "$NPROC" > "$W/plan_student.log" 2>&1
  "$BIN/nnUNetv2_move_plans_between_datasets" -s "$D" -t "$S" -sp nnUNetPlans -tp nnUNetPlans >> "$W/plan_student.log" 2>&1
  cp "$SDS/dataset.json" "$SPRE/dataset.json"  # what the planner would have copied
  "$BIN/nnUNetv2_preprocess" -d "$S" -plans_name nnUNetPlans -c 2d -np "$NPROC" >> "$W/plan_student.log" 2>&1
  cp "$SDS/splits_final.json" "$SPRE/splits_final.json"  # the pseudo-labelled cases in training only
  touch "$SPRE/teacher_plans.done"
fi
[ -d "$SPRE/nnUNetPlans_2d/nnunet_ext_soft" ] || "$BIN/nnunet-ext" preprocess-soft -d "$S" -c 2d
# 3. teacher, student and baseline on the held-out cases, against each rater and the truth
ARMS=(SoftDiceTrainer "$S:SoftDiceTrainer" ExtBaselineTrainer)
run_compare rater1 "$DS/ratersTs/rater1" "${ARMS[@]}"
run_compare rater2 "$DS/ratersTs/rater2" "${ARMS[@]}"
run_compare truth "$DS/labelsTs" "${ARMS[@]}"
