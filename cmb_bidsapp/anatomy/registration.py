"""Registration of a brain image to MNI152NLin2009cAsym with SimpleITK, and mapping between spaces.

Method (:func:`register_to_template`): the brain-extracted input and the template brain
(:func:`cmb_bidsapp.anatomy.templates.load_template`) are smoothed and resampled to an
isotropic working grid (``WORK_SPACING_MM``, 2 mm; the input in its own orientation, cropped to
its mask), intensities are clipped to the 0.5-99.5 percentiles inside the mask and scaled to
0..1. Then, with Mattes mutual information (32 bins, 25 % of voxels sampled with a fixed
seed, one thread, so that runs are bit-identical), a cross-modal metric that works for
T2*-GRE, SWI, QSM or T1w:

1. centre-of-mass initialisation from the two brain masks;
2. rigid (Euler 3D), 2 levels (4 and 2 mm), regular-step gradient descent;
3. affine (12 parameters), 2 levels (4 and 2 mm), started from the rigid result;
4. optional deformable stage (``deformable=True``): a cubic B-spline with a control-point
   spacing of about 40 mm, L-BFGS-B at 4 then 2 mm; its inverse is a displacement field
   (4 mm grid) inverted by fixed-point iteration.

If a T1w of the same session is given, it is registered rigidly to the input (mutual
information), the T1w is registered to the template, and the two are composed; the T1w's
contrast and resolution give a better template registration. :func:`mask_from_t1w` brings
a T1w-space brain mask into the input grid through the rigid part.

Quality (``result.quality``), measured on the template's 2 mm grid after warping the input
through the final transform (with a T1w, the T1w's own figures are added as ``nmi_t1w`` and
``mask_dice_t1w`` and judged too):
``nmi`` (normalised mutual information (H(A)+H(B))/H(A,B), 32 bins, of the two images
smoothed with a 2 mm Gaussian, inside both brain masks eroded by 4 mm, so that the outline
alone scores nothing and noise does not hide a good match). Calibration on synthetic cases:
pure noise, with or without a brain-shaped mask, 1.000-1.003; a good match 1.02-1.08 for
noisy low-contrast SWI-like images made from tissue priors, 1.19-1.24 for T1w or inverted T1w;
on full-size simulated SWI (16 images of ``benchmarks/cleanup_effect.py --seed 7332``) the
registrations whose brain masks matched the template's (Dice 0.95-0.97) scored only
1.008-1.019, and a well-registered 0.8 mm SWI of the speed benchmark 1.004, so the bound sits
halfway between noise and those), ``mask_dice``
(Dice of the warped input mask with the template mask) and the affine's scalings and shear.
``flag`` is True, with ``reason``, when ``mask_dice < MIN_MASK_DICE`` (0.80), ``nmi < MIN_NMI``
(1.0035), a scaling outside ``SCALE_RANGE`` (0.7-1.4), anisotropy (largest/smallest scaling) above
``MAX_ANISOTROPY`` (1.3), a reflection, or an exception. A failed registration never raises.
What the flagged result holds: the optimised transform when only the similarity figures are
low (it is still the best estimate); the rigid result (``stage="rigid"``) when the affine is
implausible (scaling, shear, reflection); the centre-of-mass (translation-only) alignment
(``stage="center-of-mass"``) after an exception.

Spaces and conventions. All public functions take and return *NIfTI world coordinates*
(RAS+ scanner mm, as the image affines give); the LPS convention of ITK stays inside this
module. ``result.native_to_template`` maps a native (scanner mm) point to its MNI mm point;
``result.template_to_native`` maps an MNI point to the native point. In fMRIPrep's file
naming, ``template_to_native`` is the ``from-native_to-MNI152NLin2009cAsym`` transform (the one
used to resample a native image into MNI space) and ``native_to_template`` is
``from-MNI152NLin2009cAsym_to-native`` (used to resample the MARS map into the native grid).
Both are SimpleITK transforms, saved and loaded with :meth:`RegistrationResult.save`,
:func:`save_transforms` and :func:`load_transform` (``.tfm`` text or ``.h5``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import templates

WORK_SPACING_MM = 2.0
MIN_MASK_DICE = 0.80
MIN_NMI = 1.0035
SCALE_RANGE = (0.7, 1.4)
MAX_ANISOTROPY = 1.3
SEED = 20240601
NMI_SMOOTH_VOXELS = 1.0
# Single-threaded optimisation: multi-threaded Mattes MI sums in a varying order, so two runs
# differ by ~1e-7 mm and outputs would not be bit-identical. Measured under load on 2 cores,
# one thread was as fast as two (2.7-3.2 s per affine registration).
REGISTRATION_THREADS = 1  # Gaussian sigma on the 2 mm working grid before the NMI
_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------
# nibabel <-> SimpleITK, RAS <-> LPS
# ----------------------------------------------------------------------------------------


def nib_to_sitk(img: nib.Nifti1Image, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image with the same voxels and world geometry (affine -> LPS direction)."""
    data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    lin = _LPS @ affine[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))
    direction = lin / spacing
    # a sheared affine has no orthonormal direction: take the nearest rotation (polar part)
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection([float(v) for v in direction.ravel()])
    out.SetOrigin([float(v) for v in _LPS @ affine[:3, 3]])
    return out


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """The NIfTI (RAS) affine of a SimpleITK image."""
    direction = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = _LPS @ np.array(img.GetOrigin())
    return affine


