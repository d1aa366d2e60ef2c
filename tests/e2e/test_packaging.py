"""Packaging as published: metadata, the version in one place, dependencies equal to the imports, and an
sdist + wheel that pass ``twine check`` and work from a clean virtual environment."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import nnunet_ext

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SOURCES = ("nnunet_ext", "trainers", "dataset_conversion")  # what the wheel ships


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> one file importing it, over every import (module level or inside functions)."""
    found = {}
    for folder in SOURCES:
        for f in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], str(f.relative_to(REPO)))
    return found


def test_metadata_as_published():
    p = PYPROJECT["project"]
    assert p["license"] == "Apache-2.0" and p["license-files"] == ["LICENSE"]  # SPDX string, not {text = ...}
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200] and "Version 2.0" in (REPO / "LICENSE").read_text()[:200]
    assert p["authors"] and p["keywords"] and {"Homepage", "Source", "Changelog"} <= set(p["urls"])
    assert "Operating System :: POSIX :: Linux" in p["classifiers"]
    assert not any(c.startswith("License ::") for c in p["classifiers"])  # PEP 639: the expression says it
    # the version is written once: nnunet_ext/__init__.py
    assert "version" not in p and "version" in p["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nnunet_ext.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", nnunet_ext.__version__)
    assert f"## [{nnunet_ext.__version__}]" in (REPO / "CHANGELOG.md").read_text()
    # upper bounds where the package reaches into internals
    deps = {_requirement_name(d): d for d in p["dependencies"]}
    assert "<" in deps["nnunetv2"] and "<" in deps["batchgeneratorsv2"]


def test_dependencies_equal_imports():
    """Every third-party module the shipped code imports is a declared dependency and every declared
    dependency is imported (the distribution of a module as installed here)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    imported = {m: f for m, f in _imported_top_level_modules().items() if m not in stdlib and m != "nnunet_ext"}
    dists = metadata.packages_distributions()
    unknown = sorted(m for m in imported if m not in dists)
    assert not unknown, f"imported but not installed: {unknown}"
    needed = {_canonical(dists[m][0]): (m, f) for m, f in imported.items()}
    declared = {_requirement_name(d) for d in PYPROJECT["project"]["dependencies"]}
    assert set(needed) - declared == set(), {k: needed[k] for k in set(needed) - declared}
    assert declared - set(needed) == set(), f"declared but never imported: {sorted(declared - set(needed))}"


def test_citation_file_cites_the_five_works_and_nnunet():
    import yaml

    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0" and cff["authors"]
    assert "version" not in cff  # one place for the version
    titles = " | ".join(r["title"] for r in cff["references"])
    for needle in ("nnU-Net: a self-configuring method", "Focal Pathology Segmentation",
                   "white matter hyperintensities", "MSSEG-2 challenge proceedings", "Soft labels",
                   "Impact of Soft Segmentation Training"):
        assert needle.lower() in titles.lower(), needle
    assert len(cff["references"]) == 6
    assert "## How to cite" in (REPO / "README.md").read_text()


def _copy_source(dst: Path) -> Path:
    """The files a release is built from (the working tree as it is, without build outputs)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md", "CITATION.cff"):
        shutil.copy2(REPO / name, dst / name)
    for folder in SOURCES:
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_clean_venv(tmp_path):
    """``python -m build`` (the wheel built from the sdist), ``twine check --strict``, then the wheel alone
    installed into a new virtual environment whose other packages come from this one through a path entry
    (so nothing is downloaded and no editable install is visible), and the three commands run there."""
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(dist), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = nnunet_ext.__version__
    sdist, wheel = dist / f"nnunet_ext-{v}.tar.gz", dist / f"nnunet_ext-{v}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), sorted(p.name for p in dist.iterdir())
    r = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("PASSED") == 2, r.stdout + r.stderr
    import tarfile

    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "CITATION.cff", "CHANGELOG.md", "trainers/ext_baseline.py"} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies (nnU-Net, torch, ...) from this environment, after the venv's own site-packages; .pth files
    # there (this checkout's editable install) are not processed for a path added this way
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_dependencies.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "nnUNet_"))}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True)

    r = subprocess.run([str(py), "-c", "import nnunet_ext, importlib.metadata as m; print(nnunet_ext.__file__); "
                                       "print(m.version('nnunet-ext')); print(m.metadata('nnunet-ext')['License-Expression'])"],
                       **run)
    file, version, lic = r.stdout.split()
    assert Path(file).is_relative_to(site) and version == v and lic == "Apache-2.0", r.stdout + r.stderr
    assert (bin_ / "nnunet-ext").is_file()

    r = subprocess.run([str(bin_ / "nnunet-ext"), "--version"], **run)
    assert r.returncode == 0 and r.stdout.strip() == f"nnunet-ext {v}", r.stdout + r.stderr
    r = subprocess.run([str(bin_ / "nnunet-ext"), "trainers-path"], **run)
    trainers = Path(r.stdout.strip())
    assert r.returncode == 0 and trainers == site / "nnunet_ext" / "trainers", r.stdout + r.stderr
    assert (trainers / "ext_baseline.py").is_file()

    # nnU-Net's own trainer lookup finds ours in the installed folder
    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; import sys, "
              "inspect; c = f('LSRDiceTrainer'); print(c.__name__, inspect.getfile(c))")
    r = subprocess.run([str(py), "-c", lookup], **{**run, "env": {**env, "nnUNet_extTrainer": str(trainers)}})
    assert r.returncode == 0, r.stderr[-2000:]
    name, where = r.stdout.strip().splitlines()[-1].split()
    assert name == "LSRDiceTrainer" and Path(where).is_relative_to(site), r.stdout

    # evaluate: one 4-voxel lesion, predicted as 2 of its voxels plus 2 voxels elsewhere
    import numpy as np

    from nnunet_ext.core.io import write_image

    ref, pred = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    ref[2, 2, 2:6] = 1
    pred[2, 2, 2:4] = 1
    pred[6, 6, 6:8] = 1
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    write_image(ref, (1.0, 1.0, 1.0), tmp_path / "ref" / "c.nii.gz")
    write_image(pred, (1.0, 1.0, 1.0), tmp_path / "pred" / "c.nii.gz")
    r = subprocess.run([str(bin_ / "nnunet-ext"), "--quiet", "evaluate", "--ref", "ref", "--pred", "pred", "-o",
                        "r.json"], **run)
    assert r.returncode == 0, r.stdout + r.stderr
    c = json.loads((tmp_path / "r.json").read_text())["per_case"]["c"]
    # Dice = 2 * 2 / (4 + 4) = 0.5; the reference lesion is hit (any overlap), the far 2-voxel component is a FP
    assert c["dice"] == pytest.approx(0.5) and (c["lesion_tp"], c["lesion_fn"], c["lesion_fp"]) == (1, 0, 1)
