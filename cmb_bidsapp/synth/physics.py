"""MR physics of the simulator: dipole field, spoiled-GRE signal, SWI and QSM reconstruction.

Units: susceptibility and field offsets in ppm (field offset ΔB / B0), times in seconds,
lengths in mm, phase in radians. B0 = 3 T along scanner z; inside a grid its direction is
:func:`cmb_bidsapp.synth.grids.b0_direction`.

Field. ``ΔB/B0 = IFFT(D(k) · FFT(χ))`` with the dipole kernel ``D(k) = 1/3 − (k·b̂)²/|k|²``
(Lorentz-sphere corrected) and ``D(0) = 0``, on a zero-padded grid (:func:`dipole_field`).

Signal. Per voxel of the fine grid ``S(TE) = A · exp(−R2*·TE) · exp(i·φ)`` with the phase
convention ``φ = −γ·ΔB·TE`` (γ = 2π·42.577 MHz/T), the right-handed convention of Haacke's
SWI papers: where the field is raised (ΔB > 0) the phase is negative. Consequences the
detector can rely on:

* a paramagnetic source (microbleed, vein, iron; χ > 0) raises the field at its poles (along
  B0, above and below it) and lowers it in its equatorial plane: its phase is NEGATIVE above
  and below it along B0 and positive in a ring around it; inside a vein parallel to B0 the
  phase is negative;
* a diamagnetic source (calcification, χ < 0) gives the opposite: POSITIVE phase at its poles.

``A = M0 · sin α (1 − E1) / (1 − cos α · E1)``, ``E1 = exp(−TR/T1)``: the spoiled-GRE steady
state (:func:`spgr_steady_state`).

SWI (:func:`swi_from_complex`): homodyne high-pass phase ``φ_hp = arg(S · conj(LP(S)))`` with a
2D Hann low-pass of the central k-space (per slice), negative phase mask
``pm = 1 + φ_hp/π`` for ``φ_hp < 0`` (else 1), and ``SWI = |S| · pm^n``.

QSM (:func:`qsm_reconstruct`): the acquired-resolution χ map filtered by the truncated
k-space division (TKD) operator ``D(k) · D⁻¹_δ(k)`` (values near the magic-angle cone are
lost: underestimation and streaks), plus field noise amplified by ``D⁻¹_δ``, a smooth
background-removal residual, referenced to the mean over the (eroded) brain mask.
"""

from __future__ import annotations

import numpy as np
import torch

GAMMA_HZ_PER_T = 42.577478e6
B0_T = 3.0
#: Phase rate per ppm of field offset (rad / s / ppm): γ·B0·1e-6.
OMEGA_PER_PPM = 2.0 * np.pi * GAMMA_HZ_PER_T * B0_T * 1e-6


def _kgrid(shape: tuple[int, ...], spacing: np.ndarray, real_last: bool) -> list[torch.Tensor]:
    """Spatial frequencies (cycles/mm) broadcastable to the FFT grid."""
    out = []
    for axis, (n, d) in enumerate(zip(shape, spacing)):
        if real_last and axis == len(shape) - 1:
            k = torch.fft.rfftfreq(n, d=float(d))
        else:
            k = torch.fft.fftfreq(n, d=float(d))
        view = [1] * len(shape)
        view[axis] = -1
        out.append(k.to(torch.float32).view(view))
    return out


def dipole_kernel(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    b0_dir: np.ndarray,
    *,
    real: bool = True,
    rows: slice | None = None,
) -> torch.Tensor:
    """D(k) = 1/3 − (k·b̂)²/|k|² on the (r)FFT grid of `shape`; D(0) = 0.

    For an oblique B0 the cross terms of (k·b̂)² change sign across the edge of the sampled
    k-space; that jump rings at the Nyquist frequency around sharp sources (a checkerboard).
    The cross terms are therefore tapered to 0 over the outer quarter of each axis's k range
    (a cos² roll-off, only on the part of D that differs from an axis-aligned kernel), which
    also keeps D Hermitian-symmetric on the Nyquist planes so that a real χ gives a real field.
    `rows` restricts the result to a range of the first axis (to build it slab by slab).
    """
    ks = _kgrid(shape, spacing, real)
    if rows is not None:
        ks[0] = ks[0][rows]
    b = [float(v) for v in b0_dir / np.linalg.norm(b0_dir)]
    kn = []  # frequencies tapered towards Nyquist (for the cross terms)
    for k, d in zip(ks, spacing):
        frac = (k.abs() * (2.0 * float(d))).clamp(0, 1)  # |k| / k_nyquist
        t = ((frac - 0.75) / 0.25).clamp(0, 1)
        kn.append(k * torch.cos(0.5 * np.pi * t) ** 2)
    # (k·b̂)² with tapered cross terms = (kn·b̂)² + Σ b_a² (k_a² − kn_a²); the second part is
    # a sum of 1D terms, cheap to broadcast
    kb = kn[0] * b[0] + kn[1] * b[1]
    kb = kb + kn[2] * b[2]
    kb.square_()
    for k, kk, bb in zip(ks, kn, b):
        kb += (bb * bb) * (k * k - kk * kk)
    kx, ky, kz = ks
    k2 = kx * kx + ky * ky
    k2 = k2 + kz * kz
    k2.clamp_(min=1e-30)  # only k = 0 is 0; its value is set below
    kb.div_(k2).neg_().add_(1.0 / 3.0)
    if rows is None or rows.start in (0, None):
        kb[0, 0, 0] = 0.0
    return kb


