"""Acquisition protocols of the simulator: parameters per input kind and size, grids, storage.

Ranges sampled per subject (uniform unless stated; ``full`` size, then ``small``):

======== ==== ======================= ================ ============= ============ ========
kind     enc. in-plane (mm)           slice (mm)       TE (ms)       TR (ms)      flip (°)
======== ==== ======================= ================ ============= ============ ========
swi      3D   0.5–0.9 | 1.2–1.5       1.0–2.0 | 1.5–2.5 15–25         25–40        10–20
t2starw  2D   0.45–1.0 | 1.2–1.5      3–5 (gap 0–20 %)  15–25         500–900      15–25
megre    3D   0.6–1.0 | 1.2–1.5       1.0–2.0 | 1.5–2.5 3–5 echoes:   last TE +    12–20
                                                       TE1 3–6, ΔTE  5–10
                                                       4–8
qsm      3D   as megre (the χ map of a multi-echo acquisition)
======== ==== ======================= ================ ============= ============ ========

SNR (mean brain magnitude of the first echo / noise σ, noise added in complex) 10–40. The field
of view covers the head in-plane (plus 5–15 mm) and the brain through-slice (plus 4–10 mm).

Grids (all share the acquisition rotation; see :mod:`cmb_bidsapp.synth.grids`):

* fine: the same field of view as the acquired grid, spacing ≤ 0.5 mm (``full``) or ≤ 1.0 mm
  (``small``); for 2D acquisitions each slice holds a whole number of fine planes;
* mid: about 1 mm (``full``) or 1.5 mm (``small``), where the template anatomy is resampled
  before linear upsampling to the fine grid (the template itself is 1 mm);
* coarse: 2 mm (``full``) or 3 mm (``small``) over the whole head, for the air/bone field.

Storage: ``RAS`` (axial, stored as acquired), ``LAS`` (first axis flipped), ``LPS`` (first two
flipped) or ``oblique`` (acquisition rotated up to 20° about x and 8° about y and z, random
flips); in 15 % of subjects the two in-plane axes are also swapped. Magnitudes and phases are
stored as int16 with ``scl_slope`` or float32 (each 50 %); QSM maps as float32 (80 %) or int16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .grids import Grid, fast_size
from .transform import rotation_matrix

KINDS = ("swi", "t2starw", "megre", "qsm")
SIZES = ("small", "full")
ORIENTATIONS = ("RAS", "LAS", "LPS", "oblique")


@dataclass
class Protocol:
    """Everything about one subject's acquisition (lengths mm, times s, angles degrees)."""

    kind: str
    size: str
    mr_acquisition_type: str
    voxel_mm: np.ndarray
    slice_gap_mm: float
    echo_times_s: list[float]
    repetition_time_s: float
    flip_angle_deg: float
    snr: float
    skull: bool
    orientation: str
    rotation: np.ndarray
    swap_inplane: bool
    flips: tuple[bool, bool, bool]
    dtype: str
    phase_dtype: str
    fine_target_mm: float
    mid_target_mm: float | None
    coarse_mm: float
    fov_margin_mm: float
    slab_margin_mm: float
    strip_margin_mm: float
    bias_amplitude: float
    swi_window_mm: float
    swi_power: int
    qsm_threshold: float
    qsm_shrink: float
    qsm_background_fraction: float
    qsm_erode_mm: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly summary (acquisition parameters of SimulatedSubject)."""
        return {
            "kind": self.kind,
            "size": self.size,
            "MRAcquisitionType": self.mr_acquisition_type,
            "voxel_mm": [round(float(v), 4) for v in self.voxel_mm],
            "slice_gap_mm": round(float(self.slice_gap_mm), 4),
            "EchoTime": [round(t, 6) for t in self.echo_times_s],
            "RepetitionTime": round(self.repetition_time_s, 6),
            "FlipAngle": round(self.flip_angle_deg, 3),
            "snr": round(self.snr, 3),
            "skull": self.skull,
            "orientation": self.orientation,
            "swap_inplane": self.swap_inplane,
            "flips": list(self.flips),
            "dtype": self.dtype,
            "phase_dtype": self.phase_dtype,
            "fine_target_mm": self.fine_target_mm,
            "swi_power": self.swi_power,
            "qsm_threshold": round(self.qsm_threshold, 4),
        }


def sample_protocol(
    rng: np.random.Generator, kind: str, size: str, skull: bool | None, **overrides
) -> Protocol:
    """Draw a protocol for `kind` and `size`; keyword `overrides` replace drawn fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    full = size == "full"
    gap = 0.0
    if kind == "swi":
        inplane = rng.uniform(0.5, 0.9) if full else rng.uniform(1.2, 1.5)
        slice_mm = rng.uniform(1.0, 2.0) if full else rng.uniform(1.5, 2.5)
        tes = [rng.uniform(15e-3, 25e-3)]
        tr = rng.uniform(25e-3, 40e-3)
        flip = rng.uniform(10, 20)
        enc = "3D"
    elif kind == "t2starw":
        inplane = rng.uniform(0.45, 1.0) if full else rng.uniform(1.2, 1.5)
        slice_mm = rng.uniform(3.0, 5.0)
        gap = slice_mm * float(rng.choice([0.0, 0.1, 0.2]))
        tes = [rng.uniform(15e-3, 25e-3)]
        tr = rng.uniform(0.5, 0.9)
        flip = rng.uniform(15, 25)
        enc = "2D"
    else:  # megre, qsm
        inplane = rng.uniform(0.6, 1.0) if full else rng.uniform(1.2, 1.5)
        slice_mm = rng.uniform(1.0, 2.0) if full else rng.uniform(1.5, 2.5)
        n_echo = int(rng.integers(3, 6))
        te1 = rng.uniform(3e-3, 6e-3)
        dte = rng.uniform(4e-3, 8e-3)
        tes = [te1 + i * dte for i in range(n_echo)]
        tr = tes[-1] + rng.uniform(5e-3, 10e-3)
        flip = rng.uniform(12, 20)
        enc = "3D"
    aspect = rng.uniform(1.0, 1.15)  # rectangular in-plane voxels (phase direction)
    voxel = np.array([inplane, inplane * aspect, slice_mm])
    orientation = str(rng.choice(ORIENTATIONS, p=[0.2, 0.25, 0.25, 0.3]))
    if orientation == "oblique":
        rot = rotation_matrix([rng.uniform(-20, 20), rng.uniform(-8, 8), rng.uniform(-8, 8)])
        flips = tuple(bool(v) for v in rng.integers(0, 2, 3))
    else:
        rot = np.eye(3)
        flips = {
            "RAS": (False, False, False),
            "LAS": (True, False, False),
            "LPS": (True, True, False),
        }[orientation]
    swap = bool(rng.random() < 0.15)
    if skull is None:
        skull = bool(rng.random() < 0.5)
    proto = Protocol(
        kind=kind,
        size=size,
        mr_acquisition_type=enc,
        voxel_mm=voxel,
        slice_gap_mm=gap,
        echo_times_s=[float(t) for t in tes],
        repetition_time_s=float(tr),
        flip_angle_deg=float(flip),
        snr=float(rng.uniform(10, 40)),
        skull=bool(skull),
        orientation=orientation,
        rotation=rot,
        swap_inplane=swap,
        flips=flips,
        dtype=str(rng.choice(["int16", "float32"])),
        phase_dtype=str(rng.choice(["int16", "float32"])),
        fine_target_mm=0.5 if full else 1.0,
        mid_target_mm=1.0 if full else 1.5,
        coarse_mm=2.0 if full else 3.0,
        fov_margin_mm=float(rng.uniform(5, 15)),
        slab_margin_mm=float(rng.uniform(4, 10)),
        strip_margin_mm=float(rng.uniform(0.0, 2.5)),
        bias_amplitude=float(rng.uniform(0.1, 0.4)),
        swi_window_mm=float(rng.uniform(6.0, 12.0)),
        swi_power=int(rng.integers(3, 6)),
        qsm_threshold=float(rng.uniform(0.1, 0.25)),
        qsm_shrink=float(rng.uniform(0.8, 1.0)),
        qsm_background_fraction=float(rng.uniform(0.005, 0.03)),
        qsm_erode_mm=float(rng.uniform(1.0, 3.0)),
    )
    if kind == "qsm":
        proto.dtype = "float32" if rng.random() < 0.8 else "int16"
    for key, value in overrides.items():
        if not hasattr(proto, key):
            raise TypeError(f"unknown protocol override {key!r}")
        if key in ("voxel_mm", "rotation"):
            value = np.asarray(value, float)
        if key == "echo_times_s":
            value = [float(v) for v in np.atleast_1d(value)]
        setattr(proto, key, value)
    return proto


