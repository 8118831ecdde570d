"""Per-subject spatial transform between scanner space and the MNI template (anatomy variability).

Pull-back (what resampling needs): ``x_t = L · (x_s − t) + u(x_s)`` with

* ``L = (R_pose · S)⁻¹``: a random head pose (pitch ±15°, roll and yaw ±5°) and head size
  (global scale 0.92–1.08, per axis 0.96–1.04),
* ``t``: the scanner position (mm) of the template origin (the head near the isocentre),
* ``u``: a smooth random displacement (mm, RMS 1–3 mm, a sum of plane waves of 40–100 mm
  wavelength defined on template positions, so that it does not depend on the acquisition)
  plus a ventricular enlargement (0–4 mm, pulling template samples towards the lateral
  ventricles so that they appear larger), stored on a lattice of 8 mm in the acquisition
  frame and interpolated linearly.

Points go the other way (template → scanner, for veins and lesions placed in the template) by
a fixed-point inversion of the same map (:meth:`SubjectTransform.to_scanner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from .anatomy import TemplateAnatomy
from .grids import Grid, resample_aligned

LATTICE_MM = 8.0


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SubjectTransform:
    """Scanner mm <-> template (MNI) mm for one subject; see the module docstring."""

    forward_linear: np.ndarray  # template -> scanner linear part (R_pose · S)
    centre: np.ndarray  # t: scanner mm of the template origin
    lattice: Grid | None = None
    disp: np.ndarray | None = None  # (3, *lattice.shape) displacement in template mm

    @property
    def linear(self) -> np.ndarray:
        return np.linalg.inv(self.forward_linear)

    def affine_to_template(self, points_s: np.ndarray) -> np.ndarray:
        return (np.asarray(points_s, float) - self.centre) @ self.linear.T

    def affine_to_scanner(self, points_t: np.ndarray) -> np.ndarray:
        return np.asarray(points_t, float) @ self.forward_linear.T + self.centre

    def displacement(self, points_s: np.ndarray) -> np.ndarray:
        """u(x_s) (template mm) at scanner points (n, 3)."""
        pts = np.asarray(points_s, float)
        if self.disp is None:
            return np.zeros_like(pts)
        idx = self.lattice.to_voxel(pts).T
        return np.stack(
            [ndi.map_coordinates(self.disp[c], idx, order=1, mode="nearest") for c in range(3)], 1
        )

    def to_template(self, points_s: np.ndarray) -> np.ndarray:
        """Scanner mm (n, 3) -> template mm (n, 3)."""
        return self.affine_to_template(points_s) + self.displacement(points_s)

    def to_scanner(self, points_t: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Template mm (n, 3) -> scanner mm (n, 3), by fixed-point inversion."""
        pts_t = np.asarray(points_t, float)
        xs = self.affine_to_scanner(pts_t)
        for _ in range(iterations):
            xs = self.affine_to_scanner(pts_t - self.displacement(xs))
        return xs

    def template_points(self, grid: Grid) -> np.ndarray:
        """Template mm of every voxel centre of `grid` (same rotation as the lattice), (3, *shape).

        The affine part is separable in the voxel indices (broadcast sums); the displacement
        is interpolated linearly from the lattice.
        """
        m = self.linear @ grid.rotation * grid.spacing[None, :]  # template mm per voxel step
        b = self.linear @ (grid.origin - self.centre)
        idx = [np.arange(n, dtype=np.float32) for n in grid.shape]
        out = np.empty((3, *grid.shape), np.float32)
        for c in range(3):
            out[c] = (
                np.float32(b[c])
                + (np.float32(m[c, 0]) * idx[0])[:, None, None]
                + (np.float32(m[c, 1]) * idx[1])[None, :, None]
                + (np.float32(m[c, 2]) * idx[2])[None, None, :]
            )
        if self.disp is not None:
            u = resample_aligned(torch.from_numpy(self.disp), self.lattice, grid).numpy()
            out += u
        return out


def sample_pose(rng: np.random.Generator) -> SubjectTransform:
    """Random head pose, size and position (no deformation yet)."""
    angles = np.array(
        [
            np.clip(rng.normal(0, 6), -15, 15),
            np.clip(rng.normal(0, 2.5), -5, 5),
            np.clip(rng.normal(0, 2.5), -5, 5),
        ]
    )
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3)
    forward = rotation_matrix(angles) @ np.diag(scale)
    centre = np.array([rng.normal(0, 3), rng.normal(5, 4), rng.normal(5, 5)])
    return SubjectTransform(forward_linear=forward, centre=centre)


def random_waves(
    points: np.ndarray,
    rng: np.random.Generator,
    channels: int,
    wavelength_mm: tuple[float, float],
    n_waves: int = 24,
) -> np.ndarray:
    """Smooth random field (channels, n) with unit variance per channel: a sum of plane waves
    with random directions, wavelengths in `wavelength_mm`, phases and Gaussian amplitudes."""
    direc = rng.normal(0, 1, (n_waves, 3))
    direc /= np.linalg.norm(direc, axis=1, keepdims=True)
    k = direc * (2 * np.pi / rng.uniform(*wavelength_mm, (n_waves, 1)))
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    amp = rng.normal(0, 1, (channels, n_waves)) / np.sqrt(n_waves / 2.0)
    return amp @ np.cos(np.asarray(points, float) @ k.T + phase).T


def add_deformation(
    tr: SubjectTransform,
    tpl: TemplateAnatomy,
    rotation: np.ndarray,
    lo_mm: np.ndarray,
    hi_mm: np.ndarray,
    rng: np.random.Generator,
    *,
    rms_mm: float | None = None,
    ventricle_mm: float | None = None,
) -> SubjectTransform:
    """Add the smooth random displacement and ventricular enlargement on a lattice.

    `lo_mm`, `hi_mm`: extent (mm along the axes of `rotation`) the lattice must cover.
    """
    lo = np.asarray(lo_mm, float) - 2 * LATTICE_MM
    hi = np.asarray(hi_mm, float) + 2 * LATTICE_MM
    shape = tuple(int(np.ceil((h - lo_) / LATTICE_MM)) + 1 for lo_, h in zip(lo, hi))
    lattice = Grid(
        origin=rotation @ lo, rotation=rotation, spacing=np.full(3, LATTICE_MM), shape=shape
    )
    rms = rng.uniform(1.0, 3.0) if rms_mm is None else rms_mm
    vent = rng.uniform(0.0, 4.0) if ventricle_mm is None else ventricle_mm
    nodes = lattice.to_world(np.indices(shape).reshape(3, -1).T)
    y = tr.affine_to_template(nodes)
    # the random field is a function of template position, so that the anatomy of a subject
    # does not depend on the acquisition (lattice orientation, field of view)
    noise = random_waves(y, rng, 3, (40.0, 100.0)) * (rms / np.sqrt(3.0))
    # ventricular enlargement: pull samples up the gradient of the smoothed ventricle map
    grad = tpl.gradient(tpl.vent_smooth, y, h=1.0)
    gmax = max(float(np.linalg.norm(grad, axis=1).max()), 1e-9)
    pull = (vent / gmax) * grad
    disp = (noise + pull.T).reshape(3, *shape).astype(np.float32)
    return SubjectTransform(tr.forward_linear, tr.centre, lattice=lattice, disp=disp)
