"""Challenge submission packaging: a trained model into a folder that builds a runnable, offline container.

``build`` writes ``OUT/``:

* ``model.zip`` -- nnU-Net's own export (``nnUNetv2_export_model_to_zip``) of the selected folds,
* ``model_extras/fold_<k>/`` -- what our trainers store beside the weights (thresholds, settings),
* ``vendor/nnunet_ext/`` -- this package's code (the trainer classes must be importable to load the model),
* ``submission.json`` -- challenge, model selection, versions,
* ``entrypoint.py``, ``Dockerfile``, ``README.md``.

Trust model: a PyTorch checkpoint can run code when loaded; only package and load models you trust.
Model archives are extracted only inside their target folder (absolute paths, ``..`` and links refused).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from nnunet_ext.submission.layouts import CHALLENGES

CHANNELS_NEEDED = {"wmh2017": 2, "msseg2": 2, "isbi2015": 4}


def safe_extract(zip_path, target) -> list[str]:
    """Extract ``zip_path`` into ``target``; refuse members with absolute paths, ``..`` components, or that
    are symbolic links, before writing anything."""
    target = Path(target).resolve()
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for m in members:
            name = m.filename
            mode = m.external_attr >> 16
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                raise ValueError(f"{zip_path}: refusing absolute path {name!r}")
            if ".." in Path(name.replace("\\", "/")).parts:
                raise ValueError(f"{zip_path}: refusing path with '..': {name!r}")
            if stat.S_ISLNK(mode):
                raise ValueError(f"{zip_path}: refusing symbolic link {name!r}")
            dest = (target / name).resolve()
            if dest != target and target not in dest.parents:
                raise ValueError(f"{zip_path}: member {name!r} would land outside {target}")
        z.extractall(target, members)
    return [m.filename for m in members]


def _versions() -> dict:
    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for pkg in ("nnunetv2", "torch", "SimpleITK", "numpy", "scipy", "connected-components-3d", "acvl-utils",
                "matplotlib", "nnunet-ext"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


DOCKERFILE = """# Built by nnunet-ext submission build. Offline at run time: everything is installed while building.
FROM python:{python}-slim
RUN pip install --no-cache-dir {pins}
RUN useradd --create-home --uid 1000 submitter
COPY --chown=submitter:submitter . /opt/submission
ENV PYTHONPATH=/opt/submission/vendor \\
    nnUNet_results=/opt/submission/results \\
    nnUNet_raw=/tmp/nnunet_raw nnUNet_preprocessed=/tmp/nnunet_preprocessed \\
    nnUNet_extTrainer=/opt/submission/vendor/nnunet_ext/trainers
RUN python /opt/submission/entrypoint.py --install-only && chown -R submitter:submitter /opt/submission
USER submitter
ENTRYPOINT ["python", "/opt/submission/entrypoint.py", "--input", "/input", "--output", "/output"]
"""

ENTRYPOINT = '''#!/usr/bin/env python3
"""Submission entrypoint (written by nnunet-ext submission build): reads the challenge's input layout,
runs the packaged nnU-Net model, writes the challenge's output names in the input's geometry."""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "vendor"))
os.environ.setdefault("nnUNet_extTrainer", str(HERE / "vendor" / "nnunet_ext" / "trainers"))

from nnunet_ext.submission.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(HERE))
'''

README = """# Submission: {challenge}

Model: `{trainer}__{plans}__{configuration}` of `{dataset}`, folds {folds}, checkpoint `{checkpoint}`
(nnunet-ext {ext_version}, nnU-Net {nnunet_version}, PyTorch {torch_version}).

Test locally without Docker (same entrypoint):

    nnunet-ext submission test {out} --input SAMPLE_INPUT_DIR

Build and run the container (no network at run time, runs as the non-root user `submitter`):

    docker build -t {tag} {out}
    docker run --rm --network none -v "$PWD/input":/input:ro -v "$PWD/output":/output {tag}

Input/output layout ({challenge}): see `vendor/nnunet_ext/submission/layouts.py`.

