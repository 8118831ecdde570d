"""N4 bias-field correction with SimpleITK, fast settings, thick slices handled, never NaN.

Method: SimpleITK's N4 (Tustison et al. 2010) fitted on a shrunk copy of the image inside the
brain mask, then the log bias field is evaluated on the full-resolution grid
(``GetLogBiasFieldAsImage``), and ``corrected = image / exp(log_bias)``.

- Shrink factors per axis: ``max(1, round(shrink · min(v) / v_a))`` for voxel sizes ``v`` (mm),
  so every axis is shrunk to about ``shrink × the finest voxel size``; a thick-slice axis is
  shrunk less or not at all (0.45 × 0.45 × 4 mm with shrink 4 gives factors 4, 4, 1).
- ``iterations=(20, 20, 20)``: three fitting levels of 20 iterations each. dependencies.md
  measured shrink 4 with 3 × 20 iterations at 2.8 s on 197 × 233 × 189 voxels, with the same
  quality as slower settings.
- Orientation does not matter: the array is handed to SimpleITK with its voxel sizes as
  spacing, and the field is a smooth B-spline in that grid.
- Intensities are clipped at 0, and voxels of the mask with no signal (<= 0) are left out of
  the fit. The bias field is clipped to [1e-3, 1e3] and both outputs are finite (float32).
- QSM maps (signed χ) must not be bias corrected: when more than 5 % of the masked voxels are
  negative, the image is returned unchanged with a field of ones (and a warning is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

LOGGER = logging.getLogger(__name__)

DEFAULT_SHRINK = 4
DEFAULT_ITERATIONS: tuple[int, ...] = (20, 20, 20)


def shrink_factors(voxel_sizes_mm: Sequence[float], shrink: int = DEFAULT_SHRINK) -> list[int]:
    """Per-axis shrink factors giving about ``shrink`` × the finest voxel size on every axis."""
    vs = np.asarray(voxel_sizes_mm, dtype=float)
    return [max(1, int(round(shrink * vs.min() / v))) for v in vs]


def _to_sitk(arr: np.ndarray, vs: np.ndarray) -> sitk.Image:
    # SimpleITK's array order is (z, y, x): transpose so that ITK's x is the array's axis 0.
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing([float(v) for v in vs])
    return img


def _from_sitk(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def n4_correct(
    data: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    shrink: int = DEFAULT_SHRINK,
    iterations: Sequence[int] = DEFAULT_ITERATIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias correction: returns ``(corrected, bias_field)``, float32, in the input grid.

    Parameters
    ----------
    data
        Magnitude image (non-negative), 3D.
    mask
        Brain mask (non-zero inside); an empty mask uses every voxel with signal.
    affine
        Voxel-to-scanner affine; only the voxel sizes (mm) are used.
    shrink
        Target shrink factor of the finest axis (see :func:`shrink_factors`).
    iterations
        Iterations per fitting level (the number of entries is the number of levels).
    """
    arr = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    inside = np.asarray(mask) > 0
    ones = np.ones(arr.shape, dtype=np.float32)
    ref = arr[inside] if inside.any() else arr.ravel()
    if ref.size and float(np.mean(ref < 0)) > 0.05:
        LOGGER.warning("N4 skipped: the image has signed values (QSM?); returned unchanged")
        return arr, ones
    arr = np.maximum(arr, 0)
    fit_mask = (inside if inside.any() else np.ones(arr.shape, bool)) & (arr > 0)
    if fit_mask.sum() < 100:
        LOGGER.warning("N4 skipped: fewer than 100 voxels with signal in the mask")
        return arr, ones
    vs = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))

    image = _to_sitk(arr, vs)
    mask_img = _to_sitk(fit_mask.astype(np.uint8), vs)
    factors = shrink_factors(vs, shrink)
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask_img, factors)
    if sitk.GetArrayViewFromImage(small_mask).sum() < 10:
        small, small_mask = image, mask_img
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    # in place on the fresh array SimpleITK returns (same operations, same bits, fewer copies)
    bias = _from_sitk(log_bias).astype(np.float32, copy=False)
    np.clip(bias, -6.9, 6.9, out=bias)
    np.exp(bias, out=bias)
    np.nan_to_num(bias, copy=False, nan=1.0, posinf=1.0, neginf=1.0)
    corrected = np.divide(arr, bias, dtype=np.float32)
    return corrected, bias
