"""Preview figure of a simulated subject: whole-brain slices and crops around lesions and mimics.

One PNG per subject (``--preview``): top row, axial/coronal/sagittal slices of the image a
detector reads, with microbleeds circled in red and mimics in cyan; then 30 mm crops around up
to four microbleeds (reference-mask contour in red) and up to four mimics (one per type first),
and, for SWI and MEGRE, the high-pass phase around the first microbleed and the first
calcification (their dipole patterns have opposite signs). Slices are shown in the closest RAS orientation.
"""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_write_bytes
from .subject import SimulatedSubject

CROP_MM = 30.0


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj, dtype=np.float32), can.affine


def _vox(affine: np.ndarray, xyz) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return np.rint(inv[:3, :3] @ np.asarray(xyz, float) + inv[:3, 3]).astype(int)


def _window(data: np.ndarray, kind: str) -> tuple[float, float]:
    if kind == "qsm":
        return -0.1, 0.2
    vals = data[data > 0]
    if not vals.size:
        return 0.0, 1.0
    return 0.0, float(np.percentile(vals, 99.5))


def _crop(ax, data, ref, affine, xyz, lo, hi, title, cmap="gray"):
    vs = np.sqrt((affine[:3, :3] ** 2).sum(0))
    v = _vox(affine, xyz)
    v = np.clip(v, 0, np.array(data.shape) - 1)
    h = np.maximum((CROP_MM / 2 / vs[:2]).astype(int), 2)
    sx = slice(max(v[0] - h[0], 0), min(v[0] + h[0] + 1, data.shape[0]))
    sy = slice(max(v[1] - h[1], 0), min(v[1] + h[1] + 1, data.shape[1]))
    ax.imshow(
        data[sx, sy, v[2]].T,
        origin="lower",
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        aspect=vs[1] / vs[0],
        interpolation="nearest",
    )
    if ref is not None and ref[sx, sy, v[2]].any():
        ax.contour(ref[sx, sy, v[2]].T, [0.5], colors="r", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def highpass_phase(phase: np.ndarray, sigma_vox: float = 4.0) -> np.ndarray:
    """Phase minus its smooth part, per slice: arg(e^{iφ} · conj(G_σ * e^{iφ})) (for display)."""
    from scipy import ndimage as ndi

    z = np.exp(1j * phase.astype(np.float64))
    low = ndi.gaussian_filter(z.real, (sigma_vox, sigma_vox, 0)) + 1j * ndi.gaussian_filter(
        z.imag, (sigma_vox, sigma_vox, 0)
    )
    return np.angle(z * np.conj(low)).astype(np.float32)


def make_preview(subject: SimulatedSubject, label: str = "") -> bytes:
    """PNG bytes of the preview figure (see the module docstring)."""
    data, aff = _canonical(subject.main_image)
    ref, _ = _canonical(subject.reference_mask)
    lo, hi = _window(data, subject.kind)
    phase = None
    for key in subject.images:
        if "part-phase" in key:
            phase, _ = _canonical(subject.images[key])  # last echo for MEGRE
    if phase is not None:
        phase = highpass_phase(phase)
    vs = np.sqrt((aff[:3, :3] ** 2).sum(0))
    les = subject.lesions
    vis = les[les.visible == 1] if len(les) else les
    show = (vis if len(vis) else les).head(4)
    mim = subject.mimics
    if len(mim):
        first = mim.drop_duplicates("type")
        mim_show = pd.concat([first, mim.drop(first.index)]).head(4)
    else:
        mim_show = mim
    fig = Figure(figsize=(16, 12), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 4)
    centre = (
        _vox(aff, show.iloc[0][["x", "y", "z"]].to_numpy(float))
        if len(show)
        else np.array(data.shape) // 2
    )
    centre = np.clip(centre, 0, np.array(data.shape) - 1)
    k = centre[2]
    ax = axes[0, 0]
    ax.imshow(data[:, :, k].T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=vs[1] / vs[0])
    for _, row in les.iterrows():
        v = _vox(aff, [row.x, row.y, row.z])
        if abs(v[2] - k) * vs[2] <= 3:
            ax.plot(v[0], v[1], "o", mfc="none", mec="r", ms=10)
    for _, row in mim.iterrows():
        v = _vox(aff, [row.x, row.y, row.z])
        if abs(v[2] - k) * vs[2] <= 3:
            ax.plot(v[0], v[1], "s", mfc="none", mec="c", ms=10)
    ax.set_title(f"sub-{label} {subject.kind} ({subject.size}) axial", fontsize=8)
    axes[0, 1].imshow(
        data[:, centre[1], :].T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=vs[2] / vs[0]
    )
    axes[0, 1].set_title("coronal", fontsize=8)
    axes[0, 2].imshow(
        data[centre[0], :, :].T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=vs[2] / vs[1]
    )
    axes[0, 2].set_title("sagittal", fontsize=8)
    ax = axes[0, 3]
    ax.axis("off")
    acq = subject.acquisition
    text = (
        f"voxel {acq['voxel_mm']} mm\nTE {[round(t * 1e3, 1) for t in subject.echo_times]} ms\n"
        f"TR {acq['RepetitionTime'] * 1e3:.0f} ms, flip {acq['FlipAngle']:.0f}°\n"
        f"SNR {acq['snr']:.0f}, {acq['orientation']}, {acq['dtype']}, skull {subject.skull}\n"
        f"microbleeds {len(les)} (visible {int(les.visible.sum()) if len(les) else 0})\n"
        f"mimics {len(mim)}"
    )
    ax.text(0.0, 0.9, text, va="top", fontsize=9, family="monospace")
    for i in range(4):
        ax = axes[1, i]
        if i < len(show):
            row = show.iloc[i]
            _crop(
                ax,
                data,
                ref,
                aff,
                [row.x, row.y, row.z],
                lo,
                hi,
                f"CMB {row.lesion_id}: d={row.true_diameter_mm:.1f} mm, χ={row.chi_ppm:.2f}, "
                f"app={row.apparent_diameter_mm:.1f} mm\n{row.region}",
            )
        else:
            ax.axis("off")
    slots = list(range(4))
    calc = mim[mim.type == "calcification"] if len(mim) else mim
    if phase is not None and len(show):
        row = show.iloc[0]
        _crop(
            axes[2, 3],
            phase,
            None,
            aff,
            [row.x, row.y, row.z],
            -np.pi / 2,
            np.pi / 2,
            f"high-pass phase at CMB {row.lesion_id} (±π/2)",
            cmap="gray",
        )
        slots = slots[:3]
    if phase is not None and len(calc):
        row = calc.iloc[0]
        _crop(
            axes[2, slots[-1]],
            phase,
            None,
            aff,
            [row.x, row.y, row.z],
            -np.pi / 2,
            np.pi / 2,
            f"high-pass phase at calcification ({row.location})",
            cmap="gray",
        )
        slots = slots[:-1]
    for i, slot in enumerate(slots):
        ax = axes[2, slot]
        if i < len(mim_show):
            row = mim_show.iloc[i]
            _crop(
                ax,
                data,
                ref,
                aff,
                [row.x, row.y, row.z],
                lo,
                hi,
                f"{row.type} ({row.location}) {row.size_mm:.1f} mm",
            )
        else:
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write_preview(subject: SimulatedSubject, path: str | Path, label: str = "") -> Path:
    """Write the preview PNG atomically."""
    return atomic_write_bytes(path, make_preview(subject, label))
