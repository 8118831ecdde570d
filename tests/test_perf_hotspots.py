"""The speed-ups of the hot spots give the same bits as the straightforward computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cmb_bidsapp.detect import frst as frst_mod
from cmb_bidsapp.preproc import brain, echoes


def _blobs(shape=(48, 56, 24), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.1, shape).astype(np.float32)
    grid = np.indices(shape)
    for centre in [(2, 2, 2), (24, 28, 12), (45, 53, 22), (8, 50, 1)]:
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        img += np.exp(-d2 / 4.0).astype(np.float32)
    return img


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.5, 0.5, 1.0), (0.9, 0.9, 4.0)])
@pytest.mark.parametrize("box", ["edge", "inner"])
@pytest.mark.parametrize("kw", [{}, {"bright": False}, {"normalise": False}, {"mode": "2d"}])
def test_frst_in_mask_box_equals_whole_array(vs, box, kw):
    img = _blobs()
    mask = np.zeros(img.shape, bool)
    if box == "edge":  # touches the array's border on some sides
        mask[0:40, 4:56, 0:24] = True
    else:
        mask[15:35, 18:40, 8:18] = True
    axes = frst_mod._resolve_axes(img.shape, np.asarray(vs), kw.get("mode", "auto"), None)
    params = {
        "radii_mm": frst_mod.DEFAULT_RADII_MM,
        "alpha": 2.0,
        "beta": 0.1,
        "bright": kw.get("bright", True),
        "sigma_factor": 0.25,
        "kappa": 0.5,
        "normalise": kw.get("normalise", True),
    }
    whole = frst_mod._frst(img, np.asarray(vs), axes, mask, **params)
    boxed = frst_mod.frst(img, vs, mask=mask, **kw)
    assert boxed.any()
    np.testing.assert_array_equal(boxed, whole)


def test_frst_empty_mask_gives_zeros():
    img = _blobs()
    out = frst_mod.frst(img, (1, 1, 1), mask=np.zeros(img.shape, bool))
    assert out.shape == img.shape and not out.any()


def _to_input_grid_whole(mask, mask_affine, shape, affine):
    back = brain.resample(mask.astype(np.float32), mask_affine, shape, affine) >= 0.5
    if not back.any():
        return back
    return ndi.binary_fill_holes(brain.largest_component(back))


@pytest.mark.parametrize("oblique", [False, True])
def test_mask_back_to_input_grid_only_in_reach_box(oblique):
    work = np.zeros((60, 70, 50), bool)
    grid = np.indices(work.shape)
    work[
        ((grid[0] - 30) / 20.0) ** 2 + ((grid[1] - 35) / 25.0) ** 2 + ((grid[2] - 25) / 18.0) ** 2
        < 1
    ] = True
    work[28:32, 33:37, 23:27] = False  # a hole, filled on the way back
    work[2:4, 2:4, 2:4] = True  # a speck, dropped (not the largest component)
    work_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    affine = np.diag([0.7, 0.7, 1.4, 1.0])
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = (3.0, -2.0, 1.5)
    shape = (90, 100, 40)
    expected = _to_input_grid_whole(work, work_aff, shape, affine)
    got = brain._to_input_grid(work, work_aff, shape, affine)
    assert expected.sum() > 1000
    np.testing.assert_array_equal(got, expected)
    assert not brain._to_input_grid(np.zeros_like(work), work_aff, shape, affine).any()


def _phase_to_radians_reference(phase, value_range=None):
    """The straightforward version the in-place one replaced."""
    x = np.asarray(phase, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.float32)
    vals = x[finite]
    lo_obs, hi_obs = float(vals.min()), float(vals.max())
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
    elif lo_obs >= -np.pi - 0.01 and hi_obs <= np.pi + 0.01 and hi_obs - lo_obs > 5.5:
        return np.clip(np.where(finite, x, 0.0), -np.pi, np.pi).astype(np.float32)
    elif np.all(vals == np.round(vals)) and hi_obs - lo_obs > 16:
        lo, hi = next(
            ((a, b) for a, b in echoes._INT_RANGES if lo_obs >= a and hi_obs < b),
            (lo_obs, hi_obs),
        )
    else:
        lo, hi = lo_obs, hi_obs
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    out = np.where(finite, (x - centre) / half * np.pi, 0.0)
    return np.clip(out, -np.pi, np.pi).astype(np.float32)


def _phases():
    rng = np.random.default_rng(3)
    shape = (20, 24, 10)
    with_nan = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    with_nan[0, 0, :3] = np.nan
    with_nan[1, 1, 1] = np.inf
    return {
        "radians": rng.uniform(-np.pi, np.pi, shape).astype(np.float32),
        "uint12": rng.integers(0, 4096, shape).astype(np.float32),
        "int16": rng.integers(-32768, 32767, shape).astype(np.int16),
        "arbitrary": rng.normal(0, 100, shape).astype(np.float32),
        "constant": np.full(shape, 3.0, np.float32),
        "with_nan": with_nan,
        "all_nan": np.full(shape, np.nan, np.float32),
    }


@pytest.mark.parametrize("name", list(_phases()))
@pytest.mark.parametrize("value_range", [None, (-100.0, 100.0)])
def test_phase_to_radians_same_bits_as_reference(name, value_range):
    phase = _phases()[name]
    before = phase.copy()
    got = echoes.phase_to_radians(phase, value_range)
    expected = _phase_to_radians_reference(phase, value_range)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(phase, before)  # the input is never changed in place


def test_label_stats_equal_scipy():
    """Counts, centres (plain and weighted), maxima and minima over labelled voxels only equal
    SciPy's whole-volume functions, for unsorted ids, absent ids and labels left out of ids."""
    from cmb_bidsapp.labelstats import LabelStats

    rng = np.random.default_rng(3)
    labels, n = ndi.label(_blobs() > 0.5)
    assert n >= 4
    values = rng.random(labels.shape).astype(np.float32)
    ids = np.array([3, 1, n + 5, 2])  # unsorted, one absent; label 4.. left out
    stats = LabelStats(labels, ids)
    present = np.array([i for i in ids if i <= n])
    rows = np.array([list(ids).index(i) for i in present])
    assert np.array_equal(
        stats.counts()[rows], ndi.sum_labels(np.ones_like(values), labels, present)
    )
    assert stats.counts()[list(ids).index(n + 5)] == 0
    np.testing.assert_allclose(
        stats.centres()[rows], ndi.center_of_mass(np.ones_like(values), labels, present), rtol=1e-12
    )
    np.testing.assert_allclose(
        stats.centres(values)[rows], ndi.center_of_mass(values, labels, present), rtol=1e-6
    )
    np.testing.assert_array_equal(stats.maximum(values)[rows], ndi.maximum(values, labels, present))
    np.testing.assert_array_equal(stats.minimum(values)[rows], ndi.minimum(values, labels, present))
    assert np.isnan(stats.maximum(values)[list(ids).index(n + 5)])
    empty = LabelStats(np.zeros((3, 3, 3), int), np.zeros(0, int))
    assert empty.centres().shape == (0, 3) and empty.counts().size == 0
