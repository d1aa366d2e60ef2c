"""Synthetic MS-lesion phantom: FLAIR-like brain volumes with white-matter lesions.

The phantom is the built-in data of every demo, test and benchmark of this package (there are no real
scans on our machines). It writes a complete nnU-Net raw dataset.

Model of one case (array order ``(z, y, x)``, coordinates normalised to ``[-1, 1]`` over the field of
view):

* anatomy: a deformed ellipsoidal head (scalp, skull), brain, a gyrified cortical grey-matter ribbon with
  sulcal CSF, two ventricles, deep grey matter, white matter (WM); FLAIR-like intensities (CSF dark,
  GM brighter than WM, lesions hyperintense);
* lesions: grown voxel by voxel inside the (eroded) white matter, never touching each other (so each
  lesion is one connected component under 26-connectivity), sizes from a heavy-tailed mixture: a share
  ``small_fraction`` drawn log-uniformly from 3-10 voxels, the rest log-normal (median 40 voxels)
  clipped to ``[11, max_lesion_voxels]``;
* partial volume: the image sees each lesion through a Gaussian blur of its mask (``pv_sigma`` voxels),
  so small lesions are fainter than large ones; the blurred mask is also the soft ground truth;
* per-lesion contrast drawn from ``contrast`` (fraction of the WM intensity);
* non-lesion hyperintensities (bright spots in grey matter, periventricular caps) that are not labelled;
* a smooth multiplicative bias field and Rician noise.

``difficulty`` in ``[0, 1]`` (or ``easy``=0.0, ``medium``=0.5, ``hard``=1.0) moves noise, contrast, bias and
the number of mimics together; see :func:`difficulty_settings`.

Options used by later parts of the package: ``raters`` (per-rater masks with boundary perturbation and
rater-specific omission of small lesions), ``soft`` (partial-volume soft labels), ``timepoints=2``
(second FLAIR with new lesions; the label is the new-lesion mask) and ``sites`` (voxel spacings; cases are
assigned to sites in turn and resampled to their site's grid) and ``cohorts`` (labelling protocols: cases are
assigned to cohorts in turn; a ``no_small`` cohort's training labels omit lesions of 10 voxels or fewer, as
some centres' protocols do; test labels always follow the original protocol, all lesions; the assignment
is written to ``cohorts.json``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_ext.core.io import write_image
from nnunet_ext.core.progress import step

DIFFICULTY_LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}

PROTOCOLS = {"all": 0, "no_small": 10}  # labelling protocol -> largest lesion size (voxels) left unlabelled
WM, GM, CSF = 0.60, 0.75, 0.12  # FLAIR-like tissue intensities
SCALP, SKULL = 0.50, 0.05


@dataclass
class PhantomConfig:
    shape: tuple[int, int, int] = (64, 64, 64)  # x, y, z (as NIfTI / SimpleITK report it)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # x, y, z in mm
    difficulty: float = 0.5
    lesions_per_case: tuple[int, int] = (4, 16)  # inclusive range of lesion count in a case with lesions
    empty_fraction: float = 0.1  # share of cases without any lesion
    small_fraction: float = 0.4  # share of lesions of 3-10 voxels
    max_lesion_voxels: int = 1500
    pv_sigma: float = 0.6  # partial-volume blur in voxels
    raters: int = 0
    soft: bool = False
    timepoints: int = 1
    new_lesions: tuple[int, int] = (1, 4)  # timepoints=2: inclusive range of new lesions in a case that has any
    sites: tuple[tuple[float, float, float], ...] = ()  # spacings (x, y, z); empty = one site at `spacing`
    cohorts: tuple[str, ...] = ()  # labelling protocol per cohort: "all" or "no_small"; empty = no cohorts
    seed: int = 0

    def __post_init__(self):
        from nnunet_ext.core import validate

        self.shape = validate.shape(self.shape, "shape", max_voxels=256 ** 3)
        self.spacing = validate.spacing(self.spacing, "spacing")
        self.sites = tuple(validate.spacing(s, "site spacing") for s in self.sites)
        self.cohorts = tuple(self.cohorts)
        bad = [c for c in self.cohorts if c not in PROTOCOLS]
        if bad:
            raise ValueError(f"cohort protocols must be among {sorted(PROTOCOLS)}, got {bad}")
        self.difficulty = validate.finite(self.difficulty, "difficulty", 0.0, 1.0)
        lo, hi = self.lesions_per_case
        if not 0 < lo <= hi <= 1000:
            raise ValueError(f"lesions_per_case must be 0 < min <= max <= 1000, got {self.lesions_per_case}")
        self.empty_fraction = validate.finite(self.empty_fraction, "empty_fraction", 0.0, 1.0)
        self.small_fraction = validate.finite(self.small_fraction, "small_fraction", 0.0, 1.0)
        if self.empty_fraction >= 1.0:
            raise ValueError("empty_fraction must be in [0, 1)")
        self.pv_sigma = validate.finite(self.pv_sigma, "pv_sigma", 0.0, 10.0)
        self.max_lesion_voxels = validate.integer(self.max_lesion_voxels, "max_lesion_voxels", 11, 10 ** 6)
        self.raters = validate.integer(self.raters, "raters", 0, validate.MAX_RATERS)
        if self.timepoints not in (1, 2):
            raise ValueError(f"timepoints must be 1 or 2, got {self.timepoints}")
        self.new_lesions = tuple(self.new_lesions)
        if len(self.new_lesions) != 2 or not 0 < self.new_lesions[0] <= self.new_lesions[1] <= 1000:
            raise ValueError(f"new_lesions must be 0 < min <= max <= 1000, got {self.new_lesions}")
        self.seed = validate.integer(self.seed, "seed", 0, 2 ** 32 - 1)


def parse_difficulty(value: str | float) -> float:
    """``easy``/``medium``/``hard`` or a number in [0, 1]."""
    if isinstance(value, str) and value in DIFFICULTY_LEVELS:
        return DIFFICULTY_LEVELS[value]
    try:
        d = float(value)
    except ValueError:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_LEVELS)} or a number in [0, 1], got {value!r}")
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {d}")
    return d


def difficulty_settings(d: float) -> dict:
    """Image-formation parameters for difficulty ``d`` in [0, 1] (linear between easy and hard)."""
    lerp = lambda a, b: a + (b - a) * d  # noqa: E731
    return {
        "noise_sigma": lerp(0.015, 0.06),  # Rician noise, in units of WM intensity 0.6
        "contrast": (lerp(0.45, 0.18), lerp(0.85, 0.55)),  # lesion contrast range, fraction of WM intensity
        "bias_amplitude": lerp(0.05, 0.3),
        "n_mimics": int(round(lerp(0, 14))),  # non-lesion hyperintensities
        "cap_contrast": lerp(0.0, 0.25),  # periventricular caps, fraction of WM intensity
    }


# ----------------------------------------------------------------------------------------------------------
# helpers


def _smooth_noise(rng: np.random.Generator, shape, coarse: int = 6) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field (cubic upsampling of a coarse random grid)."""
    g = rng.standard_normal((coarse,) * 3)
    out = ndimage.zoom(g, [s / coarse for s in shape], order=3, mode="nearest")
    out = out[: shape[0], : shape[1], : shape[2]]
    pad = [(0, s - o) for s, o in zip(shape, out.shape)]
    return np.pad(out, pad, mode="edge").astype(np.float32)


