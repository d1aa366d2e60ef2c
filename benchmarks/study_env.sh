# Sourced by the study scripts of benchmarks/ after they set W (the work folder): the device and process
# count (DEVICE, NPROC from the environment, default cpu and 2), the folder of the nnunet-ext and nnU-Net
# commands (BIN: this checkout's .venv, else the ones on PATH), and nnU-Net's folders under W.
DEVICE=${DEVICE:-cpu}
NPROC=${NPROC:-2}
BIN=$(dirname "$(realpath "${BASH_SOURCE[0]}")")/../.venv/bin
[ -x "$BIN/nnunet-ext" ] || BIN=$(dirname "$(command -v nnunet-ext)")
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res
export nnUNet_def_n_proc=$NPROC nnUNet_n_proc_DA=$NPROC
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"

# run_compare NAME REF ARM...: `nnunet-ext compare` of dataset D's arms on the held-out cases DS/imagesTs
# against the labels in REF, EPOCHS x ITERS iterations on fold 0, report in W/report_<EPOCHS>x<ITERS>_<DEVICE>_NAME.
# A new report starts from the previous report's predictions (same checkpoints, same images), so only the
# arms it adds are predicted and only the scores are computed again.
run_compare() {
  local out=$W/report_${EPOCHS}x${ITERS}_${DEVICE}_$1 ref=$2
  shift 2
  if [ ! -d "$out" ] && [ -n "${FIRST:-}" ] && [ -d "$FIRST" ]; then
    cp -r "$FIRST" "$out"
    rm -f "$out"/report.*
  fi
  "$BIN/nnunet-ext" compare -d "$D" -c 2d -tr "$@" -f 0 --epochs "$EPOCHS" --iterations "$ITERS" \
      --val-iterations 4 -device "$DEVICE" -np "$NPROC" --test-images "$DS/imagesTs" --test-labels "$ref" \
      --create-split --disable_tta -o "$out"
  FIRST=$out
}

# two_rater_labels GAMMA: the two-rater phantom DS as the Bar-Ilan studies train on it -- labelsTr becomes the
# raters' intersection (the phantom's truth moves to labelsTr_truth) and softlabelsTr the intersection plus the
# soft union with value GAMMA within 1 mm (fuse --method inter_soft_union_rim). Each step skipped once done.
two_rater_labels() {
  if [ ! -d "$DS/labelsTr_truth" ]; then
    rm -rf "$W/intersection"
    "$BIN/nnunet-ext" fuse --method intersection --raters "$DS/ratersTr/rater1" "$DS/ratersTr/rater2" -o "$W/intersection"
    mv "$DS/labelsTr" "$DS/labelsTr_truth"
    mv "$W/intersection" "$DS/labelsTr"
  fi
  [ -d "$DS/softlabelsTr" ] || "$BIN/nnunet-ext" fuse --method inter_soft_union_rim --gamma "$1" --radius-mm 1 \
      --images "$DS/imagesTr" --raters "$DS/ratersTr/rater1" "$DS/ratersTr/rater2" -o "$DS/softlabelsTr"
}