def sitk_to_nib(img: sitk.Image) -> nib.Nifti1Image:
    """A nibabel image with the voxels and geometry of a SimpleITK image."""
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    return nib.Nifti1Image(data, sitk_affine(img))


def _transform_points(tx: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    """Apply a SimpleITK point transform to (n, 3) RAS mm points (one call per point)."""
    pts = np.atleast_2d(np.asarray(points_ras, dtype=np.float64)) @ _LPS
    out = np.array([tx.TransformPoint([float(v) for v in p]) for p in pts]).reshape(-1, 3)
    return out @ _LPS


# ----------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """Transforms between the native grid and the template, and how good they look."""

    template_to_native: sitk.Transform
    native_to_template: sitk.Transform
    template: str = templates.DEFAULT_TEMPLATE
    stage: str = "affine"  # "affine", "deformable", "center-of-mass" (fallback), "identity"
    flag: bool = False
    reason: str = ""
    quality: dict[str, float] = field(default_factory=dict)
    t1w_to_native: sitk.Transform | None = None  # rigid: T1w points -> native points
    elapsed_s: float = 0.0

    @property
    def forward(self) -> sitk.Transform:
        """fMRIPrep's ``from-native_to-<template>`` transform (= :attr:`template_to_native`)."""
        return self.template_to_native

    @property
    def inverse(self) -> sitk.Transform:
        """fMRIPrep's ``from-<template>_to-native`` transform (= :attr:`native_to_template`)."""
        return self.native_to_template

    def report(self) -> dict[str, object]:
        """JSON-ready summary: template, stage, flag, reason, quality figures, time (s)."""
        return {
            "Template": self.template,
            "Stage": self.stage,
            "Flag": bool(self.flag),
            "Reason": self.reason,
            "Quality": {k: float(v) for k, v in self.quality.items()},
            "UsedT1w": self.t1w_to_native is not None,
            "ElapsedSeconds": round(float(self.elapsed_s), 2),
        }

    def save(self, path: str | Path, inverse_path: str | Path | None = None) -> Path:
        """Write :attr:`native_to_template` to `path` (``.tfm``/``.h5``), the other to `inverse_path`."""
        sitk.WriteTransform(self.native_to_template, str(path))
        if inverse_path is not None:
            sitk.WriteTransform(self.template_to_native, str(inverse_path))
        return Path(path)

    def native_to_mni(self, points_ras: np.ndarray) -> np.ndarray:
        """(n, 3) native scanner mm -> MNI mm."""
        return native_to_mni(points_ras, self)

    def mni_to_native(self, points_mni: np.ndarray) -> np.ndarray:
        """(n, 3) MNI mm -> native scanner mm."""
        return mni_to_native(points_mni, self)


def save_transforms(result: RegistrationResult, out_dir: str | Path, prefix: str = "") -> dict:
    """Write both transforms with fMRIPrep-like names (``.h5``); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fwd = out_dir / f"{prefix}from-native_to-{result.template}_mode-image_xfm.h5"
    inv = out_dir / f"{prefix}from-{result.template}_to-native_mode-image_xfm.h5"
    sitk.WriteTransform(result.template_to_native, str(fwd))
    sitk.WriteTransform(result.native_to_template, str(inv))
    return {"template_to_native": fwd, "native_to_template": inv}


def load_transform(path: str | Path) -> sitk.Transform:
    """Read a transform written by :meth:`RegistrationResult.save` or :func:`save_transforms`."""
    tx = sitk.ReadTransform(str(path))
    if (
        tx.GetName() == "CompositeTransform"
        and sitk.CompositeTransform(tx).GetNumberOfTransforms() == 1
    ):
        return sitk.CompositeTransform(tx).GetNthTransform(0)
    return tx


# ----------------------------------------------------------------------------------------
# Working images
# ----------------------------------------------------------------------------------------


def _normalise(img: sitk.Image, mask: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    m = sitk.GetArrayFromImage(mask) > 0
    vals = arr[m]
    if vals.size < 10:
        return sitk.Cast(img, sitk.sitkFloat32)
    lo, hi = np.percentile(vals, [0.5, 99.5])
    out = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * m
    res = sitk.GetImageFromArray(out.astype(np.float32))
    res.CopyInformation(img)
    return res


def _working_grid(ref: sitk.Image, mask: sitk.Image, spacing: float, margin_mm: float = 8.0):
    """An isotropic grid in `ref`'s orientation, covering `mask`'s bounding box plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    size = np.array(ref.GetSize(), float)
    if stats.HasLabel(1):
        bb = np.array(stats.GetBoundingBox(1), float)
        lo, n = bb[:3], bb[3:]
    else:
        lo, n = np.zeros(3), size
    sp_in = np.array(ref.GetSpacing())
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    start_idx = lo - margin_mm / sp_in
    extent_mm = (n - 1 + 2 * margin_mm / sp_in) * sp_in
    new_size = np.maximum(np.ceil(extent_mm / spacing).astype(int) + 1, 4)
    origin = np.array(ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in start_idx]))
    grid = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection([float(v) for v in direction.ravel()])
    grid.SetOrigin([float(v) for v in origin])
    return grid


