"""The synthetic MS-lesion phantom: determinism, lesion statistics, options, dataset layout."""
import json

import numpy as np
import pytest

from nnunet_ext.cli import run
from nnunet_ext.core.io import read_image
from nnunet_ext.metrics.lesions import label_components
from nnunet_ext.data.phantom import (PhantomConfig, contrast_to_noise, generate_case, parse_difficulty,
                                     write_phantom_dataset)

SMALL = PhantomConfig(shape=(48, 48, 48), seed=3)


def test_deterministic_for_seed():
    a, b = generate_case(SMALL, 1), generate_case(SMALL, 1)
    assert np.array_equal(a.images[0], b.images[0]) and np.array_equal(a.label, b.label)
    c = generate_case(PhantomConfig(shape=(48, 48, 48), seed=4), 1)
    assert not np.array_equal(a.images[0], c.images[0])


@pytest.fixture(scope="module")
def cases64():
    cfg = PhantomConfig(seed=0)
    return [generate_case(cfg, i) for i in range(12)]


def test_lesion_size_distribution(cases64):
    sizes = []
    for c in cases64:
        lab, n = label_components(c.label, 26)
        sizes += list(np.bincount(lab.ravel())[1:])
    sizes = np.array(sizes)
    assert len(sizes) >= 40
    assert sizes.min() >= 3
    assert ((sizes >= 3) & (sizes <= 10)).mean() >= 1 / 3
    assert sizes.max() > 200  # heavy tail
    assert any(c.label.sum() == 0 for c in cases64) or PhantomConfig().empty_fraction == 0


def test_lesions_are_separate_components_in_white_matter_intensity_range(cases64):
    c = cases64[0]
    lab6, n6 = label_components(c.label, 6)
    lab26, n26 = label_components(c.label, 26)
    assert n6 == n26  # grown 6-connected and never touching: same count under both connectivities
    img = c.images[0]
    assert img[c.label > 0].mean() > np.median(img[img > 0.3])  # hyperintense


def test_small_lesions_fainter_than_large(cases64):
    cnr = {k: [] for k in ("3-10", "11-50", "51+")}
    for c in cases64:
        for k, v in contrast_to_noise(c.images[0], c.label).items():
            if not np.isnan(v):
                cnr[k].append(v)
    small, large = np.median(cnr["3-10"]), np.median(cnr["51+"])
    assert 0.5 < small < large


def test_difficulty_moves_noise():
    easy = generate_case(PhantomConfig(shape=(48, 48, 48), difficulty=0.0), 0).images[0]
    hard = generate_case(PhantomConfig(shape=(48, 48, 48), difficulty=1.0), 0).images[0]
    corner = (slice(0, 4), slice(0, 4), slice(0, 4))  # air: noise only
    assert hard[corner].std() > 2 * easy[corner].std()


@pytest.mark.parametrize("value,expected", [("easy", 0.0), ("medium", 0.5), ("hard", 1.0), ("0.25", 0.25)])
def test_parse_difficulty(value, expected):
    assert parse_difficulty(value) == expected


@pytest.mark.parametrize("value", ["1.5", "impossible"])
def test_parse_difficulty_rejects(value):
    with pytest.raises(ValueError, match="difficulty"):
        parse_difficulty(value)


@pytest.mark.parametrize("kwargs", [dict(shape=(8, 64, 64)), dict(spacing=(1, 0, 1)), dict(difficulty=2.0),
                                    dict(lesions_per_case=(5, 2)), dict(timepoints=3), dict(raters=-1),
                                    dict(sites=((1.0, 1.0),)), dict(new_lesions=(0, 3)), dict(new_lesions=(5, 4))])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PhantomConfig(**kwargs)


def test_raters_and_soft_labels():
    cfg = PhantomConfig(shape=(48, 48, 48), raters=3, soft=True, empty_fraction=0.0, seed=1)
    c = generate_case(cfg, 0)
    assert len(c.raters) == 3 and c.label.sum() > 0
    assert c.soft.min() >= 0 and c.soft.max() <= 1 and c.soft[c.label > 0].min() > 0
    assert 0 < ((c.soft > 0) & (c.soft < 1)).sum()  # soft values exist
    for r in c.raters:
        dice = 2 * (r & c.label).sum() / (r.sum() + c.label.sum())
        assert 0.6 < dice
    assert any(not np.array_equal(r, c.label) for r in c.raters)