def apply_dipole_kernel_(
    spec: torch.Tensor, shape: tuple[int, int, int], spacing: np.ndarray, b0_dir: np.ndarray
) -> torch.Tensor:
    """Multiply an rFFT spectrum of `shape` by D(k) in place."""
    kernel = dipole_kernel(shape, spacing, b0_dir, real=True)
    torch.view_as_real(spec).mul_(kernel[..., None])
    return spec


def padded_shape(shape: tuple[int, ...], pad_mm, spacing: np.ndarray) -> tuple[int, ...]:
    """FFT-friendly shape with at least `pad_mm` (scalar or per axis) of zeros added per axis."""
    from .grids import fast_size

    pad = np.broadcast_to(np.asarray(pad_mm, float), (len(shape),))
    return tuple(fast_size(n + int(np.ceil(p / s))) for n, p, s in zip(shape, pad, spacing))


def dipole_field(
    chi: torch.Tensor,
    spacing: np.ndarray,
    b0_dir: np.ndarray,
    *,
    pad_shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Field offset (ppm) of the susceptibility map `chi` (ppm) by a zero-padded FFT."""
    shape = tuple(chi.shape)
    pad_shape = pad_shape or tuple(2 * n for n in shape)
    spec = torch.fft.rfftn(chi.to(torch.float32), s=pad_shape)
    apply_dipole_kernel_(spec, pad_shape, spacing, b0_dir)
    field = torch.fft.irfftn(spec, s=pad_shape)
    del spec
    return field[: shape[0], : shape[1], : shape[2]].contiguous()


def sphere_field_analytic(
    points_mm: np.ndarray, centre_mm: np.ndarray, radius_mm: float, chi_ppm: float, b0_dir
) -> np.ndarray:
    """Analytic field offset (ppm) of a uniform sphere: 0 inside, dipole outside."""
    r = np.asarray(points_mm, float) - np.asarray(centre_mm, float)
    dist = np.linalg.norm(r, axis=-1)
    cos = (r @ (np.asarray(b0_dir) / np.linalg.norm(b0_dir))) / np.maximum(dist, 1e-12)
    out = chi_ppm / 3.0 * (radius_mm / np.maximum(dist, 1e-12)) ** 3 * (3 * cos**2 - 1)
    return np.where(dist > radius_mm, out, 0.0)


def shim(
    field: np.ndarray, mask: np.ndarray, coords_mm: list[np.ndarray], order: int = 2
) -> np.ndarray:
    """Remove the least-squares polynomial (up to `order`) fitted to `field` inside `mask`.

    `coords_mm` are the three 1D axis positions (mm); scanner shims act in the same way up to a
    rotation, which a full polynomial basis is invariant to.
    """
    x, y, z = (np.asarray(c, float) for c in coords_mm)
    cx, cy, cz = (c - c.mean() for c in (x, y, z))
    scale = max(np.abs(cx).max(), np.abs(cy).max(), np.abs(cz).max(), 1.0)
    cx, cy, cz = cx / scale, cy / scale, cz / scale
    powers = [
        (a, b, c) for a in range(order + 1) for b in range(order + 1) for c in range(order + 1)
    ]
    powers = [p for p in powers if sum(p) <= order]
    idx = np.nonzero(mask)
    step = max(1, len(idx[0]) // 200_000)
    sel = tuple(i[::step] for i in idx)
    basis = np.stack([cx[sel[0]] ** a * cy[sel[1]] ** b * cz[sel[2]] ** c for a, b, c in powers], 1)
    coef, *_ = np.linalg.lstsq(basis, field[sel].astype(np.float64), rcond=None)
    fit = np.zeros(field.shape, np.float64)
    for (a, b, c), w in zip(powers, coef):
        fit += w * (cx[:, None, None] ** a) * (cy[None, :, None] ** b) * (cz[None, None, :] ** c)
    return (field - fit).astype(np.float32)


def spgr_steady_state(m0, t1_s, tr_s: float, flip_deg: float):
    """Spoiled gradient-echo steady-state amplitude (before T2* decay), same units as `m0`."""
    alpha = np.deg2rad(flip_deg)
    e1 = np.exp(-tr_s / np.maximum(t1_s, 1e-6))
    return m0 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)


def gre_signal(
    amplitude: torch.Tensor, r2s: torch.Tensor, field_ppm: torch.Tensor, te_s: float
) -> torch.Tensor:
    """Complex GRE signal A·exp(−R2*·TE)·exp(−i·γ·ΔB·TE) (complex64)."""
    mag = torch.mul(r2s, -te_s).exp_().mul_(amplitude)
    phase = torch.mul(field_ppm, -OMEGA_PER_PPM * te_s)
    return torch.polar(mag, phase)


def hann_lowpass(shape2d: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """2D Hann window of size `window` centred on k = 0 of an unshifted FFT grid of `shape2d`."""
    out = []
    for n, w in zip(shape2d, window):
        w = int(min(max(w, 2), n))
        k = torch.fft.fftfreq(n) * n  # integer frequencies
        h = 0.5 + 0.5 * torch.cos(2 * np.pi * k / w)
        h[k.abs() >= w / 2] = 0.0
        out.append(h)
    return out[0][:, None] * out[1][None, :]


def homodyne_phase(signal: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """High-pass phase arg(S · conj(LP(S))) per slice (axes 0, 1 in-plane; axis 2 slices)."""
    win = hann_lowpass(signal.shape[:2], window).to(torch.complex64)
    s = signal.permute(2, 0, 1).contiguous()  # slices first: contiguous 2D transforms
    spec = torch.fft.fft2(s)
    spec.mul_(win)
    low = torch.fft.ifft2(spec)
    del spec
    low.conj_physical_().mul_(s)
    return torch.angle(low).permute(1, 2, 0).contiguous()


def swi_phase_mask(phase_hp: torch.Tensor) -> torch.Tensor:
    """Negative phase mask (right-handed): 1 + φ/π for φ < 0, 1 otherwise."""
    return torch.where(phase_hp < 0, 1.0 + phase_hp / np.pi, torch.ones_like(phase_hp))


def swi_from_complex(signal: torch.Tensor, window: tuple[int, int], power: int) -> torch.Tensor:
    """SWI magnitude |S| · pm(φ_hp)^n."""
    pm = swi_phase_mask(homodyne_phase(signal, window))
    return signal.abs() * pm.pow(power)


def tkd_inverse(
    shape: tuple[int, int, int], spacing: np.ndarray, b0_dir: np.ndarray, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D⁻¹_δ, D·D⁻¹_δ) on the rFFT grid: TKD with threshold δ (the filter QSM applies to χ)."""
    d = dipole_kernel(shape, spacing, b0_dir, real=True)
    sign = torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
    inv = torch.where(
        d.abs() >= threshold, 1.0 / torch.where(d == 0, torch.ones_like(d), d), sign / threshold
    )
    inv[0, 0, 0] = 0.0  # the mean is not recoverable; QSM is referenced afterwards
    return inv, d * inv


def apply_rfft_filter(
    x: torch.Tensor, filt: torch.Tensor, pad_shape: tuple[int, int, int]
) -> torch.Tensor:
    """Real-space result of multiplying the zero-padded rFFT of `x` by `filt`, cropped back."""
    shape = tuple(x.shape)
    spec = torch.fft.rfftn(x.to(torch.float32), s=pad_shape)
    spec.mul_(filt)
    out = torch.fft.irfftn(spec, s=pad_shape)
    return out[: shape[0], : shape[1], : shape[2]].contiguous()


def smooth_separable_field(
    shape: tuple[int, int, int], rng: np.random.Generator, amplitude: float, order: int = 3
) -> np.ndarray:
    """Smooth random field (sum of low-order 1D cosines per axis and their pairwise products).

    Returns float32 with zero mean and a peak amplitude near `amplitude`.
    """
    axes = []
    for n in shape:
        t = np.linspace(0.0, np.pi, n)
        comps = [np.cos(k * t) for k in range(1, order + 1)]
        axes.append(comps)
    out = np.zeros(shape, np.float32)
    for a in range(3):
        coef = rng.normal(0, 1, order) / np.arange(1, order + 1)
        prof = sum(c * p for c, p in zip(coef, axes[a])).astype(np.float32)
        view = [1, 1, 1]
        view[a] = -1
        out += prof.reshape(view)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        c = rng.normal(0, 0.5)
        view_a = [1, 1, 1]
        view_a[a] = -1
        view_b = [1, 1, 1]
        view_b[b] = -1
        out += (c * axes[a][0].reshape(view_a) * axes[b][0].reshape(view_b)).astype(np.float32)
    peak = float(np.abs(out).max()) or 1.0
    return out * np.float32(amplitude / peak)