Trust model: a PyTorch checkpoint can execute code when it is loaded. Only build submissions from models
you trained or trust. `model.zip` is extracted only inside the results folder (absolute paths, `..` and
links are refused).
"""


def build(out_dir, dataset, configuration: str, trainer: str, plans: str = "nnUNetPlans", folds=(0,),
          challenge: str = "generic", checkpoint: str = "checkpoint_final.pth", tag: str = "nnunet-ext-submission") -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    import nnunet_ext
    from nnunet_ext.paths import nnunet_command, nnunet_env, trainers_path
    from nnunet_ext.predict import model_folder

    if challenge not in CHALLENGES:
        raise ValueError(f"unknown challenge {challenge!r}; known: {', '.join(CHALLENGES)}")
    mdir = model_folder(dataset, configuration, trainer, plans)
    ds = json.loads((mdir / "dataset.json").read_text())
    n_ch = len(ds["channel_names"])
    if challenge in CHANNELS_NEEDED and n_ch != CHANNELS_NEEDED[challenge]:
        raise ValueError(f"{challenge} provides {CHANNELS_NEEDED[challenge]} input images per case, the model "
                         f"{mdir.name} expects {n_ch} channels ({ds['channel_names']})")
    for f in folds:
        if not (mdir / f"fold_{f}" / checkpoint).is_file():
            raise FileNotFoundError(f"{mdir / f'fold_{f}' / checkpoint} not found")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([nnunet_command("nnUNetv2_export_model_to_zip"), "-d", str(dataset), "-o", str(out / "model.zip"),
                    "-c", configuration, "-tr", trainer, "-p", plans, "-f", *map(str, folds), "-chk", checkpoint],
                   env=nnunet_env(None), check=True, capture_output=True)
    for f in folds:
        for j in (mdir / f"fold_{f}").glob("nnunet_ext_*.json"):
            (out / "model_extras" / f"fold_{f}").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(j, out / "model_extras" / f"fold_{f}" / j.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    vendor = out / "vendor" / "nnunet_ext"
    shutil.copytree(Path(nnunet_ext.__file__).parent, vendor, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(trainers_path(), vendor / "trainers", ignore=ignore, dirs_exist_ok=True)
    from nnunet_ext import dataset_conversion

    shutil.copytree(Path(dataset_conversion.__file__).parent, vendor / "dataset_conversion", ignore=ignore,
                    dirs_exist_ok=True)
    versions = _versions()
    cfg = {"challenge": challenge, "dataset": maybe_convert_to_dataset_name(dataset), "configuration": configuration,
           "trainer": trainer, "plans": plans, "folds": list(folds), "checkpoint": checkpoint,
           "file_ending": ds["file_ending"], "n_channels": n_ch, "versions": versions}
    (out / "submission.json").write_text(json.dumps(cfg, indent=1))
    (out / "entrypoint.py").write_text(ENTRYPOINT)
    pins = " ".join(f"{k}=={v}" for k, v in versions.items() if k not in ("python", "nnunet-ext"))
    (out / "Dockerfile").write_text(DOCKERFILE.format(python=versions["python"], pins=pins))
    (out / "README.md").write_text(README.format(
        challenge=challenge, trainer=trainer, plans=plans, configuration=configuration, dataset=cfg["dataset"],
        folds=list(folds), checkpoint=checkpoint, ext_version=nnunet_ext.__version__,
        nnunet_version=versions.get("nnunetv2"), torch_version=versions.get("torch"), out=out, tag=tag))
    return out


def check_submission(sub_dir, input_dir, work_dir=None, device: str = "cpu") -> tuple[bool, list[dict]]:
    """Run the entrypoint locally (no Docker) on ``input_dir`` and check every expected output: present,
    same size/spacing/origin/direction as its reference input image, binary values."""
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    from nnunet_ext.submission.layouts import cases_for

    sub = Path(sub_dir)
    cfg = json.loads((sub / "submission.json").read_text())
    work = Path(work_dir or tempfile.mkdtemp(prefix="nnunet_ext_subtest_"))
    out = work / "output"
    env = dict(os.environ, PYTHONPATH=str(sub / "vendor"), nnUNet_results=str(work / "results"),
               nnUNet_extTrainer=str(sub / "vendor" / "nnunet_ext" / "trainers"))
    r = subprocess.run([sys.executable, str(sub / "entrypoint.py"), "--input", str(input_dir), "--output", str(out),
                        "--device", device], env=env, capture_output=True, text=True)
    rows = []
    if r.returncode != 0:
        return False, [{"case": "-", "check": "entrypoint ran", "ok": False, "detail": r.stderr[-2000:]}]
    for c in cases_for(cfg["challenge"], input_dir, out, cfg["n_channels"], cfg["file_ending"]):
        exists = c.output.is_file()
        rows.append({"case": c.case_id, "check": f"{c.output.name} written", "ok": exists, "detail": ""})
        if not exists:
            continue
        o, ref = sitk.ReadImage(str(c.output)), sitk.ReadImage(str(c.reference))
        for what, a, b in (("size", o.GetSize(), ref.GetSize()), ("spacing", o.GetSpacing(), ref.GetSpacing()),
                           ("origin", o.GetOrigin(), ref.GetOrigin()), ("direction", o.GetDirection(), ref.GetDirection())):
            ok = len(a) == len(b) and bool(np.allclose(a, b, atol=1e-4))
            rows.append({"case": c.case_id, "check": f"{what} = reference", "ok": ok, "detail": "" if ok else f"{a} vs {b}"})
        vals = np.unique(sitk.GetArrayViewFromImage(o))
        ok = bool(np.isin(vals, (0, 1)).all())
        rows.append({"case": c.case_id, "check": "binary values", "ok": ok, "detail": "" if ok else str(vals[:8])})
    return all(r["ok"] for r in rows) and bool(rows), rows


def format_rows(rows: list[dict]) -> str:
    w = max([len(r["case"]) for r in rows] + [4])
    lines = [f"{'case':<{w}}  {'check':<28} result"]
    lines += [f"{r['case']:<{w}}  {r['check']:<28} {'PASS' if r['ok'] else 'FAIL'} {r['detail']}" for r in rows]
    return "\n".join(lines)
