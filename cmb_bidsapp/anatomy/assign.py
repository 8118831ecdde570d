"""Assignment of each lesion to a MARS region and class, in the native grid, deterministically.

Rules, in order (:func:`assign_regions`, :func:`region_table`):

1. ``majority``: the region (label 1..13 of the MARS map resampled into the native grid, see
   :func:`cmb_bidsapp.anatomy.registration.mars_in_native`) that holds most of the lesion's
   voxels. Unlabelled voxels (0) do not vote while any voxel is labelled.
2. ``centre``: on an exact tie, the tied region at the lesion's centre-of-mass voxel (the
   centre of mass in voxel coordinates, rounded half up), if it is one of the tied regions;
3. ``lowest_label``: otherwise the tied region with the lowest label number (1 brainstem ...
   13 insula).
4. ``nearest``: a lesion with no labelled voxel (e.g. a cortical microbleed whose voxels fall in
   sulcal CSF, or just outside the registered brain) takes the region of the labelled voxel
   nearest to any of its voxels (Euclidean distance in mm, voxel sizes from the affine), if it
   is within ``max_distance_mm`` (5 mm); equal distances resolve to the first lesion voxel in
   array (C) order and the nearest labelled voxel that SciPy's exact distance transform
   returns, both fixed.
5. ``none``: otherwise the region and class are ``unknown``.

No rule is random, so the same inputs always give the same table.

Hemisphere (:func:`hemisphere`): from the MNI x coordinate of the lesion's centre of mass
(mapped with the registration, ``x < 0`` left, ``x > 0`` right; ``midline`` within
``midline_mm`` of 0, by default only at exactly 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ..labelstats import LabelStats
from .regions import MARS_REGIONS, UNKNOWN_REGION, label_class

MAX_DISTANCE_MM = 5.0
N_LABELS = max(MARS_REGIONS) + 1


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def _nearest_label(
    lesion: np.ndarray, regions: np.ndarray, sizes: np.ndarray, max_mm: float
) -> tuple[int, float]:
    """(label, distance mm) of the labelled voxel nearest to a lesion (boolean mask), in a crop."""
    idx = np.argwhere(lesion)
    margin = np.ceil(max_mm / sizes).astype(int) + 1
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, regions.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    reg = regions[crop]
    if not np.any(reg > 0):
        return 0, float("inf")
    dist, nearest = ndi.distance_transform_edt(reg == 0, sampling=sizes, return_indices=True)
    local = idx - lo
    d = dist[tuple(local.T)]
    best = int(np.argmin(d))  # first minimum in C order: deterministic
    if d[best] > max_mm:
        return 0, float(d[best])
    where = tuple(int(nearest[ax][tuple(local[best])]) for ax in range(3))
    return int(reg[where]), float(d[best])


def region_table(
    label_map: np.ndarray,
    native_affine: np.ndarray,
    mars_native: np.ndarray,
    *,
    max_distance_mm: float = MAX_DISTANCE_MM,
    to_mni: Callable[[np.ndarray], np.ndarray] | None = None,
    midline_mm: float = 0.0,
) -> pd.DataFrame:
    """One row per lesion: region, class, the rule that decided, votes, and MNI centre.

    Columns: ``lesion_id``, ``region``, ``mars_class``, ``rule`` (see the module docstring),
    ``n_voxels``, ``n_in_region`` (voxels in the chosen region), ``distance_mm`` (0 unless the
    ``nearest`` rule applied), ``x``, ``y``, ``z`` (scanner mm of the centre of mass) and, when
    `to_mni` (an (n, 3) scanner mm -> MNI mm function) is given, ``mni_x``, ``mni_y``, ``mni_z``
    and ``hemisphere`` (else ``hemisphere`` is ``n/a``).
    """
    labels = np.asarray(label_map)
    regions = np.asarray(mars_native).astype(np.int64)
    if labels.shape != regions.shape:
        raise ValueError(f"label map {labels.shape} and MARS map {regions.shape} differ in shape")
    regions = np.where((regions >= 0) & (regions < N_LABELS), regions, 0)
    ids = np.unique(labels[labels > 0]).astype(np.int64)
    cols = ["lesion_id", "region", "mars_class", "rule", "n_voxels", "n_in_region"]
    cols += ["distance_mm", "x", "y", "z", "hemisphere"]
    if ids.size == 0:
        return pd.DataFrame({c: [] for c in cols})
    sizes = _voxel_sizes(native_affine)

    # votes: lesion x region counts, vectorised
    sel = labels > 0
    row = np.searchsorted(ids, labels[sel].astype(np.int64))
    votes = np.bincount(row * N_LABELS + regions[sel], minlength=ids.size * N_LABELS)
    votes = votes.reshape(ids.size, N_LABELS)
    n_vox = votes.sum(1)
    votes[:, 0] = 0
    com = LabelStats(labels, ids).centres()
    centre_vox = np.clip(np.floor(com + 0.5).astype(int), 0, np.array(labels.shape) - 1)
    centre_region = regions[tuple(centre_vox.T)]

    best = votes.max(1)
    tied = (votes == best[:, None]) & (best[:, None] > 0)
    n_tied = tied.sum(1)
    chosen = np.argmax(tied, axis=1)  # lowest tied label
    rule = np.where(n_tied > 1, "lowest_label", "majority").astype(object)
    centre_wins = (n_tied > 1) & tied[np.arange(ids.size), centre_region] & (centre_region > 0)
    chosen = np.where(centre_wins, centre_region, chosen)
    rule[centre_wins] = "centre"
    distance = np.zeros(ids.size)

    for r in np.flatnonzero(best == 0):  # per lesion (not per voxel): few, cropped
        lab, dist = _nearest_label(labels == ids[r], regions, sizes, max_distance_mm)
        chosen[r] = lab
        distance[r] = dist if lab else np.nan
        rule[r] = "nearest" if lab else "none"

    names = [MARS_REGIONS.get(int(c), UNKNOWN_REGION) if c else UNKNOWN_REGION for c in chosen]
    world = np.c_[com, np.ones(len(com))] @ np.asarray(native_affine, float).T
    table = pd.DataFrame(
        {
            "lesion_id": ids,
            "region": names,
            "mars_class": [label_class(int(c)) for c in chosen],
            "rule": rule.astype(str),
            "n_voxels": n_vox,
            "n_in_region": votes[np.arange(ids.size), chosen] * (chosen > 0),
            "distance_mm": distance,
            "x": world[:, 0],
            "y": world[:, 1],
            "z": world[:, 2],
        }
    )
    if to_mni is not None:
        mni = np.asarray(to_mni(world[:, :3]), float).reshape(-1, 3)
        table["mni_x"], table["mni_y"], table["mni_z"] = mni[:, 0], mni[:, 1], mni[:, 2]
        table["hemisphere"] = [hemisphere(x, midline_mm) for x in mni[:, 0]]
    else:
        table["hemisphere"] = "n/a"
    return table


def assign_regions(
    label_map: np.ndarray,
    native_affine: np.ndarray,
    mars_native: np.ndarray,
    *,
    max_distance_mm: float = MAX_DISTANCE_MM,
) -> dict[int, tuple[str, str]]:
    """``{lesion_id: (region, mars_class)}`` by the rules of the module docstring.

    `label_map` holds integer lesion ids (0 background) in the native grid, `mars_native` the
    MARS labels in the same grid. Bind `mars_native` (``functools.partial``) to get the
    ``assign(labels, affine)`` hook of :func:`cmb_bidsapp.detect.lesions`.
    """
    table = region_table(label_map, native_affine, mars_native, max_distance_mm=max_distance_mm)
    return {
        int(i): (str(r), str(c))
        for i, r, c in zip(table["lesion_id"], table["region"], table["mars_class"])
    }


def hemisphere(mni_x: float, midline_mm: float = 0.0) -> str:
    """``left`` for MNI x < 0 (beyond `midline_mm`), ``right`` for x > 0, else ``midline``."""
    if mni_x < -midline_mm:
        return "left"
    if mni_x > midline_mm:
        return "right"
    return "midline"
