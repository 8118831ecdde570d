"""Multi-echo GRE: echo combination, phase scaling to radians, 3D unwrapping, high-pass phase.

Echo combination (:func:`combine_echoes`)
-----------------------------------------
``method="t2star"`` (default): a T2*-weighted average with weights that are the SAME in every
voxel (a linear combination, so lesion contrast is not flattened)::

    w_n ∝ TE_n · exp(-TE_n / T2*_ref),   Σ w_n = 1,   out = Σ w_n · S_n

``T2*_ref`` is the median over the head (voxels above the 60th percentile of the first echo) of
the voxel-wise log-linear fit ``log S_n = log S_0 - TE_n / T2*`` (closed-form least squares),
clipped to 5–200 ms. These are the optimal-combination weights (Posse et al. 1999) of the
typical tissue. ``method="t2star-voxel"`` uses each voxel's own fitted T2* (the classic
optimal combination); it maximises SNR per voxel but weights a blooming microbleed's short T2*
towards the early echoes, where it is least dark. ``method="rms"``: root of the mean square of
the echoes. The default was chosen by the lesion contrast-to-noise ratio measured on simulated
MEGRE subjects (10 subjects, 102 reference microbleeds, TE about 5-22 ms; CNR = (median of a
shell 2-4 voxels around the lesion − lesion mean) / robust SD of the shell), median CNR:
``t2star`` 10.9, ``t2star-voxel`` 9.9, ``rms`` 9.2, the echo nearest 20 ms 7.7.

Phase (:func:`phase_to_radians`)
--------------------------------
Stored phase is scaled LINEARLY onto [-π, π]. The stored range is decided by these rules, in
order:

1. ``value_range`` given: that range.
2. Values already within [-π, π] (±0.01) spanning more than 5.5 rad: radians, unchanged.
3. Integer-valued data: the smallest usual integer range holding them, among
   [0, 4096) (12-bit, Siemens DICOM), [-4096, 4096), [0, 65536) and [-32768, 32768).
4. Otherwise the observed range [min, max] (e.g. ±0.003674 in the real test crop); a phase
   image spans its whole range, so its extremes are the range's ends.

Unwrapping (:func:`unwrap_laplacian`): Laplacian-based (Schofield & Zhu 2003),
``∇²φ = cos φ ∇² sin φ - sin φ ∇² cos φ``, solved with a DCT Poisson solver (Neumann
boundaries, anisotropic voxels). It recovers the phase up to a constant and is insensitive to
noise-induced residues; exact only for smooth phase.

High-pass phase (:func:`highpass_phase`): a homodyne filter. The complex image
``z = |S| e^{iφ}`` is divided by its low-pass version (Gaussian, sigma ``sigma_mm``, in-plane only
for thick slices): ``φ_hp = angle(z · conj(G * z))``. This removes the background field (air-tissue
interfaces, the scanner's phase offsets) and keeps the local dipole of a microbleed, whose sign
pattern is opposite for a paramagnetic bleed and a diamagnetic calcification. The sign of the
phase itself follows the scanner's convention (for ``φ = -γ ΔB TE`` a paramagnetic source gives
negative phase along B0 and positive phase in the equatorial plane).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..detect.frst import thick_slice_axis
from ..errors import InputError

LOGGER = logging.getLogger(__name__)

T2STAR_CLIP_S = (0.005, 0.200)
"""Range (s) the reference T2* is clipped to."""

HIGHPASS_SIGMA_MM = 4.0
"""Default Gaussian sigma (mm) of the homodyne low-pass."""

_INT_RANGES = ((0.0, 4096.0), (-4096.0, 4096.0), (0.0, 65536.0), (-32768.0, 32768.0))


def _name(paths: Sequence[str | Path] | None, idx: int) -> str | None:
    if paths is None or idx >= len(paths):
        return None
    return str(paths[idx])


def validate_echoes(
    mags: Sequence[np.ndarray],
    echo_times_s: Sequence[float | None],
    paths: Sequence[str | Path] | None = None,
) -> None:
    """Raise :class:`InputError` (with the file and the fix) unless the echoes are usable.

    Checks: at least one echo; one EchoTime per echo; every EchoTime present, finite, > 0 and
    in seconds (< 1 s); every echo the shape of the first.
    """
    if len(mags) == 0:
        raise InputError("no echo was given", fix="Select the MEGRE echoes of one run.")
    if len(echo_times_s) != len(mags):
        raise InputError(
            f"has {len(mags)} echoes but {len(echo_times_s)} EchoTime values",
            path=_name(paths, 0),
            fix="Give every echo's JSON sidecar an EchoTime (in seconds).",
        )
    for i, te in enumerate(echo_times_s):
        if te is None or not np.isfinite(float(te)):
            raise InputError(
                "has no EchoTime",
                path=_name(paths, i),
                fix='Add "EchoTime" (seconds) to its JSON sidecar.',
            )
        if float(te) <= 0:
            raise InputError(
                f"has EchoTime {te} (must be > 0)",
                path=_name(paths, i),
                fix='Correct "EchoTime" (seconds) in its JSON sidecar.',
            )
        if float(te) >= 1.0:
            raise InputError(
                f"has EchoTime {te}, which looks like milliseconds",
                path=_name(paths, i),
                fix="BIDS EchoTime is in seconds: e.g. 0.02, not 20.",
            )
    shape0 = np.shape(mags[0])
    for i, m in enumerate(mags[1:], start=1):
        if np.shape(m) != shape0:
            raise InputError(
                f"has shape {np.shape(m)} but the first echo has {shape0}",
                path=_name(paths, i),
                fix="All echoes of a MEGRE run must share one grid; select echoes of the same run.",
            )


def fit_t2star(mags: Sequence[np.ndarray], echo_times_s: Sequence[float]) -> np.ndarray:
    """Voxel-wise T2* (s) from a log-linear least-squares fit over echoes (float32).

    Voxels with a non-positive signal in any echo or a non-decaying fit get ``inf``.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    te_c = (te - te.mean()).astype(np.float32)
    denom = float((te_c.astype(np.float64) ** 2).sum())
    if denom <= 0:
        return np.full(np.shape(mags[0]), np.inf, dtype=np.float32)
    eps = np.float32(1e-12)
    logs = [np.log(np.maximum(np.asarray(m, dtype=np.float32), eps)) for m in mags]
    mean_log = sum(logs) / np.float32(len(logs))
    slope = sum(c * (lg - mean_log) for c, lg in zip(te_c, logs)) / np.float32(denom)
    valid = np.all([np.asarray(m) > 0 for m in mags], axis=0) & (slope < 0)
    t2s = np.full(slope.shape, np.inf, dtype=np.float32)
    t2s[valid] = -1.0 / slope[valid]
    return t2s


