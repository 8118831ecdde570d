"""Working grid: canonical orientation, 0.8 mm, brain crop; round trip to the source grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cmb_bidsapp.models.grid import (
    mask_to_working,
    to_source,
    to_working,
    voxel_sizes_of,
    working_grid,
)


def _oblique_lps_affine(vs=(0.5, 0.55, 3.0)) -> np.ndarray:
    rot = nib.eulerangles.euler2mat(0.25, 0.12, -0.18)
    flip = np.diag([-1.0, -1.0, 1.0])  # LPS-like axes
    aff = np.eye(4)
    aff[:3, :3] = rot @ flip @ np.diag(vs)
    aff[:3, 3] = [40.0, 30.0, -50.0]
    return aff


def _world(shape, affine):
    ijk = np.indices(shape, dtype=float).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


@pytest.mark.parametrize("vs", [(0.5, 0.55, 3.0), (1.0, 0.9, 0.9), (0.45, 0.45, 5.0)])
def test_round_trip_oblique_lps_anisotropic(vs):
    shape = (110, 100, 24) if vs[2] > 2 else (70, 80, 70)
    aff = _oblique_lps_affine(vs)
    xyz = _world(shape, aff)
    centre = xyz[shape[0] // 2, shape[1] // 2, shape[2] // 2]
    d2 = ((xyz - centre) ** 2).sum(-1)
    smooth = np.exp(-d2 / (2 * 14.0**2)).astype(np.float32)  # smooth compared with 0.8 mm
    mask = d2 < 22.0**2
    grid = working_grid(shape, aff, mask)
    work, waff = to_working(smooth, aff, grid=grid)
    # Working grid: isotropic 0.8 mm, closest to RAS.
    assert np.allclose(voxel_sizes_of(waff), 0.8)
    assert nib.aff2axcodes(waff) == ("R", "A", "S")
    assert nib.aff2axcodes(aff) != ("R", "A", "S")
    back = to_source(work, waff, shape, aff)
    err = np.abs(back - smooth)[mask]
    assert err.max() < 0.01, err.max()
    # The crop is the mask's bounding box plus the margin, not the whole field of view.
    extent_mm = np.asarray(work.shape) * 0.8
    assert extent_mm.max() < 2 * 22.0 + 2 * 4.0 + 2 * max(vs) + 2


def test_point_keeps_its_scanner_position():
    shape = (90, 80, 20)
    aff = _oblique_lps_affine((0.5, 0.55, 3.0))
    img = np.zeros(shape, dtype=np.float32)
    img[40:43, 30:33, 9:11] = 1.0  # a small bright block
    mask = np.ones(shape, dtype=bool)
    grid = working_grid(shape, aff, mask)
    work, waff = to_working(img, aff, grid=grid, antialias=False)
    peak_w = np.unravel_index(np.argmax(work), work.shape)
    com_src = np.array([41.0, 31.0, 9.5])
    world_src = com_src @ aff[:3, :3].T + aff[:3, 3]
    world_w = np.asarray(peak_w, float) @ waff[:3, :3].T + waff[:3, 3]
    assert np.linalg.norm(world_w - world_src) < 1.6  # within two working voxels
    back = to_source(work, waff, shape, aff)
    assert np.unravel_index(np.argmax(back), shape)[2] in (9, 10)
    assert np.linalg.norm(np.argwhere(back == back.max()).mean(0)[:2] - com_src[:2]) < 2.0


def test_mask_keeps_every_small_component():
    shape = (60, 60, 12)
    aff = np.diag([0.45, 0.45, 4.0, 1.0])
    mask = np.zeros(shape, dtype=np.uint8)
    mask[10, 10, 5] = 1  # one 0.8 mm³ voxel: vanishes with trilinear + 0.5
    mask[30:36, 30:36, 6] = 1  # a 2.7 x 2.7 x 4 mm lesion: survives on its own
    brain = np.ones(shape, dtype=bool)
    grid = working_grid(shape, aff, brain)
    out = mask_to_working(mask, aff, grid)
    from scipy import ndimage as ndi

    _, n = ndi.label(out, structure=np.ones((3, 3, 3)))
    assert n == 2
    plain = mask_to_working(mask, aff, grid, keep_components=False)
    assert ndi.label(plain, structure=np.ones((3, 3, 3)))[1] == 1


def test_outside_the_crop_is_zero_in_source():
    shape = (80, 80, 40)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    mask = np.zeros(shape, dtype=bool)
    mask[20:40, 20:40, 10:30] = True
    grid = working_grid(shape, aff, mask)
    ones = np.ones(grid.shape, dtype=np.float32)
    back = to_source(ones, grid.affine, shape, aff)
    assert back[mask].min() > 0.99
    assert back[0, 0, 0] == 0.0 and back[79, 79, 39] == 0.0