def _to_working(img: sitk.Image, mask: sitk.Image, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """Anti-aliased, normalised image and its mask on an isotropic `spacing` mm grid."""
    grid = _working_grid(img, mask, spacing)
    sp = np.array(img.GetSpacing())
    sigmas = [float(max(s, 0.0)) for s in np.sqrt(np.maximum(spacing**2 - sp**2, 0.0)) / 2.355]
    src = sitk.Cast(img, sitk.sitkFloat32)
    if max(sigmas) > 0.1:
        src = sitk.SmoothingRecursiveGaussian(src, [max(s, 0.01) for s in sigmas])
    work = sitk.Resample(src, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    wmask = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    wmask = sitk.Cast(wmask > 0.5, sitk.sitkUInt8)
    return _normalise(work, wmask), wmask


def _template_working(name: str, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """The template and its mask on the working grid, made once per process (copies returned:
    SimpleITK copies share their buffer until written)."""
    work, mask = _template_working_cached(name, float(spacing), str(templates.templateflow_home()))
    return sitk.Image(work), sitk.Image(mask)


@functools.lru_cache(maxsize=2)
def _template_working_cached(name: str, spacing: float, home: str):
    tpl = nib_to_sitk(templates.load_template(name))
    mask = nib_to_sitk(templates.template_mask(name), dtype=np.uint8)
    return _to_working(tpl, mask, spacing)


# ----------------------------------------------------------------------------------------
# Registration stages
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Set SimpleITK's global default thread count (the metric reads it), then restore it."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _method(levels=(2, 1), sigmas=(2.0, 1.0), sampling=0.25) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _com_transform(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.Euler3DTransform:
    """Rigid transform (fixed -> moving points) that aligns the masks' centres of mass."""

    def com(m):
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(m > 0, sitk.sitkUInt8))
        if not stats.HasLabel(1):
            size = np.array(m.GetSize()) - 1
            return np.array(m.TransformContinuousIndexToPhysicalPoint((size / 2).tolist()))
        return np.array(stats.GetCentroid(1))

    cf, cm = com(fixed_mask), com(moving_mask)
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in cf])
    tx.SetTranslation([float(v) for v in cm - cf])
    return tx


