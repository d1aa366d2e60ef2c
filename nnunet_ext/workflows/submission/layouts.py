"""Input/output conventions of the challenges a submission can target.

Each layout turns the folder the organisers mount as input into cases (id, channel files in the model's
channel order, the reference image whose geometry the output must have, output file name). The
conventions are our reading of the organisers' instructions; check them against the current challenge
page before uploading:

* ``generic``: nnU-Net's ``imagesTs`` naming, ``<case>_<channel:04d>.nii.gz`` in, ``<case>.nii.gz`` out
  (geometry of channel 0).
* ``wmh2017`` (WMH Segmentation Challenge 2017, wmh.grand-challenge.org, "Docker" submission page): one
  subject per run, ``<input>/pre/FLAIR.nii.gz`` and ``<input>/pre/T1.nii.gz`` in, ``<output>/result.nii.gz``
  out, in the space of ``pre/FLAIR.nii.gz``; binary WMH mask (label 1).
* ``msseg2`` (MSSEG-2 2021, portal.fli-iam.irisa.fr/msseg-2): one patient per run, the two co-registered
  FLAIR time points ``flair_time01_on_middle_space.nii.gz`` and ``flair_time02_on_middle_space.nii.gz`` in
  (channels 0 and 1, as our converter and phantom order them), the new-lesion mask
  ``<output>/new_lesions.nii.gz`` out in the geometry of time point 1.
* ``isbi2015`` (ISBI 2015 longitudinal MS challenge, smart-stats-tools.org/lesion-challenge): every time
  point ``<case>_{flair,t2,pd,mprage}_pp.nii[.gz]`` in (channels FLAIR, T2, PD, MPRAGE as our converter
  orders them), ``<output>/<case>_mask.nii.gz`` out, in the geometry of the FLAIR.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHALLENGES = ("generic", "wmh2017", "msseg2", "isbi2015")


@dataclass
class Case:
    case_id: str
    channels: list[Path]
    reference: Path
    output: Path


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"expected input file {path} is missing")
    return path


def cases_for(challenge: str, input_dir, output_dir, n_channels: int, file_ending: str = ".nii.gz") -> list[Case]:
    i, o = Path(input_dir), Path(output_dir)
    if not i.is_dir():
        raise FileNotFoundError(f"input folder {i} not found")
    if challenge == "generic":
        groups: dict[str, list[Path]] = {}
        for p in sorted(i.glob(f"*{file_ending}")):
            m = re.match(rf"(.+)_(\d{{4}}){re.escape(file_ending)}$", p.name)
            if not m:
                raise ValueError(f"{p}: expected <case>_<channel:04d>{file_ending}")
            groups.setdefault(m.group(1), []).append(p)
        out = []
        for c, files in groups.items():
            if len(files) != n_channels:
                raise ValueError(f"case {c}: {len(files)} channel files, the model needs {n_channels}")
            out.append(Case(c, files, files[0], o / f"{c}{file_ending}"))
        if not out:
            raise ValueError(f"no {file_ending} images in {i}")
        return out
    if challenge == "wmh2017":
        ch = [_need(i / "pre" / "FLAIR.nii.gz"), _need(i / "pre" / "T1.nii.gz")]
        return [Case("wmh", ch[:n_channels], ch[0], o / "result.nii.gz")]
    if challenge == "msseg2":
        ch = [_need(i / "flair_time01_on_middle_space.nii.gz"), _need(i / "flair_time02_on_middle_space.nii.gz")]
        return [Case("msseg2", ch[:n_channels], ch[0], o / "new_lesions.nii.gz")]
    if challenge == "isbi2015":
        out = []
        for flair in sorted(i.glob("*_flair_pp.nii*")):
            m = re.match(r"(.+)_flair_pp(\.nii(\.gz)?)$", flair.name)
            c, ext = m.group(1), m.group(2)
            ch = [_need(i / f"{c}_{mod}_pp{ext}") for mod in ("flair", "t2", "pd", "mprage")]
            out.append(Case(c, ch[:n_channels], ch[0], o / f"{c}_mask.nii.gz"))
        if not out:
            raise ValueError(f"no *_flair_pp.nii[.gz] in {i}")
        return out
    raise ValueError(f"unknown challenge {challenge!r}; known: {', '.join(CHALLENGES)}")
