"""The per-lesion table (the contract's ``_desc-CMB_lesions.tsv`` columns) from a label map.

Columns
-------
=============  ======================================================================
lesion_id      the label value in the label map (int)
x, y, z        scanner coordinates of the centre of mass (mm, from the affine)
i, j, k        the voxel nearest the centre of mass (rounded voxel coordinates)
volume_mm3     voxel count × voxel volume (mm³)
diameter_mm    diameter of the sphere of that volume, (6 V / π)^(1/3) (mm)
probability    the MAXIMUM of the probability map over the lesion's voxels: the lesion's
               score does not drop because the thresholded region is larger
mars_class     ``lobar``, ``deep``, ``infratentorial`` or ``unknown``
region         one of the 13 MARS regions, or ``unknown``
hemisphere     ``left``, ``right``, ``midline``, or ``n/a`` when no MNI mapping is given
=============  ======================================================================

Region rule (when a MARS region map in the same grid is given): the region holding most of the
lesion's voxels; on a tie, the region at the centre-of-mass voxel if it is one of the tied
regions, else the lowest label value; ``unknown`` when no voxel of the lesion is labelled.
Deterministic, never random. The anatomy module's ``assign_regions`` can be passed instead
(``assign=``) for its richer rule (nearest region within a distance).

Hemisphere: from the MNI x coordinate of the centre of mass, given a ``to_mni`` function
(scanner mm → MNI mm): x < 0 left, x > 0 right, exactly 0 midline (the rule of
``cmb_bidsapp.anatomy.assign.hemisphere``; ``MIDLINE_MM`` widens the midline band).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from ..anatomy.regions import MARS_REGIONS, UNKNOWN_REGION, region_class
from ..labelstats import LabelStats

COLUMNS: tuple[str, ...] = (
    "lesion_id",
    "x",
    "y",
    "z",
    "i",
    "j",
    "k",
    "volume_mm3",
    "diameter_mm",
    "probability",
    "mars_class",
    "region",
    "hemisphere",
)

MIDLINE_MM = 0.0
"""Half-width (mm) of the MNI x band called ``midline`` (0: only x = 0 exactly)."""


def _empty_table() -> pd.DataFrame:
    dtypes = {
        "lesion_id": "int64",
        "x": "float64",
        "y": "float64",
        "z": "float64",
        "i": "int64",
        "j": "int64",
        "k": "int64",
        "volume_mm3": "float64",
        "diameter_mm": "float64",
        "probability": "float64",
        "mars_class": "object",
        "region": "object",
        "hemisphere": "object",
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in COLUMNS})


def majority_region(
    labels: np.ndarray, ids: np.ndarray, region_map: np.ndarray, centre_voxels: np.ndarray
) -> list[str]:
    """Region name per lesion by the majority rule of the module docstring (vectorised)."""
    regions = np.asarray(region_map).astype(np.int64)
    n_regions = max(int(regions.max(initial=0)), max(MARS_REGIONS)) + 1
    sel = labels > 0
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lut[ids] = np.arange(ids.size)
    rows = lut[labels[sel]]
    cols = np.clip(regions[sel], 0, n_regions - 1)
    counts = np.zeros((ids.size, n_regions), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    counts[:, 0] = 0  # unlabelled voxels never win
    top = counts.max(axis=1)
    shape = np.asarray(labels.shape)
    cv = np.clip(centre_voxels, 0, shape - 1)
    centre_region = regions[cv[:, 0], cv[:, 1], cv[:, 2]]
    out = []
    for row in range(ids.size):
        if top[row] == 0:
            out.append(UNKNOWN_REGION)
            continue
        tied = np.flatnonzero(counts[row] == top[row])
        c = int(centre_region[row])
        label = c if c in tied else int(tied[0])
        out.append(MARS_REGIONS.get(label, UNKNOWN_REGION))
    return out


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray,
    prob: np.ndarray,
    region_map: np.ndarray | None = None,
    *,
    to_mni: Callable[[np.ndarray], np.ndarray] | None = None,
    assign: Callable[[np.ndarray, np.ndarray], dict] | None = None,
) -> pd.DataFrame:
    """One row per lesion with the contract's columns (see module docstring).

    Parameters
    ----------
    labels
        Integer lesion label map (0 background), any label values.
    affine
        Voxel-to-scanner affine (4×4, mm).
    prob
        Probability map in [0, 1], same grid.
    region_map
        MARS region labels (1..13, 0 outside) in the same grid, or ``None`` (``unknown``).
    to_mni
        Maps an (n, 3) array of scanner mm to MNI mm, for ``hemisphere``; ``None`` gives ``n/a``.
    assign
        Optional ``assign(labels, affine) -> {lesion_id: (region, mars_class)}`` replacing the
        built-in majority rule (e.g. the anatomy module's assignment bound to its MARS map).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        labels = np.rint(labels)
    labels = labels.astype(np.int64)
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return _empty_table()
    affine = np.asarray(affine, dtype=float)
    prob = np.asarray(prob, dtype=np.float32)

    stats = LabelStats(labels, ids)
    com = stats.centres()
    centre_vox = np.rint(com).astype(np.int64)
    xyz = com @ affine[:3, :3].T + affine[:3, 3]
    counts = stats.counts().astype(float)
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    volume = counts * voxel_volume
    diameter = np.cbrt(6.0 * volume / np.pi)
    pmax = stats.maximum(prob)

    if assign is not None:
        mapping = assign(labels, affine)
        regions = [mapping.get(int(i), (UNKNOWN_REGION, UNKNOWN_REGION))[0] for i in ids]
        classes = [mapping.get(int(i), (UNKNOWN_REGION, UNKNOWN_REGION))[1] for i in ids]
    elif region_map is not None:
        regions = majority_region(labels, ids, region_map, centre_vox)
        classes = [region_class(r) for r in regions]
    else:
        regions = [UNKNOWN_REGION] * ids.size
        classes = [UNKNOWN_REGION] * ids.size

    if to_mni is not None:
        mni_x = np.asarray(to_mni(xyz), dtype=float).reshape(-1, 3)[:, 0]
        hemi = np.where(
            mni_x < -MIDLINE_MM, "left", np.where(mni_x > MIDLINE_MM, "right", "midline")
        )
        hemisphere = [str(h) for h in hemi]
    else:
        hemisphere = ["n/a"] * ids.size

    return pd.DataFrame(
        {
            "lesion_id": ids.astype(np.int64),
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "i": centre_vox[:, 0],
            "j": centre_vox[:, 1],
            "k": centre_vox[:, 2],
            "volume_mm3": volume,
            "diameter_mm": diameter,
            "probability": pmax,
            "mars_class": classes,
            "region": regions,
            "hemisphere": hemisphere,
        },
        columns=list(COLUMNS),
    )