def _rigid(fixed, moving, fixed_mask, init: sitk.Transform, iterations=100):
    reg = _method()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(sitk.Euler3DTransform(init), inPlace=False)
    out = reg.Execute(fixed, moving)
    return _unwrap(out), reg.GetMetricValue()


def _affine(fixed, moving, fixed_mask, rigid: sitk.Transform, iterations=100):
    rig = sitk.Euler3DTransform(rigid)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(rig.GetCenter())
    aff.SetMatrix(rig.GetMatrix())
    aff.SetTranslation(rig.GetTranslation())
    reg = _method()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(aff, inPlace=False)
    out = reg.Execute(fixed, moving)
    return _unwrap(out), reg.GetMetricValue()


def _bspline(fixed, moving, fixed_mask, affine: sitk.Transform, spacing_mm=40.0, evaluations=40):
    """B-spline stage on top of `affine`; returns the B-spline (fixed -> fixed displacement).

    Two levels (4 and 2 mm); 20 % then 4 % of the voxels sampled, at most `evaluations` metric
    evaluations per level, so that it adds about 5-10 s on 2 cores.
    """
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(int(round(e / spacing_mm)), 1) for e in extent]
    bsp = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(levels=(2, 1), sigmas=(2.0, 1.0), sampling=0.2)
    reg.SetMetricSamplingPercentagePerLevel([0.2, 0.04], SEED)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=evaluations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=evaluations,
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bsp, inPlace=True)
    reg.Execute(fixed, moving)
    return bsp


def _unwrap(tx: sitk.Transform) -> sitk.Transform:
    """The single transform inside a composite that ImageRegistrationMethod returns."""
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        if comp.GetNumberOfTransforms() == 1:
            tx = comp.GetNthTransform(0)
    name = tx.GetName()
    if name == "Euler3DTransform":
        return sitk.Euler3DTransform(tx)
    if name == "AffineTransform":
        return sitk.AffineTransform(tx)
    return tx


def _invert_deformable(bsp: sitk.Transform, grid: sitk.Image, spacing_mm: float = 4.0):
    """Displacement-field inverse of a B-spline (template -> template) on a coarse grid."""
    size = [
        int(math.ceil(s * sp / spacing_mm)) + 1 for s, sp in zip(grid.GetSize(), grid.GetSpacing())
    ]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(grid.GetOrigin())
    ref.SetDirection(grid.GetDirection())
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(ref)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    field_img = to_field.Execute(bsp)
    inv = sitk.InvertDisplacementField(
        field_img,
        maximumNumberOfIterations=20,
        maxErrorToleranceThreshold=0.1,
        meanErrorToleranceThreshold=0.001,
        enforceBoundaryCondition=True,
    )
    return sitk.DisplacementFieldTransform(sitk.Cast(inv, sitk.sitkVectorFloat64))


# ----------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) of two samples in [0, 1]."""
    if a.size < 100:
        return 1.0
    hist, _, _ = np.histogram2d(a, b, bins=bins, range=[[0, 1], [0, 1]])
    p = hist / hist.sum()
    pa, pb = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hab = ent(p.ravel())
    return (ent(pa) + ent(pb)) / hab if hab > 0 else 1.0


def _unit(x: np.ndarray) -> np.ndarray:
    """Values scaled to 0..1 between their 0.5 and 99.5 percentiles."""
    if x.size == 0:
        return x
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def _affine_figures(tx: sitk.Transform) -> dict[str, float]:
    """Scalings (singular values), anisotropy and determinant of the linear part (mm/mm)."""
    try:
        mat = np.array(sitk.AffineTransform(tx).GetMatrix()).reshape(3, 3)
    except (RuntimeError, TypeError):
        try:
            mat = np.array(tx.GetMatrix()).reshape(3, 3)
        except (RuntimeError, AttributeError):
            mat = np.eye(3)
    sv = np.linalg.svd(mat, compute_uv=False)
    return {
        "scale_min": float(sv.min()),
        "scale_max": float(sv.max()),
        "anisotropy": float(sv.max() / max(sv.min(), 1e-9)),
        "determinant": float(np.linalg.det(mat)),
    }


