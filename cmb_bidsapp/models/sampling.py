"""Patch sampling and augmentation for training, on prepared subjects in the working grid.

Detector patches (cubes of ``DETECTOR_PATCH`` = 32 working voxels, 25.6 mm)
    Each patch centre is drawn from one of five pools, with these probabilities
    (``DETECTOR_MIX``):

    =============  =====  ===========================================================
    pool           p      centre
    =============  =====  ===========================================================
    lesion         0.35   a voxel of a reference microbleed
    mimic          0.20   a mimic of the simulator's table (vein, calcification,
                          air-tissue artefact, ...), or a lesion-free bright spot if none
    bright         0.10   one of the brightest 0.1 % radial-symmetry voxels that is not
                          a lesion (hard negatives the table does not list)
    edge           0.15   a voxel on the brain mask's boundary
    background     0.20   any brain voxel
    =============  =====  ===========================================================

    An empty pool gives its share to ``background``. Then the centre is shifted by up to
    ±``DETECTOR_SHIFT`` voxels per axis (a lesion is not always in the middle).
    The lesion pool holds at most ``LESION_POOL_CAP`` voxels of each microbleed, so a
    1-voxel microbleed is drawn about as often as a 50-voxel one (otherwise the large SWI
    blooms dominate and the tiny QSM sources are rarely seen).

Detector target (:func:`detector_target`)
    The detector is trained on the reference mask in which every microbleed smaller than
    ``SMALL_LESION_VOXELS`` working voxels (8 × 0.512 mm³ ≈ 4 mm³) is dilated by one voxel
    (6-connected). Measured in the pilot: QSM microbleeds are often 1–3 working voxels (the
    susceptibility source, without blooming); with such targets the detector's probability
    there stayed below 0.2 (4 of 7 QSM lesions of a validation subject missed at any useful
    ``t_det``). The detector is only the candidate generator: a slightly larger candidate costs
    nothing lesion-wise (a candidate matches its reference lesion by overlap or 3 mm), and
    the teacher's segmentation head keeps the true reference mask.

Discriminator patches (cubes of 24 voxels centred on a candidate)
    The centre is shifted by up to ±``CANDIDATE_SHIFT`` voxels per axis.

Augmentation (:func:`augment`), independently per patch
    flips along each axis (p = 0.5 each); on the lesion-bright channel a random contrast inside
    the brain, ``g = x^γ``, then ``x ↦ clip(m + k · (g − m) + b + N(0, s²), 0, 1)`` where ``m``
    is the median of ``g`` over the patch's brain voxels, with γ ∈ [0.7, 1.4] (log-uniform),
    k ∈ [``CONTRAST_RANGE``] = [0.6, 1.2] (log-uniform), b ∈ [−0.05, 0.05], s ∈ [0, 0.05]; the
    radial-symmetry channel is scaled by [0.8, 1.2] and clipped to [0, 1]. Flips keep the
    physics: the dipole pattern of a bleed is symmetric under each of them.

    The contrast factor ``k`` scales every structure's difference from the surrounding tissue
    (microbleeds, veins and mimics alike) about the tissue level, not about 0: on QSM
    (tissue at 0.5) it is a scaling of χ, on the dark kinds a scaling of the signal drop. Its
    range reaches down to 0.6 because the first default detector, trained with ``a · x^γ``
    (a ∈ [0.85, 1.15] about 0), gave p ≈ 0 to clearly visible microbleeds whose peak was lower
    than the training lesions' (QSM peaks of lesion-bright 0.76–0.81 on tissue 0.50 ± 0.03, and
    2-voxel SWI microbleeds in noisy images), measured on the fresh cohort of seed 9001: it had
    learned an absolute intensity rather than a contrast.

All random draws come from a ``numpy.random.Generator`` passed in (deterministic for a seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

DETECTOR_PATCH = 32
DETECTOR_SHIFT = 8
CANDIDATE_SHIFT = 2
DETECTOR_MIX: dict[str, float] = {
    "lesion": 0.35,
    "mimic": 0.20,
    "bright": 0.10,
    "edge": 0.15,
    "background": 0.20,
}
MAX_POOL = 4000
"""At most this many voxels are kept per pool and subject (a uniform random subset)."""
LESION_POOL_CAP = 8
"""At most this many voxels of each microbleed in the lesion pool."""
CONTRAST_RANGE: tuple[float, float] = (0.6, 1.2)
"""Range of the contrast factor ``k`` of :func:`augment` (log-uniform), about the tissue median."""
NOISE_MAX = 0.05
"""Largest standard deviation of the Gaussian noise :func:`augment` adds (lesion-bright units)."""
SMALL_LESION_VOXELS = 8
"""Microbleeds with fewer working voxels are dilated by one voxel in the detector target."""


def detector_target(ref: np.ndarray, small_voxels: int = SMALL_LESION_VOXELS) -> np.ndarray:
    """The detector's training target (uint8): ``ref`` with every component (26-connected) of
    fewer than ``small_voxels`` voxels dilated by one voxel (6-connected). Module docstring."""
    ref = np.asarray(ref) > 0
    lab, n = ndi.label(ref, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return ref.astype(np.uint8)
    small = np.bincount(lab.ravel(), minlength=n + 1) < small_voxels
    small[0] = False
    grown = ndi.binary_dilation(small[lab])
    return (ref | grown).astype(np.uint8)


def _cap_per_component(
    points: np.ndarray, ref: np.ndarray, rng: np.random.Generator, cap: int
) -> np.ndarray:
    """At most ``cap`` random voxels of each 26-connected component among ``points``."""
    if len(points) == 0:
        return points
    lab, _ = ndi.label(ref, structure=np.ones((3, 3, 3), dtype=bool))
    ids = lab[points[:, 0], points[:, 1], points[:, 2]]
    perm = rng.permutation(len(points))
    order = perm[np.argsort(ids[perm], kind="stable")]
    sorted_ids = ids[order]
    first = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.arange(len(order)) - first
    keep = np.sort(order[rank < cap])
    return points[keep]


def extract_patch(volume: np.ndarray, centre: Sequence[int], size: int) -> np.ndarray:
    """The cube of side ``size`` centred at ``centre`` (last 3 axes), zero-padded beyond the edges.

    For even sizes the centre voxel is at index ``size // 2``.
    """
    centre = np.asarray(centre, dtype=int)
    lead = volume.shape[:-3]
    spatial = np.asarray(volume.shape[-3:])
    lo = centre - size // 2
    hi = lo + size
    out = np.zeros((*lead, size, size, size), dtype=volume.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, spatial)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    src = (..., *[slice(a, b) for a, b in zip(src_lo, src_hi)])
    dst = (..., *[slice(a, b) for a, b in zip(dst_lo, dst_hi)])
    out[dst] = volume[src]
    return out


def _subset(points: np.ndarray, rng: np.random.Generator, n: int = MAX_POOL) -> np.ndarray:
    if len(points) > n:
        points = points[np.sort(rng.choice(len(points), n, replace=False))]
    return points


@dataclass
class DetectorPools:
    """Candidate patch centres (working voxel indices, (n, 3) int) of one subject, per pool."""

    lesion: np.ndarray
    mimic: np.ndarray
    bright: np.ndarray
    edge: np.ndarray
    background: np.ndarray


def detector_pools(
    ref: np.ndarray,
    brain: np.ndarray,
    frst_map: np.ndarray,
    mimics_vox: np.ndarray,
    seed: int,
) -> DetectorPools:
    """Build the sampling pools of one subject (module docstring); deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    ref = np.asarray(ref) > 0
    brain = np.asarray(brain) > 0
    shape = np.asarray(brain.shape)
    lesion = _subset(_cap_per_component(np.argwhere(ref), ref, rng, LESION_POOL_CAP), rng)
    mimics = np.rint(np.asarray(mimics_vox, dtype=float).reshape(-1, 3)).astype(int)
    if mimics.size:
        ok = np.all((mimics >= 0) & (mimics < shape), axis=1)
        mimics = mimics[ok]
        # A mimic overlapping a reference lesion is not a negative example.
        mimics = mimics[~ref[mimics[:, 0], mimics[:, 1], mimics[:, 2]]] if mimics.size else mimics
    fr = np.asarray(frst_map, dtype=np.float32)
    inside = brain & ~ndi.binary_dilation(ref, iterations=3) if ref.any() else brain
    vals = fr[inside]
    if vals.size:
        cut = float(np.quantile(vals, 0.999))
        bright = _subset(np.argwhere(inside & (fr >= cut) & (fr > 0)), rng)
    else:
        bright = np.zeros((0, 3), dtype=int)
    edge_mask = brain & ~ndi.binary_erosion(brain, iterations=1)
    edge = _subset(np.argwhere(edge_mask), rng)
    # Background: a random subset of brain voxels, drawn on a coarse lattice for memory.
    coarse = np.argwhere(brain[::3, ::3, ::3]) * 3
    background = _subset(coarse, rng)
    if len(mimics) == 0:
        mimics = bright
    return DetectorPools(lesion, mimics.astype(int), bright, edge, background)


