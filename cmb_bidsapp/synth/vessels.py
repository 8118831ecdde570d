"""Veins of the simulator: random deep medullary and cortical veins, named veins and sinuses.

All veins are centre lines in template (MNI) space with a radius per point; they are mapped
to each subject with its transform and drawn as tubes on the fine grid (:func:`stamp_tubes`),
where they hold venous blood (paramagnetic, χ 0.30–0.50 ppm against CSF, R2* ≈ 80 s⁻¹).

* Deep medullary veins (80–200 per subject): from the superolateral walls of the lateral
  ventricles, first
  away from the wall, then bending along the gradient of the distance to the brain surface,
  with a little random bending, until 3 mm below the surface; 0.5–1.0 mm thick, up to 15–40 mm.
* Cortical (pial and sulcal) veins (80–160): random walks on the brain surface, 0.5–3 mm
  below the template brain boundary (sulcal CSF and the pial surface), drifting upwards
  towards the superior sagittal sinus; 0.6–1.5 mm thick, 20–80 mm long.
The medullary and cortical veins are traced once into a pool (1200 and 800 veins, fixed seed,
cached on disk beside the template); each subject draws its own subset, radii and deformation.

* Named veins (control points in MNI space, jittered by 1.5 mm): internal cerebral veins,
  thalamostriate veins, basal veins of Rosenthal, the great vein of Galen, the straight sinus,
  the superior sagittal sinus (traced over the midline brain surface, 3–7 mm wide) and the
  transverse and sigmoid sinuses (6–7 mm, pushed outside the brain).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from .anatomy import NMM_LATERAL_VENTRICLES, TemplateAnatomy

STEP_MM = 0.5


@dataclass
class VesselSet:
    """Centre-line points of all veins of one subject, in template mm."""

    points: np.ndarray  # (n, 3)
    radius: np.ndarray  # (n,) mm
    tangent: np.ndarray  # (n, 3) unit direction
    vessel: np.ndarray  # (n,) vessel index
    kinds: list[str]  # kind of each vessel ('medullary', 'cortical', or a vein's name)

    def __len__(self) -> int:
        return len(self.points)

    def decimated(self, grid_step_mm: float) -> VesselSet:
        """Fewer centre-line points where the grid or the vessel is coarse: points at most
        0.7 · max(grid step, radius) apart (the union of spheres then ripples by < 0.1 of the
        radius, well inside the one-voxel partial-volume ramp)."""
        step = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        same = self.vessel[1:] == self.vessel[:-1]
        arc = np.concatenate([[0.0], np.cumsum(np.where(same, step, 0.0))])
        target = 0.7 * np.maximum(grid_step_mm, self.radius)
        bucket = np.floor(arc / target).astype(np.int64)
        keep = np.ones(len(self.points), bool)
        keep[1:] = (bucket[1:] != bucket[:-1]) | ~same
        keep[:-1] |= ~same  # last point of each vessel
        keep[-1] = True
        return VesselSet(
            self.points[keep], self.radius[keep], self.tangent[keep], self.vessel[keep], self.kinds
        )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


@lru_cache(maxsize=2)
def _start_points(tpl: TemplateAnatomy) -> tuple[np.ndarray, np.ndarray]:
    """(ventricle-wall points for medullary veins, surface points for cortical veins), MNI mm."""
    from scipy import ndimage as ndi

    vent = np.isin(tpl.nmm, NMM_LATERAL_VENTRICLES)
    wall = ndi.binary_dilation(vent, iterations=2) & ~vent & (tpl.wm > 0.5)
    wall_pts = tpl.mask_points(wall)
    wall_pts = wall_pts[wall_pts[:, 2] > 0.0]
    surf = (tpl.dist > -2.5) & (tpl.dist < -0.5) & (tpl.csf > 0.2)
    surf_pts = tpl.mask_points(surf)
    surf_pts = surf_pts[surf_pts[:, 2] > -30.0]
    return wall_pts, surf_pts


def _trace_medullary(tpl: TemplateAnatomy, rng: np.random.Generator, n: int):
    wall, _ = _start_points(tpl)
    # the superolateral walls: medullary veins fan out laterally and upwards to the cortex
    normal = -_unit(tpl.gradient(tpl.vent_smooth, wall, h=1.5))
    lateral = normal[:, 0] * np.sign(wall[:, 0]) > 0.4
    wall = wall[lateral & (np.abs(wall[:, 0]) > 10.0)]
    # spread the starts evenly along the ventricles (5 mm bins of y, per side)
    key = np.floor(wall[:, 1] / 5.0) * 2 + (wall[:, 0] > 0)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inverse]
    pos = wall[rng.choice(len(wall), n, p=weight / weight.sum())] + rng.uniform(-0.5, 0.5, (n, 3))
    length = rng.uniform(15.0, 40.0, n)
    # away from the ventricle wall, then bending towards the nearest cortex
    away = -_unit(tpl.gradient(tpl.vent_smooth, pos, h=1.5))
    direc = _unit(away + 0.3 * rng.normal(0, 1, (n, 3)))
    active = np.ones(n, bool)
    out = [pos.copy()]
    alive = [active.copy()]
    for step in range(int(length.max() / STEP_MM)):
        g = _unit(tpl.gradient(tpl.dist, pos, h=1.5))
        direc = _unit(0.9 * direc + 0.1 * g + 0.06 * rng.normal(0, 1, (n, 3)))
        pos = pos + STEP_MM * direc * active[:, None]
        active &= (step + 1) * STEP_MM < length
        active &= tpl.sample(tpl.dist, pos) < -3.0
        out.append(pos.copy())
        alive.append(active.copy())
        if not active.any():
            break
    return np.stack(out), np.stack(alive), rng.uniform(0.25, 0.5, n)


def _trace_cortical(tpl: TemplateAnatomy, rng: np.random.Generator, n: int):
    _, surf = _start_points(tpl)
    pos = surf[rng.integers(0, len(surf), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    target = rng.uniform(-3.0, -0.5, n)
    length = rng.uniform(20.0, 80.0, n)
    normal = _unit(tpl.gradient(tpl.dist, pos))
    direc = rng.normal(0, 1, (n, 3))
    direc = _unit(direc - (direc * normal).sum(1, keepdims=True) * normal)
    active = np.ones(n, bool)
    out = [pos.copy()]
    alive = [active.copy()]
    up = np.array([0.0, 0.0, 1.0])
    for step in range(int(length.max() / STEP_MM)):
        normal = _unit(tpl.gradient(tpl.dist, pos))
        direc = direc + 0.18 * rng.normal(0, 1, (n, 3)) + 0.08 * up
        direc = _unit(direc - (direc * normal).sum(1, keepdims=True) * normal)
        new = pos + STEP_MM * direc
        d = tpl.sample(tpl.dist, new)
        new = new - (d - target)[:, None] * normal
        pos = np.where(active[:, None], new, pos)
        d = tpl.sample(tpl.dist, pos)
        active &= (step + 1) * STEP_MM < length
        active &= np.abs(d - target) < 1.5
        out.append(pos.copy())
        alive.append(active.copy())
        if not active.any():
            break
    return np.stack(out), np.stack(alive), rng.uniform(0.3, 0.75, n)


def _sss_path(tpl: TemplateAnatomy) -> np.ndarray:
    """Midline path just outside the brain surface, from the frontal pole to the torcular."""
    centre = np.array([0.0, -15.0, 5.0])
    angles = np.deg2rad(np.linspace(-5.0, 205.0, 140))
    radii = np.arange(0.0, 130.0, 0.5)
    dirs = np.stack([np.zeros_like(angles), np.cos(angles), np.sin(angles)], 1)
    pts = centre + dirs[:, None, :] * radii[None, :, None]
    inside = tpl.sample(tpl.dist, pts.reshape(-1, 3)).reshape(len(angles), len(radii)) < 0
    last = np.array([radii[np.nonzero(row)[0].max()] if row.any() else 0.0 for row in inside])
    return centre + dirs * (last[:, None] + 1.0)


def _spline(ctrl: np.ndarray, step: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    ctrl = np.asarray(ctrl, float)
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    keep = np.r_[True, seg > 1e-6]
    ctrl = ctrl[keep]
    t = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    if len(ctrl) < 3:
        s = np.linspace(0, t[-1], max(int(t[-1] / step), 2))
        pts = np.stack([np.interp(s, t, ctrl[:, a]) for a in range(3)], 1)
    else:
        cs = CubicSpline(t, ctrl, axis=0)
        s = np.linspace(0, t[-1], max(int(t[-1] / step), 2))
        pts = cs(s)
    return pts, s / max(t[-1], 1e-9)


def _push_outside(tpl: TemplateAnatomy, pts: np.ndarray, clearance: np.ndarray) -> np.ndarray:
    for _ in range(8):
        d = tpl.sample(tpl.dist, pts)
        deficit = np.maximum(clearance - d, 0.0)
        if not deficit.any():
            break
        pts = pts + deficit[:, None] * _unit(tpl.gradient(tpl.dist, pts, h=1.5))
    return pts


def _named_veins(tpl: TemplateAnatomy, rng: np.random.Generator):
    """[(name, points (n, 3), radius (n,))] of the named veins and sinuses."""
    j = lambda p: np.asarray(p, float) + rng.normal(0, 1.5, np.shape(p))  # noqa: E731
    out = []
    sss = _sss_path(tpl)
    sss_pts, s = _spline(sss[::4] + rng.normal(0, 1.0, sss[::4].shape))
    r_sss = rng.uniform(1.5, 2.0) + s * rng.uniform(1.2, 1.8)
    sss_pts = _push_outside(tpl, sss_pts, r_sss + 0.5)
    out.append(("superior_sagittal_sinus", sss_pts, r_sss))
    torcular = sss_pts[-1]
    galen = j([0.0, -47.0, 4.0])
    for side in (1.0, -1.0):
        icv = [[side * 2.5, -3, 11], [side * 2.5, -18, 12], [side * 2.0, -33, 9]]
        pts, _ = _spline(np.r_[j(icv), galen[None]])
        out.append(
            (
                f"internal_cerebral_vein_{'right' if side > 0 else 'left'}",
                pts,
                np.full(len(pts), rng.uniform(0.8, 1.1)),
            )
        )
        ts = [[side * 17, -22, 20], [side * 13, -10, 17], [side * 6, -2, 14]]
        pts, _ = _spline(np.r_[j(ts), [[side * 2.5, -3, 11]]])
        out.append(
            (
                f"thalamostriate_vein_{'right' if side > 0 else 'left'}",
                pts,
                np.full(len(pts), rng.uniform(0.5, 0.8)),
            )
        )
        bv = [
            [side * 20, -2, -14],
            [side * 24, -15, -10],
            [side * 20, -28, -4],
            [side * 11, -40, 1],
        ]
        pts, _ = _spline(np.r_[j(bv), galen[None]])
        out.append(
            (
                f"basal_vein_{'right' if side > 0 else 'left'}",
                pts,
                np.full(len(pts), rng.uniform(0.8, 1.1)),
            )
        )
        tv = [
            [side * 25, -100, -18],
            [side * 45, -88, -24],
            [side * 55, -68, -30],
            [side * 52, -52, -40],
            [side * 46, -42, -52],
        ]
        pts, _ = _spline(np.r_[torcular[None], j(tv)])
        r = np.full(len(pts), rng.uniform(2.8, 3.5))
        pts = _push_outside(tpl, pts, r + 0.5)
        out.append((f"transverse_sinus_{'right' if side > 0 else 'left'}", pts, r))
    pts, _ = _spline(
        np.r_[galen[None], j([[0, -55, 6], [0, -70, -3], [0, -88, -16]]), torcular[None]]
    )
    out.append(("straight_sinus", pts, np.full(len(pts), rng.uniform(2.0, 2.6))))
    out.append(
        (
            "vein_of_galen",
            *(lambda p: (p, np.full(len(p), 2.0)))(
                _spline(np.r_[galen[None], j([[0, -52, 5]])])[0]
            ),
        )
    )
    return out


POOL_SEED = 0x5EA7
POOL_SIZE = {"medullary": 1200, "cortical": 800}


@lru_cache(maxsize=2)
def vein_pool(tpl: TemplateAnatomy) -> dict[str, dict[str, np.ndarray]]:
    """Traced medullary and cortical veins (template mm), a fixed pool each subject draws from.

    Tracing is the slow part of vein generation, so it is done once (fixed seed) and cached on
    disk beside the template; each subject draws its own subset, radii and deformation.
    Per kind: ``points`` (n, 3) at 0.25 mm steps, ``tangent`` (n, 3), ``s`` (arc fraction 0..1),
    ``start`` (first point of each vein), ``radius`` (mm, per vein).
    """
    from .anatomy import cache_dir, load_cached, save_cached

    folder = cache_dir("veins")
    keys = tuple(
        f"{kind}_{field}"
        for kind in POOL_SIZE
        for field in ("points", "tangent", "s", "start", "radius")
    )
    got = load_cached(folder, keys)
    if got is None:
        rng = np.random.default_rng(POOL_SEED)
        got = {}
        for kind, tracer in (("medullary", _trace_medullary), ("cortical", _trace_cortical)):
            path, alive, radius = tracer(tpl, rng, POOL_SIZE[kind])
            pts, tan, arc, start, rad = [], [], [], [], []
            n_done = 0
            for v in range(path.shape[1]):
                keep = path[: int(alive[:, v].sum()) + 1, v]
                if len(keep) < 2:
                    continue
                dense, frac = _spline(
                    keep[:: max(1, len(keep) // 12)] if len(keep) > 24 else keep, 0.25
                )
                pts.append(dense)
                tan.append(_unit(np.gradient(dense, axis=0)))
                arc.append(frac)
                start.append(n_done)
                rad.append(radius[v])
                n_done += len(dense)
            got[f"{kind}_points"] = np.concatenate(pts).astype(np.float32)
            got[f"{kind}_tangent"] = np.concatenate(tan).astype(np.float32)
            got[f"{kind}_s"] = np.concatenate(arc).astype(np.float32)
            got[f"{kind}_start"] = np.asarray(start, np.int64)
            got[f"{kind}_radius"] = np.asarray(rad, np.float32)
        save_cached(folder, got)
    return {
        kind: {
            field: got[f"{kind}_{field}"] for field in ("points", "tangent", "s", "start", "radius")
        }
        for kind in POOL_SIZE
    }


def sample_veins(
    tpl: TemplateAnatomy,
    rng: np.random.Generator,
    n_medullary: int | None = None,
    n_cortical: int | None = None,
) -> VesselSet:
    """Draw the veins of one subject (template mm): a subset of the traced pool with new radii,
    plus the named veins and sinuses (jittered)."""
    n_med = int(rng.integers(80, 201)) if n_medullary is None else int(n_medullary)
    n_cor = int(rng.integers(80, 161)) if n_cortical is None else int(n_cortical)
    pts_all, rad_all, tan_all, ves_all, kinds = [], [], [], [], []
    pool = vein_pool(tpl)
    for kind, n in (("medullary", n_med), ("cortical", n_cor)):
        p = pool[kind]
        n_pool = len(p["start"])
        n = min(max(n, 0), n_pool)
        if n == 0:
            continue
        chosen = np.sort(rng.choice(n_pool, n, replace=False))
        ends = np.r_[p["start"][1:], len(p["points"])]
        lo, hi = (0.25, 0.5) if kind == "medullary" else (0.35, 0.75)
        for v in chosen:
            sl = slice(int(p["start"][v]), int(ends[v]))
            taper = np.clip(1.2 - 0.6 * p["s"][sl], 0.6, 1.0)
            pts_all.append(p["points"][sl].astype(float))
            tan_all.append(p["tangent"][sl].astype(float))
            rad_all.append(rng.uniform(lo, hi) * taper)
            ves_all.append(np.full(sl.stop - sl.start, len(kinds)))
            kinds.append(kind)
    for name, points, radius in _named_veins(tpl, rng):
        if len(points) < 2:
            continue
        pts_all.append(points)
        tan_all.append(_unit(np.gradient(points, axis=0)))
        rad_all.append(np.broadcast_to(radius, (len(points),)).astype(float))
        ves_all.append(np.full(len(points), len(kinds)))
        kinds.append(name)
    return VesselSet(
        points=np.concatenate(pts_all),
        radius=np.concatenate(rad_all),
        tangent=np.concatenate(tan_all),
        vessel=np.concatenate(ves_all),
        kinds=kinds,
    )


def stamp_tubes(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    centres_vox: np.ndarray,
    radius_mm: np.ndarray,
    out: torch.Tensor | None = None,
    chunk: int = 1_000_000,
) -> torch.Tensor:
    """Partial-volume occupancy (0..1, max over points) of spheres along centre lines.

    `centres_vox`: (n, 3) continuous voxel indices; `radius_mm`: (n,). The edge is a linear
    ramp one voxel wide, centred on the radius (volume-preserving to first order).
    """
    spacing = np.asarray(spacing, float)
    if out is None:
        out = torch.zeros(shape, dtype=torch.float32)
    flat = out.view(-1)
    width = float(np.mean(spacing))
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    centres_vox = np.asarray(centres_vox, float)
    radius_mm = np.asarray(radius_mm, float)
    inside = np.all((centres_vox > -5) & (centres_vox < np.asarray(shape) + 4), axis=1)
    centres_vox, radius_mm = centres_vox[inside], radius_mm[inside]
    if not len(radius_mm):
        return out
    half = np.ceil((radius_mm[:, None] + width) / spacing[None, :]).astype(int)
    keys = half[:, 0] * 10000 + half[:, 1] * 100 + half[:, 2]
    for key in np.unique(keys):
        sel = keys == key
        h = half[sel][0]
        off = np.stack(np.meshgrid(*[np.arange(-x, x + 1) for x in h], indexing="ij"), -1).reshape(
            -1, 3
        )
        c = centres_vox[sel]
        r = radius_mm[sel]
        # only offsets that can reach the sphere (rounding moves the centre by <= half a voxel)
        reach = r.max() + width + 0.5 * float(np.linalg.norm(spacing))
        off = off[np.linalg.norm(off * spacing, axis=1) <= reach]
        per = max(1, chunk // len(off))
        off32 = off.astype(np.int32)
        sp32 = spacing.astype(np.float32)
        for start in range(0, len(c), per):
            cc = c[start : start + per].astype(np.float32)
            rr = r[start : start + per].astype(np.float32)
            base = np.rint(cc).astype(np.int32)
            d2 = np.zeros((len(cc), len(off32)), np.float32)
            ok = np.ones((len(cc), len(off32)), bool)
            idx = np.zeros((len(cc), len(off32)), np.int64)
            for ax in range(3):
                v = base[:, ax : ax + 1] + off32[None, :, ax]
                ok &= (v >= 0) & (v < shape[ax])
                d2 += ((v - cc[:, ax : ax + 1]) * sp32[ax]) ** 2
                idx += v.astype(np.int64) * int(strides[ax])
            cov = (rr[:, None] - np.sqrt(d2)) * np.float32(1.0 / width) + np.float32(0.5)
            np.clip(cov, 0.0, 1.0, out=cov)
            ok &= cov > 0
            flat.scatter_reduce_(
                0, torch.from_numpy(idx[ok]), torch.from_numpy(cov[ok]), reduce="amax"
            )
    return out
