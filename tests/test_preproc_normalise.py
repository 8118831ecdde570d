"""Tests of the lesion-bright normalisation for dark-lesion kinds and QSM."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.preproc.normalise import lesion_bright


@pytest.mark.parametrize("kind", ["swi", "t2starw", "megre"])
def test_dark_lesion_becomes_bright(kind):
    rng = np.random.default_rng(0)
    data = rng.normal(500, 20, (30, 30, 30)).astype(np.float32)
    data[10:13, 10:13, 10:13] = 100  # a dark microbleed
    data[0, 0, 0] = 1e6  # an outlier must not squash the scale
    mask = np.zeros(data.shape, bool)
    mask[2:28, 2:28, 2:28] = True
    data[~mask] = 5000  # bright scalp: outside the mask, ignored
    out = lesion_bright(data, mask, kind)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.all(out[~mask] == 0)
    assert out[11, 11, 11] > 0.7
    tissue = out[20:25, 20:25, 20:25]
    assert tissue.mean() < 0.15
    # Formula: 1 - I / P99(I in mask)
    p99 = np.percentile(data[mask], 99)
    assert np.isclose(out[11, 11, 11], 1 - 100 / p99, atol=1e-5)


def test_qsm_mapping_bleed_bright_calcification_dark():
    chi = np.zeros((20, 20, 20), np.float32)
    chi[5, 5, 5] = 0.4  # bleed (ppm)
    chi[10, 10, 10] = -0.3  # calcification
    chi[15, 15, 15] = 2.0  # strong bleed: clipped
    mask = np.ones(chi.shape, bool)
    mask[0] = False
    out = lesion_bright(chi, mask, "qsm")
    assert np.isclose(out[5, 5, 5], 0.9) and np.isclose(out[10, 10, 10], 0.2)
    assert out[15, 15, 15] == 1.0 and np.isclose(out[8, 8, 8], 0.5)
    assert np.all(out[0] == 0)
    # A map in ppb gives the same result.
    ppb = chi * 1000
    ppb[1:, 1:4, 1:4] = np.random.default_rng(0).normal(0, 60, (19, 3, 3))  # tissue texture
    chi2 = ppb / 1000
    assert np.allclose(lesion_bright(ppb, mask, "qsm"), lesion_bright(chi2, mask, "qsm"), atol=1e-6)


def test_bad_kind():
    with pytest.raises(ValueError):
        lesion_bright(np.zeros((2, 2, 2)), np.ones((2, 2, 2)), "flair")
