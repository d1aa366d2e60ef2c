"""Per-voxel maps carried beside the labels through nnU-Net's data loader, augmentation and deep supervision.

One transport serves every target part (lesion sizes, soft targets, a random rater's mask):

1. **Reading.** :class:`CaseChannels` is what our dataset wrapper returns as a case's "segmentation": a
   lazy ``(1 + K, *spatial)`` stack of the case's labels (nnU-Net's blosc2 ``_seg.b2nd``, or one rater's
   mask) and K maps stored chunked like the labels (:mod:`nnunet_ext.maps`). nnU-Net's data loader crops
   it exactly as it crops the labels; only the patch is read and decompressed, never the whole case.
2. **Augmentation.** :class:`MapTransport` wraps nnU-Net's own training transforms: it moves the K map
   channels out of the segmentation into batchgeneratorsv2's ``regression_target`` (so the label-wise
   segmentation interpolation, one ``grid_sample`` per label value, never sees them) and nnU-Net's
   ``SpatialTransform`` is given :class:`MapSpatialTransform`'s regression path: linear maps (soft targets)
   ride as extra channels of the image's own ``grid_sample`` call, and maps whose values must stay exact
   (lesion sizes) are sampled nearest-neighbour at the foreground output voxels only, whatever the number
   of lesions. Mirroring flips them; intensity transforms
   skip them. Samples that are only cropped are cropped exactly.
3. **Deep supervision.** Each scale's target is ``[labels, map_1, ..., map_K]`` (float): exact maps are
   downsampled with the same ``nearest-exact`` interpolation nnU-Net uses for the labels (so at every
   scale a voxel's size comes from the same source voxel as its label), soft maps by area averaging.

Exactness: exact maps are sampled nearest-neighbour, with nnU-Net's own grid, at the output voxels whose
transformed label is foreground (everywhere else they are 0; the losses only read sizes where the label is
foreground). A transported size is therefore the whole-case size at the source voxel nearest to the output
voxel, i.e. exactly the size of the lesion the label came from wherever the label of the output voxel
equals the label of that nearest source voxel (nnU-Net's label interpolation keeps the nearest label
except on some interpolated borders). On such borders a lesion voxel whose nearest source voxel is
background gets size 0 (weight 1, as background); a background voxel gets size 0 whatever its nearest
source voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

from nnunet_ext.maps import open_map
from nnunet_ext.training.plumbing import DatasetWrapper

SOFT_SCALE = 255.0  # soft maps and rater masks are stored as uint8 in 1/255 steps


@dataclass(frozen=True)
class MapSpec:
    """One map channel: ``exact`` maps (lesion sizes) are sampled nearest-neighbour and downsampled like
    the labels; others (soft targets) linearly and by area; values are divided by ``scale``."""

    name: str
    exact: bool
    scale: float = 1.0


# --------------------------------------------------------------------------------------------- reading


class CaseChannels:
    """Lazy ``(1 + K, *spatial)`` int16 stack: the label channel and K maps (blosc2 arrays ``(1, *spatial)``).

    ``label_from`` (optional, a blosc2 rater mask 0..255) replaces the labels by ``mask >= 128`` while
    keeping nnU-Net's ``-1`` outside the crop. Indexing reads only the requested region of every part."""

    dtype = np.dtype(np.int16)

    def __init__(self, seg, maps=(), label_from=None):
        self.seg, self.maps, self.label_from = seg, list(maps), label_from
        spatial = tuple(seg.shape[1:])
        for m in self.maps + ([label_from] if label_from is not None else []):
            if tuple(m.shape[1:]) != spatial:
                raise RuntimeError(f"a stored map has shape {tuple(m.shape[1:])}, the case's labels {spatial}; "
                                   f"delete the map folder to recompute it")
        self.shape = (1 + len(self.maps), *spatial)
        self.ndim = len(self.shape)

    def _labels(self, region):
        seg = np.asarray(self.seg[(slice(0, 1),) + region])
        if self.label_from is None:
            return seg.astype(np.int16, copy=False)
        mask = np.asarray(self.label_from[(slice(0, 1),) + region]) >= 128
        return np.where(seg == -1, -1, mask).astype(np.int16)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        channels, region = (key[0] if key else slice(None)), tuple(key[1:])
        parts = [self._labels(region)] + [np.asarray(m[(slice(0, 1),) + region]).astype(np.int16, copy=False)
                                          for m in self.maps]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[channels] if channels != slice(None) else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