def _quality(fixed, fixed_mask, moving, moving_mask, tx, linear_tx) -> dict[str, float]:
    warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    wmask = sitk.Resample(sitk.Cast(moving_mask, sitk.sitkFloat32), fixed, tx, sitk.sitkLinear, 0.0)
    f = sitk.GetArrayFromImage(fixed)
    fm = sitk.GetArrayFromImage(fixed_mask) > 0
    w = sitk.GetArrayFromImage(warped)
    wm = sitk.GetArrayFromImage(wmask) > 0.5
    dice = 2.0 * (fm & wm).sum() / max(fm.sum() + wm.sum(), 1)
    # inside both brains, away from their outlines, so that a mask alone scores nothing
    inner = ndi.binary_erosion(fm & wm, iterations=2)
    # smoothed (3 mm FWHM-ish) so that noise does not hide a good match; rescaled to 0..1
    fs, ws = (_unit(ndi.gaussian_filter(x, NMI_SMOOTH_VOXELS)[inner]) for x in (f, w))
    q = {"nmi": _nmi(fs, ws), "mask_dice": float(dice)}
    q.update(_affine_figures(linear_tx))
    return q


def _judge(q: dict[str, float]) -> str:
    reasons = []
    if q.get("mask_dice", 0.0) < MIN_MASK_DICE:
        reasons.append(f"brain-mask Dice {q.get('mask_dice', 0.0):.2f} < {MIN_MASK_DICE}")
    if q.get("nmi", 1.0) < MIN_NMI:
        reasons.append(f"normalised mutual information {q.get('nmi', 1.0):.3f} < {MIN_NMI}")
    lo, hi = SCALE_RANGE
    if q.get("scale_min", 1.0) < lo or q.get("scale_max", 1.0) > hi:
        reasons.append(
            f"degenerate scaling {q.get('scale_min', 1):.2f}-{q.get('scale_max', 1):.2f} "
            f"outside {lo}-{hi}"
        )
    if q.get("anisotropy", 1.0) > MAX_ANISOTROPY:
        reasons.append(f"shear/anisotropy {q.get('anisotropy', 1):.2f} > {MAX_ANISOTROPY}")
    if q.get("determinant", 1.0) <= 0:
        reasons.append("reflection (negative determinant)")
    return "; ".join(reasons)


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------


def _mask_image(img: nib.Nifti1Image, mask: nib.Nifti1Image | None) -> sitk.Image:
    if mask is None:
        arr = (np.asanyarray(img.dataobj) != 0).astype(np.uint8)
        return nib_to_sitk(nib.Nifti1Image(arr, img.affine), dtype=np.uint8)
    return nib_to_sitk(
        nib.Nifti1Image((np.asanyarray(mask.dataobj) > 0).astype(np.uint8), mask.affine),
        dtype=np.uint8,
    )


def _register_pair(fixed, fmask, moving, mmask, *, affine=True):
    """Rigid, then affine, from the centre-of-mass alignment; returns (rigid, affine or None)."""
    init = _com_transform(fmask, mmask)
    rigid, _ = _rigid(fixed, moving, fmask, init)
    if not affine:
        return rigid, None
    aff, _ = _affine(fixed, moving, fmask, rigid)
    return rigid, aff


def _implausible(tx: sitk.Transform) -> str:
    """Why an affine is not a head-to-template transform (scaling, shear, reflection), or ''."""
    q = _affine_figures(tx)
    return _judge({"mask_dice": 1.0, "nmi": 2.0, **q})


def register_rigid(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    *,
    fixed_mask: nib.Nifti1Image | None = None,
    moving_mask: nib.Nifti1Image | None = None,
    spacing: float = WORK_SPACING_MM,
) -> sitk.Transform:
    """Rigid (Mattes MI) transform mapping `fixed` world points to `moving` world points."""
    f_img, m_img = nib_to_sitk(fixed), nib_to_sitk(moving)
    f, fm = _to_working(f_img, _mask_image(fixed, fixed_mask), spacing)
    m, mm = _to_working(m_img, _mask_image(moving, moving_mask), spacing)
    with _threads(REGISTRATION_THREADS):
        return _register_pair(f, fm, m, mm, affine=False)[0]


