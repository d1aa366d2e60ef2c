"""Maps carried through nnU-Net's real training transforms (rotation, scaling, mirroring, deep-supervision
downsampling): transported lesion sizes equal the whole-case sizes recomputed independently (scipy), on
every voxel whose label the augmentation did not change; soft maps stay in [0, 1] and follow the image;
only the patch is read from disk."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_ext.preprocessing.maps import map_path, save_map_like_seg
from nnunet_ext.training.parts import compute_size_maps
from nnunet_ext.training.targets import CaseChannels, MapSpec, MapTransport, WithTargetMaps

SHAPE = (40, 44, 48)
PATCH = (24, 28, 32)


def _case():
    """Labels with lesions of many sizes, two touching lesions of different sizes (6-connectivity: diagonal
    contact only) and lesions on the volume border (cut by any patch there)."""
    rng = np.random.default_rng(3)
    seg = np.zeros(SHAPE, np.int16)
    for _ in range(40):
        c = [rng.integers(2, s - 2) for s in SHAPE]
        r = rng.integers(0, 3)
        seg[c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2]:c[2] + 2 * r + 1] = 1
    seg[10:14, 10:14, 10:14] = 0
    seg[10:12, 10:12, 10:12] = 1          # 8 voxels
    seg[12:14, 12:14, 12:13] = 1          # 4 voxels, touches the 8-voxel lesion diagonally only
    seg[12:14, 12:14, 13:14] = 0
    seg[0:3, 0:5, 0:4] = 1                # on the volume corner
    seg[-2:, 20:23, -3:] = 1              # on the opposite border
    seg[:, :, :2][seg[:, :, :2] == 0] = -1  # outside nnU-Net's crop
    return seg


def _independent_sizes(label, connectivity):
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    comp, _ = ndimage.label(label == 1, structure)
    counts = np.bincount(comp.ravel())
    counts[0] = 0
    return counts[comp]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    pre = tmp_path_factory.mktemp("pre")
    seg = _case()
    image = np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32)
    nnUNetDatasetBlosc2.save_case(image, seg[None], {"class_locations": {1: np.argwhere(seg[None] == 1)}},
                                  str(pre / "case0"), chunks=(1, 16, 16, 16), blocks=(1, 8, 8, 8),
                                  chunks_seg=(1, 16, 16, 16), blocks_seg=(1, 8, 8, 8))
    ds = nnUNetDatasetBlosc2(str(pre))
    assert compute_size_maps(ds, pre, pre / "sizes6", [1], connectivity=6) == 1
    assert compute_size_maps(ds, pre, pre / "sizes6", [1], connectivity=6) == 0  # cached
    # a voxel-index map (exact) tells which source voxel every output voxel came from
    index = np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE)
    (pre / "index").mkdir()
    return pre, ds, seg, index


def _transforms(p_spatial):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    t = nnUNetTrainer.get_training_transforms(PATCH, (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]],
                                              (0, 1, 2), False, use_mask_for_norm=[False], foreground_labels=[1])
    return t, p_spatial


def test_case_channels_read_only_the_patch(stored):
    pre, ds, seg, _ = stored
    _, s, _, _ = ds.load_case("case0")
    sizes_map = compute_size_maps  # noqa: F841 - documented above
    from nnunet_ext.preprocessing.maps import open_map

    stack = CaseChannels(s, [open_map(pre / "sizes6", "case0")])
    assert stack.shape == (2, *SHAPE)
    region = stack[:, 5:9, 0:44, 30:48]
    np.testing.assert_array_equal(region[0], seg[5:9, :, 30:48])
    np.testing.assert_array_equal(region[1], _independent_sizes(seg, 6)[5:9, :, 30:48])


@pytest.mark.parametrize("seed", range(6))
def test_sizes_exact_after_real_augmentation(stored, seed):
    """Spatial path forced (rotation + scaling) for even seeds, crop-only for odd seeds."""
    from nnunet_ext.preprocessing.maps import open_map

    pre, ds, seg, index = stored
    transforms, _ = _transforms(1.0)
    spatial = [t for t in transforms.transforms if type(t).__name__ == "SpatialTransform"][0]
    spatial.p_rotation = spatial.p_scaling = 1.0 if seed % 2 == 0 else 0.0
    # index carried as a third, exact map: it rides the same nearest sampling as the sizes
    transport = MapTransport(transforms, [MapSpec("sizes", True), MapSpec("index", True)])
    torch.manual_seed(seed)
    np.random.seed(seed)
    _, s, _, _ = ds.load_case("case0")
    sizes = np.asarray(open_map(pre / "sizes6", "case0")[:])
    crop = [(a - 4, a - 4 + b + 8) for a, b in zip((8, 6, 4), PATCH)]  # a region bigger than the patch
    sl = tuple(slice(max(0, a), min(n, b)) for (a, b), n in zip(crop, SHAPE))
    lab = np.asarray(s[(slice(None),) + sl])
    idx = index[sl].astype(np.float32)
    seg_t = torch.from_numpy(np.concatenate([lab, sizes[(slice(None),) + sl], np.zeros_like(lab)])).to(torch.int16)
    img = torch.randn(1, *lab.shape[1:])
    seg_t = seg_t.float()
    seg_t[2] = torch.from_numpy(idx)
    out = transport(image=img, segmentation=seg_t)
    expected_full = _independent_sizes(seg, 6)
    checked = 0
    for scale in out["segmentation"]:
        label, tsize, tidx = scale[0].numpy(), scale[1].numpy(), scale[2].numpy().round().astype(np.int64)
        src = np.unravel_index(np.clip(tidx, 0, index.size - 1), SHAPE)
        src_label = seg[src]
        inside = tidx > 0  # index 0 is also the zero padding: those voxels came from outside the region
        same = inside & (label == src_label) & (label == 1)
        assert same.sum() > 0
        np.testing.assert_array_equal(tsize[same], expected_full[src][same])
        # labels mostly unchanged by interpolation
        assert (label[inside & (label == 1)] == src_label[inside & (label == 1)]).mean() > 0.8
        checked += int(same.sum())
        if seed % 2 and scale.shape[1:] == PATCH:  # the centre crop holds the two touching lesions
            pair = np.zeros(SHAPE, bool)
            pair[10:14, 10:14, 10:13] = True
            got = set(tsize[same & pair[src]].tolist())
            assert got == {8.0, 4.0}, got  # each keeps its own size across the diagonal contact
            # lesions cut by the patch border keep their whole-case size, larger than what the patch shows
            comp, _ = ndimage.label(label == 1, ndimage.generate_binary_structure(3, 1))
            at_border = np.unique(np.concatenate([comp[[0, -1]].ravel(), comp[:, [0, -1]].ravel(),
                                                  comp[:, :, [0, -1]].ravel()]))
            cut = [c for c in at_border if c and (tsize[comp == c] > (comp == c).sum()).any()]
            assert cut, "no lesion cut by the patch border in this sample"
    assert checked > 50


def test_soft_map_is_linear_and_bounded(stored):
    """Soft maps travel in their stored 1/255 steps (int16): interpolated on borders, never above the
    stored value, and every deep-supervision scale subsamples the full-resolution target (nearest-exact,
    as nnU-Net downsamples the labels)."""
    pre, ds, seg, _ = stored
    transforms, _ = _transforms(1.0)
    spatial = [t for t in transforms.transforms if type(t).__name__ == "SpatialTransform"][0]
    spatial.p_rotation = spatial.p_scaling = 1.0
    transport = MapTransport(transforms, [MapSpec("soft", False, 255.0)])
    torch.manual_seed(0)
    np.random.seed(0)
    lab = torch.from_numpy(np.clip(seg[4:36, 4:40, 4:44], 0, 1)[None]).to(torch.int16)
    soft = (lab.float() * 200).to(torch.int16)  # 200/255 inside lesions
    out = transport(image=torch.randn(1, *lab.shape[1:]), segmentation=torch.cat([lab, soft]))
    full = out["segmentation"][0][1]
    for scale in out["segmentation"]:
        assert scale.dtype == torch.int16
        m = scale[1]
        assert int(m.min()) >= 0 and int(m.max()) <= 200
        f = full.shape[0] // m.shape[0]
        torch.testing.assert_close(m, full[f // 2::f, f // 2::f, f // 2::f], rtol=0, atol=0)
    assert ((full > 2) & (full < 198)).any()


def test_random_rater_labels_keep_crop_marker(stored, tmp_path):
    pre, ds, seg, _ = stored
    rater = tmp_path / "rater1"
    mask = (np.random.default_rng(1).random(SHAPE) > 0.5).astype(np.uint8) * 255
    save_map_like_seg(mask, pre / "case0_seg.b2nd", map_path(rater, "case0"))
    w = WithTargetMaps(ds, [], [rater])
    _, s, _, _ = w.load_case("case0")
    full = np.asarray(s)[0]
    np.testing.assert_array_equal(full == -1, seg == -1)
    np.testing.assert_array_equal(full[seg != -1], (mask[seg != -1] >= 128).astype(np.int16))


def test_wrong_map_shape_is_an_error(stored, tmp_path):
    pre, ds, seg, _ = stored
    with pytest.raises(ValueError, match="shape"):
        save_map_like_seg(np.zeros((3, 3, 3), np.int16), pre / "case0_seg.b2nd", tmp_path / "x.b2nd")


@pytest.mark.parametrize("align_corners", [False, True])
def test_nearest_gather_equals_grid_sample_nearest(align_corners):
    """The exact maps' gather picks, at every grid point, the value torch's nearest grid_sample picks
    (same unnormalisation and rounding; zero outside), on nnU-Net's own rotated and scaled grids."""
    import torch.nn.functional as F
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnunet_ext.training.targets import MapSpatialTransform

    torch.manual_seed(0)
    np.random.seed(0)
    src = torch.randint(0, 30000, (2, 21, 26, 30), dtype=torch.int16)
    t = SpatialTransform((25, 31, 34), 0, False, p_rotation=1.0, rotation=(-0.6, 0.6), p_scaling=1.0,
                         scaling=(0.6, 1.5), p_synchronize_scaling_across_axes=0, p_elastic_deform=0,
                         align_corners=align_corners)
    t.__class__ = MapSpatialTransform
    for _ in range(5):
        grid = t.get_parameters(image=src.float())["grid"]
        pts = grid.reshape(-1, 3)
        want = F.grid_sample(src.float()[None], grid[None], mode="nearest", padding_mode="zeros",
                             align_corners=align_corners)[0].reshape(2, -1)
        got = t._nearest_at(src, pts)
        assert (want == 0).any() and (want > 0).any()  # the patch is larger than the region: some points fall outside
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("align_corners,elastic", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_maps_equal_grid_sample_bilinear_everywhere(align_corners, elastic, ndim):
    """Linear maps are interpolated only where a non-zero map voxel can reach (block search), yet equal
    torch's bilinear grid_sample of the whole map (zero padding, crop marker -1 read as 0) on every output
    voxel, on nnU-Net's own rotated and scaled grids, also where the patch reaches outside the region."""
    import torch.nn.functional as F
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnunet_ext.training.targets import MapSpatialTransform

    torch.manual_seed(1)
    np.random.seed(1)
    shape, patch = ((37, 42, 45), (40, 33, 36)) if ndim == 3 else ((61, 70), (64, 52))
    src = torch.zeros((2, *shape), dtype=torch.int16)
    for _ in range(6):  # sparse blobs with soft values, one on the region's corner
        c = [np.random.randint(0, s) for s in shape]
        sl = tuple(slice(max(0, x - 2), x + 3) for x in c)
        src[(slice(None),) + sl] = torch.randint(1, 256, src[(slice(None),) + sl].shape, dtype=torch.int16)
    src[(slice(None),) + (slice(0, 3),) * ndim] = 255
    src[(0,) + (slice(None),) * (ndim - 1) + (slice(0, 2),)] = -1  # nnU-Net's crop marker
    t = SpatialTransform(patch, 0, False, p_rotation=1.0, rotation=(-0.6, 0.6), p_scaling=1.0,
                         scaling=(0.6, 1.5), p_synchronize_scaling_across_axes=0,
                         p_elastic_deform=1.0 if elastic else 0.0, align_corners=align_corners)
    t.__class__ = MapSpatialTransform
    for _ in range(4):
        params = t.get_parameters(image=src.float())
        assert (params["elastic_offsets"] is not None) == elastic
        grid = params["grid"]
        want = F.grid_sample(src.float().clamp(min=0)[None], grid[None], mode="bilinear", padding_mode="zeros",
                             align_corners=align_corners)[0].reshape(2, -1)
        where = t._linear_support(src, grid, affine=params["elastic_offsets"] is None)
        got = torch.zeros_like(want)
        got[:, where] = t._linear_at(src.clamp(min=0), grid.reshape(-1, ndim)[where])
        assert (want > 0).any()
        # an affine grid samples a part of the patch only; an elastic one every voxel
        assert (where.numel() == want.shape[1]) == elastic
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_sizes_and_soft_exact_with_dummy_2d_augmentation(stored, seed):
    """nnU-Net's dummy 2d augmentation (anisotropic 3d_fullres: slices become channels, rotation and
    scaling in-plane): sizes stay exact where the label is unchanged, for the sizes-only transport (maps as
    segmentation channels) and for sizes + soft (maps as regression target), and the soft map follows the
    same voxels as the labels."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ext.preprocessing.maps import open_map

    pre, ds, seg, index = stored
    expected_full = _independent_sizes(seg, 6)
    sizes = np.asarray(open_map(pre / "sizes6", "case0")[:])
    # the region: the patch's depth (dummy 2d does not crop along the first axis), larger in-plane
    sl = (slice(8, 8 + PATCH[0]), slice(2, 2 + PATCH[1] + 12), slice(0, PATCH[2] + 14))
    lab = np.asarray(ds.load_case("case0")[1][(slice(None),) + sl])
    for specs in ([MapSpec("sizes", True), MapSpec("index", True)],
                  [MapSpec("sizes", True), MapSpec("index", True), MapSpec("soft", False, 255.0)],
                  [MapSpec("soft", False, 255.0), MapSpec("index", True)]):
        t = nnUNetTrainer.get_training_transforms(PATCH, (-0.5, 0.5), [[1, 1, 1], [1, 0.5, 0.5]], (1, 2), True,
                                                  use_mask_for_norm=[False], foreground_labels=[1])
        sp = [x for x in t.transforms if type(x).__name__ == "SpatialTransform"][0]
        sp.p_rotation = sp.p_scaling = 1.0 if seed % 2 == 0 else 0.0
        transport = MapTransport(t, specs)
        chans = [lab, sizes[(slice(None),) + sl], index[sl][None]]
        if len(specs) == 3:
            chans.append(np.where(lab > 0, 255, 0))
        seg_t = torch.from_numpy(np.concatenate([c.astype(np.float32) for c in chans]))
        torch.manual_seed(seed)
        np.random.seed(seed)
        out = transport(image=torch.randn(1, *lab.shape[1:]), segmentation=seg_t)
        checked = 0
        for scale in out["segmentation"]:
            assert scale.shape[0] == 1 + len(specs)
            names = [m.name for m in specs]
            label = scale[0].numpy()
            tidx = scale[1 + names.index("index")].numpy().round().astype(np.int64)
            src = np.unravel_index(np.clip(tidx, 0, index.size - 1), SHAPE)
            same = (tidx > 0) & (label == seg[src]) & (label == 1)
            if "sizes" in names:
                np.testing.assert_array_equal(scale[1 + names.index("sizes")].numpy()[same], expected_full[src][same])
            checked += int(same.sum())
            if "soft" in names:  # the soft copy of the labels (255 inside lesions, stored units)
                soft = scale[1 + names.index("soft")].numpy()
                assert soft.min() >= 0 and soft.max() <= 255 + 1e-3
                assert (soft[same] > 0).all()
        assert checked > 50


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("first", ["sizes", "soft"])
def test_packed_first_map_gives_the_same_targets(stored, tmp_path, seed, first):
    """The first map packed into the label channel (one int16 channel through nnU-Net's data path), packed
    while reading or stored packed beforehand, gives targets identical to the unpacked transport, after nnU-Net's real data loader crop and training
    transforms, on cropped-only (odd seeds) and rotated/scaled (even seeds) samples; sizes above the
    packing's cap are clipped to it."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_ext.training.targets import Packing

    pre, ds, seg, _ = stored
    soft_dir = tmp_path / "soft"
    save_map_like_seg(np.where(seg > 0, 200, np.where(seg == 0, 7, 0)).astype(np.uint8), pre / "case0_seg.b2nd",
                      map_path(soft_dir, "case0"))
    folders = {"sizes": pre / "sizes6", "soft": soft_dir}
    specs = {"sizes": MapSpec("sizes", True), "soft": MapSpec("soft", False, 255.0)}
    order = [first, "soft" if first == "sizes" else "sizes"]
    packing = Packing.for_labels(1, specs[first])
    assert packing is not None and packing.bits == 1 and packing.cap == 16383
    # stored packed, as ComposedTrainer does; kept while newer than its sources, rewritten otherwise
    from nnunet_ext.training.targets import packed_folder, write_packed_maps

    work = tmp_path / "pre"  # a copy of the preprocessed folder: the module's fixture stays untouched
    work.mkdir()
    import shutil

    shutil.copy(pre / "case0_seg.b2nd", work / "case0_seg.b2nd")
    assert write_packed_maps(["case0"], work, folders[first], packing) == 1
    assert write_packed_maps(["case0"], work, folders[first], packing) == 0
    import os

    later = map_path(packed_folder(work, folders[first], packing), "case0").stat().st_mtime + 10
    os.utime(work / "case0_seg.b2nd", (later, later))  # the labels changed after the packed file was written
    assert write_packed_maps(["case0"], work, folders[first], packing) == 1
    stored_dir = packed_folder(work, folders[first], packing)
    assert stored_dir.parent.name == "nnunet_ext_packed"
    outs = []
    for pk, stored_packed in ((None, None), (packing, None), (packing, stored_dir)):
        transforms, _ = _transforms(1.0)
        sp = [t for t in transforms.transforms if type(t).__name__ == "SpatialTransform"][0]
        sp.p_rotation = sp.p_scaling = 1.0 if seed % 2 == 0 else 0.0
        w = WithTargetMaps(ds, [folders[n] for n in order], packing=None if stored_packed else pk,
                           packed_folders=stored_packed)
        dl = nnUNetDataLoader(w, 1, [p + 8 for p in PATCH], PATCH, LabelManager({"background": 0, "lesion": 1}, None),
                              oversample_foreground_percent=1.0,
                              transforms=MapTransport(transforms, [specs[n] for n in order], pk))
        np.random.seed(seed)
        torch.manual_seed(seed)
        outs.append(next(dl)["target"])
    for a, b, c in zip(*outs):
        assert a.shape == b.shape == c.shape and a.shape[1] == 3 and b.dtype == c.dtype == torch.int16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert outs[1][0][:, 1 + order.index("sizes")].max() > 0 and outs[1][0][:, 1 + order.index("soft")].max() > 0
    # clipping at the cap, the crop marker kept
    lab = np.array([[-1, 0, 1, 1]], np.int16)
    enc = packing.pack_np(lab, np.array([[5, 3, 20000, 7]], np.int16))
    assert enc.tolist() == [[-1, 6, 16383 * 2 + 1, 15]]
    labels, m = packing.unpack(torch.from_numpy(enc))
    assert labels.tolist() == [[-1, 0, 1, 1]] and m.tolist() == [[-1, 3, 16383, 7]]
    assert Packing.for_labels(255, MapSpec("soft", False, 255.0)) is None  # 8 label bits leave 7 for the map
    assert Packing.for_labels(3, MapSpec("sizes", True)).cap == 8191
