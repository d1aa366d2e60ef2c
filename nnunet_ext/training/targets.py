"""Per-voxel maps carried beside the labels through nnU-Net's data loader, augmentation and deep supervision.

One transport serves every target part (lesion sizes, soft targets, a random rater's mask):

1. **Reading.** :class:`CaseChannels` is what our dataset wrapper returns as a case's "segmentation": a
   lazy ``(1 + K, *spatial)`` stack of the case's labels (nnU-Net's blosc2 ``_seg.b2nd``, or one rater's
   mask) and K maps stored chunked like the labels (:mod:`nnunet_ext.preprocessing.maps`); with a :class:`Packing` the
   first map shares the label channel (stored so by :func:`write_packed_maps`), and the stack is
   ``(K, *spatial)``. nnU-Net's data loader crops it exactly as it crops the labels; only the patch is
   read and decompressed, never the whole case.
2. **Augmentation.** :class:`MapTransport` wraps nnU-Net's own training transforms and leaves the maps
   where the data loader put them, as segmentation channels after the labels: nnU-Net's crop, mirroring,
   ``-1`` removal and deep-supervision downsampling treat every channel alike. Only sampled (rotated or
   scaled) samples need more, since nnU-Net's label sampling runs one ``grid_sample`` per label value:
   :class:`MapSpatialTransform` gives it the labels alone and samples the maps itself, exact maps
   (lesion sizes) nearest-neighbour at the foreground output voxels, linear maps (soft targets)
   bilinearly at the output voxels non-zero map voxels can reach, whatever the number of lesions.
3. **Deep supervision.** Each scale's target is ``[labels, map_1, ..., map_K]`` in the stored dtype
   (int16) and units (sizes in voxels, soft maps in 1/255 steps, ``nnunet_ext.preprocessing.maps.SOFT_SCALE``), every channel
   downsampled by nnU-Net's ``nearest-exact`` (so at every scale a voxel's map value comes from the same
   source voxel as its label).

Exactness: exact maps are sampled nearest-neighbour, with nnU-Net's own grid, at the output voxels whose
transformed label is foreground (everywhere else they are 0; the losses only read sizes where the label is
foreground). A transported size is therefore the whole-case size at the source voxel nearest to the output
voxel, i.e. exactly the size of the lesion the label came from wherever the label of the output voxel
equals the label of that nearest source voxel (nnU-Net's label interpolation keeps the nearest label
except on some interpolated borders). On such borders a lesion voxel whose nearest source voxel is
background gets size 0 (weight 1, as background); a background voxel gets size 0 whatever its nearest
source voxel. Soft maps are interpolated like the image (bilinear, zero padding) and rounded to the stored
1/255 steps (at most 0.002 off the interpolated value); lower deep-supervision scales subsample them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

from nnunet_ext.preprocessing.maps import map_path, open_map, save_map_like_seg
from nnunet_ext.training.plumbing import DatasetWrapper

ACTIVE_BLOCK = 4  # output and source block edge (voxels) of the linear maps' support search


@dataclass(frozen=True)
class MapSpec:
    """One map channel: ``exact`` maps (lesion sizes) are sampled nearest-neighbour, others (soft targets)
    linearly; every map is downsampled like the labels and stays in its stored units, whose largest value
    is ``scale`` for linear maps (255: soft maps in 1/255 steps)."""

    name: str
    exact: bool
    scale: float = 1.0


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Packing:
    """The first map packed into the label channel: ``label | min(map, cap) << bits`` (int16; the crop
    marker -1 stays -1, since ``x | -1 == -1``). One int16 channel then carries the labels and that map
    through nnU-Net's whole data path (read, pad, crop, mirror, ``-1`` removal, deep supervision) at the
    cost of the labels alone; :class:`MapTransport` unpacks every scale's target at the end.

    ``bits``: label bits (labels, incl. an ignore label, must be below ``2 ** bits``); the map must be
    ``>= 0`` and values above ``cap = 2 ** (15 - bits) - 1`` are clipped (lesion sizes only: the LSR weight
    of a lesion of ``cap`` voxels is 1 to float32 precision for any beta up to 1000)."""

    bits: int

    @property
    def cap(self) -> int:
        return 2 ** (15 - self.bits) - 1

    @property
    def mask(self) -> int:
        return 2 ** self.bits - 1

    @staticmethod
    def for_labels(max_label: int, first: MapSpec) -> "Packing | None":
        """The packing for labels up to ``max_label`` and the first map, or None when the map would lose
        values (a soft map needs 8 bits; sizes keep at least 4095 voxels)."""
        bits = max(1, int(max_label).bit_length())
        p = Packing(bits)
        return p if p.cap >= (4095 if first.exact else int(first.scale)) else None

    def pack_np(self, labels: np.ndarray, first: np.ndarray) -> np.ndarray:
        """``first`` must be a fresh array (it may be reused as the result)."""
        enc = first.astype(np.int16, copy=False)
        if first.dtype != np.uint8:  # uint8 maps (soft, 0..255) are below every cap Packing allows
            np.minimum(enc, self.cap, out=enc)
        np.left_shift(enc, self.bits, out=enc)
        return np.bitwise_or(enc, labels.astype(np.int16, copy=False), out=enc)

    def pack(self, labels: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """int16 tensors: labels (-1 allowed) and the map (0 ..cap), packed (a new tensor)."""
        enc = first.to(torch.int16).numpy().copy()
        np.left_shift(enc, self.bits, out=enc)
        return torch.from_numpy(np.bitwise_or(enc, labels.to(torch.int16).numpy(), out=enc))

    def labels_of(self, enc: torch.Tensor) -> torch.Tensor:
        """The labels of a packed int16 tensor, the crop marker -1 kept (``-1 >> 15 == -1``)."""
        e = enc.numpy()
        lab = np.bitwise_and(e, self.mask)
        return torch.from_numpy(np.bitwise_or(lab, np.right_shift(e, 15), out=lab))

    def unpack(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (the crop marker -1 kept) and the map (-1 there as well)."""
        return self.labels_of(enc), torch.from_numpy(np.right_shift(enc.numpy(), self.bits))