def combine_echoes(
    mags: list[np.ndarray],
    echo_times_s: list[float],
    *,
    method: str = "t2star",
    paths: Sequence[str | Path] | None = None,
) -> np.ndarray:
    """Combine MEGRE magnitudes into one T2*-weighted magnitude image (float32, same grid).

    Parameters
    ----------
    mags
        One magnitude array per echo, same shape.
    echo_times_s
        Echo times (s), one per echo (BIDS ``EchoTime``).
    method
        ``"t2star"`` (default), ``"t2star-voxel"`` or ``"rms"`` (see the module docstring).
    paths
        The echoes' file names, used only in error messages.

    Raises
    ------
    InputError
        Different shapes, missing or implausible echo times.
    """
    validate_echoes(mags, echo_times_s, paths)
    if method not in ("t2star", "t2star-voxel", "rms"):
        raise ValueError(f"unknown echo combination method {method!r}")
    arrays = [np.maximum(np.asarray(m, dtype=np.float32), 0) for m in mags]
    te = np.asarray(echo_times_s, dtype=np.float64)
    if len(arrays) == 1:
        return arrays[0].copy()
    if method == "rms":
        return np.sqrt(sum(a * a for a in arrays) / np.float32(len(arrays))).astype(np.float32)
    if np.ptp(te) <= 0:
        return (sum(arrays) / np.float32(len(arrays))).astype(np.float32)
    t2s = fit_t2star(arrays, te)
    lo, hi = T2STAR_CLIP_S
    if method == "t2star":
        first = arrays[int(np.argmin(te))]
        signal = first > np.percentile(first, 60.0)
        finite = signal & np.isfinite(t2s)
        ref = float(np.median(t2s[finite])) if finite.any() else 0.04
        ref = float(np.clip(ref, lo, hi))
        w = te * np.exp(-te / ref)
        w = w / w.sum()
        LOGGER.info("echo combination: T2*_ref = %.1f ms, weights %s", 1e3 * ref, np.round(w, 3))
        return sum(np.float32(wn) * a for wn, a in zip(w, arrays)).astype(np.float32)
    t2v = np.clip(np.where(np.isfinite(t2s), t2s, hi), lo, hi).astype(np.float32)
    weights = [np.float32(t) * np.exp(-np.float32(t) / t2v) for t in te]
    total = sum(weights)
    return (sum(w * a for w, a in zip(weights, arrays)) / total).astype(np.float32)