@dataclass
class Grids:
    """The four grids of one subject plus the 2D slice layout (see the module docstring)."""

    acquired: Grid
    fine: Grid
    mid: Grid
    coarse: Grid
    n_pitch: int = 1  # 2D: fine planes per slice pitch
    n_sub: int = 1  # 2D: fine planes inside a slice


def _extent(points_s: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proj = points_s @ rotation
    return proj.min(0), proj.max(0)


def make_grids(proto: Protocol, head_points_s: np.ndarray, brain_points_s: np.ndarray) -> Grids:
    """Acquired, fine, mid and coarse grids for a head/brain surface given in scanner mm."""
    rot = proto.rotation
    head_lo, head_hi = _extent(head_points_s, rot)
    brain_lo, brain_hi = _extent(brain_points_s, rot)
    vox = np.asarray(proto.voxel_mm, float)
    lo = np.empty(3)
    n_acq = np.empty(3, int)
    for a in range(2):
        fov = head_hi[a] - head_lo[a] + 2 * proto.fov_margin_mm
        n = int(np.ceil(fov / vox[a] / 2.0) * 2)
        n_acq[a] = n
        lo[a] = 0.5 * (head_lo[a] + head_hi[a]) - 0.5 * n * vox[a]
    slab = brain_hi[2] - brain_lo[2] + 2 * proto.slab_margin_mm
    centre_z = 0.5 * (brain_lo[2] + brain_hi[2])
    fine_n = np.empty(3, int)
    fine_sp = np.empty(3)
    n_pitch = n_sub = 1
    for a in range(2):
        fov = n_acq[a] * vox[a]
        fine_n[a] = fast_size(int(np.ceil(fov / proto.fine_target_mm)))
        fine_sp[a] = fov / fine_n[a]
    if proto.mr_acquisition_type == "2D":
        n_sub = int(np.ceil(vox[2] / proto.fine_target_mm - 1e-6))
        dz = vox[2] / n_sub
        n_gap = int(round(proto.slice_gap_mm / dz))
        n_pitch = n_sub + n_gap
        pitch = n_pitch * dz
        n_acq[2] = int(np.ceil(slab / pitch))
        fine_n[2] = n_acq[2] * n_pitch
        fine_sp[2] = dz
        lo[2] = centre_z - 0.5 * n_acq[2] * pitch
        acq_sp = np.array([vox[0], vox[1], pitch])
        acq_lo = lo.copy()
        acq_lo[2] = lo[2] + 0.5 * (n_sub - 1) * dz
    else:
        n_acq[2] = int(np.ceil(slab / vox[2] / 2.0) * 2)
        lo[2] = centre_z - 0.5 * n_acq[2] * vox[2]
        fov = n_acq[2] * vox[2]
        fine_n[2] = fast_size(int(np.ceil(fov / proto.fine_target_mm)))
        fine_sp[2] = fov / fine_n[2]
        acq_sp = vox.copy()
        acq_lo = lo.copy()
    acquired = Grid(rot @ acq_lo, rot, acq_sp, tuple(int(n) for n in n_acq))
    fine = Grid(rot @ lo, rot, fine_sp, tuple(int(n) for n in fine_n))
    if proto.mid_target_mm is None:
        mid = fine
    elif 1.8 * fine_sp.max() <= proto.mid_target_mm <= 2.2 * fine_sp.min():
        # exactly twice the fine spacing: upsampled by the fast factor-2 path
        mid_n = (fine_n + 1) // 2
        mid = Grid(rot @ lo, rot, 2 * fine_sp, tuple(int(n) for n in mid_n))
    else:
        fov = fine_n * fine_sp
        mid_n = np.ceil(fov / proto.mid_target_mm).astype(int)
        mid = Grid(rot @ lo, rot, fov / mid_n, tuple(int(n) for n in mid_n))
    # coarse grid: the whole head, 30 mm more below (neck), whatever the acquired slab
    c_lo = head_lo - 8.0
    c_hi = head_hi + 8.0
    c_lo[2] -= 30.0
    c_n = np.ceil((c_hi - c_lo) / proto.coarse_mm).astype(int) + 1
    coarse = Grid(rot @ c_lo, rot, np.full(3, proto.coarse_mm), tuple(int(n) for n in c_n))
    return Grids(acquired, fine, mid, coarse, n_pitch=n_pitch, n_sub=n_sub)


def storage_transform(
    proto: Protocol, shape: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[bool, ...], np.ndarray]:
    """(axis order, flips, 4x4 P) so that ``stored = flip(transpose(acquired, order))`` and
    ``affine_stored = affine_acquired @ P`` (P maps stored voxel indices to acquired ones)."""
    order = (1, 0, 2) if proto.swap_inplane else (0, 1, 2)
    flips = proto.flips
    p = np.zeros((4, 4))
    p[3, 3] = 1.0
    for s_axis, a_axis in enumerate(order):
        if flips[s_axis]:
            p[a_axis, s_axis] = -1.0
            p[a_axis, 3] = shape[a_axis] - 1
        else:
            p[a_axis, s_axis] = 1.0
    return order, flips, p


def to_storage(arr: np.ndarray, order: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """Apply the storage axis order and flips to an acquired-grid array."""
    out = np.transpose(arr, order)
    for axis, f in enumerate(flips):
        if f:
            out = np.flip(out, axis)
    return np.ascontiguousarray(out)
