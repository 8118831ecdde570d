"""Microbleeds and mimics: how many, how big, where (template space), and their partial volumes.

Microbleeds (statistics of method.md, "Data facts for realistic simulation"):

* count: none with probability 0.35; among positive subjects 1 with probability 0.55,
  otherwise ``floor(2 · U^(−1/α))`` with α = 0.85 truncated to 2–80 (90th percentile of positive
  subjects ≈ 10, about 5 % of them with 20 or more);
* location: MARS class drawn per lesion from a subject-specific Dirichlet (concentration 10)
  around 74 % lobar / 16 % deep / 11 % infratentorial (normalised), then a uniform voxel of
  that class with tissue (GM + WM ≥ 0.6, CSF ≤ 0.3, ≥ 1 mm inside the brain), jittered within
  the voxel; lesions at least 4 mm apart. Lobar = cortex and juxtacortical white matter of the
  MARS map;
* true diameter 0.5–2 mm (density rising linearly with the diameter: median 1.56 mm; calibrated
  so that the apparent diameters on full-size SWI match the reported median of about 2.8 mm),
  χ 0.3–1.5 ppm (uniform) against the surrounding tissue,
  haemosiderin core M0 0.55, R2* 300 s⁻¹.

Mimics (``type`` and ``location`` columns of the mimics table):

* ``calcification`` / ``globus_pallidus``: bilateral, symmetric (25 % of subjects),
  2–5 mm, χ −0.3 to −1.0 ppm;
* ``calcification`` / ``choroid_plexus``: in the atria of the lateral ventricles (40 %,
  bilateral in 70 % of them), 3–6 mm, χ −0.5 to −1.5 ppm;
* ``calcification`` / ``parenchyma``: 1–2 small ones anywhere (10 %), 1–2.5 mm, χ −0.3 to
  −1.2 ppm: as dark as a microbleed on magnitude, told apart only by phase or QSM;
* ``flow_void``: 1–3 short segments (3–8 mm) of the basilar, internal carotid or middle
  cerebral arteries (50 %), 2–4 mm wide, no signal (M0 0.05), χ 0;
* ``vein_crossing`` and ``air_tissue_artefact`` rows are found after the simulation (veins
  running through the slice; brain regions where the air/bone field removes the signal).

Partial volumes: :func:`stamp_sphere` supersamples each fine voxel 4 × 4 × 4 times and
rescales the occupancy so that the stamped volume equals the true sphere volume: the dipole
moment (χ × volume), which sets the blooming, is exact even for a 0.5 mm source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..anatomy.regions import MARS_CLASSES, MARS_REGIONS, REGION_CLASS
from .anatomy import NMM_LATERAL_VENTRICLES, NMM_PALLIDUM, TemplateAnatomy, structure_centroid

CLASS_PROBS = np.array([0.74, 0.16, 0.11]) / 1.01
ARTERIES: dict[
    str, tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float]]
] = {
    "basilar_artery": ((0.0, -8.0, -42.0), (0.0, -6.0, -20.0), (1.2, 1.6)),
    "internal_carotid_right": ((14.0, 2.0, -34.0), (15.0, 4.0, -18.0), (1.5, 2.0)),
    "internal_carotid_left": ((-14.0, 2.0, -34.0), (-15.0, 4.0, -18.0), (1.5, 2.0)),
    "middle_cerebral_right": ((16.0, 6.0, -15.0), (40.0, 10.0, -8.0), (1.0, 1.4)),
    "middle_cerebral_left": ((-16.0, 6.0, -15.0), (-40.0, 10.0, -8.0), (1.0, 1.4)),
}


@dataclass
class Source:
    """One simulated susceptibility source placed in template space."""

    kind: str  # 'cmb' or a mimic type
    centre_t: np.ndarray  # template mm
    diameter_mm: float
    chi_ppm: float
    tissue: str  # 'bleed', 'calcification', 'flow_void'
    location: str = ""
    region_label: int = 0
    axis_t: np.ndarray | None = None  # tubes (flow voids): unit axis in template space
    length_mm: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mars_region(self) -> str:
        return MARS_REGIONS.get(int(self.region_label), "unknown")

    @property
    def mars_class(self) -> str:
        return REGION_CLASS.get(self.mars_region, "unknown")

    @property
    def hemisphere(self) -> str:
        return "left" if self.centre_t[0] < 0 else "right"


def sample_cmb_count(
    rng: np.random.Generator,
    p_none: float = 0.35,
    p_one: float = 0.55,
    alpha: float = 0.85,
    n_max: int = 80,
) -> int:
    """Number of microbleeds of one subject (see the module docstring)."""
    if rng.random() < p_none:
        return 0
    if rng.random() < p_one:
        return 1
    lo = (n_max / 2.0) ** (-alpha)
    u = rng.uniform(lo, 1.0)
    return int(min(n_max, max(2, np.floor(2.0 * u ** (-1.0 / alpha)))))


@lru_cache(maxsize=2)
def class_candidates(tpl: TemplateAnatomy) -> dict[str, np.ndarray]:
    """Template voxel indices (n, 3) where a microbleed of each MARS class may sit."""
    tissue = ((tpl.gm + tpl.wm) >= 0.6) & (tpl.csf <= 0.3) & (tpl.dist < -1.0)
    out = {}
    for cls in MARS_CLASSES:
        labels = [lab for lab, name in MARS_REGIONS.items() if REGION_CLASS[name] == cls]
        out[cls] = np.argwhere(tissue & np.isin(tpl.region, labels))
    return out


def sample_microbleeds(
    rng: np.random.Generator,
    tpl: TemplateAnatomy,
    n: int,
    *,
    diameter_range: tuple[float, float] = (0.5, 2.0),
    chi_range: tuple[float, float] = (0.3, 1.5),
    class_probs: np.ndarray | None = None,
    min_distance_mm: float = 4.0,
) -> list[Source]:
    """Draw `n` microbleeds (template space)."""
    if n <= 0:
        return []
    cand = class_candidates(tpl)
    probs = CLASS_PROBS if class_probs is None else np.asarray(class_probs, float)
    probs = probs / probs.sum()
    if n > 1 and class_probs is None:
        probs = rng.dirichlet(10.0 * probs + 1e-3)
    out: list[Source] = []
    centres: list[np.ndarray] = []
    for _ in range(n):
        for _attempt in range(50):
            cls = MARS_CLASSES[int(rng.choice(3, p=probs))]
            ijk = cand[cls][int(rng.integers(0, len(cand[cls])))] + rng.uniform(-0.5, 0.5, 3)
            c = tpl.to_mm(ijk[None])[0]
            if all(np.linalg.norm(c - o) >= min_distance_mm for o in centres):
                break
        centres.append(c)
        label = int(tpl.region[tuple(np.rint(ijk).astype(int))])
        out.append(
            Source(
                kind="cmb",
                centre_t=c,
                # weighted towards larger sources (density rising linearly with the diameter)
                diameter_mm=float(
                    diameter_range[0]
                    + (diameter_range[1] - diameter_range[0]) * np.sqrt(rng.random())
                ),
                chi_ppm=float(rng.uniform(*chi_range)),
                tissue="bleed",
                region_label=label,
            )
        )
    return out


@lru_cache(maxsize=2)
def _mimic_sites(tpl: TemplateAnatomy) -> dict[str, np.ndarray]:
    pall = {side: structure_centroid(tpl, lab) for side, lab in NMM_PALLIDUM.items()}
    vent = np.isin(tpl.nmm, NMM_LATERAL_VENTRICLES)
    vpts = tpl.mask_points(vent)
    atria = {}
    for side, x in (("right", 28.0), ("left", -28.0)):
        target = np.array([x, -42.0, 14.0])
        atria[side] = vpts[np.argmin(np.linalg.norm(vpts - target, axis=1))]
    return {
        "pallidum_right": pall["right"],
        "pallidum_left": pall["left"],
        "atrium_right": atria["right"],
        "atrium_left": atria["left"],
    }


def sample_mimics(
    rng: np.random.Generator, tpl: TemplateAnatomy, rate: float = 1.0
) -> list[Source]:
    """Draw calcifications and flow voids (template space); `rate` scales their prevalence."""
    sites = _mimic_sites(tpl)
    out: list[Source] = []
    if rng.random() < 0.25 * rate:
        jitter = rng.normal(0, 1.5, 3)
        d = rng.uniform(2.0, 5.0)
        chi = rng.uniform(-1.0, -0.3)
        for side, sign in (("right", 1.0), ("left", -1.0)):
            c = sites[f"pallidum_{side}"] + jitter * np.array([sign, 1.0, 1.0])
            out.append(
                Source(
                    "calcification",
                    c,
                    d * rng.uniform(0.85, 1.15),
                    chi,
                    "calcification",
                    "globus_pallidus",
                )
            )
    if rng.random() < 0.40 * rate:
        sides = ["right", "left"] if rng.random() < 0.7 else [str(rng.choice(["right", "left"]))]
        for side in sides:
            c = sites[f"atrium_{side}"] + rng.normal(0, 1.5, 3)
            out.append(
                Source(
                    "calcification",
                    c,
                    rng.uniform(3.0, 6.0),
                    rng.uniform(-1.5, -0.5),
                    "calcification",
                    "choroid_plexus",
                )
            )
    if rng.random() < 0.10 * rate:
        cand = np.concatenate(list(class_candidates(tpl).values()))
        for _ in range(int(rng.integers(1, 3))):
            ijk = cand[int(rng.integers(0, len(cand)))] + rng.uniform(-0.5, 0.5, 3)
            out.append(
                Source(
                    "calcification",
                    tpl.to_mm(ijk[None])[0],
                    rng.uniform(1.0, 2.5),
                    rng.uniform(-1.2, -0.3),
                    "calcification",
                    "parenchyma",
                    region_label=int(tpl.region[tuple(np.rint(ijk).astype(int))]),
                )
            )
    if rng.random() < 0.5 * rate:
        names = list(ARTERIES)
        for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
            a, b, (rlo, rhi) = ARTERIES[str(name)]
            a, b = np.asarray(a) + rng.normal(0, 1.5, 3), np.asarray(b) + rng.normal(0, 1.5, 3)
            axis = (b - a) / np.linalg.norm(b - a)
            length = rng.uniform(3.0, 8.0)
            t = rng.uniform(0.0, max(np.linalg.norm(b - a) - length, 0.0))
            centre = a + axis * (t + length / 2)
            out.append(
                Source(
                    "flow_void",
                    centre,
                    2 * rng.uniform(rlo, rhi),
                    0.0,
                    "flow_void",
                    str(name),
                    axis_t=axis,
                    length_mm=length,
                )
            )
    return out


def stamp_sphere(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    centre_vox: np.ndarray,
    radius_mm: float,
    supersample: int = 4,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """(slices, occupancy patch) of a sphere on a grid, volume-normalised (see the docstring)."""
    spacing = np.asarray(spacing, float)
    h = np.ceil(radius_mm / spacing + 1.0).astype(int)
    c = np.asarray(centre_vox, float)
    lo = np.floor(c).astype(int) - h
    hi = np.floor(c).astype(int) + h + 2
    lo_c, hi_c = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(hi_c <= lo_c):
        return None
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = [
        ((np.arange(lo_c[a], hi_c[a])[:, None] + sub[None, :]) - c[a]).ravel() * spacing[a]
        for a in range(3)
    ]
    d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    inside = (d2 <= radius_mm**2).astype(np.float32)
    n = hi_c - lo_c
    occ = inside.reshape(n[0], supersample, n[1], supersample, n[2], supersample).mean(
        axis=(1, 3, 5)
    )
    total = occ.sum() * np.prod(spacing)
    target = 4.0 / 3.0 * np.pi * radius_mm**3
    if total <= 0:  # smaller than one subsample: put the volume in the nearest voxel
        occ = np.zeros_like(occ)
        near = tuple(np.clip(np.rint(c).astype(int) - lo_c, 0, n - 1))
        occ[near] = 1.0
        total = np.prod(spacing)
    occ = np.clip(occ * (target / total), 0.0, 1.0)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c)), occ.astype(np.float32)


def stamp_cylinder(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    centre_vox: np.ndarray,
    axis_world_in_grid: np.ndarray,
    radius_mm: float,
    length_mm: float,
    supersample: int = 3,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """(slices, occupancy patch) of a finite cylinder; `axis_world_in_grid` is a unit vector
    in the grid frame (mm)."""
    spacing = np.asarray(spacing, float)
    reach = np.hypot(radius_mm, length_mm / 2)
    h = np.ceil(reach / spacing + 1.0).astype(int)
    c = np.asarray(centre_vox, float)
    lo = np.maximum(np.floor(c).astype(int) - h, 0)
    hi = np.minimum(np.floor(c).astype(int) + h + 2, shape)
    if np.any(hi <= lo):
        return None
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = [
        ((np.arange(lo[a], hi[a])[:, None] + sub[None, :]) - c[a]).ravel() * spacing[a]
        for a in range(3)
    ]
    u = np.asarray(axis_world_in_grid, float)
    u = u / np.linalg.norm(u)
    along = (
        axes[0][:, None, None] * u[0]
        + axes[1][None, :, None] * u[1]
        + axes[2][None, None, :] * u[2]
    )
    d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    inside = ((d2 - along**2) <= radius_mm**2) & (np.abs(along) <= length_mm / 2)
    n = hi - lo
    occ = (
        inside.astype(np.float32)
        .reshape(n[0], supersample, n[1], supersample, n[2], supersample)
        .mean(axis=(1, 3, 5))
    )
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), occ
