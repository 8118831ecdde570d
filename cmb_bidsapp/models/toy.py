"""A tiny hand-made phantom (ellipsoid brain, dark spherical bleeds, dark tubular veins) for fast tests.

Not a simulation of MRI physics (that is :mod:`cmb_bidsapp.synth`): it only gives the training and
inference code something with the right shapes, labels and mimics to run on in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi


@dataclass
class ToySubject:
    """A phantom in its own grid: magnitude image (lesions dark), masks, lesion and mimic tables."""

    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    reference: np.ndarray
    lesions_mm: np.ndarray
    """(n, 3) lesion centres in scanner mm."""
    mimics_mm: np.ndarray
    """(m, 3) mimic positions in scanner mm (points along the veins)."""
    mimic_types: list[str] = field(default_factory=list)
    kind: str = "swi"


def toy_subject(
    seed: int,
    shape: tuple[int, int, int] = (56, 60, 28),
    voxel_mm: tuple[float, float, float] = (0.9, 0.9, 1.8),
    n_lesions: int = 4,
    n_veins: int = 2,
    noise: float = 0.03,
) -> ToySubject:
    """Make a phantom; lesions are dark blobs of radius 1.0–1.6 mm, veins dark tubes of 0.6 mm."""
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_mm, dtype=float)
    affine = np.diag([*vs, 1.0])
    affine[:3, 3] = -np.asarray(shape) * vs / 2.0
    idx = np.indices(shape, dtype=np.float32)
    pos = [idx[a] * np.float32(vs[a]) + np.float32(affine[a, 3]) for a in range(3)]
    semi = np.asarray(shape) * vs * 0.42
    r2 = sum((pos[a] / np.float32(semi[a])) ** 2 for a in range(3))
    brain = r2 <= 1.0
    image = np.where(brain, 1.0, 0.05).astype(np.float32)
    image *= 1.0 + 0.15 * (pos[0] / np.float32(semi[0]))  # a smooth bias
    lesion_mask = np.zeros(shape, dtype=bool)
    centres = []
    for _ in range(200):
        if len(centres) == n_lesions:
            break
        c = rng.uniform(-0.65, 0.65, 3) * semi
        if sum((c[a] / semi[a]) ** 2 for a in range(3)) > 0.5:
            continue
        if centres and min(np.linalg.norm(c - np.asarray(o)) for o in centres) < 8.0:
            continue
        centres.append(c)
    for c in centres:
        radius = rng.uniform(1.0, 1.6)
        d2 = sum((pos[a] - np.float32(c[a])) ** 2 for a in range(3))
        image *= 1.0 - 0.75 * np.exp(-d2 / np.float32(2 * (radius * 0.8) ** 2))
        lesion_mask |= d2 <= radius**2
    mimic_points = []
    for _ in range(n_veins):
        p0 = rng.uniform(-0.5, 0.5, 3) * semi
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        t = np.linspace(-15, 15, 31)
        pts = p0[None] + t[:, None] * direction[None]
        pts = pts[[sum((p[a] / semi[a]) ** 2 for a in range(3)) < 0.8 for p in pts]]
        if len(pts) == 0:
            continue
        ijk = np.rint((pts - affine[:3, 3]) / vs).astype(int)
        ijk = np.clip(ijk, 0, np.asarray(shape) - 1)
        line = np.zeros(shape, dtype=np.float32)
        line[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1.0
        tube = ndi.gaussian_filter(line, 0.6 / vs)
        tube /= max(float(tube.max()), 1e-6)
        image *= 1.0 - 0.5 * tube
        mimic_points.extend(pts[:: max(1, len(pts) // 4)])
    image = image + rng.normal(0, noise, shape).astype(np.float32)
    image = np.maximum(image, 0).astype(np.float32)
    return ToySubject(
        image=image,
        affine=affine,
        brain=brain.astype(np.uint8),
        reference=(lesion_mask & brain).astype(np.uint8),
        lesions_mm=np.asarray(centres, dtype=float).reshape(-1, 3),
        mimics_mm=np.asarray(mimic_points, dtype=float).reshape(-1, 3),
        mimic_types=["vein"] * len(mimic_points),
    )