def phase_to_radians(
    phase: np.ndarray, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Scale a stored phase image linearly onto [-π, π] (float32); rules in the module docstring.

    The arithmetic is in float64, in place, and the non-finite voxels are only looked for when
    there are some (the common case has none): about 3 times faster than a straightforward
    version at 30 million voxels, with the same bits.
    """
    x = np.asarray(phase)
    if x.dtype.kind not in "biuf":
        x = x.astype(np.float64)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        return np.zeros(x.shape, dtype=np.float32)
    vals = x if all_finite else x[finite]
    lo_obs, hi_obs = float(vals.min()), float(vals.max())
    scale = True
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
    elif lo_obs >= -np.pi - 0.01 and hi_obs <= np.pi + 0.01 and hi_obs - lo_obs > 5.5:
        scale = False  # already radians
    elif hi_obs - lo_obs > 16 and _all_integers(vals):
        lo, hi = next(
            ((a, b) for a, b in _INT_RANGES if lo_obs >= a and hi_obs < b),
            (lo_obs, hi_obs),
        )
    else:
        lo, hi = lo_obs, hi_obs
    if scale and hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = x.astype(np.float64)  # a copy: the caller's array is never changed
    if scale:
        centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        out -= centre
        out /= half
        out *= np.pi
    if not all_finite:
        out[~finite] = 0.0
    np.clip(out, -np.pi, np.pi, out=out)
    return out.astype(np.float32)


def _all_integers(vals: np.ndarray) -> bool:
    """Whether every value is a whole number (in slabs, to bound the temporary memory)."""
    if vals.dtype.kind in "biu":
        return True
    flat = vals.reshape(-1)
    step = 1 << 22
    return all(
        np.array_equal(flat[i : i + step], np.round(flat[i : i + step]))
        for i in range(0, flat.size, step)
    )


def _dct_laplacian_eigs(shape: tuple[int, ...], vs: np.ndarray) -> np.ndarray:
    eig = np.zeros(shape, dtype=np.float64)
    for a, (n, v) in enumerate(zip(shape, vs)):
        k = np.arange(n)
        lam = (2.0 * np.cos(np.pi * k / n) - 2.0) / (v * v)
        sh = [1, 1, 1]
        sh[a] = n
        eig = eig + lam.reshape(sh)
    return eig


def unwrap_laplacian(
    phase: np.ndarray, voxel_sizes_mm: Sequence[float] = (1.0, 1.0, 1.0), workers: int = 1
) -> np.ndarray:
    """Laplacian-based 3D phase unwrapping (radians in, radians out, float32, zero mean).

    ``∇²φ = cos φ ∇² sin φ − sin φ ∇² cos φ``, Poisson-solved with a DCT (Neumann boundaries).
    """
    phi = np.asarray(phase, dtype=np.float64)
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    eig = _dct_laplacian_eigs(phi.shape, vs)

    def lap(f: np.ndarray) -> np.ndarray:
        return sfft.idctn(
            sfft.dctn(f, type=2, norm="ortho", workers=workers) * eig,
            type=2,
            norm="ortho",
            workers=workers,
        )

    c, s = np.cos(phi), np.sin(phi)
    rhs = c * lap(s) - s * lap(c)
    coef = sfft.dctn(rhs, type=2, norm="ortho", workers=workers)
    eig[0, 0, 0] = 1.0
    coef /= eig
    coef[0, 0, 0] = 0.0
    return sfft.idctn(coef, type=2, norm="ortho", workers=workers).astype(np.float32)


def highpass_phase(
    mag: np.ndarray | None,
    phase: np.ndarray,
    voxel_sizes_mm: Sequence[float] = (1.0, 1.0, 1.0),
    sigma_mm: float = HIGHPASS_SIGMA_MM,
    slice_axis: int | None = None,
) -> np.ndarray:
    """Homodyne high-pass phase (radians, float32, in (-π, π]): the local field's phase.

    Parameters
    ----------
    mag
        Magnitude of the same echo (weights the low-pass; ``None``: unit magnitude).
    phase
        Phase in radians (see :func:`phase_to_radians`), wrapped or not.
    voxel_sizes_mm
        Voxel sizes (mm).
    sigma_mm
        Gaussian sigma of the low-pass (mm).
    slice_axis
        Thick-slice axis, not filtered across (default: from the voxel sizes).
    """
    phi = np.asarray(phase, dtype=np.float32)
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    m = np.ones_like(phi) if mag is None else np.maximum(np.asarray(mag, dtype=np.float32), 0)
    if slice_axis is None:
        slice_axis = thick_slice_axis(vs)
    sigma = [0.0 if a == slice_axis else sigma_mm / vs[a] for a in range(3)]
    re = np.cos(phi)
    re *= m
    im = np.sin(phi)
    im *= m
    re_lp = ndi.gaussian_filter(re, sigma=sigma, truncate=3.0)
    im_lp = ndi.gaussian_filter(im, sigma=sigma, truncate=3.0)
    # angle(z · conj(z_lp)) = atan2(Im z·Re z_lp − Re z·Im z_lp, Re z·Re z_lp + Im z·Im z_lp),
    # in place (the same operations in the same order as the formula: the same bits)
    num = im * re_lp
    num -= re * im_lp
    re *= re_lp
    im *= im_lp
    re += im
    out = np.arctan2(num, re, out=num)
    out[m <= 0] = 0.0
    return out.astype(np.float32, copy=False)