def register_to_template(
    moving: nib.Nifti1Image,
    moving_mask: nib.Nifti1Image | None = None,
    *,
    deformable: bool = False,
    t1w: nib.Nifti1Image | None = None,
    t1w_mask: nib.Nifti1Image | None = None,
    template: str = templates.DEFAULT_TEMPLATE,
) -> RegistrationResult:
    """Register a brain-extracted image (any orientation, any voxel size) to the template.

    Rigid then affine, optionally deformable (see the module docstring). With `t1w` (same
    session, brain-extracted, or with `t1w_mask`) the T1w is registered rigidly to the input
    and affinely (or deformably) to the template, and the two are composed. Never raises for
    a failed registration: the result is then flagged, with the reason, and holds the
    centre-of-mass alignment.
    """
    with _threads(REGISTRATION_THREADS):
        return _register_to_template(moving, moving_mask, deformable, t1w, t1w_mask, template)


def _register_to_template(moving, moving_mask, deformable, t1w, t1w_mask, template):
    t0 = time.perf_counter()
    fixed = fmask = m = mm = None
    com = sitk.Euler3DTransform()
    try:
        fixed, fmask = _template_working(template, WORK_SPACING_MM)
        m, mm = _to_working(nib_to_sitk(moving), _mask_image(moving, moving_mask), WORK_SPACING_MM)
        com = _com_transform(fmask, mm)
        t1w_to_native = None
        if t1w is not None:
            t, tm = _to_working(nib_to_sitk(t1w), _mask_image(t1w, t1w_mask), WORK_SPACING_MM)
            # rigid: native points -> T1w points; then template -> T1w
            native_to_t1w = _register_pair(m, mm, t, tm, affine=False)[0]
            rigid, linear = _register_pair(fixed, fmask, t, tm)
            src, src_mask = t, tm
            t1w_to_native = native_to_t1w.GetInverse()
        else:
            rigid, linear = _register_pair(fixed, fmask, m, mm)
            src, src_mask = m, mm
        stage = "affine"
        degenerate = _implausible(linear)
        if degenerate:  # keep the rigid result rather than a degenerate affine
            linear, stage, deformable = rigid, "rigid", False
        fwd_t1 = linear  # template -> registered image (T1w or native)
        inv_t1 = linear.GetInverse()
        if deformable:
            bsp = _bspline(fixed, src, fmask, linear)
            fwd_t1 = sitk.CompositeTransform([linear, bsp])
            inv_t1 = sitk.CompositeTransform([_invert_deformable(bsp, fixed), linear.GetInverse()])
            stage = "deformable"
        if t1w_to_native is not None:
            template_to_native = sitk.CompositeTransform([t1w_to_native, fwd_t1])
            native_to_template = sitk.CompositeTransform([inv_t1, native_to_t1w])
        else:
            template_to_native, native_to_template = fwd_t1, inv_t1
        # the input itself, through the final (possibly composed) transform, is what is judged
        q = _quality(fixed, fmask, m, mm, template_to_native, linear)
        reason = _judge(q)
        if degenerate:
            reason = "; ".join(r for r in (f"affine rejected: {degenerate}", reason) if r)
        if t1w_to_native is not None:
            qt = _quality(fixed, fmask, src, src_mask, fwd_t1, linear)
            q.update({"nmi_t1w": qt["nmi"], "mask_dice_t1w": qt["mask_dice"]})
            reason_t1w = _judge(qt)
            if reason_t1w:
                reason = "; ".join(r for r in (reason, f"T1w: {reason_t1w}") if r)
        return RegistrationResult(
            template_to_native=template_to_native,
            native_to_template=native_to_template,
            template=template,
            stage=stage,
            flag=bool(reason),
            reason=reason,
            quality=q,
            t1w_to_native=t1w_to_native,
            elapsed_s=time.perf_counter() - t0,
        )
    except Exception as err:  # a failed registration must not crash the run
        reason = f"registration failed ({type(err).__name__}: {_short_message(err)})"
        q: dict[str, float] = {}
        if fixed is not None and m is not None:
            try:
                q = _quality(fixed, fmask, m, mm, com, com)
            except Exception:  # quality is best effort here
                q = {}
        return RegistrationResult(
            template_to_native=com,
            native_to_template=com.GetInverse(),
            template=template,
            stage="center-of-mass",
            flag=True,
            reason=reason,
            quality=q,
            elapsed_s=time.perf_counter() - t0,
        )


