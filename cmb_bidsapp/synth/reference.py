"""Reference masks of the simulated microbleeds, defined from the simulated signal.

Definition (noise-free signals, before the receive bias and noise; on the acquired grid):

* SWI, 2D T2*-GRE, MEGRE: a voxel belongs to microbleed *l* when the image intensity drops by
  more than 30 % against the same subject simulated without *l* (other microbleeds kept):
  ``1 − I_with / I_without > 0.30``, where ``I`` is the magnitude ``|S|`` (T2*-GRE), the
  root-sum-of-squares of the echo magnitudes (MEGRE) or the SWI intensity
  ``|S| · pm(φ_hp)^n`` (SWI; without *l* the high-pass phase loses *l*'s own phase change
  ``arg(S_with · conj(S_without))``).
* QSM: a voxel belongs to *l* when *l*'s own contribution to the reconstructed χ map
  (acquired-resolution χ filtered by the same TKD operator, inside the QSM mask) is at least
  half its peak and at least 0.05 ppm.

A voxel claimed by two microbleeds goes to the one with the larger drop (contribution). Only
the 26-connected components that contain or touch the voxel of the microbleed's centre are
kept, so every visible lesion's centre is inside or within one voxel of its component.
``visible`` is 1 when the lesion keeps at least one voxel.

Locality: the field and the reduction to the acquired grid are linear, so "without *l*" is
computed on a local patch: *l*'s field is the dipole field of its own χ on a zero-padded
patch (± 8 mm), the fine-grid signal difference is formed on that patch and reduced to the
acquired grid with the exact rows of the k-space truncation (3D) or slice integration (2D)
operators (:func:`cmb_bidsapp.synth.grids.truncation_matrix`), then subtracted from the
globally simulated acquired signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from .grids import Grid, fast_size, slice_matrix, truncation_matrix
from .physics import OMEGA_PER_PPM, dipole_field, swi_phase_mask, tkd_inverse

PATCH_MM = 8.0
_MAG = (
    "voxels of the acquired grid whose noise-free {what} drops by more than 30 % against the same "
    "subject simulated without that microbleed (components touching the microbleed's centre)"
)
#: One-line definition of the reference mask per input kind (written in the mask's sidecar).
DEFINITION = {
    "swi": _MAG.format(what="SWI intensity |S|*pm(phase_hp)^n"),
    "t2starw": _MAG.format(what="magnitude"),
    "megre": _MAG.format(what="root-sum-of-squares magnitude over echoes"),
    "qsm": "voxels where the microbleed's own contribution to the reconstructed chi map is at "
    "least half its peak and at least 0.05 ppm (inside the QSM mask)",
}
DROP_THRESHOLD = 0.30
QSM_MIN_PPM = 0.05
QSM_PEAK_FRACTION = 0.5


@dataclass
class LesionStamp:
    """What was drawn on the fine grid for one microbleed."""

    slices: tuple[slice, slice, slice]
    occupancy: np.ndarray  # (patch) 0..1
    chi_ppm: float
    amp_before: np.ndarray
    r2s_before: np.ndarray
    centre_fine: np.ndarray  # continuous fine voxel index
    centre_acq: np.ndarray  # continuous acquired voxel index


@dataclass
class ReferenceContext:
    fine: Grid
    acquired: Grid
    two_d: bool
    n_pitch: int
    n_sub: int
    b0_fine: np.ndarray
    b0_acq: np.ndarray
    echo_times: list[float]
    amp: torch.Tensor
    r2s: torch.Tensor
    field: torch.Tensor
    signals: list[torch.Tensor]  # noise-free acquired complex signal per echo (kind != qsm)
    kind: str
    swi_phase_hp: torch.Tensor | None = None
    swi_power: int = 4
    qsm_threshold: float = 0.15
    qsm_shrink: float = 1.0
    qsm_mask: np.ndarray | None = None


def _acq_rows(ctx: ReferenceContext, axis: int, lo: int, hi: int) -> np.ndarray:
    """Acquired indices whose centre lies inside fine index range [lo, hi) (with 1 voxel margin)."""
    n_acq = ctx.acquired.shape[axis]
    if ctx.two_d and axis == 2:
        ok = (np.arange(n_acq) * ctx.n_pitch >= lo) & (
            np.arange(n_acq) * ctx.n_pitch + ctx.n_sub <= hi
        )
        return np.nonzero(ok)[0]
    pos = np.arange(n_acq) * (ctx.fine.shape[axis] / n_acq)
    return np.nonzero((pos >= lo + 1) & (pos <= hi - 2))[0]


def _operator(ctx: ReferenceContext, axis: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if ctx.two_d and axis == 2:
        return slice_matrix(ctx.n_pitch, ctx.n_sub, rows, cols).astype(np.complex128)
    return truncation_matrix(ctx.fine.shape[axis], ctx.acquired.shape[axis], rows, cols)


def _apply(ops: list[np.ndarray], patch: np.ndarray) -> np.ndarray:
    return np.einsum("ia,jb,kc,abc->ijk", ops[0], ops[1], ops[2], patch, optimize=True)


def _local_field(occ_chi: np.ndarray, spacing: np.ndarray, b0: np.ndarray) -> np.ndarray:
    pad = tuple(fast_size(2 * n + 8) for n in occ_chi.shape)
    return dipole_field(
        torch.from_numpy(occ_chi.astype(np.float32)), spacing, b0, pad_shape=pad
    ).numpy()


def microbleed_masks(
    ctx: ReferenceContext, stamps: list[LesionStamp]
) -> tuple[np.ndarray, list[dict]]:
    """Owner map (int16, 0 = none, l + 1 = microbleed l) on the acquired grid, and per-lesion
    measurements (``n_voxels``, ``peak_drop``)."""
    shape = ctx.acquired.shape
    owner = np.zeros(shape, np.int16)
    best = np.zeros(shape, np.float32)
    boxes = []
    for li, st in enumerate(stamps):
        half = np.ceil(PATCH_MM / ctx.fine.spacing).astype(int)
        c = np.rint(st.centre_fine).astype(int)
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, ctx.fine.shape)
        rows = [_acq_rows(ctx, a, lo[a], hi[a]) for a in range(3)]
        if any(len(r) == 0 for r in rows) or np.any(hi <= lo):
            boxes.append(None)
            continue
        cols = [np.arange(lo[a], hi[a]) for a in range(3)]
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        # the lesion's own χ on the patch, and where its stamp lies inside the patch
        occ_chi = np.zeros(tuple(hi - lo), np.float32)
        inner = tuple(
            slice(max(s.start, a) - a, min(s.stop, b) - a) for s, a, b in zip(st.slices, lo, hi)
        )
        src = tuple(
            slice(max(s.start, a) - s.start, min(s.stop, b) - s.start)
            for s, a, b in zip(st.slices, lo, hi)
        )
        occ_chi[inner] = st.occupancy[src] * st.chi_ppm
        ops = [_operator(ctx, a, rows[a], cols[a]) for a in range(3)]
        arows = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in rows)
        if ctx.kind == "qsm":
            contrib = _qsm_contribution(ctx, ops, occ_chi)
            if ctx.qsm_mask is not None:
                contrib = contrib * ctx.qsm_mask[arows]
            peak = float(contrib.max()) if contrib.size else 0.0
            score = np.where(contrib >= max(QSM_PEAK_FRACTION * peak, QSM_MIN_PPM), contrib, 0.0)
        else:
            score = _magnitude_drop(ctx, st, box, inner, src, occ_chi, ops, arows)
        sel = (score > 0) & (score > best[arows])
        if ctx.kind != "qsm":
            sel &= score > DROP_THRESHOLD
        owner_view = owner[arows]
        best_view = best[arows]
        owner_view[sel] = li + 1
        best_view[sel] = score[sel]
        boxes.append(arows)
    # keep only components touching each lesion's centre voxel
    stats = []
    struct = np.ones((3, 3, 3), bool)
    for li, (st, arows) in enumerate(zip(stamps, boxes)):
        if arows is None:
            stats.append({"n_voxels": 0, "peak": 0.0})
            continue
        mine = owner[arows] == li + 1
        lab, n = ndi.label(mine, structure=struct)
        centre = np.rint(st.centre_acq).astype(int) - np.array([s.start for s in arows])
        keep = np.zeros(n + 1, bool)
        if n:
            near = tuple(slice(max(int(c) - 1, 0), max(int(c) + 2, 0)) for c in centre)
            touched = np.unique(lab[near])
            keep[touched[touched > 0]] = True
        drop_vox = mine & ~keep[lab]
        owner_view = owner[arows]
        owner_view[drop_vox] = 0
        kept = mine & keep[lab]
        stats.append(
            {
                "n_voxels": int(kept.sum()),
                "peak": float(best[arows][kept].max()) if kept.any() else 0.0,
            }
        )
    return owner, stats


def _magnitude_drop(ctx, st, box, inner, src, occ_chi, ops, arows) -> np.ndarray:
    amp_w = ctx.amp[box].numpy().astype(np.float64)
    r2s_w = ctx.r2s[box].numpy().astype(np.float64)
    fld_w = ctx.field[box].numpy().astype(np.float64)
    amp_o, r2s_o = amp_w.copy(), r2s_w.copy()
    amp_o[inner] = st.amp_before[src]
    r2s_o[inner] = st.r2s_before[src]
    fld_o = fld_w - _local_field(occ_chi, ctx.fine.spacing, ctx.b0_fine)
    mag_w = 0.0
    mag_o = 0.0
    dphi = None
    for e, te in enumerate(ctx.echo_times):
        s_w = amp_w * np.exp(-r2s_w * te - 1j * OMEGA_PER_PPM * fld_w * te)
        s_o = amp_o * np.exp(-r2s_o * te - 1j * OMEGA_PER_PPM * fld_o * te)
        delta = _apply(ops, s_w - s_o)
        acq_w = ctx.signals[e][arows].numpy().astype(np.complex128)
        acq_o = acq_w - delta
        if ctx.kind == "swi":
            dphi = np.angle(acq_w * np.conj(acq_o))
            mag_w = np.abs(acq_w)
            mag_o = np.abs(acq_o)
        else:
            mag_w = mag_w + np.abs(acq_w) ** 2
            mag_o = mag_o + np.abs(acq_o) ** 2
    if ctx.kind == "swi":
        phi_w = ctx.swi_phase_hp[arows].numpy().astype(np.float64)
        phi_o = np.angle(np.exp(1j * (phi_w - dphi)))
        pm = lambda p: swi_phase_mask(torch.from_numpy(p)).numpy()  # noqa: E731
        mag_w = mag_w * pm(phi_w) ** ctx.swi_power
        mag_o = mag_o * pm(phi_o) ** ctx.swi_power
    else:
        mag_w, mag_o = np.sqrt(mag_w), np.sqrt(mag_o)
    ref = max(float(np.median(mag_o)), 1e-12)
    valid = mag_o > 0.05 * ref
    drop = np.where(valid, 1.0 - mag_w / np.maximum(mag_o, 1e-12), 0.0)
    return drop.astype(np.float32)


def _qsm_contribution(ctx: ReferenceContext, ops, occ_chi) -> np.ndarray:
    chi_a = np.real(_apply(ops, occ_chi.astype(np.complex128))).astype(np.float32)
    pad = tuple(fast_size(2 * n + 8) for n in chi_a.shape)
    _, filt = tkd_inverse(pad, ctx.acquired.spacing, ctx.b0_acq, ctx.qsm_threshold)
    spec = torch.fft.rfftn(torch.from_numpy(chi_a), s=pad) * filt
    out = torch.fft.irfftn(spec, s=pad)[: chi_a.shape[0], : chi_a.shape[1], : chi_a.shape[2]]
    return out.numpy() * ctx.qsm_shrink
