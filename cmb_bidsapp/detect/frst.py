"""Fast radial symmetry transform (Loy & Zelinsky) in 3D or per thick slice, radii in millimetres.

What it computes
----------------
For every voxel ``p`` whose gradient magnitude ``|g(p)|`` exceeds ``beta`` times the 99th
percentile of the gradient magnitude (inside the voting mask), and for each radius ``r`` (mm),
the voxel casts one vote at the *positively affected* voxel

    p+ = p + round(n̂(p) · r / v)          (per axis a: round(n̂_a · r / v_a))

where ``n̂ = g / |g|`` is the FLOAT unit gradient in physical space (gradients are taken per mm)
and ``v`` the voxel sizes in mm. The gradient of a bright blob points inwards, so votes from its
rim land at its centre. Dark blobs are handled by negating the image (``bright=False``).

Per radius two projection images are accumulated with ``numpy.bincount`` (no loop over voxels):

- orientation projection ``O_r(q)`` = number of votes received by ``q``;
- magnitude projection ``M_r(q)`` = sum of the voters' gradient magnitudes.

They are combined as in Loy & Zelinsky (2003)::

    F_r = (M_r / k_r) · (min(O_r, k_r) / k_r) ** alpha
    S_r = F_r * Gaussian(sigma = sigma_factor · r  [mm, per axis in voxels])
    S   = mean over radii of S_r

``k_r`` is the saturation count of agreeing votes. Loy & Zelinsky used 8 (2D, r > 1 pixel);
here it scales with the number of rim voxels of an ideal blob, so that it means the same thing
in 2D and 3D and at any voxel size: ``k_r = max(kappa · 4π r² / v_eff², 2)`` in 3D and
``k_r = max(kappa · 2π r / v_eff, 2)`` in 2D, with ``v_eff`` the geometric mean voxel size of the
axes used and ``kappa = 0.5``. A tube of the same radius gets about ``2π r / v`` agreeing votes
on its axis instead of ``4π r² / v²`` at a sphere's centre, so with ``alpha = 2`` it scores far
lower than a blob in 3D.

Differences from the published microbleed code (method.md, "known defects"): float unit vectors
(votes go in every direction, not 8 compass directions), vectorised, radii in mm (anisotropic
voxels handled per axis), 3D by default.

Thick slices
------------
``thick_slice_axis``: the slice axis is the axis whose voxel size is more than 1.6 times the
smallest of the two other (in-plane) voxel sizes; ``None`` when there is no such axis (3D). With
``mode="auto"`` the transform runs per slice (in-plane gradients and votes only, smoothing
in-plane only) when there is a thick slice axis, and in 3D otherwise.

Mask handling
-------------
Only voxels inside the mask eroded by one voxel (in-plane in 2D mode) vote: the step from the
brain to the zeroed background outside the mask would otherwise vote as an edge. Radii that
would move a vote by less than half a voxel along every axis used are skipped (they can only
vote on the voter itself); if all are, the smallest radius of one voxel is used.

With a mask, the map is computed in the mask's bounding box widened by what can reach into
it (gradients, erosion, the largest vote offset and the smoothing kernel), which gives the
same bits as the whole array (the voters keep their order) in about half the time at 0.5 mm.

Normalisation (``normalise=True``): with ``P`` the 99.9th percentile of the raw map inside the
mask (or its maximum when that percentile is 0), ``S_norm = S / (S + P)``, 0 outside the
mask. This is in [0, 1), robust to a few extreme responses (a percentile, not the maximum), and
monotone without saturating: unlike clipping, it keeps the ranking among the strongest
responses (the centre of a lesion stays above its rim). ``S = P`` maps to 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

LOGGER = logging.getLogger(__name__)

DEFAULT_RADII_MM: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5)
"""Default radii (mm): microbleeds have an apparent diameter of about 2–5 mm."""

THICK_SLICE_RATIO = 1.6
"""A voxel axis more than this many times the smallest in-plane voxel size is a slice axis."""


def thick_slice_axis(
    voxel_sizes_mm: Sequence[float], ratio: float = THICK_SLICE_RATIO
) -> int | None:
    """The thick-slice axis (0, 1 or 2), or ``None`` for a 3D-like grid.

    The slice axis is the axis of the largest voxel size (the first one on ties) when that size
    exceeds ``ratio`` (1.6) times the smaller of the two other voxel sizes (mm).
    """
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    axis = int(np.argmax(vs))
    in_plane = np.delete(vs, axis)
    if vs[axis] > ratio * in_plane.min():
        return axis
    return None


def _saturation_count(radius_mm: float, vs_used: np.ndarray, kappa: float) -> float:
    """``k_r``: the number of agreeing votes above which the orientation term saturates."""
    v_eff = float(np.prod(vs_used) ** (1.0 / len(vs_used)))
    if len(vs_used) == 3:
        count = 4.0 * np.pi * (radius_mm / v_eff) ** 2
    else:
        count = 2.0 * np.pi * (radius_mm / v_eff)
    return max(kappa * count, 2.0)


def _resolve_axes(
    shape: tuple[int, ...],
    vs: np.ndarray,
    mode: str,
    slice_axis: int | None,
) -> tuple[int, ...]:
    """Axes along which gradients and votes run: all three (3D) or the in-plane two (2D)."""
    if mode not in ("auto", "3d", "2d"):
        raise ValueError(f"mode must be 'auto', '3d' or '2d', not {mode!r}")
    if mode == "3d":
        return (0, 1, 2)
    axis = slice_axis if slice_axis is not None else thick_slice_axis(vs)
    if axis is None:
        if mode == "auto":
            return (0, 1, 2)
        axis = int(np.argmax(vs)) if np.ptp(vs) > 0 else 2
    return tuple(a for a in range(3) if a != axis)


def frst(
    image: np.ndarray,
    voxel_sizes_mm: Sequence[float],
    radii_mm: Sequence[float] = DEFAULT_RADII_MM,
    alpha: float = 2.0,
    beta: float = 0.1,
    mode: str = "auto",
    slice_axis: int | None = None,
    bright: bool = True,
    mask: np.ndarray | None = None,
    *,
    sigma_factor: float = 0.25,
    kappa: float = 0.5,
    normalise: bool = True,
) -> np.ndarray:
    """Fast radial symmetry map of bright (or dark) blobs, float32 in the image's grid.

    Parameters
    ----------
    image
        3D array (any orientation), e.g. the lesion-bright image.
    voxel_sizes_mm
        Voxel sizes along the three array axes (mm).
    radii_mm
        Blob radii to look for (mm).
    alpha
        Radial strictness (2 in Loy & Zelinsky and the published microbleed code).
    beta
        Gradient threshold, as a fraction of the 99th percentile of the gradient magnitude
        inside the (eroded) mask: weaker gradients do not vote.
    mode
        ``"auto"`` (per slice when slices are thick, see :func:`thick_slice_axis`), ``"3d"``
        or ``"2d"`` (per slice along ``slice_axis``, or the largest voxel axis).
    slice_axis
        Slice axis for 2D mode; detected from the voxel sizes when ``None``.
    bright
        Look for bright blobs (``True``) or dark ones (``False``).
    mask
        Brain mask; voting is restricted to it (eroded by one voxel) and normalisation uses it.
    sigma_factor
        Gaussian smoothing of each radius' response, sigma = ``sigma_factor`` · r (mm).
    kappa
        Fraction of the ideal blob's rim-voxel count at which the orientation term saturates.
    normalise
        Map to [0, 1) with ``S / (S + P99.9)`` inside the mask (``False``: raw values).

    Returns
    -------
    numpy.ndarray
        float32 map, high at the centres of radially symmetric blobs; 0 outside the mask.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"frst expects a 3D array, got shape {img.shape}")
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    axes = _resolve_axes(img.shape, vs, mode, slice_axis)
    params = dict(
        radii_mm=radii_mm, alpha=alpha, beta=beta, bright=bright, sigma_factor=sigma_factor,
        kappa=kappa, normalise=normalise,
    )  # fmt: skip
    if mask is None:
        return _frst(img, vs, axes, None, **params)
    # The map is 0 outside the mask and nothing outside the mask's box (plus the reach of the
    # gradients, the votes and the smoothing) changes it: compute it in that box only. The
    # voters keep their C order, so every sum is made in the same order: the same bits.
    mask_arr = np.asarray(mask) > 0
    box = _mask_box(mask_arr, vs, axes, radii_mm, sigma_factor)
    out = np.zeros(img.shape, dtype=np.float32)
    if box is not None:
        out[box] = _frst(img[box], vs, axes, mask_arr[box], **params)
    return out