def _coords(shape) -> list[np.ndarray]:
    return [np.linspace(-1, 1, s, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)])
            for a, s in enumerate(shape)]


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii))


def _anatomy(rng: np.random.Generator, shape) -> dict[str, np.ndarray]:
    z, y, x = coords = _coords(shape)
    scale = rng.uniform(0.95, 1.03, 3)
    head_r = np.array([0.9, 0.95, 0.82]) * scale
    rho = np.sqrt(_ellipsoid(coords, (0, 0, 0), head_r)) + 0.04 * _smooth_noise(rng, shape, 4)
    head = rho < 1.0
    brain = rho < 0.84
    gyri = _smooth_noise(rng, shape, 10)
    cortex = brain & (rho > 0.66 + 0.07 * gyri)
    sulci = brain & (rho > 0.80 + 0.04 * gyri)
    vshift = rng.uniform(-0.03, 0.03, 3)
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        ventricles |= _ellipsoid(coords, (0.05 + vshift[0], 0.02 + vshift[1], side * 0.11 + vshift[2]),
                                 (0.16, 0.34, 0.07)) < 1
    deep_gm = np.zeros(shape, bool)
    for side in (-1, 1):
        deep_gm |= _ellipsoid(coords, (0.0, 0.05, side * 0.3), (0.12, 0.14, 0.09)) < 1
    csf = (sulci | ventricles) & brain
    gm = (cortex | deep_gm) & brain & ~csf
    wm = brain & ~gm & ~csf
    return {"head": head, "brain": brain, "wm": wm, "gm": gm, "csf": csf, "ventricles": ventricles,
            "skull": head & ~brain & (rho > 0.88) & (rho < 0.94)}


