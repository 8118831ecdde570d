"""Tests of N4 bias correction: recovers a known smooth field, thick slices, no NaN, QSM skipped."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.preproc.bias import n4_correct, shrink_factors


def _phantom(shape, vs, seed=0):
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, vs)], indexing="ij")
    r = np.sqrt((g[0] / 60) ** 2 + (g[1] / 70) ** 2 + (g[2] / 55) ** 2)
    mask = r < 1
    # Two tissues (a "white matter" core and a "grey matter" shell) and noise.
    tissue = np.where(r < 0.7, 100.0, 70.0) * mask
    tissue = tissue + rng.normal(0, 2.0, shape) * mask
    # Smooth multiplicative field: ±30 % across the head.
    log_bias = 0.25 * g[0] / 60 - 0.2 * g[2] / 55 + 0.15 * (g[1] / 70) ** 2
    bias = np.exp(log_bias)
    return (tissue * bias).astype(np.float32), mask, log_bias, r


def _affine(vs):
    aff = np.diag([*vs, 1.0])
    aff[0, 0] *= -1  # orientation must not matter
    return aff


@pytest.mark.parametrize(
    ("shape", "vs"),
    [((64, 72, 56), (2.0, 2.0, 2.0)), ((128, 144, 28), (1.0, 1.0, 4.0))],
)
def test_n4_recovers_field(shape, vs):
    data, mask, true_log, r = _phantom(shape, vs)
    corrected, bias = n4_correct(data, mask, _affine(vs))
    assert corrected.shape == data.shape and bias.shape == data.shape
    assert corrected.dtype == np.float32 and bias.dtype == np.float32
    assert np.isfinite(corrected).all() and np.isfinite(bias).all()
    est = np.log(bias[mask])
    assert np.corrcoef(est, true_log[mask])[0, 1] > 0.9
    # Within one tissue, the spread drops a lot once the field is removed.
    core = r < 0.6
    cv_before = data[core].std() / data[core].mean()
    cv_after = corrected[core].std() / corrected[core].mean()
    assert cv_after < 0.5 * cv_before


def test_shrink_factors_thick_slices():
    assert shrink_factors((0.45, 0.45, 4.0), 4) == [4, 4, 1]
    assert shrink_factors((1.0, 1.0, 1.0), 4) == [4, 4, 4]
    assert shrink_factors((0.5, 1.0, 2.0), 4) == [4, 2, 1]


def test_n4_never_nan_and_skips_qsm():
    data, mask, _, _ = _phantom((40, 40, 30), (3.0, 3.0, 3.0))
    data[5, 5, 5] = np.nan
    data[6, 6, 6] = -5.0
    corrected, bias = n4_correct(data, mask, np.eye(4) * 3)
    assert np.isfinite(corrected).all() and np.isfinite(bias).all()
    rng = np.random.default_rng(0)
    chi = (rng.normal(0, 0.05, data.shape) * mask).astype(np.float32)
    out, field = n4_correct(chi, mask, np.eye(4))
    assert np.array_equal(out, chi) and np.all(field == 1)
