"""Tests of echo combination, echo validation, phase scaling, unwrapping and high-pass phase."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.errors import InputError
from cmb_bidsapp.preproc.echoes import (
    combine_echoes,
    fit_t2star,
    highpass_phase,
    phase_to_radians,
    unwrap_laplacian,
)

TES = [0.005, 0.015, 0.025, 0.035]


def _megre(shape=(20, 20, 10), t2s_tissue=0.040, seed=0):
    rng = np.random.default_rng(seed)
    t2s = np.full(shape, t2s_tissue)
    t2s[8:12, 8:12, 4:6] = 0.008  # a short-T2* lesion
    s0 = np.full(shape, 100.0)
    mags = [(s0 * np.exp(-te / t2s) + rng.normal(0, 0.5, shape)).astype(np.float32) for te in TES]
    return mags, t2s


def test_fit_t2star_recovers_truth():
    mags, t2s = _megre()
    est = fit_t2star(mags, TES)
    assert est.dtype == np.float32
    assert np.allclose(np.median(est[t2s == 0.040]), 0.040, rtol=0.03)
    assert np.allclose(np.median(est[t2s == 0.008]), 0.008, rtol=0.1)


@pytest.mark.parametrize("method", ["t2star", "t2star-voxel", "rms"])
def test_combine_keeps_grid_and_lesion_dark(method):
    mags, t2s = _megre()
    out = combine_echoes(mags, TES, method=method)
    assert out.shape == mags[0].shape and out.dtype == np.float32
    lesion = float(out[t2s < 0.01].mean())
    tissue = float(out[t2s > 0.01].mean())
    assert lesion < 0.6 * tissue


def test_t2star_combination_has_more_contrast_than_rms_and_voxelwise():
    mags, t2s = _megre()

    def contrast(img):
        return 1 - img[t2s < 0.01].mean() / img[t2s > 0.01].mean()

    c = {
        m: contrast(combine_echoes(mags, TES, method=m)) for m in ("t2star", "t2star-voxel", "rms")
    }
    assert c["t2star"] > c["rms"] and c["t2star"] > c["t2star-voxel"]


def test_combine_order_independent_and_single_echo():
    mags, _ = _megre()
    a = combine_echoes(mags, TES)
    b = combine_echoes(mags[::-1], TES[::-1])
    assert np.allclose(a, b, rtol=1e-5)
    assert np.array_equal(combine_echoes(mags[:1], TES[:1]), mags[0])


def test_echo_validation_errors_name_the_file():
    mags, _ = _megre()
    paths = [f"sub-01_echo-{i + 1}_part-mag_MEGRE.nii.gz" for i in range(4)]
    with pytest.raises(InputError, match="echo-3.*EchoTime"):
        combine_echoes(mags, [0.005, 0.015, None, 0.035], paths=paths)
    with pytest.raises(InputError, match="echo-2.*shape"):
        combine_echoes([mags[0], mags[1][:-1]], TES[:2], paths=paths)
    with pytest.raises(InputError, match="milliseconds"):
        combine_echoes(mags, [5, 15, 25, 35], paths=paths)
    with pytest.raises(InputError, match="4 echoes but 3 EchoTime"):
        combine_echoes(mags, TES[:3], paths=paths)
    err = None
    try:
        combine_echoes(mags, [0.005, float("nan"), 0.025, 0.035], paths=paths)
    except InputError as e:
        err = e
    assert err is not None and err.path == paths[1] and "sidecar" in err.format()


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (np.array([0, 1024, 2048, 3072, 4095], float), [-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi]),
        (np.array([-4096, -2048, 0, 2048, 4094], float), [-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi]),
        (
            np.array([-0.003674, -0.001837, 0, 0.001837, 0.003674]),
            [-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi],
        ),
        (np.array([-3.14, -1.0, 0.0, 1.0, 3.14]), [-3.14, -1.0, 0.0, 1.0, 3.14]),
    ],
)
def test_phase_to_radians(stored, expected):
    out = phase_to_radians(stored.reshape(5, 1, 1))
    assert out.dtype == np.float32
    assert np.allclose(out.ravel(), expected, atol=2e-3)


def test_phase_to_radians_12bit_with_narrow_observed_range():
    # 12-bit data that does not reach 0 or 4095 still maps through the nominal range.
    out = phase_to_radians(np.array([100.0, 2048.0, 4000.0]).reshape(3, 1, 1))
    assert np.allclose(out.ravel(), (np.array([100, 2048, 4000]) - 2048) / 2048 * np.pi, atol=1e-5)


def test_real_crop_phase_scaling(shared_data):
    import nibabel as nib

    ph = np.asarray(nib.load(shared_data / "real-megre" / "Phase.nii").dataobj, dtype=np.float32)
    rad = phase_to_radians(ph[..., 0])
    assert rad.min() < -3.1 and rad.max() > 3.1 and np.abs(rad).max() <= np.pi + 1e-6
    mag = np.asarray(nib.load(shared_data / "real-megre" / "Mag.nii").dataobj, dtype=np.float32)
    comb = combine_echoes([mag[..., e] for e in range(3)], [0.004, 0.008, 0.012])
    assert comb.shape == mag.shape[:3] and np.isfinite(comb).all() and comb.max() > 0
    hp = highpass_phase(mag[..., 2], phase_to_radians(ph[..., 2]), (0.46875, 0.46875, 1.0))
    # The background field is removed: the high-pass phase is small almost everywhere,
    # while the raw phase wraps over the whole range.
    assert np.percentile(np.abs(hp), 90) < 0.6


def _grid(n):
    return np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij")


def test_unwrap_laplacian_smooth_phase():
    g = _grid(48)
    true = 0.004 * (g[0] ** 2 + 0.5 * g[1] ** 2 + 0.8 * g[2] ** 2)  # up to ~8 rad: wraps
    wrapped = np.angle(np.exp(1j * true))
    assert np.abs(wrapped - true).max() > 3  # really wrapped
    out = unwrap_laplacian(wrapped, (1.0, 1.0, 1.0))
    err = out - true
    err -= err.mean()
    assert np.abs(err).mean() < 0.1


def _dipole_phase(chi_ppm, n=64, radius=2.0, te=0.02):
    """Phase (rad, φ = -γ ΔB TE at 3 T) of a susceptibility sphere, via the dipole kernel."""
    g = _grid(n)
    r = np.sqrt(sum(x * x for x in g))
    chi = np.where(r <= radius, chi_ppm, 0.0)
    k = np.meshgrid(*[np.fft.fftfreq(n)] * 3, indexing="ij")
    k2 = sum(x * x for x in k)
    k2[0, 0, 0] = 1
    kernel = 1 / 3 - k[2] ** 2 / k2
    kernel[0, 0, 0] = 0
    field = np.real(np.fft.ifftn(kernel * np.fft.fftn(chi)))
    return -2 * np.pi * 127.7e6 * te * 1e-6 * field, g, r


@pytest.mark.parametrize("chi", [0.3, -0.3])
def test_highpass_keeps_local_dipole_removes_background(chi):
    local, g, r = _dipole_phase(chi)
    background = 0.15 * g[0] + 0.1 * g[2] + 0.001 * g[1] ** 2 + 1.0
    raw = np.angle(np.exp(1j * (local + background)))
    mag = np.where(r <= 2.5, 0.3, 1.0)
    hp = highpass_phase(mag, raw, (1.0, 1.0, 1.0))
    roi = (r > 2.5) & (r < 8)
    assert np.corrcoef(hp[roi], local[roi])[0, 1] > 0.95
    # Sign: along B0 (axis 2) a paramagnetic source (chi > 0) gives negative phase here,
    # in the equatorial plane positive; a diamagnetic one the opposite.
    pole, equator = hp[32, 32, 36], hp[36, 32, 32]
    assert np.sign(pole) == -np.sign(chi) and np.sign(equator) == np.sign(chi)


def test_highpass_paramagnetic_and_diamagnetic_are_opposite():
    para, g, r = _dipole_phase(0.4)
    dia, _, _ = _dipole_phase(-0.4)
    background = 0.12 * g[1] - 0.05 * g[2]
    hp_para = highpass_phase(None, np.angle(np.exp(1j * (para + background))))
    hp_dia = highpass_phase(None, np.angle(np.exp(1j * (dia + background))))
    roi = (r > 2.5) & (r < 8)
    assert np.corrcoef(hp_para[roi], hp_dia[roi])[0, 1] < -0.9
