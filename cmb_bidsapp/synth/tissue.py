"""Tissue parameters at 3 T and the head model: maps of M0·steady state, R2* and χ per subject.

Reference values (each is multiplied per subject by a random factor: M0 0.93–1.07, T1
0.9–1.1, R2* 0.85–1.15, brain χ 0.8–1.2, which randomises the contrast):

==================  =====  ======  ========  ===========  ===============
tissue              M0     T1 (s)  R2* (/s)  χ brain      χ head (rel. air)
                                             (ppm, CSF 0)  (ppm)
==================  =====  ======  ========  ===========  ===============
white matter        0.69   0.85    21        −0.03        −9.4
grey matter         0.80   1.45    16        +0.01        −9.4
CSF                 1.00   4.0     2.5        0           −9.4
venous blood        0.85   1.65    80        +0.30–0.50   (in χ brain)
microbleed core     0.55   0.80    300       +0.3–1.5     (in χ brain)
calcification       0.25   1.0     120       −0.3–−1.5    (in χ brain)
flow void           0.05   1.0     30         0           (in χ brain)
cortical bone       0.05   0.5     600        —           −11.4
marrow (diploë)     0.85   0.40    60         —           −8.8
scalp / neck        0.80   0.60    35         —           −9.2
air (sinuses)       0      —       —          —           0
==================  =====  ======  ========  ===========  ===============

Iron (from :mod:`cmb_bidsapp.synth.anatomy`, scaled 0.7–1.4 per subject) adds its χ to the
brain χ and ``130 s⁻¹/ppm × χ`` to R2* (globus pallidus ≈ 0.17 ppm, R2* ≈ 38 s⁻¹).

Two χ maps are built: the *head* χ, relative to air (tissue −9.4 ppm, bone −11.4, air 0),
whose field is computed on the coarse grid over the whole head with the neck below it, and
then shimmed (2nd-order polynomial removed over the brain); and the *brain* χ, relative to
CSF, whose field is computed on the fine grid. Their sum is the total field.

Head model around the brain: outer CSF ``0 ≤ d < c`` (c = 1.5–4 mm, ``d`` the signed distance to
the template brain surface); beyond it, layers by the distance ``h`` to the *head core* (the
brain closed with a 10 mm ball plus skull base, face and neck volumes, so that no air touches
the brain): inner table up to ``h = c + 1–2 mm``, diploë (1.5–4 mm), outer table (1–2 mm),
scalp (4–9 mm), then air. Deep inside the core, beyond the CSF (skull base, face), 70 % soft
tissue and 30 % bone.
Each thickness varies smoothly over the head (±15 %). Air sinuses
(frontal, ethmoid, sphenoid, mastoid air cells, ear canals) are ellipsoids in template space,
scaled 0.6–1.5 per subject (the frontal sinus is absent in 10 %), kept out of the brain and
its CSF layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .anatomy import TemplateAnatomy
from .physics import spgr_steady_state

#: name: (M0, T1 s, R2* 1/s, χ brain ppm, χ head ppm relative to air)
TISSUES: dict[str, tuple[float, float, float, float, float]] = {
    "wm": (0.69, 0.85, 21.0, -0.03, -9.4),
    "gm": (0.80, 1.45, 16.0, 0.01, -9.4),
    "csf": (1.00, 4.0, 2.5, 0.0, -9.4),
    "blood": (0.85, 1.65, 80.0, 0.40, -9.4),
    "bleed": (0.55, 0.80, 300.0, 0.0, -9.4),
    "calcification": (0.25, 1.0, 120.0, 0.0, -9.4),
    "flow_void": (0.05, 1.0, 30.0, 0.0, -9.4),
    "bone": (0.05, 0.5, 600.0, 0.0, -11.4),
    "marrow": (0.85, 0.40, 60.0, 0.0, -8.8),
    "scalp": (0.80, 0.60, 35.0, 0.0, -9.2),
}
IRON_R2S_PER_PPM = 130.0
AIR_CHI_PPM = 9.4  # air relative to tissue

#: (name, centre MNI mm, semi-axes mm); mirrored sinuses are listed per side.
SINUSES: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("frontal", (0.0, 80.0, 8.0), (14.0, 6.0, 10.0)),
    ("ethmoid", (0.0, 38.0, -42.0), (10.0, 15.0, 9.0)),
    ("nasal", (0.0, 45.0, -66.0), (12.0, 22.0, 14.0)),
    ("sphenoid", (0.0, 12.0, -40.0), (13.0, 11.0, 11.0)),
    ("mastoid_right", (48.0, -34.0, -46.0), (10.0, 12.0, 10.0)),
    ("mastoid_left", (-48.0, -34.0, -46.0), (10.0, 12.0, 10.0)),
    ("ear_canal_right", (64.0, -22.0, -38.0), (6.0, 5.0, 5.0)),
    ("ear_canal_left", (-64.0, -22.0, -38.0), (6.0, 5.0, 5.0)),
)


@dataclass
class TissueParams:
    """Per-subject tissue parameters (see the module docstring)."""

    values: dict[str, tuple[float, float, float, float, float]]
    iron_scale: float
    vein_chi: float
    layers: dict[str, float]  # mean thickness (mm) of csf, inner, marrow, outer, scalp
    layer_waves: np.ndarray  # (n, 4): wave vectors (1/mm, 3) and phase for thickness variation
    sinuses: list[tuple[str, np.ndarray, np.ndarray]]
    texture: float  # relative amplitude of the smooth tissue texture

    def amplitude(self, name: str, tr_s: float, flip_deg: float) -> float:
        m0, t1, *_ = self.values[name]
        return float(spgr_steady_state(m0, t1, tr_s, flip_deg))

    def r2s(self, name: str) -> float:
        return float(self.values[name][2])


def sample_tissue_params(rng: np.random.Generator) -> TissueParams:
    values = {}
    for name, (m0, t1, r2s, chi_b, chi_h) in TISSUES.items():
        values[name] = (
            m0 * rng.uniform(0.93, 1.07),
            t1 * rng.uniform(0.9, 1.1),
            r2s * rng.uniform(0.85, 1.15),
            chi_b * rng.uniform(0.8, 1.2),
            chi_h,
        )
    layers = {
        "csf": rng.uniform(1.5, 4.0),
        "inner": rng.uniform(1.0, 2.0),
        "marrow": rng.uniform(1.5, 4.0),
        "outer": rng.uniform(1.0, 2.0),
        "scalp": rng.uniform(4.0, 9.0),
    }
    waves = np.concatenate(
        [
            rng.normal(0, 1, (4, 3)) * (2 * np.pi / rng.uniform(60, 150, (4, 1))),
            rng.uniform(0, 2 * np.pi, (4, 1)),
        ],
        axis=1,
    )
    sinuses = []
    right: dict[str, tuple[float, np.ndarray]] = {}
    for name, centre, semi in SINUSES:
        if name == "frontal" and rng.random() < 0.1:
            continue
        scale = rng.uniform(0.6, 1.5)
        jitter = rng.normal(0, 2.5, 3)
        base = name.removesuffix("_left").removesuffix("_right")
        if name.endswith("_right"):
            right[base] = (scale, jitter)
        elif name.endswith("_left") and base in right:  # roughly symmetric
            scale = right[base][0] * rng.uniform(0.85, 1.15)
            jitter = right[base][1] * np.array([-1.0, 1.0, 1.0]) + rng.normal(0, 1.0, 3)
        sinuses.append((name, np.asarray(centre) + jitter, np.asarray(semi) * scale))
    return TissueParams(
        values=values,
        iron_scale=float(rng.uniform(0.7, 1.4)),
        vein_chi=float(rng.uniform(0.30, 0.50)),
        layers=layers,
        layer_waves=waves,
        sinuses=sinuses,
        texture=float(rng.uniform(0.02, 0.06)),
    )


#: Template-space box (MNI mm) that holds every iron-rich nucleus.
IRON_BOX = (np.array([-35.0, -72.0, -52.0]), np.array([35.0, 35.0, 30.0]))


def grid_sample_points(volume: torch.Tensor, tpl: TemplateAnatomy, xt: np.ndarray) -> np.ndarray:
    """Trilinear samples of a template-grid volume (1, C, X, Y, Z) at template points (3, ...)."""
    inv = np.linalg.inv(tpl.affine)
    if not np.allclose(inv[:3, :3], np.diag(np.diag(inv[:3, :3]))):
        raise ValueError("the template grid must be axis-aligned")
    spatial = xt.shape[1:]
    norm = []
    for a in range(2, -1, -1):  # grid_sample wants (z, y, x) = (W, H, D) index order
        scale = float(inv[a, a]) * 2.0 / (tpl.shape[a] - 1)
        offset = float(inv[a, 3]) * 2.0 / (tpl.shape[a] - 1) - 1.0
        norm.append(torch.from_numpy(xt[a].reshape(-1) * np.float32(scale) + np.float32(offset)))
    grid = torch.stack(norm, dim=-1).view(1, 1, 1, -1, 3)
    del norm
    out = torch.nn.functional.grid_sample(
        volume, grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out[0, :, 0, 0].numpy().reshape(volume.shape[1], *spatial)


def _box(xt_lo_hi, shape, tr, grid) -> tuple[slice, slice, slice] | None:
    """Grid slices covering a template-space box (via the affine part of the transform, +10 mm)."""
    lo, hi = xt_lo_hi
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    vox = grid.to_voxel(tr.affine_to_scanner(corners))
    pad = 10.0 / grid.spacing
    a = np.floor(vox.min(0) - pad).astype(int)
    b = np.ceil(vox.max(0) + pad).astype(int) + 1
    a, b = np.maximum(a, 0), np.minimum(b, shape)
    if np.any(b <= a):
        return None
    return tuple(slice(int(i), int(j)) for i, j in zip(a, b))


def _ramp(x: np.ndarray) -> np.ndarray:
    return np.clip(x + np.float32(0.5), 0.0, 1.0)


def _wave_factor(xt: np.ndarray, waves: np.ndarray, amplitude: float) -> np.ndarray:
    out = np.zeros(xt.shape[1:], np.float32)
    for w in waves:
        arg = np.float32(w[0]) * xt[0] + np.float32(w[1]) * xt[1]
        arg += np.float32(w[2]) * xt[2] + np.float32(w[3])
        out += np.cos(arg)
    out *= np.float32(amplitude / len(waves) ** 0.5)
    out += np.float32(1.0)
    return out


def build_maps(
    tpl: TemplateAnatomy,
    xt: np.ndarray,
    params: TissueParams,
    tr_s: float,
    flip_deg: float,
    tr,
    grid,
    texture: np.ndarray | None = None,
    *,
    head_only: bool = False,
) -> dict[str, np.ndarray]:
    """Maps on `grid` from its template points `xt` (3, *shape): ``chi_head`` (ppm rel. air),
    ``brain`` (fraction), ``dist`` (mm); unless `head_only` also ``amp`` (M0·steady state),
    ``r2s`` (1/s), ``chi_brain`` (ppm rel. CSF) and ``wm`` (fraction). float32 arrays."""
    f32 = np.float32
    gm, wm, d, dh = grid_sample_points(tpl.volume, tpl, xt)
    shape = d.shape
    brain = _ramp(-d)
    # brain tissue fractions (GM, WM, CSF) scaled to the brain fraction
    tissue = gm + wm
    over = np.maximum(tissue, brain)
    scale = np.divide(brain, over, out=np.zeros_like(brain), where=over > 1e-3)
    gm *= scale
    wm *= scale
    csf = brain - gm - wm
    np.maximum(csf, 0, out=csf)
    # Beyond the brain only a shell of voxels can hold CSF, skull or scalp: the layers are
    # computed there, on 1D arrays, and added into the maps.
    total = sum(params.layers.values()) * 1.3 + 2.0  # thickness modulation is at most ±30 %
    shell = np.flatnonzero((d > -1.0) & (dh < total))
    ds, dhs = d.reshape(-1)[shell], dh.reshape(-1)[shell]
    xs = xt.reshape(3, -1)[:, shell]
    mod = _wave_factor(xs, params.layer_waves, 0.15)
    c = f32(params.layers["csf"]) * mod
    beyond_csf = _ramp(ds - c)
    layers: dict[str, np.ndarray] = {"csf_out": _ramp(ds) - beyond_csf}
    prev = np.ones(len(shell), f32)
    edge = c.copy()
    for name, key in zip(
        ("bone_in", "marrow", "bone_out", "scalp"), ("inner", "marrow", "outer", "scalp")
    ):
        edge += f32(params.layers[key]) * mod
        beyond = _ramp(dhs - edge)
        layers[name] = (prev - beyond) * beyond_csf
        prev = beyond
    # deep inside the core (skull base, face): 70 % soft tissue, 30 % bone
    fill = beyond_csf * _ramp(-dhs - 2.0) * f32(0.7)
    layers["bone_in"] -= fill
    layers["scalp"] += fill
    # sinuses: air replaces bone, marrow and scalp (never brain or its CSF layer)
    air = np.zeros(len(shell), f32)
    for _name, centre, semi in params.sinuses:
        near = np.all(np.abs(xs - centre[:, None].astype(f32)) <= semi[:, None].astype(f32), axis=0)
        if not near.any():
            continue
        q = sum(((xs[a][near] - f32(centre[a])) / f32(semi[a])) ** 2 for a in range(3))
        inside = np.clip((1.0 - np.sqrt(q)) * f32(min(semi)) + 0.5, 0, 1)
        air[near] = np.maximum(air[near], inside)
    if air.any():
        air *= np.clip(ds - (c + 0.5), 0, 1)
        keep = 1.0 - air
        for name in ("bone_in", "marrow", "bone_out", "scalp"):
            layers[name] *= keep
    del mod, c, prev, edge, beyond_csf, fill, air
    brain_part = {"gm": gm, "wm": wm, "csf": csf}
    layer_tissue = {
        "csf_out": "csf",
        "bone_in": "bone",
        "bone_out": "bone",
        "marrow": "marrow",
        "scalp": "scalp",
    }

    def combine(column: int, values_of=None) -> np.ndarray:
        """Σ fraction × tissue value: full grid for the brain, shell for the layers."""
        get = values_of or (lambda t: params.values[t][column])
        full = np.zeros(shape, f32)
        for name, frac in brain_part.items():
            v = get(name)
            if v:
                full += frac * f32(v)
        flat = full.reshape(-1)
        acc = np.zeros(len(shell), f32)
        for name, t in layer_tissue.items():
            v = get(t)
            if v:
                acc += layers[name] * f32(v)
        flat[shell] += acc
        return full

    out = {"chi_head": combine(4), "brain": brain, "dist": d}
    if head_only:
        return out
    amp = combine(0, lambda t: params.amplitude(t, tr_s, flip_deg))
    r2s = combine(2)
    chi = combine(3)
    box = _box(IRON_BOX, shape, tr, grid)
    if box is not None:
        sub = np.ascontiguousarray(xt[(slice(None), *box)])
        iron = grid_sample_points(tpl.iron_volume, tpl, sub)[0] * f32(params.iron_scale)
        iron *= brain[box]
        chi[box] += iron
        r2s[box] += f32(IRON_R2S_PER_PPM) * iron
    if texture is not None:
        amp *= 1.0 + f32(params.texture) * texture[0]
        r2s *= 1.0 + f32(1.5 * params.texture) * texture[1]
    out.update(amp=amp, r2s=r2s, chi_brain=chi, wm=wm)
    return out