def _short_message(err: Exception) -> str:
    """The useful line of an exception (ITK's 'Description:' line when there is one)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for marker in ("Description:", "ITK ERROR:"):
        for line in lines:
            if marker in line:
                return line.split(marker, 1)[1].strip()[:160]
    return (lines or [""])[0][:160]


# ----------------------------------------------------------------------------------------
# Mapping points and images between the spaces
# ----------------------------------------------------------------------------------------


def native_to_mni(points_ras: np.ndarray, result: RegistrationResult) -> np.ndarray:
    """(n, 3) native scanner mm (RAS) -> (n, 3) MNI mm."""
    return _transform_points(result.native_to_template, points_ras)


def mni_to_native(points_mni: np.ndarray, result: RegistrationResult) -> np.ndarray:
    """(n, 3) MNI mm -> (n, 3) native scanner mm (RAS)."""
    return _transform_points(result.template_to_native, points_mni)


def resample_to_native(
    img_mni: nib.Nifti1Image, result: RegistrationResult, native: nib.Nifti1Image, order: int = 0
) -> np.ndarray:
    """An image in template space resampled into the native grid (order 0 nearest, 1 linear)."""
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    src = nib_to_sitk(img_mni, dtype=np.float32)
    ref = nib_to_sitk(nib.Nifti1Image(np.zeros(native.shape[:3], np.uint8), native.affine))
    out = sitk.Resample(src, ref, result.native_to_template, interp, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def resample_to_template(
    img: nib.Nifti1Image, result: RegistrationResult, order: int = 1, resolution: int = 1
) -> nib.Nifti1Image:
    """A native image resampled onto the template grid (for figures and checks)."""
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    tpl = templates.load_template(result.template, resolution)
    ref = nib_to_sitk(nib.Nifti1Image(np.zeros(tpl.shape, np.uint8), tpl.affine))
    out = sitk.Resample(nib_to_sitk(img), ref, result.template_to_native, interp, 0.0)
    return nib.Nifti1Image(sitk.GetArrayFromImage(out).transpose(2, 1, 0), tpl.affine)


def mars_in_native(result: RegistrationResult, native: nib.Nifti1Image) -> np.ndarray:
    """The MARS region map (labels 0..13, int16) in the native grid, nearest neighbour."""
    from .mars import mars_map_mni

    return resample_to_native(mars_map_mni(), result, native, order=0).astype(np.int16)


def mask_from_t1w(
    t1w_mask: nib.Nifti1Image, result_or_transform, native: nib.Nifti1Image
) -> np.ndarray:
    """A T1w-space brain mask in the native grid (uint8), through the rigid T1w -> input step.

    `result_or_transform` is a :class:`RegistrationResult` made with a T1w, or a transform
    mapping native points to T1w points (e.g. ``register_rigid(native, t1w)``).
    """
    if isinstance(result_or_transform, RegistrationResult):
        if result_or_transform.t1w_to_native is None:
            raise ValueError("this registration was made without a T1w")
        tx = result_or_transform.t1w_to_native.GetInverse()
    else:
        tx = result_or_transform
    src = nib_to_sitk(
        nib.Nifti1Image((np.asanyarray(t1w_mask.dataobj) > 0).astype(np.float32), t1w_mask.affine)
    )
    ref = nib_to_sitk(nib.Nifti1Image(np.zeros(native.shape[:3], np.uint8), native.affine))
    out = sitk.Resample(src, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return (sitk.GetArrayFromImage(out).transpose(2, 1, 0) >= 0.5).astype(np.uint8)