def rater_labels(seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A rater's labels (``mask >= 128`` of 0..255) with nnU-Net's crop marker of ``seg`` kept (int16)."""
    lab = (mask >= 128).astype(np.int16)
    # seg >> 15 is -1 at the crop marker and 0 elsewhere (labels >= 0), and x | -1 == -1
    return np.bitwise_or(lab, np.right_shift(seg.astype(np.int16, copy=False), 15), out=lab)


FUSIONS = ("union", "intersection", "majority")  # the voxel-wise rules of nnunet_ext.data.fusion.fuse


class FusedMasks:
    """Lazy fusion of several raters' masks (blosc2 arrays ``(1, *spatial)`` of 0..255, foreground at >= 128)
    as one such mask: ``"union"`` (any rater), ``"intersection"`` (every rater) or ``"majority"`` (more than
    half of them; a tie is background), computed by :func:`nnunet_ext.data.fusion.fuse`. Indexing reads only
    the requested region of every rater."""

    def __init__(self, masks, method: str):
        if method not in FUSIONS:
            raise ValueError(f"method must be union, intersection or majority, got {method!r}")
        self.masks, self.method = list(masks), method
        if not self.masks:
            raise ValueError("no rater masks to fuse")
        self.shape = tuple(self.masks[0].shape)
        for m in self.masks[1:]:
            if tuple(m.shape) != self.shape:
                raise RuntimeError(f"rater masks of shapes {self.shape} and {tuple(m.shape)}; rerun nnunet-ext "
                                   f"preprocess-soft --raters --overwrite")

    def __getitem__(self, key):
        from nnunet_ext.data.fusion import fuse

        return fuse(self.method, [(np.asarray(m[key]) >= 128).astype(np.uint8) for m in self.masks]) * np.uint8(255)


PACKED_FOLDER = "nnunet_ext_packed"


def packed_folder(preprocessed_folder, first_folder, packing: Packing) -> Path:
    """Where the label channel packed with the maps of ``first_folder`` is stored."""
    first = Path(first_folder)
    return Path(preprocessed_folder) / PACKED_FOLDER / f"{first.parent.name}__{first.name}__b{packing.bits}"


def write_packed_maps(identifiers, preprocessed_folder, first_folder, packing: Packing,
                      raters: list[Path] | None = None, remedy: str = "") -> int:
    """Store, per case (and per rater when ``first_folder`` is a callable ``(case, rater_index) ->
    folder``), the label channel with the first map packed into it (:class:`Packing`), chunked like
    nnU-Net's labels, so that training reads one array where it would read two. A stored one is kept
    while it is newer than its sources (nnU-Net's labels, the map, the rater's mask). Returns how many
    were written."""
    import blosc2

    pre = Path(preprocessed_folder)
    made = 0
    for case in identifiers:
        seg_file = pre / f"{case}_seg.b2nd"
        for r in (range(len(raters)) if callable(first_folder) else [None]):
            src = first_folder(case, r) if r is not None else first_folder
            target = map_path(packed_folder(pre, src, packing), case)
            sources = [seg_file, map_path(src, case)] + ([map_path(raters[r], case)] if r is not None else [])
            if target.is_file() and target.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
                continue
            seg = np.asarray(blosc2.open(urlpath=str(seg_file), mode="r")[:])
            labels = seg if r is None else rater_labels(seg, np.asarray(open_map(raters[r], case, remedy)[:]))
            enc = packing.pack_np(labels, np.asarray(open_map(src, case, remedy)[:]))
            save_map_like_seg(enc, seg_file, target)
            made += 1
    return made


class CaseChannels:
    """Lazy int16 stack of the label channel and K maps (blosc2 arrays ``(1, *spatial)``): ``(1 + K, *spatial)``,
    or with a :class:`Packing` ``(K, *spatial)``, the first map packed into the label channel.

    ``label_from`` (optional, a blosc2 rater mask 0..255) replaces the labels by ``mask >= 128`` while
    keeping nnU-Net's ``-1`` outside the crop. Indexing reads only the requested region of every part."""

    dtype = np.dtype(np.int16)

    def __init__(self, seg, maps=(), label_from=None, packing: Packing | None = None):
        self.seg, self.maps, self.label_from = seg, list(maps), label_from
        self.packing = packing if self.maps else None
        spatial = tuple(seg.shape[1:])
        for m in self.maps + ([label_from] if label_from is not None else []):
            if tuple(m.shape[1:]) != spatial:
                raise RuntimeError(f"a stored map has shape {tuple(m.shape[1:])}, the case's labels {spatial}; "
                                   f"delete the map folder to recompute it")
        self.shape = (1 + len(self.maps) - (self.packing is not None), *spatial)
        self.ndim = len(self.shape)

    def _labels(self, region):
        seg = np.asarray(self.seg[(slice(0, 1),) + region])
        if self.label_from is None:
            return seg.astype(np.int16, copy=False)
        return rater_labels(seg, np.asarray(self.label_from[(slice(0, 1),) + region]))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        channels, region = (key[0] if key else slice(None)), tuple(key[1:])
        parts = [self._labels(region)] + [np.asarray(m[(slice(0, 1),) + region]) for m in self.maps]
        if self.packing is not None:
            parts = [self.packing.pack_np(parts[0], parts[1])] + parts[2:]
        parts = [p.astype(np.int16, copy=False) for p in parts]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[channels] if channels != slice(None) else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


class WithTargetMaps(DatasetWrapper):
    """Wraps an nnU-Net dataset; ``load_case`` returns a :class:`CaseChannels` as the segmentation.

    ``map_folders`` lists, per map channel, a folder of ``<case>.b2nd`` maps, or a callable
    ``(case, rater_index) -> folder`` for maps that depend on the drawn rater; ``rater_folders`` (optional)
    draws one rater per load (uniformly) whose mask becomes the labels; ``packing`` (the transport's,
    :attr:`MapTransport.packing`) packs the first map into the label channel while reading, or
    ``packed_folders`` (a folder, or a callable ``(case, rater_index) -> folder``; from
    :func:`write_packed_maps`) gives it already packed (one array read instead of two). ``fuse`` (``"union"``,
    ``"intersection"`` or ``"majority"``, with ``rater_folders`` and no maps) makes the labels the raters'
    fusion (:class:`FusedMasks`) instead of one drawn rater."""

    def __init__(self, base, map_folders, rater_folders=None, remedy: str = "", packing: Packing | None = None,
                 packed_folders=None, fuse: str | None = None):
        super().__init__(base)
        if fuse is not None and (not rater_folders or map_folders or packed_folders is not None):
            raise ValueError("fuse needs rater folders and no maps")
        self.fuse = fuse
        self.packing, self.packed_folders = packing, packed_folders
        self.map_folders = list(map_folders)
        self.rater_folders = [Path(f) for f in rater_folders] if rater_folders else None
        self.remedy = remedy
        if rater_folders is not None and not self.rater_folders:
            raise FileNotFoundError("no preprocessed rater folders: run nnunet-ext preprocess-soft --raters")

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        if self.fuse is not None:
            fused = FusedMasks([open_map(f, identifier, self.remedy) for f in self.rater_folders], self.fuse)
            return data, CaseChannels(seg, [], fused), seg_prev, properties
        rater = None if self.rater_folders is None else int(np.random.randint(len(self.rater_folders)))

        def opened(folder):  # a folder, or a callable (case, rater_index) -> folder
            return open_map(folder(identifier, rater) if callable(folder) else folder, identifier, self.remedy)

        if self.packed_folders is not None:  # labels (the rater's, if any) and the first map in one array
            maps = [opened(f) for f in self.map_folders[1:]]
            return data, CaseChannels(opened(self.packed_folders), maps), seg_prev, properties
        label_from = None if rater is None else opened(self.rater_folders[rater])
        maps = [opened(f) for f in self.map_folders]
        return data, CaseChannels(seg, maps, label_from, self.packing), seg_prev, properties


# --------------------------------------------------------------------------------------------- augmentation


def _block_max(x: torch.Tensor, b: int) -> torch.Tensor:
    """Maximum over blocks of ``b`` voxels (a power of 2) along every axis, the last block of an axis
    partial when ``b`` does not divide it: pairwise maxima of strided views, halving one axis at a time."""
    while b > 1:
        for axis in range(x.ndim):
            n = x.shape[axis]
            if n < 2:
                continue
            shape = list(x.shape)
            shape[axis] = (n + 1) // 2
            out = torch.empty(shape, dtype=x.dtype)
            even = x.narrow(axis, 0, n - n % 2)
            torch.maximum(even.unflatten(axis, (n // 2, 2)).select(axis + 1, 0),
                          even.unflatten(axis, (n // 2, 2)).select(axis + 1, 1), out=out.narrow(axis, 0, n // 2))
            if n % 2:
                out.narrow(axis, n // 2, 1).copy_(x.narrow(axis, n - 1, 1))
            x = out
        b //= 2
    return x


def _summed_area(occ: torch.Tensor) -> torch.Tensor:
    """Summed-area table of a boolean block occupancy, with a leading zero plane per axis (int32)."""
    sat = torch.zeros(tuple(n + 1 for n in occ.shape), dtype=torch.int32)
    inner = sat[tuple(slice(1, None) for _ in occ.shape)]
    inner.copy_(occ)
    for axis in range(occ.ndim):
        torch.cumsum(inner, axis, out=inner)
    return sat


def _blocks_touching(origins, extent, sat, b, o, d, spatial) -> torch.Tensor:
    """True for the output blocks (origins (M, nd), ``extent`` voxels per axis) whose linear-interpolation
    footprint in the source (output index i maps to source voxel coordinates ``o + i @ d``) meets an
    occupied source block of ``b`` voxels (``sat``: :func:`_summed_area` of the occupancy)."""
    nd = len(spatial)
    start = o + origins.to(torch.float64) @ d
    span = torch.full((nd,), float(extent - 1), dtype=torch.float64)
    lo = start + (span @ d.clamp(max=0) - 1e-3)
    hi = start + (span @ d.clamp(min=0) + 1e-3)
    v_lo, v_hi = torch.floor(lo), torch.floor(hi) + 1  # first and last source voxel of the footprints
    size = torch.tensor(spatial, dtype=torch.float64)
    inside = ((v_hi >= 0) & (v_lo <= size - 1)).all(-1)
    nb = torch.tensor(sat.shape) - 1
    b_lo = torch.minimum(v_lo.clamp_(min=0).to(torch.int64) // b, nb - 1)
    b_hi = torch.minimum(v_hi.clamp_(min=0).to(torch.int64) // b, nb - 1) + 1
    st = torch.tensor([int(np.prod(sat.shape[a + 1:])) for a in range(nd)])
    i_lo, i_hi = b_lo * st, b_hi * st  # per axis contributions to the flat index
    flat = sat.reshape(-1)
    count = torch.zeros(origins.shape[0], dtype=torch.int32)
    for corner in range(2 ** nd):
        use = [(corner >> a) & 1 for a in range(nd)]
        idx = i_hi[:, 0] if use[0] else i_lo[:, 0]
        for a in range(1, nd):
            idx = idx + (i_hi[:, a] if use[a] else i_lo[:, a])
        if (nd - sum(use)) % 2:
            count -= flat.take(idx)
        else:
            count += flat.take(idx)
    return inside & (count > 0)


class MapSpatialTransform(SpatialTransform):
    """nnU-Net's SpatialTransform for a segmentation whose channels are the labels followed by K maps
    (``rows`` channels each: 1, or the slices of nnU-Net's dummy 2d augmentation), at a cost that does not
    grow with the number of lesions:

    - cropped-only samples are cropped by nnU-Net with the labels, every channel as stored (exact);
    - on sampled ones nnU-Net's label sampling (one ``grid_sample`` per label value) sees the labels only;
      *exact* maps (lesion sizes) are read, as stored, at the source voxel nearest to each output voxel
      whose transformed label is foreground (the only voxels where the losses read them; elsewhere 0):
      nnU-Net's own grid, unnormalised and rounded as ``grid_sample(mode="nearest")`` does (zero outside
      the region). *Linear* maps (soft targets) are interpolated as ``grid_sample(mode="bilinear")`` with
      zero padding would, but only at the output voxels a non-zero map voxel can reach (found block by
      block, :meth:`_linear_support`; 0 elsewhere and where the transformed label is the crop marker -1),
      and rounded to the stored steps (1/255). Both cost what the lesions' neighbourhood costs, not a pass
      over the patch.

    With a :class:`Packing` the first map arrives packed into the label channel; it is unpacked for the
    sampling and packed again.
    """

    map_specs: list = []
    packing: Packing | None = None

    def _nearest_at(self, maps: torch.Tensor, pts: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """``maps`` (C, *S) at the grid points ``pts`` (N, ndim; grid_sample's x-first order), nearest
        neighbour with zero padding, negative values (the crop marker) read as 0: (C, N) float32.
        ``shift``: the maps are packed (:class:`Packing`); a value is ``stored >> shift``."""
        spatial = maps.shape[1:]
        nd = len(spatial)
        flat = torch.zeros(pts.shape[0], dtype=torch.int64)
        inside = torch.ones(pts.shape[0], dtype=torch.bool)
        stride = 1
        for axis in range(nd - 1, -1, -1):  # grid column j addresses spatial axis nd - 1 - j
            size = spatial[axis]
            c = self._to_source(pts[:, nd - 1 - axis], size)
            i = torch.round(c).to(torch.int64)  # round half to even, as std::nearbyint in grid_sample
            inside &= (i >= 0) & (i < size)
            flat += i.clamp_(0, size - 1) * stride
            stride *= size
        vals = maps.reshape(maps.shape[0], -1)[:, flat]
        vals = (vals >> shift if shift else vals).to(torch.float32)
        vals[:, ~inside] = 0.0
        return vals.clamp_(min=0.0)

    def _to_source(self, g: torch.Tensor, size: int) -> torch.Tensor:
        """grid_sample's unnormalisation of grid coordinates ``g`` along a source axis of ``size`` voxels."""
        return (g + 1) * ((size - 1) / 2) if self.align_corners else (g + 1) * (size / 2) - 0.5

    def _linear_at(self, maps: torch.Tensor, pts: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """``maps`` (C, *S), as stored, linearly interpolated at the grid points ``pts`` (N, ndim; x first)
        with zero padding, negative values (the crop marker) read as 0: (C, N) float32. The unnormalisation
        and corner weights of ``grid_sample(mode="bilinear")`` (equal to it up to float rounding).
        ``shift``: packed maps, a value is ``stored >> shift``."""
        spatial = maps.shape[1:]
        nd = len(spatial)
        flat = maps.reshape(maps.shape[0], -1)
        strides = [int(np.prod(spatial[a + 1:])) for a in range(nd)]
        base, w_axes, border = None, [], []
        for axis in range(nd):
            size = spatial[axis]
            c = self._to_source(pts[:, nd - 1 - axis], size)
            f = torch.floor(c)
            w1 = c.sub_(f)
            i0 = f.to(torch.int64)
            w_axes.append((1.0 - w1, w1))
            lo, hi = torch.aminmax(i0)
            border.append(bool(lo < 0) or bool(hi > size - 2))
            if border[-1]:  # some footprints leave the region: zero weight outside, indices clamped
                w_axes[-1][0].mul_((i0 >= 0) & (i0 < size))
                w_axes[-1][1].mul_((i0 >= -1) & (i0 < size - 1))
            base = i0 * strides[axis] if base is None else base.add_(i0 * strides[axis])
        # all 2^nd corners at once: weights (2^nd, N) by broadcasting, one gather per channel
        weights = None
        for w0, w1 in w_axes:  # corner c uses bit (nd - 1 - axis) of c for the axis
            pair = torch.stack([w0, w1])
            weights = pair if weights is None else (weights[:, None] * pair[None]).reshape(-1, pair.shape[1])
        offs = torch.tensor([sum(((corner >> (nd - 1 - axis)) & 1) * strides[axis] for axis in range(nd))
                             for corner in range(2 ** nd)])
        idx = base[None] + offs[:, None]
        if any(border):
            idx.clamp_(0, flat.shape[1] - 1)  # only where the weight is 0 (outside on some axis)
        out = torch.empty((maps.shape[0], pts.shape[0]), dtype=torch.float32)
        for ch in range(maps.shape[0]):
            v = flat[ch].take(idx)
            v = (v >> shift if shift else v).clamp_(min=0).to(torch.float32)
            torch.sum(v.mul_(weights), 0, out=out[ch])
        return out

    def _affine_in_voxels(self, grid: torch.Tensor, spatial) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The grid as an affine map from output voxel index to source voxel coordinates, ``s = o + i @ D``
        (o: (nd,), D: (nd, nd), source axes in array order), or None when the grid is not affine (elastic
        deformation): checked at the far corners to a hundredth of a voxel."""
        nd = len(spatial)
        g0 = grid[(0,) * nd]
        to_src = lambda g: torch.stack([self._to_source(g[..., nd - 1 - a], spatial[a]) for a in range(nd)], -1)  # noqa: E731
        o = to_src(g0.double())
        steps = []
        for a in range(nd):
            n = grid.shape[a]
            i = [0] * nd
            i[a] = n - 1
            steps.append((to_src(grid[tuple(i)].double()) - o) / max(n - 1, 1))
        d = torch.stack(steps)
        for corner in range(1, 2 ** nd):
            i = [(grid.shape[a] - 1) * ((corner >> a) & 1) for a in range(nd)]
            want = o + torch.tensor(i, dtype=torch.float64) @ d
            if float((to_src(grid[tuple(i)].double()) - want).abs().max()) > 1e-2:
                return None
        return o, d

    def _linear_support(self, maps: torch.Tensor, grid: torch.Tensor, affine: bool = True,
                        shift: int = 0) -> torch.Tensor | None:
        """Flat indices (into the patch) of a superset of the output voxels whose linear interpolation reads
        a non-zero map voxel, or None when none can. Two levels of blocks: an output block is kept when the
        source box its voxels map into (an affine grid maps a box onto the hull of its corners), widened by
        the interpolation footprint, holds a non-zero voxel of the maps' block occupancy (a summed-area
        table); the voxels of kept fine blocks are returned. Cost: that of the blocks near non-zero maps.
        ``affine=False`` (elastic deformation) returns every voxel."""
        spatial, patch = tuple(maps.shape[1:]), tuple(grid.shape[:-1])
        nd = len(spatial)
        aff = self._affine_in_voxels(grid, spatial) if affine else None
        if aff is None:
            return torch.arange(int(np.prod(patch)))
        o, d = aff
        fine, coarse = ACTIVE_BLOCK // 2, ACTIVE_BLOCK
        occ = maps.amax(0) if maps.shape[0] > 1 else maps[0]
        occ_fine = _block_max(occ, fine) >= (1 << shift)  # a non-zero value (packed: stored >> shift > 0)
        if not bool(occ_fine.any()):
            return None
        occ_coarse = _block_max(occ_fine, coarse // fine)

        def lattice(*ranges):  # every combination of the per-axis index ranges, (M, nd)
            return torch.stack(torch.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, nd)

        blocks = lattice(*[torch.arange(0, n, coarse) for n in patch])
        blocks = blocks[_blocks_touching(blocks, coarse, _summed_area(occ_coarse), coarse, o, d, spatial)]
        sub = (blocks[:, None, :] + lattice(*[torch.arange(0, coarse, fine)] * nd)[None]).reshape(-1, nd)
        sub = sub[_blocks_touching(sub, fine, _summed_area(occ_fine), fine, o, d, spatial)]
        if sub.shape[0] == 0:
            return None
        st = torch.tensor([int(np.prod(patch[a + 1:])) for a in range(nd)])
        vox = (sub[:, None, :] + lattice(*[torch.arange(fine)] * nd)[None]).reshape(-1, nd)
        if any(n % coarse for n in patch):
            vox = vox[(vox < torch.tensor(patch)).all(-1)]
        return vox @ st

    def apply(self, data_dict, **params):
        grid = params.get("grid")
        seg = data_dict.get("segmentation")
        if grid is None or seg is None or not self.map_specs:  # cropped only: every channel as stored
            return super().apply(data_dict, **params)
        k, pk = len(self.map_specs), self.packing
        rows = seg.shape[0] // (k if pk is not None else 1 + k)  # > 1 with nnU-Net's dummy 2d augmentation
        if pk is not None:  # map 0 is read from the packed channel itself (its values >> bits)
            labels_in = pk.labels_of(seg[:rows])
            sources = [(seg[:rows], pk.bits)] + [(seg[rows * i:rows * (i + 1)], 0) for i in range(1, k)]
        else:
            labels_in = seg[:rows]
            sources = [(seg[rows * (i + 1):rows * (i + 2)], 0) for i in range(k)]
        data_dict = dict(data_dict)
        data_dict["segmentation"] = labels_in
        data_dict = super().apply(data_dict, **params)  # nnU-Net's own image and label sampling, untouched
        labels = data_dict["segmentation"]
        patch = tuple(labels.shape[1:])
        maps_out = torch.zeros((k * rows, *patch), dtype=seg.dtype)  # map i: rows i * rows ... (i + 1) * rows
        flat_out = maps_out.view(k * rows, -1)
        pts = grid.reshape(-1, grid.shape[-1])
        fg, outside = None, None
        for i, spec in enumerate(self.map_specs):
            src, shift = sources[i]
            dst = flat_out[i * rows:(i + 1) * rows]
            if spec.exact:
                if fg is None:
                    fg = (labels > 0).any(0).reshape(-1)
                if bool(fg.any()):
                    dst[:, fg] = self._nearest_at(src, pts[fg], shift).to(seg.dtype)
                continue
            where = self._linear_support(src, grid, affine=params.get("elastic_offsets") is None, shift=shift)
            if where is None:
                continue
            vals = self._linear_at(src, pts[where], shift)
            if not seg.is_floating_point():
                vals = vals.round_()  # back to the stored steps
            dst[:, where] = vals.to(seg.dtype)
            if outside is None:
                outside = labels < 0  # nnU-Net's crop marker: no map value there (as in the packed channel)
            if bool(outside.any()):
                maps_out[i * rows:(i + 1) * rows][outside] = 0
        if pk is not None:
            first = pk.pack(labels, maps_out[:rows])
            data_dict["segmentation"] = torch.cat([first, maps_out[rows:]]) if k > 1 else first
        else:
            data_dict["segmentation"] = torch.cat([labels, maps_out])
        return data_dict


def map_spatial_transform(transform, specs: list[MapSpec], packing: Packing | None = None):
    """Give nnU-Net's ``SpatialTransform`` instance our map path (in place; returns it)."""
    if type(transform) is SpatialTransform:
        transform.__class__ = MapSpatialTransform
    elif not isinstance(transform, MapSpatialTransform):
        raise NotImplementedError(f"map transport supports batchgeneratorsv2's SpatialTransform, not a "
                                  f"{type(transform).__name__}")
    transform.map_specs = list(specs)
    transform.packing = packing
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


class MapTransport:
    """nnU-Net's training transforms with K map channels (segmentation channels 1..K, as stored: int16 from
    :class:`CaseChannels`). The maps stay segmentation channels through nnU-Net's whole pipeline: its crop,
    mirroring, ``-1`` removal and ``nearest-exact`` deep-supervision downsampling treat every channel
    alike, and only sampled samples take :class:`MapSpatialTransform`'s map path. Returns per
    deep-supervision scale ``[labels, map_1..map_K]`` in the stored dtype and units (lesion sizes in
    voxels, soft maps in 1/255 steps: the losses read integer soft channels that way).

    ``packing`` (:meth:`Packing.for_labels`; the dataset wrapper must be given the same): the segmentation
    then has K channels, the first map packed into the labels."""

    def __init__(self, inner, specs: list[MapSpec], packing: Packing | None = None):
        self.inner, self.specs = inner, list(specs)
        spatial = _find_spatial(inner)
        if len(spatial) != 1:
            raise NotImplementedError(f"map transport needs exactly one SpatialTransform in the training transforms, "
                                      f"found {len(spatial)}")
        self.packing = packing if self.specs else None
        map_spatial_transform(spatial[0], self.specs, self.packing)

    def __call__(self, **data):
        seg = data["segmentation"]
        k = len(self.specs)
        want = k if self.packing is not None else 1 + k
        if seg.shape[0] != want:
            raise RuntimeError(f"map transport expects {want} segmentation channels, got {seg.shape[0]}")
        if self.packing is not None and seg.dtype != torch.int16:
            raise RuntimeError(f"a packed segmentation must be int16, got {seg.dtype}")
        out = self.inner(**data)
        if self.packing is not None:
            segs = out["segmentation"]
            out["segmentation"] = [self._unpack(s) for s in segs] if isinstance(segs, (list, tuple)) \
                else self._unpack(segs)
        return out

    def _unpack(self, s: torch.Tensor) -> torch.Tensor:
        """(K, *S) packed target -> (1 + K, *S): labels, the first map, the others (no -1 left here)."""
        t = np.empty((s.shape[0] + 1, *s.shape[1:]), dtype=np.int16)
        s0 = s[0].numpy()
        np.bitwise_and(s0, self.packing.mask, out=t[0])
        np.right_shift(s0, self.packing.bits, out=t[1])
        if s.shape[0] > 1:
            t[2:] = s[1:].numpy()
        return torch.from_numpy(t)
