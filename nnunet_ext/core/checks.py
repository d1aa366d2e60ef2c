"""Checks that run before any work, shared by every command (each failure is one ValueError naming the file,
option or name, and what to do).

* :func:`check_image` / :func:`check_prediction_inputs` -- every image a command reads, the inputs of the one
  predictor included: readable to the last byte (whole gzip stream, complete NIfTI voxel block), finite, 3-D,
  one component, the model's channels ``<case>_0000 ... <case>_<n-1>``, one size and spacing per case.
  SimpleITK alone reads a truncated file's missing part and NaN voxels as zeros, so a damaged image would
  otherwise give a plausible but wrong prediction.
* :func:`model_name` / :func:`split_member` -- trainer, plans and configuration names (from the command line
  or from a file: a selection file, ``consensus.json``) are names, never paths; a model folder is always
  ``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>`` (nnunet_ext.nnunet_adapter.ModelRef).
* :func:`check_contract_identity` -- a model contract (``nnunet_ext_model.json``) belongs to the folder it
  lies in: its ``trainer``, ``plans`` and ``configuration`` match the folder name.
* :func:`check_configuration`, :func:`check_writable_folder` -- what a command that fans out (launcher
  scripts, Slurm arrays, dry runs) checks before it writes anything (with
  :func:`nnunet_ext.nnunet_adapter.check_fan_out`, which adds nnU-Net's trainer lookup).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

_NIFTI = (".nii.gz", ".nii")
_ITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_CHECKED: dict[str, tuple] = {}  # realpath -> (size, mtime_ns, header): files checked in this process


# ---------------------------------------------------------------------------------------------- images


def check_image(path, *, what: str = "") -> dict:
    """Check one image file (see the module docstring); returns its header ``{"dimension", "size",
    "spacing", "components"}``. A file checked before in this process and unchanged since (size, mtime) is
    not read again. ``what`` is put in front of the message (e.g. the option that named the file)."""
    from nnunet_ext.core.io import ImageReadError, _itk_message, check_file, read_sitk

    path = Path(path)
    prefix = f"{what}: " if what else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}{path} not found") from None
    key = os.path.realpath(path)
    hit = _CHECKED.get(key)
    if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
        return hit[2]
    try:
        if path.name.lower().endswith(_NIFTI):
            check_file(path)  # whole gzip stream, complete voxel block, NaN/Inf
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
            except RuntimeError as e:
                raise ImageReadError(f"{path}: SimpleITK cannot read it ({_itk_message(e)}); check the file "
                                     f"format") from None
            head = {"dimension": reader.GetDimension(), "size": tuple(reader.GetSize()),
                    "spacing": tuple(reader.GetSpacing()), "components": reader.GetNumberOfComponents()}
        elif path.name.lower().endswith(_ITK_ENDINGS):
            img = read_sitk(path)  # NaN/Inf of float images checked on the voxels
            head = {"dimension": img.GetDimension(), "size": tuple(img.GetSize()), "spacing": tuple(img.GetSpacing()),
                    "components": img.GetNumberOfComponentsPerPixel()}
        else:  # other formats (e.g. 2-D .png datasets): only that the file is there and not empty
            check_file(path)
            head = {"dimension": None, "size": None, "spacing": None, "components": None}
    except ImageReadError as e:
        raise ImageReadError(f"{prefix}{e}") from None
    if head["dimension"] is not None and (head["dimension"] != 3 or head["components"] != 1):
        raise ImageReadError(f"{prefix}{path}: expected a 3-D single-channel image, got {head['dimension']}-D with "
                             f"{head['components']} component(s) (size {head['size']}); give one 3-D volume per "
                             f"channel file")
    _CHECKED[key] = (st.st_size, st.st_mtime_ns, head)
    return head


def _channel_of(name: str, ending: str) -> tuple[str, int] | None:
    stem = name[: -len(ending)]
    if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
        return None
    return stem[:-5], int(stem[-4:])


def prediction_cases(folder, ending: str, n_channels: int, what: str = "-i") -> dict[str, list[Path]]:
    """``{case: [channel files]}`` of an input folder in nnU-Net's naming (``<case>_<XXXX><ending>``);
    ValueError naming the folder or file unless every case has exactly the channels 0..n-1."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder}: input folder not found")
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.name.endswith(ending) or p.name.startswith("."):
            continue
        cc = _channel_of(p.name, ending)
        if cc is None:
            raise ValueError(f"{what}: {p}: image names must be <case>_<channel:04d>{ending} (nnU-Net's naming), "
                             f"e.g. <case>_0000{ending}; rename the file")
        cases.setdefault(cc[0], {})[cc[1]] = p
    if not cases:
        raise ValueError(f"{what} {folder}: no images named <case>_0000{ending}; give the folder of the images to "
                         f"predict")
    out = {}
    for c, chans in sorted(cases.items()):
        if sorted(chans) != list(range(n_channels)):
            missing = [k for k in range(n_channels) if k not in chans]
            extra = [chans[k] for k in sorted(chans) if k >= n_channels]
            detail = (f"{folder / f'{c}_{missing[0]:04d}{ending}'} is missing" if missing else
                      f"{extra[0]} is a channel the model does not take")
            raise ValueError(f"{what}: case {c}: the model takes {n_channels} channel(s) "
                             f"(<case>_0000 ... _{n_channels - 1:04d}{ending}), but {detail}; give each case "
                             f"exactly these channels")
        out[c] = [chans[k] for k in range(n_channels)]
    return out


