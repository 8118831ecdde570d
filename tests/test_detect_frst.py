"""Tests of the fast radial symmetry transform: blob centres, thick slices, tubes, flips, speed."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.detect.frst import frst, thick_slice_axis


def _grid(shape, vs, centre):
    return np.meshgrid(
        *[(np.arange(n) - c) * v for n, c, v in zip(shape, centre, vs)], indexing="ij"
    )


def gaussian_blob(shape, vs, centre, fwhm_mm=3.0):
    sigma = fwhm_mm / 2.3548
    g = _grid(shape, vs, centre)
    return np.exp(-sum(x * x for x in g) / (2 * sigma**2)).astype(np.float32)


def gaussian_tube(shape, vs, centre, axis, fwhm_mm=3.0):
    sigma = fwhm_mm / 2.3548
    g = _grid(shape, vs, centre)
    return np.exp(-sum(x * x for a, x in enumerate(g) if a != axis) / (2 * sigma**2)).astype(
        np.float32
    )


def test_thick_slice_axis():
    assert thick_slice_axis((0.5, 0.5, 4.0)) == 2
    assert thick_slice_axis((3.0, 0.45, 0.45)) == 0
    assert thick_slice_axis((0.9, 0.9, 1.75)) == 2
    assert thick_slice_axis((1.0, 1.0, 1.5)) is None
    assert thick_slice_axis((1.0, 1.0, 1.0)) is None


CASES = [
    ((0.5, 0.7, 1.0), (60, 50, 36), "3d"),
    ((0.45, 0.45, 4.0), (64, 64, 12), "auto"),  # thick slices: per-slice 2D
    ((3.0, 0.5, 0.6), (12, 60, 56), "auto"),  # thick slices along the first axis
]


@pytest.mark.parametrize(("vs", "shape", "mode"), CASES)
@pytest.mark.parametrize("bright", [True, False])
def test_blob_maximum_at_centre(vs, shape, mode, bright):
    rng = np.random.default_rng(1)
    centre = tuple(n / 2 - 0.3 for n in shape)
    blob = gaussian_blob(shape, vs, centre)
    image = 0.3 + (0.6 if bright else -0.25) * blob + rng.normal(0, 0.02, shape)
    f = frst(image.astype(np.float32), vs, mode=mode, bright=bright)
    peak = np.array(np.unravel_index(np.argmax(f), shape))
    assert np.all(np.abs(peak - np.array(centre)) <= 1.0), (peak, centre)
    assert f.dtype == np.float32
    assert 0.0 <= f.min() and f.max() <= 1.0
    # The wrong polarity does not find it.
    g = frst(image.astype(np.float32), vs, mode=mode, bright=not bright, normalise=False)
    h = frst(image.astype(np.float32), vs, mode=mode, bright=bright, normalise=False)
    c = tuple(int(round(x)) for x in centre)
    assert g[c] < 0.1 * h[c]


@pytest.mark.parametrize(
    ("vs", "shape", "mode", "tube_axis"),
    [
        ((0.5, 0.7, 1.0), (60, 50, 36), "3d", 0),
        ((0.5, 0.7, 1.0), (60, 50, 36), "3d", 2),
        ((0.45, 0.45, 4.0), (64, 64, 12), "auto", 0),  # a vessel in the slice plane
    ],
)
def test_tube_scores_much_lower_than_blob(vs, shape, mode, tube_axis):
    rng = np.random.default_rng(2)
    centre = tuple(n / 2 for n in shape)
    blob = 0.3 + 0.6 * gaussian_blob(shape, vs, centre) + rng.normal(0, 0.02, shape)
    tube = 0.3 + 0.6 * gaussian_tube(shape, vs, centre, tube_axis) + rng.normal(0, 0.02, shape)
    fb = frst(blob.astype(np.float32), vs, mode=mode, normalise=False).max()
    ft = frst(tube.astype(np.float32), vs, mode=mode, normalise=False).max()
    assert ft < 0.35 * fb, (ft, fb)


def test_invariant_to_axis_flips():
    rng = np.random.default_rng(3)
    vs = (0.6, 0.8, 1.1)
    shape = (50, 44, 30)
    image = 0.3 + 0.6 * gaussian_blob(shape, vs, (20.2, 25.7, 14.1))
    image += 0.4 * gaussian_blob(shape, vs, (35.0, 12.3, 20.0), fwhm_mm=4.0)
    image = (image + rng.normal(0, 0.03, shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    ref = frst(image, vs, mask=mask)
    for axes in [(0,), (1,), (2,), (0, 1, 2)]:
        flipped = frst(np.flip(image, axes).copy(), vs, mask=np.flip(mask, axes).copy())
        back = np.flip(flipped, axes)
        assert np.max(np.abs(back - ref)) < 0.02
    # Permuting axes (with their voxel sizes) gives the same map too.
    perm = (2, 0, 1)
    out = frst(
        np.transpose(image, perm).copy(),
        tuple(vs[p] for p in perm),
        mask=np.transpose(mask, perm).copy(),
    )
    assert np.max(np.abs(np.transpose(out, np.argsort(perm)) - ref)) < 0.02


def test_mask_edge_does_not_vote():
    # A bright disc-shaped "brain" on a zero background: no spurious maximum at its edge,
    # and a blob inside still wins.
    vs = (1.0, 1.0, 1.0)
    shape = (60, 60, 40)
    g = _grid(shape, vs, (30, 30, 20))
    mask = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 18**2
    image = np.where(mask, 0.3, 0.0).astype(np.float32)
    image += 0.5 * gaussian_blob(shape, vs, (30, 38, 20)) * mask
    f = frst(image, vs, mask=mask)
    peak = np.unravel_index(np.argmax(f), shape)
    assert np.allclose(peak, (30, 38, 20), atol=1)
    assert np.all(f[~mask] == 0)


def test_radii_adapt_to_voxel_size():
    # The same physical blob sampled at 0.5 mm and 1 mm gives its maximum at the same place.
    rng = np.random.default_rng(4)
    peaks = []
    for v in (0.5, 1.0):
        shape = tuple(int(30 / v) for _ in range(3))
        centre = tuple(12.0 / v for _ in range(3))
        image = 0.3 + 0.6 * gaussian_blob(shape, (v, v, v), centre)
        image = (image + rng.normal(0, 0.02, shape)).astype(np.float32)
        f = frst(image, (v, v, v))
        peaks.append(np.array(np.unravel_index(np.argmax(f), shape)) * v)
    assert np.allclose(peaks[0], peaks[1], atol=1.0)


def test_speed_budget():
    # A 256×256×120 volume: target under 5 s (a generous bound here: the machine is shared).
    import time

    rng = np.random.default_rng(5)
    image = rng.random((256, 256, 120), dtype=np.float32)
    t0 = time.perf_counter()
    frst(image, (0.9, 0.9, 1.5))
    assert time.perf_counter() - t0 < 15.0