class WithTargetMaps(DatasetWrapper):
    """Wraps an nnU-Net dataset; ``load_case`` returns a :class:`CaseChannels` as the segmentation.

    ``map_folders`` lists, per map channel, a folder of ``<case>.b2nd`` maps, or a callable
    ``(case, rater_index) -> folder`` for maps that depend on the drawn rater; ``rater_folders`` (optional)
    draws one rater per load (uniformly) whose mask becomes the labels."""

    def __init__(self, base, map_folders, rater_folders=None, remedy: str = ""):
        super().__init__(base)
        self.map_folders = list(map_folders)
        self.rater_folders = [Path(f) for f in rater_folders] if rater_folders else None
        self.remedy = remedy
        if rater_folders is not None and not self.rater_folders:
            raise FileNotFoundError("no preprocessed rater folders: run nnunet-ext preprocess-soft --raters")

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        rater = None if self.rater_folders is None else int(np.random.randint(len(self.rater_folders)))
        label_from = None if rater is None else open_map(self.rater_folders[rater], identifier, self.remedy)
        maps = [open_map(f(identifier, rater) if callable(f) else f, identifier, self.remedy)
                for f in self.map_folders]
        return data, CaseChannels(seg, maps, label_from), seg_prev, properties


# --------------------------------------------------------------------------------------------- augmentation