def _mask_box(
    mask: np.ndarray,
    vs: np.ndarray,
    axes: tuple[int, ...],
    radii_mm: Sequence[float],
    sigma_factor: float,
) -> tuple[slice, slice, slice] | None:
    """The mask's bounding box, widened along each axis used by what can reach into it."""
    if not mask.any():
        return None
    r_max = max([float(r) for r in radii_mm] + [float(vs.min())])
    box = []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        idx = np.flatnonzero(mask.any(axis=other))
        margin = 1
        if a in axes:  # gradient and erosion (2), vote offset, smoothing kernel radius
            margin = (
                2 + int(np.ceil(r_max / vs[a])) + 1 + int(3.0 * sigma_factor * r_max / vs[a] + 0.5)
            )
        box.append(
            slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[a]))
        )
    return tuple(box)  # type: ignore[return-value]


def _frst(
    img: np.ndarray,
    vs: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    *,
    radii_mm: Sequence[float],
    alpha: float,
    beta: float,
    bright: bool,
    sigma_factor: float,
    kappa: float,
    normalise: bool,
) -> np.ndarray:
    """:func:`frst` on one array (the mask's box, or the whole image without a mask)."""
    if not bright:
        img = -img
    shape = img.shape
    mask_arr = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    if mask is not None:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1, 1, 1] = True
        for a in axes:
            idx = [1, 1, 1]
            for off in (0, 2):
                idx[a] = off
                structure[tuple(idx)] = True
        voters_mask = ndi.binary_erosion(mask_arr, structure=structure)
    else:
        voters_mask = mask_arr

    # Gradients in physical units (per mm); only along the axes used.
    grads = [np.gradient(img, float(vs[a]), axis=a).astype(np.float32) for a in axes]
    mag = np.sqrt(sum(g * g for g in grads))
    out = np.zeros(shape, dtype=np.float32)
    inside = mag[voters_mask]
    if inside.size == 0:
        return out
    ref = float(np.percentile(inside, 99.0))
    if ref <= 0:
        return out
    voters = voters_mask & (mag > beta * ref)
    flat = np.flatnonzero(voters)
    if flat.size == 0:
        return out
    coords = {
        a: c.astype(np.int32) for a, c in zip(range(3), np.unravel_index(flat, shape)) if a in axes
    }
    weight = mag.ravel()[flat]
    units = [g.ravel()[flat] / weight for g in grads]
    del grads, mag

    vs_used = vs[list(axes)]
    radii = [float(r) for r in radii_mm if np.max(float(r) / vs_used) >= 0.5]
    if not radii:
        radii = [float(np.min(vs_used))]
        LOGGER.info("FRST: every radius is under half a voxel; using one voxel (%.2f mm)", radii[0])

    n_vox = int(np.prod(shape))
    strides = [int(np.prod(shape[a + 1 :])) for a in range(3)]  # C order
    total = np.zeros(shape, dtype=np.float32)
    for radius in radii:
        tflat = flat.astype(np.int64)
        valid = np.ones(flat.size, dtype=bool)
        for a, u in zip(axes, units):
            off = np.rint(u * np.float32(radius / vs[a])).astype(np.int32)
            moved = coords[a] + off
            valid &= (moved >= 0) & (moved < shape[a])
            tflat += off.astype(np.int64) * strides[a]
        tflat = tflat[valid]
        orient = np.bincount(tflat, minlength=n_vox).astype(np.float32)
        magp = np.bincount(tflat, weights=weight[valid], minlength=n_vox).astype(np.float32)
        del tflat
        k = np.float32(_saturation_count(radius, vs_used, kappa))
        resp = (magp / k) * (np.minimum(orient, k) / k) ** np.float32(alpha)
        sigma = [0.0, 0.0, 0.0]
        for a in axes:
            sigma[a] = sigma_factor * radius / vs[a]
        resp = resp.reshape(shape)
        ndi.gaussian_filter(resp, sigma=sigma, output=resp, truncate=3.0)
        total += resp
    total /= np.float32(len(radii))

    if mask is not None:
        total[~mask_arr] = 0.0
    if not normalise:
        return total
    values = total[mask_arr]
    scale = float(np.percentile(values, 99.9)) if values.size else 0.0
    if scale <= 0:
        scale = float(values.max()) if values.size else 0.0
    if scale <= 0:
        return out
    total = total / (total + np.float32(scale))
    np.clip(total, 0.0, 1.0, out=total)
    if mask is not None:
        total[~mask_arr] = 0.0
    return total
