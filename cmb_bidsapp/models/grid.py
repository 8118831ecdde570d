"""The networks' working grid: closest-canonical orientation, isotropic 0.8 mm, cropped to the brain.

Every image is brought to ONE grid before the networks see it, so that one model bundle serves
0.45–1 mm in-plane with 0.8–5 mm slices, in any orientation:

Orientation
    The working axes are the SOURCE voxel axes, permuted and flipped to the closest canonical
    (RAS+) orientation, as :func:`nibabel.as_closest_canonical` would do. An oblique acquisition
    keeps its obliquity (the working axes are the source's rotated axes): the slice axis of a
    thick-slice acquisition stays one of the three working axes, so its through-slice blur is
    axis-aligned in every input, and the mapping back to the source grid interpolates along
    the source axes only. The working affine is ``[0.8·d₀, 0.8·d₁, 0.8·d₂ | o]`` with ``dₐ`` the
    unit direction of the source axis mapped to working axis ``a`` (sign-flipped to point to
    R, A or S).

Spacing
    Isotropic ``WORKING_VOXEL_MM`` = 0.8 mm (the middle of the in-plane range of clinical SWI;
    a 2 mm microbleed spans 2–3 working voxels).

Extent
    The bounding box of the brain mask (the whole field of view without a mask), enlarged by
    ``MARGIN_MM`` = 4 mm on every side and clipped to the source field of view (voxel edges,
    not centres). The grid's first voxel centre sits half a working voxel inside the box.

Interpolation
    Intensity-like maps (the lesion-bright image, the radial-symmetry map): trilinear
    (``order=1``), edge values repeated outside the field of view. Along an axis whose source
    voxel is finer than 0.8 mm, a Gaussian anti-aliasing pre-filter of
    ``σ = sqrt(0.8² − v²) / 2.355`` mm (the FWHM difference) is applied first.
    Masks (brain, reference lesions): the float version is resampled trilinearly with no
    pre-filter and thresholded at 0.5. A reference lesion that would vanish (smaller than half a
    working voxel) keeps the working voxel nearest to its centre of mass
    (:func:`mask_to_working`), so no reference lesion is lost to resampling.
    Back to the source grid (:func:`to_source`): trilinear, 0 outside the working crop.

All functions are pure NumPy/SciPy (``scipy.ndimage.affine_transform``, C loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

WORKING_VOXEL_MM = 0.8
"""Isotropic voxel size of the working grid (mm)."""

MARGIN_MM = 4.0
"""Margin around the brain mask's bounding box (mm)."""

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def voxel_sizes_of(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the three array axes of a 4x4 affine."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class WorkingGrid:
    """A working grid and the source grid it came from (shapes in voxels, affines in mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    @property
    def voxel_mm(self) -> float:
        return float(voxel_sizes_of(self.affine).mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "source_shape": list(self.source_shape),
            "source_affine": np.asarray(self.source_affine).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkingGrid:
        return cls(
            tuple(int(s) for s in d["shape"]),
            np.asarray(d["affine"], dtype=float),
            tuple(int(s) for s in d["source_shape"]),
            np.asarray(d["source_affine"], dtype=float),
        )

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Scanner mm (n, 3) to continuous working voxel indices (n, 3)."""
        inv = np.linalg.inv(self.affine)
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Working voxel indices (n, 3) to scanner mm (n, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def canonical_directions(affine: np.ndarray) -> np.ndarray:
    """3x3 matrix whose column ``a`` is the unit direction of working axis ``a`` (see module doc).

    The source axis closest to world axis ``a`` (R, A, S), sign-flipped to point the same way.
    """
    affine = np.asarray(affine, dtype=float)
    ornt = nib.orientations.io_orientation(affine)  # per source axis: (world axis, flip)
    cols = affine[:3, :3] / voxel_sizes_of(affine)[None, :]
    out = np.zeros((3, 3))
    for src_axis, (world_axis, flip) in enumerate(ornt):
        out[:, int(world_axis)] = cols[:, src_axis] * flip
    return out


def working_grid(
    source_shape: tuple[int, ...],
    source_affine: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    voxel_mm: float = WORKING_VOXEL_MM,
    margin_mm: float = MARGIN_MM,
) -> WorkingGrid:
    """Define the working grid of a source image (module docstring for the rules).

    ``mask`` (source grid, non-zero = brain) sets the extent; without it (or when it is empty)
    the whole field of view is used. ``voxel_mm`` and ``margin_mm`` are in mm.
    """
    source_shape = tuple(int(s) for s in source_shape[:3])
    source_affine = np.asarray(source_affine, dtype=float)
    dirs = canonical_directions(source_affine)
    vs = voxel_sizes_of(source_affine)
    shape_arr = np.asarray(source_shape, dtype=float)
    fov_lo = np.full(3, -0.5)
    fov_hi = shape_arr - 0.5
    if mask is not None and np.any(mask):
        nz = np.nonzero(np.asarray(mask))
        lo = np.array([ax.min() for ax in nz], dtype=float) - 0.5 - margin_mm / vs
        hi = np.array([ax.max() for ax in nz], dtype=float) + 0.5 + margin_mm / vs
        lo = np.maximum(lo, fov_lo)
        hi = np.minimum(hi, fov_hi)
    else:
        lo, hi = fov_lo, fov_hi
    # The 8 corners of the (voxel-edge) box, in the working frame (mm along each working axis).
    corners = np.array([[c[0], c[1], c[2]] for c in np.ndindex(2, 2, 2)], dtype=float)
    corners = lo + corners * (hi - lo)
    world = corners @ source_affine[:3, :3].T + source_affine[:3, 3]
    frame = world @ dirs  # dirs is orthonormal up to shear: projection on each working axis
    f_lo, f_hi = frame.min(axis=0), frame.max(axis=0)
    shape = tuple(int(max(1, np.ceil((f_hi[a] - f_lo[a]) / voxel_mm - 1e-6))) for a in range(3))
    first_centre = f_lo + voxel_mm / 2.0
    affine = np.eye(4)
    affine[:3, :3] = dirs * voxel_mm
    affine[:3, 3] = dirs @ first_centre
    return WorkingGrid(shape, affine, source_shape, source_affine)


def resample(
    data: np.ndarray,
    from_affine: np.ndarray,
    to_shape: tuple[int, ...],
    to_affine: np.ndarray,
    *,
    order: int = 1,
    outside: str = "edge",
) -> np.ndarray:
    """Resample ``data`` (grid ``from_affine``) onto the grid (``to_shape``, ``to_affine``), float32.

    ``outside="edge"`` repeats the edge values beyond the field of view; ``"zero"`` gives 0 more
    than half a voxel beyond the outermost voxel centres (voxel edges, not centres, bound the
    field of view: a point inside an edge voxel takes that voxel's value).
    """
    data = np.asarray(data, dtype=np.float32)
    from_affine = np.asarray(from_affine, dtype=float)
    if outside == "zero":
        data = np.pad(data, 1, mode="edge")
        shift = np.eye(4)
        shift[:3, 3] = -1.0
        from_affine = from_affine @ shift
        mode = "constant"
    elif outside == "edge":
        mode = "nearest"
    else:
        raise ValueError(f"outside must be 'edge' or 'zero', not {outside!r}")
    m = np.linalg.inv(from_affine) @ np.asarray(to_affine, dtype=float)
    out = ndi.affine_transform(
        data,
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(int(s) for s in to_shape[:3]),
        order=order,
        mode=mode,
        cval=0.0,
        prefilter=False,
    ).astype(np.float32, copy=False)
    if outside == "zero":
        # Zero the points more than half a voxel beyond the outermost voxel centres.
        inside = np.pad(np.ones(tuple(s - 2 for s in data.shape), dtype=np.uint8), 1)
        keep = ndi.affine_transform(
            inside,
            m[:3, :3],
            offset=m[:3, 3],
            output_shape=out.shape,
            order=0,
            mode="constant",
            cval=0,
            prefilter=False,
        )
        out[keep == 0] = 0.0
    return out


def antialias_sigma_vox(
    source_affine: np.ndarray, voxel_mm: float = WORKING_VOXEL_MM
) -> np.ndarray:
    """Gaussian pre-filter σ (source voxels) per source axis before downsampling to ``voxel_mm``."""
    vs = voxel_sizes_of(source_affine)
    sigma_mm = np.sqrt(np.clip(voxel_mm**2 - vs**2, 0.0, None)) * FWHM_TO_SIGMA
    return sigma_mm / vs


def to_working(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    grid: WorkingGrid | None = None,
    antialias: bool = True,
    voxel_mm: float = WORKING_VOXEL_MM,
    margin_mm: float = MARGIN_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an intensity-like map to the working grid; returns ``(array, working_affine)``.

    ``grid`` (from :func:`working_grid`) is reused when given; otherwise it is defined from
    ``mask`` (the brain mask in the source grid). Trilinear, anti-aliased (module docstring).
    """
    if grid is None:
        grid = working_grid(data.shape, affine, mask, voxel_mm=voxel_mm, margin_mm=margin_mm)
    src = np.asarray(data, dtype=np.float32)
    if antialias:
        sigma = antialias_sigma_vox(affine, grid.voxel_mm)
        if np.any(sigma > 0.05):
            src = ndi.gaussian_filter(src, np.where(sigma > 0.05, sigma, 0.0), mode="nearest")
    out = resample(src, affine, grid.shape, grid.affine, order=1, outside="edge")
    return out, grid.affine


def mask_to_working(
    mask: np.ndarray,
    affine: np.ndarray,
    grid: WorkingGrid,
    *,
    keep_components: bool = True,
) -> np.ndarray:
    """A binary mask (source grid) on the working grid, uint8: float trilinear, threshold 0.5.

    With ``keep_components``, every 26-connected component of the source mask that would
    vanish keeps the working voxel nearest its centre of mass (if inside the grid).
    """
    src = np.asarray(mask) > 0
    out = resample(src.astype(np.float32), affine, grid.shape, grid.affine, outside="zero") >= 0.5
    if keep_components and src.any():
        labels, n = ndi.label(src, structure=np.ones((3, 3, 3), dtype=bool))
        if n:
            com = np.asarray(ndi.center_of_mass(src, labels, np.arange(1, n + 1))).reshape(-1, 3)
            world = com @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
            ijk = np.rint(grid.world_to_voxel(world)).astype(int)
            inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.shape)), axis=1)
            ijk = ijk[inside]
            # A component is "present" when any working voxel maps back into it; checking the
            # voxel at its centre is enough to decide whether to add it (cheap, vectorised).
            missing = ~out[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
            ijk = ijk[missing]
            if ijk.size:
                present = _components_present(out, labels, affine, grid, n)
                lab_ids = np.flatnonzero(inside) + 1
                add = ~present[lab_ids[missing]]
                sel = ijk[add]
                out[sel[:, 0], sel[:, 1], sel[:, 2]] = True
    return out.astype(np.uint8)


def _components_present(
    out: np.ndarray, labels: np.ndarray, affine: np.ndarray, grid: WorkingGrid, n: int
) -> np.ndarray:
    """Boolean (n+1,): whether source component ``c`` has a working voxel mapping into it."""
    idx = np.argwhere(out)
    present = np.zeros(n + 1, dtype=bool)
    if idx.size == 0:
        return present
    m = np.linalg.inv(np.asarray(affine, float)) @ grid.affine
    src = np.rint(idx @ m[:3, :3].T + m[:3, 3]).astype(int)
    src = np.clip(src, 0, np.asarray(labels.shape) - 1)
    present[np.unique(labels[src[:, 0], src[:, 1], src[:, 2]])] = True
    return present


def to_source(
    data: np.ndarray,
    working_affine: np.ndarray,
    source_shape: tuple[int, ...],
    source_affine: np.ndarray,
    *,
    order: int = 1,
) -> np.ndarray:
    """Map a working-grid map back to the source grid (trilinear; 0 outside the working crop)."""
    return resample(data, working_affine, source_shape, source_affine, order=order, outside="zero")


def mm_to_working_voxels(length_mm: float, voxel_mm: float = WORKING_VOXEL_MM) -> float:
    """A length in mm as a number of working voxels."""
    return float(length_mm) / float(voxel_mm)
