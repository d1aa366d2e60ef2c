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