_BALL6 = ndimage.generate_binary_structure(3, 1)
_BALL26 = ndimage.generate_binary_structure(3, 3)


def _sample_sizes(rng: np.random.Generator, n: int, cfg: PhantomConfig) -> list[int]:
    sizes = []
    for _ in range(n):
        if rng.random() < cfg.small_fraction:
            sizes.append(int(round(np.exp(rng.uniform(np.log(3), np.log(10.49))))))
        else:
            sizes.append(int(np.clip(round(rng.lognormal(np.log(40), 1.1)), 11, cfg.max_lesion_voxels)))
    return sizes


def _grow_lesion(rng, allowed: np.ndarray, seed_idx, size: int) -> np.ndarray | None:
    """Grow a 6-connected blob of ``size`` voxels inside ``allowed`` from ``seed_idx``; local box returned
    as (slices, mask) or None when the region is too small."""
    r = int(np.ceil((3 * size / (4 * np.pi)) ** (1 / 3) * 2.2)) + 2
    lo = [max(0, c - r) for c in seed_idx]
    hi = [min(s, c + r + 1) for c, s in zip(seed_idx, allowed.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    allow = allowed[box]
    mask = np.zeros(allow.shape, bool)
    local_seed = tuple(c - a for c, a in zip(seed_idx, lo))
    mask[local_seed] = True
    # anisotropic preference gives elongated, ovoid lesions
    axes_w = rng.uniform(0.6, 1.6, 3)
    grid = np.indices(allow.shape, dtype=np.float32)
    dist = np.sqrt(sum(((g - s) * w) ** 2 for g, s, w in zip(grid, local_seed, axes_w)))
    n = 1
    while n < size:
        frontier = ndimage.binary_dilation(mask, _BALL6) & allow & ~mask
        idx = np.flatnonzero(frontier)
        if idx.size == 0:
            return None
        k = min(size - n, max(1, idx.size // 2))
        p = np.exp(-dist.ravel()[idx] / 1.5)
        chosen = rng.choice(idx, size=k, replace=False, p=p / p.sum())
        mask.ravel()[chosen] = True
        n += k
    return box, mask


def _place_lesions(rng, allowed: np.ndarray, sizes: Sequence[int], occupied: np.ndarray) -> np.ndarray:
    """Instance map (int32, 0 = none) with lesions grown in ``allowed`` not touching ``occupied``."""
    inst = np.zeros(allowed.shape, np.int32)
    free = allowed & ~ndimage.binary_dilation(occupied, _BALL26, iterations=2)
    label = 0
    for size in sorted(sizes, reverse=True):
        cand = np.flatnonzero(free)
        for _ in range(20):
            if cand.size == 0:
                break
            seed_idx = np.unravel_index(rng.choice(cand), allowed.shape)
            grown = _grow_lesion(rng, free, seed_idx, size)
            if grown is None:
                continue
            box, mask = grown
            label += 1
            inst[box][mask] = label
            # keep two free voxels around every lesion so lesions never touch
            lo = [max(0, s.start - 2) for s in box]
            hi = [min(n, s.stop + 2) for s, n in zip(box, allowed.shape)]
            big = tuple(slice(a, b) for a, b in zip(lo, hi))
            free[big] &= ~ndimage.binary_dilation(inst[big] == label, _BALL26, iterations=2)
            break
    return inst


def _mimics(rng, anat, n: int, shape) -> np.ndarray:
    """Unlabelled bright spots in grey matter / at the GM-CSF border (vessels, artefacts)."""
    out = np.zeros(shape, np.float32)
    cand = np.flatnonzero(anat["gm"])
    for _ in range(n):
        if cand.size == 0:
            break
        c = np.unravel_index(rng.choice(cand), shape)
        spot = np.zeros(shape, np.float32)
        spot[c] = 1.0
        sigma = rng.uniform(0.6, 1.4)
        spot = ndimage.gaussian_filter(spot, sigma)
        out += spot / spot.max() * rng.uniform(0.25, 0.6)
    return out


def _rician(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    a = img + rng.normal(0, sigma, img.shape)
    b = rng.normal(0, sigma, img.shape)
    return np.sqrt(a * a + b * b).astype(np.float32)


def _render(rng, anat, inst: np.ndarray, contrasts: np.ndarray, settings: dict, cfg: PhantomConfig,
            extra_bright: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR-like image and the partial-volume soft lesion map of one time point."""
    shape = inst.shape
    img = np.zeros(shape, np.float32)
    img[anat["head"]] = SCALP
    img[anat["skull"]] = SKULL
    img[anat["wm"]] = WM
    img[anat["gm"]] = GM
    img[anat["csf"]] = CSF
    brain = anat["brain"]
    img[brain] = ndimage.gaussian_filter(img, 0.7)[brain]  # tissue partial volume
    soft = ndimage.gaussian_filter((inst > 0).astype(np.float32), cfg.pv_sigma) if inst.any() \
        else np.zeros(shape, np.float32)
    soft = np.clip(soft, 0, 1)
    cmap = np.zeros(shape, np.float32)
    if inst.any():
        cmap = ndimage.grey_dilation(np.concatenate([[0.0], contrasts]).astype(np.float32)[inst], size=3)
    img += soft * cmap * WM + extra_bright * WM
    bias = 1.0 + settings["bias_amplitude"] * _smooth_noise(rng, shape, 3) / 2.0
    img = _rician(rng, img * bias, settings["noise_sigma"])
    return img, soft


def _rater_masks(rng, inst: np.ndarray, n_raters: int) -> list[np.ndarray]:
    """Per-rater masks: each lesion drawn wider (half of its outer shell added) or narrower (half of its
    boundary removed) at random; small lesions omitted with a rater-specific probability (the k-th rater,
    1-based, misses a 3-10-voxel lesion with probability 0.1 k)."""
    out = []
    objs = ndimage.find_objects(inst)
    for k in range(n_raters):
        p_omit = 0.1 + 0.1 * k
        m = np.zeros(inst.shape, bool)
        for lab, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            big = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(sl, inst.shape))
            les = inst[big] == lab
            size = int(les.sum())
            if size <= 10 and rng.random() < p_omit:
                continue
            action = rng.random()
            if action < 0.3:  # this rater draws wider: half of the outer shell added
                shell = ndimage.binary_dilation(les, _BALL6) & ~les & ((inst[big] == 0) | (inst[big] == lab))
                les = les | (shell & (rng.random(les.shape) < 0.5))
            elif action < 0.6 and size > 10:  # narrower: half of the boundary voxels removed
                boundary = les & ~ndimage.binary_erosion(les, _BALL6)
                les = les & ~(boundary & (rng.random(les.shape) < 0.5))
            m[big] |= les
        out.append(m.astype(np.uint8))
    return out


def _resample(arr: np.ndarray, factors, order: int) -> np.ndarray:
    """Resample by ``factors`` (new/old voxel size, array order); anti-aliased for downsampling."""
    arr = arr.astype(np.float32)
    sig = [max(0.0, (f - 1) / 2.0) for f in factors]
    if any(sig) and order > 0:
        arr = ndimage.gaussian_filter(arr, sig)
    return ndimage.zoom(arr, [1 / f for f in factors], order=order, mode="nearest")


def lesion_table(mask: np.ndarray, spacing_zyx) -> list[dict]:
    """Connected components (26-connectivity) of ``mask``: id, voxel count, centre (voxel x,y,z and mm)."""
    import cc3d

    lab, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    if n == 0:
        return []
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    centres = ndimage.center_of_mass(np.ones_like(lab), lab, range(1, n + 1))
    rows = []
    for i, (c, com) in enumerate(zip(counts, centres), start=1):
        zyx = np.asarray(com)
        rows.append({"id": i, "voxels": int(c), "volume_mm3": float(c * np.prod(spacing_zyx)),
                     "centre_voxel_xyz": [round(float(v), 2) for v in zyx[::-1]],
                     "centre_mm_xyz": [round(float(v), 2) for v in (zyx * np.asarray(spacing_zyx))[::-1]]})
    return rows


# ----------------------------------------------------------------------------------------------------------
# one case


@dataclass
class PhantomCase:
    images: list[np.ndarray]  # one per channel (time point), float32, (z, y, x)
    label: np.ndarray  # uint8 binary lesion mask (new lesions for two time points)
    spacing_zyx: tuple[float, float, float]
    soft: np.ndarray | None = None  # float32 partial-volume soft label in [0, 1]
    raters: list[np.ndarray] = field(default_factory=list)
    site: int = 0
    cohort: str | None = None


def cohort_names(cfg: PhantomConfig) -> list[str]:
    """Names of the phantom's cohorts: ``cohort<k>_<protocol>``."""
    return [f"cohort{k}_{p}" for k, p in enumerate(cfg.cohorts)]


def apply_protocol(label: np.ndarray, protocol: str) -> np.ndarray:
    """``label`` as a cohort with labelling ``protocol`` would draw it (lesions up to the protocol's size
    limit removed, 26-connected components)."""
    import cc3d

    limit = PROTOCOLS[protocol]
    if limit == 0 or not label.any():
        return label
    return cc3d.dust(label.astype(np.uint8), threshold=limit + 1, connectivity=26, in_place=False)


def generate_case(cfg: PhantomConfig, index: int) -> PhantomCase:
    """Generate case ``index`` of the phantom; deterministic in ``(cfg.seed, index)``."""
    rng = np.random.default_rng([cfg.seed, index])
    settings = difficulty_settings(cfg.difficulty)
    shape = tuple(reversed(cfg.shape))
    anat = _anatomy(rng, shape)
    wm_core = ndimage.binary_erosion(anat["wm"], _BALL6, iterations=1)
    has_lesions = rng.random() >= cfg.empty_fraction
    lo, hi = cfg.lesions_per_case
    # lesion counts scale with the brain size so small grids are not crowded
    scale = min(1.0, float(np.prod(shape)) / 64 ** 3) ** 0.5
    n = int(max(1, round(rng.integers(lo, hi + 1) * scale))) if has_lesions else 0
    inst = _place_lesions(rng, wm_core, _sample_sizes(rng, n, cfg), np.zeros(shape, bool))
    c_lo, c_hi = settings["contrast"]
    contrasts = rng.uniform(c_lo, c_hi, int(inst.max()))
    mimic = _mimics(rng, anat, settings["n_mimics"], shape)
    if settings["cap_contrast"] > 0:
        caps = ndimage.binary_dilation(anat["ventricles"], _BALL6, iterations=2) & ~anat["ventricles"] & anat["wm"]
        mimic += ndimage.gaussian_filter(caps.astype(np.float32), 1.0) * settings["cap_contrast"]
    img1, soft1 = _render(rng, anat, inst, contrasts, settings, cfg, mimic)
    label = inst > 0
    soft = soft1
    images = [img1]
    rater_src = inst
    if cfg.timepoints == 2:
        n_new = 0 if rng.random() < 0.25 else int(rng.integers(cfg.new_lesions[0], cfg.new_lesions[1] + 1))
        new = _place_lesions(rng, wm_core, _sample_sizes(rng, n_new, cfg), inst > 0)
        both = inst.copy()
        both[new > 0] = new[new > 0] + inst.max()
        new_contrasts = rng.uniform(c_lo, c_hi, int(new.max()))
        img2, soft2 = _render(rng, anat, both, np.concatenate([contrasts, new_contrasts]), settings, cfg, mimic)
        img2 *= rng.normal(1.0, 0.03)
        img2 = ndimage.shift(img2, rng.uniform(-0.5, 0.5, 3), order=1, mode="nearest")  # registration noise
        images.append(img2)
        label = new > 0
        soft = np.where(ndimage.binary_dilation(new > 0, _BALL26, iterations=2), soft2, 0).astype(np.float32)
        rater_src = new
    raters = _rater_masks(rng, rater_src, cfg.raters)
    spacing = tuple(reversed(cfg.spacing))
    site = index % len(cfg.sites) if cfg.sites else 0
    if cfg.sites:
        target = tuple(reversed(cfg.sites[site]))
        factors = [t / s for t, s in zip(target, spacing)]
        if not np.allclose(factors, 1):
            images = [_resample(im, factors, 1) for im in images]
            soft = np.clip(_resample(soft, factors, 1), 0, 1)
            label = _resample(label, factors, 1) >= 0.5
            raters = [(_resample(r, factors, 1) >= 0.5).astype(np.uint8) for r in raters]
        spacing = target
    return PhantomCase(images=[im.astype(np.float32) for im in images], label=label.astype(np.uint8),
                       spacing_zyx=spacing, soft=soft.astype(np.float32) if cfg.soft else None,
                       raters=raters, site=site,
                       cohort=cohort_names(cfg)[index % len(cfg.cohorts)] if cfg.cohorts else None)


# ----------------------------------------------------------------------------------------------------------
# dataset writer


def _write_case(args) -> tuple[str, list[dict], int, str | None]:
    cfg, index, root, split, case_id = args
    case = generate_case(cfg, index)
    if case.cohort is not None and split == "train":
        case.label = apply_protocol(case.label, cfg.cohorts[cohort_names(cfg).index(case.cohort)])
    img_dir, lab_dir = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
    for ch, im in enumerate(case.images):
        write_image(im, case.spacing_zyx, root / img_dir / f"{case_id}_{ch:04d}.nii.gz")
    write_image(case.label, case.spacing_zyx, root / lab_dir / f"{case_id}.nii.gz")
    suffix = "Tr" if split == "train" else "Ts"
    if case.soft is not None:
        write_image(case.soft, case.spacing_zyx, root / f"softlabels{suffix}" / f"{case_id}.nii.gz")
    for k, r in enumerate(case.raters, start=1):
        write_image(r, case.spacing_zyx, root / f"raters{suffix}" / f"rater{k}" / f"{case_id}.nii.gz")
    return case_id, lesion_table(case.label, case.spacing_zyx), case.site, case.cohort


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def write_phantom_dataset(raw_root: str | os.PathLike, dataset_id: int, n_train: int, cfg: PhantomConfig,
                          n_test: int = 0, name: str = "MSPhantom", num_workers: int = 1,
                          progress: bool = True, overwrite: bool = False) -> Path:
    """Write ``Dataset{id}_{name}`` under ``raw_root`` (imagesTr/labelsTr, optional imagesTs/labelsTs,
    dataset.json, lesions.json, phantom.json with the settings, and the optional soft/rater folders).

    Returns the dataset folder. Training cases are ``phantom_000 ...``, test cases continue the numbering
    (they are different draws of the same generator). The dataset is built in a staging folder and moved
    into place at the end, under a lock on the dataset id: an interrupted run leaves the previous dataset
    (or none) untouched, a concurrent run on the same id fails with a message, and a non-empty existing
    dataset is refused unless ``overwrite`` (which replaces it as a whole: no stale cases). The files are
    byte-identical for the same settings, whatever ``num_workers``.
    """
    from nnunet_ext.core import validate
    from nnunet_ext.data.raw import staged_dataset, write_json
    from nnunet_ext.core.safety import atomic_write_text, worker_pool

    n_train = validate.count(n_train, "n_train (--cases)", 1, validate.MAX_CASES)
    n_test = validate.count(n_test, "n_test (--test-cases)", 0, validate.MAX_CASES)
    if n_train + n_test > validate.MAX_CASES:
        raise ValueError(f"at most {validate.MAX_CASES} cases in all, got {n_train + n_test}")
    num_workers = validate.workers(num_workers, "num_workers (--num-processes)")
    with staged_dataset(raw_root, dataset_id, name, overwrite) as (root, final):
        jobs = [(cfg, i, root, "train" if i < n_train else "test", f"phantom_{i:03d}") for i in range(n_train + n_test)]
        table, sites, cohorts = {}, {}, {}

        def collect(results):
            for k, (cid, rows, site, cohort) in enumerate(results, 1):
                table[cid], sites[cid], cohorts[cid] = rows, site, cohort
                step("phantom", k, len(jobs), progress, item=cid)

        if num_workers > 1:
            with worker_pool(min(num_workers, len(jobs))) as pool:
                collect(pool.imap(_write_case, jobs))
        else:
            collect(map(_write_case, jobs))
        channels = {"0": "FLAIR"} if cfg.timepoints == 1 else {"0": "FLAIR_tp1", "1": "FLAIR_tp2"}
        dataset_json = {
            "channel_names": channels,
            "labels": {"background": 0, "lesion": 1},
            "numTraining": n_train,
            "file_ending": ".nii.gz",
            "name": name,
            "description": "nnunet-ext synthetic MS-lesion phantom" + (" (label: new lesions)" if cfg.timepoints == 2 else ""),
        }
        atomic_write_text(root / "dataset.json", json.dumps(dataset_json, indent=2))
        write_json(root / "lesions.json", table)
        if cfg.cohorts:
            write_json(root / "cohorts.json", cohorts)
        meta = asdict(cfg)
        meta.update({"n_train": n_train, "n_test": n_test, "difficulty_settings": difficulty_settings(cfg.difficulty),
                     "sites_of_cases": sites})
        write_json(root / "phantom.json", meta)
    return final


def contrast_to_noise(image: np.ndarray, label: np.ndarray, wm_ring: int = 2,
                      bins=((3, 10), (11, 50), (51, None))) -> dict[str, float]:
    """Median per-lesion CNR by size bin: (lesion mean - surrounding WM mean) / surrounding std.

    The surrounding is a shell of ``wm_ring`` voxels starting 2 voxels away from the lesion (26-connected
    dilations), outside the partial-volume halo."""
    import cc3d

    lab, n = cc3d.connected_components(label.astype(np.uint8), connectivity=26, return_N=True)
    per_bin: dict[str, list[float]] = {f"{lo}-{hi}" if hi else f"{lo}+": [] for lo, hi in bins}
    objs = ndimage.find_objects(lab)
    for i, sl in enumerate(objs, start=1):
        big = tuple(slice(max(0, s.start - wm_ring - 3), min(m, s.stop + wm_ring + 3)) for s, m in zip(sl, lab.shape))
        les = lab[big] == i
        near = ndimage.binary_dilation(les, _BALL26, iterations=2)
        ring = ndimage.binary_dilation(les, _BALL26, iterations=wm_ring + 2) & ~near & (lab[big] == 0)
        vals, bg = image[big][les], image[big][ring]
        if bg.size < 2:
            continue
        cnr = (vals.mean() - bg.mean()) / (bg.std() + 1e-8)
        size = int(les.sum())
        for lo, hi in bins:
            if size >= lo and (hi is None or size <= hi):
                per_bin[f"{lo}-{hi}" if hi else f"{lo}+"].append(float(cnr))
    return {k: float(np.median(v)) if v else float("nan") for k, v in per_bin.items()}