def check_prediction_inputs(inputs, ending: str, n_channels: int, what: str = "-i") -> int:
    """Check every image of ``inputs`` (a folder in nnU-Net's naming, or a list of per-case file lists) before
    a prediction: :func:`prediction_cases` and :func:`check_image` for each file, one size and spacing per
    case. Returns the number of cases."""
    if isinstance(inputs, (str, os.PathLike)):
        cases = list(prediction_cases(inputs, ending, n_channels, what).values())
    else:
        cases = [[Path(f) for f in files] for files in inputs]
        for files in cases:
            if len(files) != n_channels:
                raise ValueError(f"{what}: the case of {files[0] if files else '(no file)'} has {len(files)} "
                                 f"channel file(s); the model takes {n_channels}")
    for files in cases:
        heads = [check_image(f, what=what) for f in files]
        for f, h in zip(files[1:], heads[1:]):
            h0 = heads[0]
            if h["size"] is not None and (h["size"] != h0["size"] or not _close(h["spacing"], h0["spacing"])):
                raise ValueError(f"{what}: {f} (size {h['size']}, spacing {h['spacing']}) does not match {files[0]} "
                                 f"(size {heads[0]['size']}, spacing {heads[0]['spacing']}); the channels of a "
                                 f"case must share one grid, resample one onto the other")
    return len(cases)


def check_model_inputs(model_dir, inputs, what: str = "-i") -> int:
    """:func:`check_prediction_inputs` with the file ending and channels of the model in ``model_dir``
    (its ``dataset.json``)."""
    from nnunet_ext.core.io import read_json

    ds = read_json(Path(model_dir) / "dataset.json", required=("file_ending", "channel_names"))
    return check_prediction_inputs(inputs, ds["file_ending"], len(ds["channel_names"]), what)


def _close(a, b) -> bool:
    import numpy as np

    return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-4))


# ---------------------------------------------------------------------------------------------- names


