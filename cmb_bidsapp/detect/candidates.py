"""Provisional voxel-wise microbleed probability and candidate labelling (before the networks).

Probability
-----------
Three features per voxel, all computed on the lesion-bright image (microbleeds bright, [0, 1]):

- ``frst``: the fast radial symmetry map (:func:`cmb_bidsapp.detect.frst.frst`), in [0, 1];
- ``contrast``: the image minus its local background, the mean of the brain voxels in a box of
  half-width 5 mm (``BACKGROUND_MM``) around the voxel (a masked box mean, computed with
  separable uniform filters);
- ``blob``: Hessian blob-ness at a scale of 1 mm (``BLOB_SIGMA_MM``): with the Hessian eigenvalue
  magnitudes sorted ``|l1| >= |l2| >= |l3|``, ``blob = |l3| / |l1|`` where every eigenvalue is
  negative (a bright blob), else 0. A sphere gives about 1, a tube about 0, a sheet 0. Thick
  slices (:func:`~cmb_bidsapp.detect.frst.thick_slice_axis`) use the in-plane 2×2 Hessian.

They are combined by a logistic model::

    p = 1 / (1 + exp(-(b + w_frst·frst + w_contrast·contrast + w_blob·blob)))

with the weights in ``CANDIDATE_WEIGHTS``, calibrated on simulated subjects (see that
dictionary's comment for how) so that ``p >= 0.5`` keeps about 10 candidate peaks per subject
that are not microbleeds. ``p`` is 0 outside the brain mask. The networks of a later issue
replace this model.

Measured operating points (held-out simulated subjects, ``size="small"``, 4 per kind, 73
reference microbleeds, true brain masks; lesion-wise matching of ``cmb_bidsapp.evaluation``):
share of microbleeds covered / false-positive components per subject:

=========  ============  ============  ============  ============  ============
threshold  SWI           T2*-GRE       MEGRE         QSM           all
=========  ============  ============  ============  ============  ============
0.2        0.78 / 67     0.88 / 40     1.00 / 32     0.68 / 38     0.82 / 44
0.3        0.65 / 38     0.81 / 22     1.00 / 22     0.58 / 31     0.74 / 28
0.5        0.52 / 16     0.62 / 9      1.00 / 9      0.58 / 17     0.66 / 13
0.7        0.35 / 4.5    0.50 / 4.5    1.00 / 3.5    0.42 / 4.0    0.53 / 4.1
0.9        0.17 / 0.2    0.19 / 1.2    1.00 / 1.2    0.21 / 1.0    0.36 / 0.9
=========  ============  ============  ============  ============  ============

Labelling
---------
:func:`label_candidates`: ``p >= threshold``, 26-connected components, kept when their volume
is within ``[min_volume_mm3, max_volume_mm3]`` (defaults 1.5 and 500 mm³: about 1.4 and 9.8 mm
equivalent-sphere diameters; apparent microbleed diameters are 2–10 mm), then renumbered
1..n in the order of their centre of mass along the last array axis, then the middle one,
then the first (``k, j, i``: "z, y, x" of the voxel grid), ties broken by the raster order of
the components' first voxel. The same input always gives the same numbering.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from ..labelstats import LabelStats
from .frst import thick_slice_axis

BACKGROUND_MM = 5.0
"""Half-width (mm) of the box whose masked mean is the local background."""

BLOB_SIGMA_MM = 1.0
"""Gaussian scale (mm) of the Hessian used for blob-ness."""

DEFAULT_THRESHOLD = 0.5
"""Provisional operating point of the candidate probability."""

MIN_VOLUME_MM3 = 1.5
MAX_VOLUME_MM3 = 500.0

# Logistic weights. Calibrated on simulated subjects (cmb_bidsapp.synth, size "small", 10
# subjects per kind: SWI, T2*-GRE, MEGRE, QSM, 8-20 microbleeds each): a grid search over the
# feature weights (frst 4-20, contrast 0-15, blob 0-6) maximised the share of reference
# microbleeds holding a score peak above the level of the 5th/10th/20th highest non-lesion peak
# per subject; then the bias was set so that p = 0.5 sits at about 10 non-lesion peaks per
# subject. Voxel-wise class-balanced logistic regression (fit_candidate_weights) ranked
# candidates worse on held-out subjects, so it is kept only as a tool.
CANDIDATE_WEIGHTS: dict[str, float] = {
    "bias": -12.8,
    "frst": 14.0,
    "contrast": 3.0,
    "blob": 4.0,
}

FEATURES: tuple[str, ...] = ("frst", "contrast", "blob")


def local_contrast(
    image: np.ndarray,
    mask: np.ndarray,
    voxel_sizes_mm: Sequence[float],
    background_mm: float = BACKGROUND_MM,
) -> np.ndarray:
    """Image minus the mean of the brain voxels within ``background_mm`` (box half-width, mm).

    float32, 0 outside the mask.
    """
    img = np.asarray(image, dtype=np.float32)
    inside = np.asarray(mask) > 0
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    size = [2 * max(1, round(background_mm / v)) + 1 for v in vs]
    m = inside.astype(np.float32)
    num = ndi.uniform_filter(img * m, size=size, mode="constant")
    den = ndi.uniform_filter(m, size=size, mode="constant")
    bg = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-6)
    out = img - bg
    out[~inside] = 0.0
    return out


def blobness(
    image: np.ndarray,
    voxel_sizes_mm: Sequence[float],
    where: np.ndarray | None = None,
    sigma_mm: float = BLOB_SIGMA_MM,
    slice_axis: int | None = None,
) -> np.ndarray:
    """Hessian blob-ness of bright blobs in [0, 1] (see module docstring), float32.

    ``where`` restricts the eigen-decomposition to some voxels (others get 0), for speed.
    ``slice_axis`` (default: detected from the voxel sizes) selects the in-plane 2D Hessian.
    """
    img = np.asarray(image, dtype=np.float32)
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    if slice_axis is None:
        slice_axis = thick_slice_axis(vs)
    axes = [a for a in range(3) if a != slice_axis]
    sigma = [0.0 if a == slice_axis else sigma_mm / vs[a] for a in range(3)]
    sel = np.ones(img.shape, dtype=bool) if where is None else np.asarray(where, dtype=bool)
    out = np.zeros(img.shape, dtype=np.float32)
    if not sel.any():
        return out
    n = len(axes)
    hess = np.empty((int(sel.sum()), n, n), dtype=np.float32)
    for p, a in enumerate(axes):
        for q, b in enumerate(axes):
            if q < p:
                continue
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndi.gaussian_filter(img, sigma=sigma, order=order, truncate=3.0)
            d = d[sel] / np.float32(vs[a] * vs[b])
            hess[:, p, q] = d
            hess[:, q, p] = d
    eig = np.linalg.eigvalsh(hess)  # ascending
    mags = np.abs(eig)
    all_neg = np.all(eig < 0, axis=1)
    ratio = mags.min(axis=1) / np.maximum(mags.max(axis=1), 1e-12)
    out[sel] = np.where(all_neg, ratio, 0.0).astype(np.float32)
    return out


def candidate_features(
    lesion_bright: np.ndarray,
    frst_map: np.ndarray,
    mask: np.ndarray,
    voxel_sizes: Sequence[float],
) -> dict[str, np.ndarray]:
    """The three feature maps of the provisional model (float32, 0 outside the mask)."""
    inside = np.asarray(mask) > 0
    frst_map = np.asarray(frst_map, dtype=np.float32)
    contrast = local_contrast(lesion_bright, inside, voxel_sizes)
    # Blob-ness only where a candidate is possible at all: brighter than its background.
    where = inside & (contrast > 0.02) & (frst_map > 0.01)
    blob = blobness(lesion_bright, voxel_sizes, where=where)
    return {
        "frst": np.where(inside, frst_map, 0).astype(np.float32),
        "contrast": contrast,
        "blob": blob,
    }


def _logistic(features: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    z = np.full(features["frst"].shape, weights["bias"], dtype=np.float32)
    for name in FEATURES:
        z += np.float32(weights[name]) * features[name]
    np.clip(z, -30.0, 30.0, out=z)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def candidate_probability(
    lesion_bright: np.ndarray,
    frst_map: np.ndarray,
    mask: np.ndarray,
    voxel_sizes: Sequence[float],
    weights: dict[str, float] | None = None,
) -> np.ndarray:
    """Provisional microbleed probability per voxel, float32 in [0, 1], 0 outside the mask.

    Parameters
    ----------
    lesion_bright
        Normalised image with lesions bright (:func:`cmb_bidsapp.preproc.normalise.lesion_bright`).
    frst_map
        Radial symmetry map in [0, 1] (:func:`cmb_bidsapp.detect.frst.frst`).
    mask
        Brain mask.
    voxel_sizes
        Voxel sizes (mm).
    weights
        Logistic weights; ``CANDIDATE_WEIGHTS`` by default.
    """
    inside = np.asarray(mask) > 0
    feats = candidate_features(lesion_bright, frst_map, inside, voxel_sizes)
    prob = _logistic(feats, weights or CANDIDATE_WEIGHTS)
    prob[~inside] = 0.0
    return prob


def fit_candidate_weights(
    features: dict[str, np.ndarray], labels: np.ndarray, *, c: float = 1.0
) -> dict[str, float]:
    """Fit the logistic weights on sampled voxels (class-balanced, L2 with inverse strength c).

    ``features`` maps each name of ``FEATURES`` to a 1D array of sampled values; ``labels`` is
    1 for voxels of reference microbleeds and 0 for the others.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.stack([np.asarray(features[n], dtype=float) for n in FEATURES], axis=1)
    y = np.asarray(labels).astype(int)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit(x, y)
    out = {"bias": float(model.intercept_[0])}
    out.update({n: float(w) for n, w in zip(FEATURES, model.coef_[0])})
    return out


def label_candidates(
    prob: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    voxel_sizes: Sequence[float] = (1.0, 1.0, 1.0),
    min_volume_mm3: float = MIN_VOLUME_MM3,
    max_volume_mm3: float = MAX_VOLUME_MM3,
) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``prob >= threshold`` within the size bounds.

    Returns ``(labels, n)``: an int32 map with values 1..n (0 elsewhere), numbered by centre of
    mass along axes 2, 1, 0 (see module docstring), and the number of components kept.
    Volumes are in mm³ (voxel count × voxel volume).
    """
    binary = np.asarray(prob) >= threshold
    labels, n = ndi.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    labels = labels.astype(np.int32, copy=False)
    if n == 0:
        return labels, 0
    voxel_volume = float(np.prod(np.asarray(voxel_sizes, dtype=float)))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    volumes = counts * voxel_volume
    ids = np.arange(1, n + 1)
    keep = ids[(volumes[1:] >= min_volume_mm3) & (volumes[1:] <= max_volume_mm3)]
    if keep.size == 0:
        return np.zeros_like(labels), 0
    com = LabelStats(labels, keep).centres()
    order = np.lexsort((keep, com[:, 0], com[:, 1], com[:, 2]))
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep[order]] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[labels], int(keep.size)
