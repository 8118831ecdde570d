"""Tests of the provisional candidate probability and the candidate labelling."""

from __future__ import annotations

import numpy as np

from cmb_bidsapp.detect.candidates import (
    blobness,
    candidate_probability,
    label_candidates,
    local_contrast,
)
from cmb_bidsapp.detect.frst import frst


def _grid(shape, vs, centre):
    return np.meshgrid(
        *[(np.arange(n) - c) * v for n, c, v in zip(shape, centre, vs)], indexing="ij"
    )


def _blob(shape, vs, centre, fwhm=3.0):
    s = fwhm / 2.3548
    g = _grid(shape, vs, centre)
    return np.exp(-sum(x * x for x in g) / (2 * s * s)).astype(np.float32)


def _tube(shape, vs, centre, axis, fwhm=3.0):
    s = fwhm / 2.3548
    g = _grid(shape, vs, centre)
    return np.exp(-sum(x * x for a, x in enumerate(g) if a != axis) / (2 * s * s))


def _phantom(vs=(0.6, 0.6, 1.2), shape=(80, 80, 40), seed=0):
    """A lesion-bright brain: tissue 0.3, three blobs, an in-plane tube (vessel), noise."""
    rng = np.random.default_rng(seed)
    g = _grid(shape, vs, tuple(n / 2 for n in shape))
    mask = (g[0] / 22) ** 2 + (g[1] / 22) ** 2 + (g[2] / 21) ** 2 < 1
    img = np.full(shape, 0.3, np.float32)
    blobs = [(30.0, 30.0, 15.0), (50.0, 45.0, 22.0), (40.0, 55.0, 28.0)]
    for c in blobs:
        img += 0.55 * _blob(shape, vs, c)
    # A vessel crossing the whole brain in the slice plane.
    img += 0.55 * _tube(shape, vs, (40.0, 25.0, 20.0), axis=0).astype(np.float32)
    img += rng.normal(0, 0.02, shape).astype(np.float32)
    img = np.clip(img, 0, 1) * mask
    return img.astype(np.float32), mask, vs, blobs


def test_local_contrast_of_a_blob():
    img, mask, vs, blobs = _phantom()
    c = local_contrast(img, mask, vs)
    centre = tuple(int(round(x)) for x in blobs[0])
    assert 0.4 < c[centre] < 0.6
    # Flat tissue far from lesions has about zero contrast.
    assert abs(float(np.median(c[mask]))) < 0.03
    assert np.all(c[~mask] == 0)


def test_blobness_sphere_vs_tube():
    vs = (0.7, 0.7, 0.7)
    shape = (40, 40, 40)
    c = (20, 20, 20)
    b = blobness(_blob(shape, vs, c), vs)
    t = blobness(_tube(shape, vs, c, axis=1).astype(np.float32), vs)
    assert b[c] > 0.8
    assert t[c] < 0.2


def test_probability_high_on_blobs_low_on_vessel_and_tissue():
    img, mask, vs, blobs = _phantom()
    f = frst(img, vs, mask=mask)
    p = candidate_probability(img, f, mask, vs)
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    for c in blobs:
        assert p[tuple(int(round(x)) for x in c)] > 0.8
    labels, n = label_candidates(p, 0.5, vs)
    assert n == 3
    # Every blob is hit by exactly one distinct label.
    hit = {int(labels[tuple(int(round(x)) for x in c)]) for c in blobs}
    assert hit == {1, 2, 3}
    assert np.all(p[~mask] == 0)


def test_label_candidates_size_bounds_and_order():
    vs = (0.5, 0.5, 2.0)  # voxel volume 0.5 mm³
    prob = np.zeros((40, 40, 10), np.float32)
    prob[30:33, 5:8, 2:4] = 0.9  # 18 voxels = 9 mm³, centre k = 2.5
    prob[5:7, 30:32, 6] = 0.9  # 4 voxels = 2 mm³, k = 6
    prob[20, 20, 1] = 0.9  # 1 voxel = 0.5 mm³: too small
    prob[10:38, 10:38, 7:9] = 0.0
    prob[0:30, 0:30, 8:10] = 0.8  # 1800 voxels = 900 mm³: too large
    prob[15:17, 15:17, 2:4] = 0.3  # below threshold
    # Diagonal neighbours are one component (26-connectivity).
    prob[2, 2, 0] = prob[3, 3, 1] = prob[4, 4, 0] = prob[3, 3, 0] = 0.9  # 4 voxels: 2 mm³
    labels, n = label_candidates(prob, 0.5, vs, min_volume_mm3=1.5, max_volume_mm3=500)
    assert n == 3
    assert labels.dtype == np.int32
    # Numbered by centre along k, then j, then i.
    assert labels[3, 3, 1] == 1  # k ≈ 0.25
    assert labels[31, 6, 2] == 2  # k = 2.5
    assert labels[5, 30, 6] == 3  # k = 6
    assert labels[20, 20, 1] == 0 and labels[1, 1, 9] == 0
    # Deterministic.
    again, _ = label_candidates(prob, 0.5, vs, min_volume_mm3=1.5, max_volume_mm3=500)
    assert np.array_equal(labels, again)


def test_label_candidates_empty():
    labels, n = label_candidates(np.zeros((5, 5, 5), np.float32), 0.5, (1, 1, 1))
    assert n == 0 and not labels.any()