_TRAINER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_EXAMPLE = {"trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "configuration": "3d_fullres"}


def model_name(trainer: str, plans: str, configuration: str, where: str = "") -> str:
    """``<trainer>__<plans>__<configuration>`` after checking that each part is a plain name (a trainer is a
    Python class name; plans and configuration letters, digits, ``_ . -``, not starting with ``.``): a
    ``/`` or ``..`` could reach another dataset's folder."""
    src = f"{where}: " if where else ""
    for kind, value, rx in (("trainer", trainer, _TRAINER), ("plans", plans, _PART),
                            ("configuration", configuration, _PART)):
        if not isinstance(value, str) or not rx.match(value) or "__" in value:
            raise ValueError(f"{src}{kind} name {value!r} is not a name (letters, digits, _ . -; no path); give the "
                             f"{kind} as nnU-Net names it, e.g. "
                             + _EXAMPLE[kind])
    return f"{trainer}__{plans}__{configuration}"


def split_member(member: str, where: str = "") -> tuple[str, str, str]:
    """(trainer, plans, configuration) of a ``Trainer__Plans__configuration`` name from a file."""
    parts = str(member).split("__") if isinstance(member, str) else []
    if len(parts) != 3:
        raise ValueError(f"{where + ': ' if where else ''}model {member!r} is not a Trainer__Plans__configuration "
                         f"name; re-create the file (nnunet-ext select)")
    model_name(*parts, where=where)
    return parts[0], parts[1], parts[2]


def folder_identity(model_dir) -> dict:
    """``{"trainer", "plans", "configuration"}`` of a model folder named ``<trainer>__<plans>__<configuration>``
    (empty when the folder is named otherwise)."""
    parts = Path(os.path.abspath(model_dir)).name.split("__")
    if len(parts) != 3 or not all(parts):
        return {}
    return dict(zip(("trainer", "plans", "configuration"), parts))


def check_contract_identity(contract_file, fields: dict, model_dir) -> None:
    """ValueError naming the contract file when its ``trainer`` / ``plans`` / ``configuration`` (where it
    records them) differ from its model folder's name: a contract copied from another model would apply
    that model's activation, threshold and post-processing."""
    ident = folder_identity(model_dir)
    for k, v in ident.items():
        got = fields.get(k)
        if got not in (None, "") and got != v:
            raise ValueError(f"{contract_file}: this model contract was written for {k} {got!r}, but it lies in the "
                             f"folder of {k} {v!r} ({Path(model_dir).name}); it belongs to another model. Delete it "
                             f"(the contract is then derived from the checkpoint) or copy the right model's contract")


# ---------------------------------------------------------------------------------------------- fan-out


STANDARD_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def check_configuration(plans_file, configuration: str, option: str = "-c") -> None:
    """The configuration is in the plans file when it exists; otherwise it must be one nnU-Net's planner makes
    (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``), since the plans are made later."""
    plans_file = Path(plans_file)
    if plans_file.is_file():
        from nnunet_ext.core.io import read_json

        planned = read_json(plans_file, required=("configurations",))["configurations"]
        if configuration not in planned:
            raise ValueError(f"{option} {configuration}: not a configuration of {plans_file} (it has "
                             f"{', '.join(sorted(planned))}); choose one of those or plan it first")
    elif configuration not in STANDARD_CONFIGURATIONS:
        raise ValueError(f"{option} {configuration}: {plans_file} does not exist yet and nnU-Net's planner makes only "
                         f"{', '.join(STANDARD_CONFIGURATIONS)}; choose one of those")


def check_writable_folder(folder, option: str) -> Path:
    """``folder`` is a folder (or can become one) that this process may write: ValueError naming the option
    when it, or the nearest existing folder above it, is a file or not writable. Creates nothing."""
    folder = Path(os.path.abspath(folder))
    p = folder
    while not os.path.lexists(p):
        p = p.parent
    if not p.is_dir():
        what = "is" if p == folder else f"lies under {p}, which is"
        raise ValueError(f"{option} {folder} {what} a file, not a folder; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder}: {p} is not writable; choose a writable folder")
    return folder


def read_json_named(path, what: str = "") -> object:
    """A JSON file; a damaged one is a ValueError naming the file (and ``what`` it is)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: damaged {what + ' ' if what else ''}file, not valid JSON ({e}); restore it or "
                         f"delete it and run the command that wrote it again") from None