def test_two_timepoints_label_new_lesions():
    cfg = PhantomConfig(shape=(48, 48, 48), timepoints=2, empty_fraction=0.0, seed=2)
    cases = [generate_case(cfg, i) for i in range(6)]
    assert all(len(c.images) == 2 for c in cases)
    with_new = [c for c in cases if c.label.sum() > 0]
    assert with_new
    c = with_new[0]
    diff = c.images[1] - c.images[0]
    assert diff[c.label > 0].mean() > diff[c.label == 0].mean() + 0.05  # new lesions brighter at time point 2


def test_new_lesion_count_and_default_unchanged(tmp_path):
    import hashlib

    # --new-lesions 6 6: every case has 0 (25 % of cases) or exactly 6 new lesions (lesions.json, label components)
    r = write_phantom_dataset(tmp_path, 590, 8, PhantomConfig(shape=(48, 48, 48), timepoints=2, new_lesions=(6, 6),
                                                              seed=1), name="N")
    counts = {k: len(v) for k, v in json.loads((r / "lesions.json").read_text()).items()}
    assert set(counts.values()) == {0, 6} and list(counts.values()).count(6) == 6
    assert json.loads((r / "phantom.json").read_text())["new_lesions"] == [6, 6]
    # the default (1-4 new lesions) draws exactly what the phantom drew before the option existed
    r = write_phantom_dataset(tmp_path, 591, 3, PhantomConfig(shape=(32, 32, 32), timepoints=2, seed=5), name="H")
    h = hashlib.sha256()
    for f in sorted((r / "labelsTr").glob("*.nii.gz")):
        h.update(read_image(f)[0].tobytes())
    assert h.hexdigest() == "952de6dba42dc12c3d1e366b7147592828b33294e2e619b771f137b952eacd8b"


def test_sites_resample_to_their_spacing():
    cfg = PhantomConfig(shape=(48, 48, 48), sites=((1.0, 1.0, 1.0), (1.0, 1.0, 3.0)))
    a, b = generate_case(cfg, 0), generate_case(cfg, 1)
    assert (a.site, b.site) == (0, 1)
    assert a.images[0].shape == (48, 48, 48) and b.images[0].shape == (16, 48, 48)
    assert b.spacing_zyx == (3.0, 1.0, 1.0) and b.label.shape == b.images[0].shape


def test_write_dataset_layout(tmp_path):
    cfg = PhantomConfig(shape=(32, 32, 32), raters=2, soft=True)
    root = write_phantom_dataset(tmp_path, 7, 3, cfg, n_test=1, progress=False)
    assert root.name == "Dataset007_MSPhantom"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["numTraining"] == 3 and ds["channel_names"] == {"0": "FLAIR"} and ds["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [f"phantom_00{i}_0000.nii.gz" for i in range(3)]
    assert (root / "imagesTs" / "phantom_003_0000.nii.gz").exists() and (root / "labelsTs" / "phantom_003.nii.gz").exists()
    assert (root / "ratersTr" / "rater2" / "phantom_001.nii.gz").exists()
    assert (root / "softlabelsTr" / "phantom_002.nii.gz").exists()
    table = json.loads((root / "lesions.json").read_text())
    lab, sp = read_image(root / "labelsTr" / "phantom_000.nii.gz")
    assert sp == (1.0, 1.0, 1.0)
    assert sum(r["voxels"] for r in table["phantom_000"]) == int(lab.sum())
    assert set(table["phantom_000"][0]) >= {"id", "voxels", "centre_voxel_xyz", "centre_mm_xyz"} \
        if table["phantom_000"] else True
    with pytest.raises(ValueError, match="already used"):
        write_phantom_dataset(tmp_path, 7, 3, cfg, name="Other", progress=False)


def test_cli_phantom(tmp_path):
    assert run(["phantom", "-d", "12", "--cases", "2", "--shape", "32", "32", "24", "--spacing", "1", "1", "2",
                "--raw", str(tmp_path), "--timepoints", "2", "--difficulty", "hard"]) == 0
    root = tmp_path / "Dataset012_MSPhantom"
    img, sp = read_image(root / "imagesTr" / "phantom_000_0001.nii.gz")
    assert img.shape == (24, 32, 32) and sp == (2.0, 1.0, 1.0)
    assert json.loads((root / "phantom.json").read_text())["difficulty"] == 1.0
    with pytest.raises(ValueError, match="--new-lesions needs --timepoints 2"):
        run(["phantom", "-d", "13", "--new-lesions", "2", "5", "--raw", str(tmp_path)])
    assert not (tmp_path / "Dataset013_MSPhantom").exists()
