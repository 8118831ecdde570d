"""Simulator physics: dipole field, k-space reduction, phase sign, blooming (local patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmb_bidsapp.synth.acquisition import Grids
from cmb_bidsapp.synth.grids import Grid, slice_matrix, truncate_axis, truncation_matrix
from cmb_bidsapp.synth.lesions import stamp_sphere
from cmb_bidsapp.synth.physics import (
    OMEGA_PER_PPM,
    dipole_field,
    gre_signal,
    sphere_field_analytic,
)
from cmb_bidsapp.synth.reference import LesionStamp, ReferenceContext, microbleed_masks
from cmb_bidsapp.synth.subject import _signals_acquired


def _sphere(n: int, spacing: float, radius: float, offset=(0.3, -0.2, 0.1)):
    centre = np.array([n / 2] * 3) + np.asarray(offset)
    sl, occ = stamp_sphere((n, n, n), np.full(3, spacing), centre, radius)
    chi = np.zeros((n, n, n), np.float32)
    chi[sl] = occ
    return chi, centre * spacing


@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), (0.0, 0.6, 0.8), (0.55, 0.3, 0.78)])
def test_sphere_field_matches_analytic_dipole(b0):
    n, d, radius = 64, 0.25, 1.5
    chi, centre = _sphere(n, d, radius)
    b0 = np.asarray(b0) / np.linalg.norm(b0)
    field = dipole_field(torch.from_numpy(chi), np.full(3, d), b0).numpy()
    ax = np.arange(n) * d
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    r = np.linalg.norm(pts - centre, axis=-1)
    ana = sphere_field_analytic(pts, centre, radius, 1.0, b0)
    shell = (r >= 2 * radius) & (r <= 4 * radius)
    local_peak = 2.0 / 3.0 * (radius / r[shell]) ** 3  # |field| on the B0 axis at that distance
    err = np.abs(field[shell] - ana[shell]) / local_peak
    assert err.max() < 0.05, err.max()
    # and the sign pattern: positive along B0, negative in the equatorial plane
    along = np.round((centre + 3 * radius * b0) / d).astype(int)
    assert field[tuple(along)] > 0


def test_truncation_operator_matches_matrix_and_keeps_constants():
    x = torch.randn(6, 5, 48, dtype=torch.complex64)
    got = truncate_axis(x, 2, 20).numpy()
    mat = truncation_matrix(48, 20, np.arange(20), np.arange(48))
    want = np.einsum("kc,ijc->ijk", mat, x.numpy())
    assert np.abs(got - want).max() < 1e-5
    const = torch.full((2, 2, 30), 3.0 + 0j, dtype=torch.complex64)
    assert torch.allclose(truncate_axis(const, 2, 11), torch.full((2, 2, 11), 3.0 + 0j), atol=1e-5)
    sm = slice_matrix(5, 4, np.arange(3), np.arange(15))
    assert np.allclose(sm.sum(1), 1.0) and sm[1, 5:9].all() and not sm[1, 9]


def _uniform_context(chi_ppm: float, te: float, diameter: float, vox=(1.0, 1.0, 1.0)):
    """One microbleed in uniform tissue: fine grid 0.25 mm, acquired `vox`, 24 mm FOV."""
    fov = 24.0
    fine_sp = 0.25
    n_f = int(fov / fine_sp)
    n_a = tuple(int(round(fov / v)) for v in vox)
    rot = np.eye(3)
    fine = Grid(np.zeros(3), rot, np.full(3, fine_sp), (n_f, n_f, n_f))
    acq = Grid(np.zeros(3), rot, np.asarray(vox, float), n_a)
    grids = Grids(acquired=acq, fine=fine, mid=fine, coarse=fine)
    amp = torch.full(fine.shape, 0.1)
    r2s = torch.full(fine.shape, 20.0)
    centre = np.array([n_f / 2 + 0.3, n_f / 2 - 0.4, n_f / 2 + 0.2])
    sl, occ = stamp_sphere(fine.shape, fine.spacing, centre, diameter / 2)
    before_a, before_r = amp[sl].numpy().copy(), r2s[sl].numpy().copy()
    o = torch.from_numpy(occ)
    amp[sl] = amp[sl] * (1 - o) + o * 0.05
    r2s[sl] = r2s[sl] * (1 - o) + o * 300.0
    chi = torch.zeros(fine.shape)
    chi[sl] = o * chi_ppm
    field = dipole_field(chi, fine.spacing, np.array([0.0, 0.0, 1.0]))
    signals = _signals_acquired(amp, r2s, field, [te], grids, False)
    ctx = ReferenceContext(
        fine=fine, acquired=acq, two_d=False, n_pitch=1, n_sub=1,
        b0_fine=np.array([0.0, 0.0, 1.0]), b0_acq=np.array([0.0, 0.0, 1.0]),
        echo_times=[te], amp=amp, r2s=r2s, field=field, signals=signals, kind="t2starw",
    )  # fmt: skip
    stamp = LesionStamp(
        sl, occ, chi_ppm, before_a, before_r, centre, acq.to_voxel(fine.to_world(centre[None]))[0]
    )
    return ctx, stamp, signals[0]


def _apparent_voxels(chi_ppm, te, diameter=1.5):
    ctx, stamp, _ = _uniform_context(chi_ppm, te, diameter, vox=(0.75, 0.75, 0.75))
    owner, stats = microbleed_masks(ctx, [stamp])
    return stats[0]["n_voxels"], owner


def test_blooming_grows_with_te_and_chi():
    by_te = [_apparent_voxels(0.8, te)[0] for te in (0.010, 0.020, 0.040)]
    by_chi = [_apparent_voxels(chi, 0.020)[0] for chi in (0.3, 0.8, 1.5)]
    assert by_te[0] < by_te[1] < by_te[2], by_te
    assert by_chi[0] < by_chi[1] < by_chi[2], by_chi
    # a 1.5 mm source (1.8 mm³) blooms to > 6 mm³ (15 voxels of 0.42 mm³) at TE 40 ms
    assert by_te[2] >= 15


def test_microbleed_is_dark_and_mask_contains_centre():
    ctx, stamp, sig = _uniform_context(1.0, 0.02, 1.2)
    owner, stats = microbleed_masks(ctx, [stamp])
    mag = sig.abs().numpy()
    c = tuple(np.rint(stamp.centre_acq).astype(int))
    assert owner[c] == 1
    assert mag[c] < 0.5 * np.median(mag)
    assert stats[0]["n_voxels"] == int((owner == 1).sum()) > 0


def test_phase_sign_bleed_versus_calcification():
    """phase = -γ·ΔB·TE: negative above/below a paramagnetic source along B0, positive for a
    diamagnetic one; the equatorial ring has the opposite sign."""
    n, d, radius, te = 48, 0.5, 1.5, 0.02
    b0 = np.array([0.0, 0.0, 1.0])
    for chi_ppm, pole_sign in ((1.0, -1.0), (-1.0, 1.0)):
        chi, centre = _sphere(n, d, radius, offset=(0, 0, 0))
        field = dipole_field(torch.from_numpy(chi * chi_ppm), np.full(3, d), b0)
        sig = gre_signal(torch.ones(chi.shape), torch.zeros(chi.shape), field, te)
        phase = torch.angle(sig).numpy()
        c = np.rint(centre / d).astype(int)
        pole = phase[c[0], c[1], c[2] + 6]  # 3 mm above along B0
        ring = phase[c[0] + 6, c[1], c[2]]  # 3 mm away in the equatorial plane
        assert np.sign(pole) == pole_sign and np.sign(ring) == -pole_sign
        expected = (
            -OMEGA_PER_PPM
            * te
            * sphere_field_analytic(np.array([[0, 0, 3.0]]), np.zeros(3), radius, chi_ppm, b0)[0]
        )
        assert abs(pole - expected) < 0.1 * abs(expected)