def sample_detector_centres(
    pools: DetectorPools,
    n: int,
    rng: np.random.Generator,
    mix: dict[str, float] | None = None,
    shift: int = DETECTOR_SHIFT,
) -> np.ndarray:
    """Draw ``n`` patch centres (n, 3) from the pools with the mixing probabilities."""
    mix = dict(mix or DETECTOR_MIX)
    names = list(mix)
    probs = np.array([mix[k] if len(getattr(pools, k)) else 0.0 for k in names], dtype=float)
    if probs.sum() == 0:
        return np.zeros((0, 3), dtype=int)
    probs /= probs.sum()
    which = rng.choice(len(names), size=n, p=probs)
    centres = np.empty((n, 3), dtype=int)
    for i, w in enumerate(which):
        pool = getattr(pools, names[w])
        centres[i] = pool[rng.integers(len(pool))]
    if shift:
        centres = centres + rng.integers(-shift, shift + 1, size=(n, 3))
    return centres


def augment(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    brain: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Augment one patch (module docstring). ``image`` (2, s, s, s); ``labels`` (s, s, s) each."""
    image = np.array(image, dtype=np.float32, copy=True)
    labels = [np.asarray(lab) for lab in labels]
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis=axis + 1)
            labels = [np.flip(lab, axis=axis) for lab in labels]
            brain = np.flip(brain, axis=axis)
    inside = np.asarray(brain) > 0
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    k = float(np.exp(rng.uniform(np.log(CONTRAST_RANGE[0]), np.log(CONTRAST_RANGE[1]))))
    b = rng.uniform(-0.05, 0.05)
    s = rng.uniform(0.0, NOISE_MAX)
    g = np.power(np.clip(image[0], 0, 1), gamma)
    m = float(np.median(g[inside])) if inside.any() else 0.0
    noisy = m + k * (g - m) + b + rng.normal(0.0, s, g.shape)
    image[0] = np.where(inside, np.clip(noisy, 0.0, 1.0), 0.0)
    image[1] = np.clip(image[1] * rng.uniform(0.8, 1.2), 0.0, 1.0)
    return np.ascontiguousarray(image), [np.ascontiguousarray(lab) for lab in labels]
