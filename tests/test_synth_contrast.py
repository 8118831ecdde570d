"""Contrast and sign in whole simulated subjects: microbleeds dark on magnitude and bright on
QSM, calcifications dark on QSM with the opposite phase to a microbleed."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.synth import simulate_subject
from cmb_bidsapp.synth.preview import highpass_phase

BIG = dict(
    n_microbleeds=3, cmb_diameter_range=(1.8, 2.0), cmb_chi_range=(1.2, 1.5), mimic_rate=3.0,
    snr=300.0,
)  # fmt: skip


def _vox(img, xyz):
    inv = np.linalg.inv(img.affine)
    return np.rint(inv[:3, :3] @ np.asarray(xyz, float) + inv[:3, 3]).astype(int)


def _local(data, v, radius_vox=4):
    box = tuple(slice(max(c - radius_vox, 0), c + radius_vox + 1) for c in v)
    return data[box]


@pytest.fixture(scope="module")
def qsm():
    return simulate_subject(31, "qsm", "small", skull=False, **BIG)


@pytest.fixture(scope="module")
def megre():
    return simulate_subject(32, "megre", "small", skull=True, **BIG)


def test_microbleeds_bright_and_calcifications_dark_on_qsm(qsm):
    img = qsm.images["Chimap"]
    chi = img.get_fdata()
    calcs = qsm.mimics[qsm.mimics.type == "calcification"]
    assert len(qsm.lesions) == 3 and len(calcs) >= 1
    for _, row in qsm.lesions.iterrows():
        v = _vox(img, [row.x, row.y, row.z])
        peak = _local(chi, v, 1).max()
        assert peak > np.median(_local(chi, v)) + 0.05, row.lesion_id
    for _, row in calcs.iterrows():
        v = _vox(img, [row.x, row.y, row.z])
        low = _local(chi, v, 1).min()
        assert low < np.median(_local(chi, v)) - 0.05, row.location


def test_microbleeds_dark_on_magnitude(megre):
    key = f"echo-{len(megre.echo_times)}_part-mag_MEGRE"
    img = megre.images[key]
    mag = img.get_fdata()
    for _, row in megre.lesions.iterrows():
        v = _vox(img, [row.x, row.y, row.z])
        assert _local(mag, v, 1).min() < 0.5 * np.median(_local(mag, v)), row.lesion_id


def _pole_phase(sub, xyz, distance_mm):
    """Mean high-pass phase (last echo) above and below a source along B0 (world z)."""
    key = f"echo-{len(sub.echo_times)}_part-phase_MEGRE"
    img = sub.images[key]
    hp = highpass_phase(img.get_fdata().astype(np.float32), sigma_vox=4.0)
    vals = []
    for sign in (1.0, -1.0):
        v = _vox(img, np.asarray(xyz) + [0.0, 0.0, sign * distance_mm])
        vals.append(_local(hp, v, 1).mean())
    return float(np.mean(vals))


def test_phase_of_bleed_and_calcification_have_opposite_signs(megre):
    """phase = -γ·ΔB·TE: negative at a paramagnetic source's poles, positive at a
    diamagnetic one's (B0 along world z)."""
    bleeds = [
        _pole_phase(megre, [r.x, r.y, r.z], r.true_diameter_mm / 2 + 2.0)
        for _, r in megre.lesions.iterrows()
    ]
    calcs = megre.mimics[megre.mimics.type == "calcification"]
    assert len(calcs) >= 1
    calc = [_pole_phase(megre, [r.x, r.y, r.z], r.size_mm / 2 + 2.0) for _, r in calcs.iterrows()]
    assert np.median(bleeds) < 0 < np.median(calc), (bleeds, calc)