class MapSpatialTransform(SpatialTransform):
    """nnU-Net's SpatialTransform with our maps as its regression target, at a cost independent of the number
    of lesions and close to nothing on top of nnU-Net's own sampling:

    - *linear* maps (soft targets) are sampled in the same ``grid_sample`` call as the image (extra channels
      of one call share its coordinate computation), written straight into that call's input buffer;
    - *exact* maps (lesion sizes) are read, as stored (int16), at the source voxel nearest to each output
      voxel whose transformed label is foreground (the only voxels where the losses read them; elsewhere
      they are 0): nnU-Net's own grid, unnormalised and rounded as ``grid_sample(mode="nearest")`` does
      (zero outside the region). The cost is that of the foreground voxels, not of the patch.

    Cropped-only samples are cropped exactly, as nnU-Net crops the image, and stay as stored (int16, ``-1``
    outside the case: mirroring then moves half the bytes of float32); sampled ones leave as float32 (>= 0).
    :class:`MapTransport` converts and scales either while it writes each scale's target."""

    map_specs: list = []

    def _nearest_at(self, maps: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        """``maps`` (C, *S) at the grid points ``pts`` (N, ndim; grid_sample's x-first order), nearest
        neighbour with zero padding: (C, N) float32."""
        spatial = maps.shape[1:]
        nd = len(spatial)
        flat = torch.zeros(pts.shape[0], dtype=torch.int64)
        inside = torch.ones(pts.shape[0], dtype=torch.bool)
        stride = 1
        for axis in range(nd - 1, -1, -1):  # grid column j addresses spatial axis nd - 1 - j
            size = spatial[axis]
            g = pts[:, nd - 1 - axis]
            c = (g + 1) * ((size - 1) / 2) if self.align_corners else (g + 1) * (size / 2) - 0.5
            i = torch.round(c).to(torch.int64)  # round half to even, as std::nearbyint in grid_sample
            inside &= (i >= 0) & (i < size)
            flat += i.clamp_(0, size - 1) * stride
            stride *= size
        vals = maps.reshape(maps.shape[0], -1)[:, flat].to(torch.float32)
        vals[:, ~inside] = 0.0
        return vals.clamp_(min=0.0)

    def apply(self, data_dict, **params):
        maps = data_dict.get("regression_target")
        grid = params.get("grid")
        if maps is None or not self.map_specs:
            return super().apply(data_dict, **params)
        if grid is None:  # cropped only: exact for every map; kept as stored (int16: half the bytes to mirror)
            return super().apply(data_dict, **params)
        k = len(self.map_specs)
        rows = maps.shape[0] // k  # > 1 with nnU-Net's dummy 2d augmentation (maps x slices)
        exact = torch.tensor([s.exact for s in self.map_specs]).repeat_interleave(rows)
        linear = ~exact
        data_dict = dict(data_dict)
        data_dict.pop("regression_target")
        img = data_dict.get("image")
        n_lin = int(linear.sum())
        lin_out = None
        if img is not None and n_lin:  # one call for the image and the linear maps, one buffer
            n_img = img.shape[0]
            buf = torch.empty((n_img + n_lin, *img.shape[1:]), dtype=torch.float32)
            buf[:n_img] = img
            lin_in = buf[n_img:]
            lin_in.copy_(maps if bool(linear.all()) else maps[linear])
            lin_in.clamp_(min=0.0)  # crop padding (-1) -> 0
            data_dict["image"] = buf
            data_dict = super().apply(data_dict, **params)
            both = data_dict["image"]
            data_dict["image"], lin_out = both[:n_img].to(img.dtype), both[n_img:]
            if self.padding_mode_image == "constant" and float(self.padding_value_image) != 0:
                lin_out = lin_out - float(self.padding_value_image)  # maps are padded with 0
        else:
            data_dict = super().apply(data_dict, **params)
            if n_lin:
                lin_out = self._apply_to_image(maps[linear].to(torch.float32).clamp_(min=0.0), **params)
        out_shape = (maps.shape[0], *grid.shape[:-1])
        if not bool(exact.any()):
            data_dict["regression_target"] = lin_out.clamp_(min=0.0)
            return data_dict
        out = torch.zeros(out_shape, dtype=torch.float32)
        if lin_out is not None:
            out[linear] = lin_out.clamp_(min=0.0)
        seg = data_dict.get("segmentation")
        fg = (seg > 0).any(0) if seg is not None else torch.ones(grid.shape[:-1], dtype=torch.bool)
        if bool(fg.any()):
            vals = self._nearest_at(maps[exact], grid[fg])
            if bool(exact.all()):
                out[:, fg] = vals
            else:
                sub = out[exact]
                sub[:, fg] = vals
                out[exact] = sub
        data_dict["regression_target"] = out
        return data_dict


def map_spatial_transform(transform, specs: list[MapSpec]):
    """Give nnU-Net's ``SpatialTransform`` instance our regression-target path (in place; returns it)."""
    if type(transform) is SpatialTransform:
        transform.__class__ = MapSpatialTransform
    elif not isinstance(transform, MapSpatialTransform):
        raise NotImplementedError(f"map transport supports batchgeneratorsv2's SpatialTransform, not a "
                                  f"{type(transform).__name__}")
    transform.map_specs = list(specs)
    return transform


def _find_spatial(transforms):
    if isinstance(transforms, SpatialTransform):
        return [transforms]
    found = []
    for attr in ("transforms", "transform"):
        inner = getattr(transforms, attr, None)
        if inner is None:
            continue
        for t in (inner if isinstance(inner, (list, tuple)) else [inner]):
            found += _find_spatial(t)
    return found


def downsample_map(m: torch.Tensor, shape, exact: bool) -> torch.Tensor:
    """(C, *spatial) map to ``shape``: nearest-exact (as nnU-Net downsamples labels) or area average.

    Nearest-exact by an integer factor f picks source index ``floor((i + 0.5) * f) = i * f + f // 2``, i.e.
    a strided view (no copy); other factors interpolate."""
    src = tuple(m.shape[1:])
    if src == tuple(shape):
        return m
    if exact and all(a % b == 0 for a, b in zip(src, shape)):
        return m[(slice(None),) + tuple(slice((a // b) // 2, None, a // b) for a, b in zip(src, shape))]
    return F.interpolate(m[None], size=tuple(shape), mode="nearest-exact" if exact else "area")[0]


class MapTransport:
    """nnU-Net's training transforms with K map channels (segmentation channels 1..K, int16 as stored)
    carried as a regression target; returns per deep-supervision scale ``[labels, map_1..map_K]`` (float)."""

    def __init__(self, inner, specs: list[MapSpec]):
        self.inner, self.specs = inner, list(specs)
        spatial = _find_spatial(inner)
        if len(spatial) != 1:
            raise NotImplementedError(f"map transport needs exactly one SpatialTransform in the training transforms, "
                                      f"found {len(spatial)}")
        map_spatial_transform(spatial[0], self.specs)

    def __call__(self, **data):
        seg = data["segmentation"]
        k = len(self.specs)
        if seg.shape[0] != 1 + k:
            raise RuntimeError(f"map transport expects 1 + {k} segmentation channels, got {seg.shape[0]}")
        data["segmentation"] = seg[:1]
        data["regression_target"] = seg[1:]  # as stored (int16); MapSpatialTransform samples it
        out = self.inner(**data)
        maps = out.pop("regression_target")  # int16 as stored (cropped only) or float32 (sampled)
        maps.clamp_(min=0)  # crop padding (-1) -> 0, in the map's own dtype
        scales = [float(s.scale) for s in self.specs]  # applied while writing each scale's target
        exact = [s.exact for s in self.specs]
        if maps.is_floating_point():  # sampled: linear interpolation may round a hair above the stored maximum
            for i, e in enumerate(exact):
                if not e:
                    maps[i].clamp_(max=scales[i])
        segs = out["segmentation"]
        last: dict = {}  # soft map i -> its float map at the previous (finer) scale, already scaled to [0, 1]

        def soft_into(i, dst):
            """Soft map i at dst's shape, written into dst: converted and scaled in one pass at the first
            scale, then block averages of the previous scale's block averages (exact, and each scale costs
            a fraction of the previous one)."""
            shape = tuple(dst.shape)
            prev = last.get(i)
            if prev is None and tuple(maps.shape[1:]) == shape:
                torch.div(maps[i], scales[i], out=dst)  # correctly rounded: 255 / 255 is exactly 1
            elif prev is not None and all(a % b == 0 for a, b in zip(prev.shape, shape)):
                f = tuple(a // b for a, b in zip(prev.shape, shape))
                pool = F.avg_pool3d if len(f) == 3 else F.avg_pool2d
                dst.copy_(pool(prev[None, None], kernel_size=f, stride=f)[0, 0])
            else:  # a factor that does not divide: area interpolation from the full-resolution map
                full = maps[i:i + 1].to(torch.float32) / scales[i]
                dst.copy_(downsample_map(full, shape, exact=False)[0])
            last[i] = dst

        def join(s):
            n = s.shape[0]
            t = torch.empty((n + k, *s.shape[1:]), dtype=torch.float32)
            t[:n] = s
            for i, e in enumerate(exact):
                if e:  # a strided view of the stored map (nearest-exact, as the labels), converted while copied
                    t[n + i].copy_(downsample_map(maps[i:i + 1], s.shape[1:], True)[0])
                    if scales[i] != 1.0:
                        t[n + i].div_(scales[i])
                else:
                    soft_into(i, t[n + i])
            return t

        out["segmentation"] = [join(s) for s in segs] if isinstance(segs, (list, tuple)) else join(segs)
        return out
