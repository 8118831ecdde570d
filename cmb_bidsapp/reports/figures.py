"""QC figures of one image: overlays (brain mask, bias field, registration, MARS regions) and lesion crops.

Every figure is drawn in the image's own grid, turned to the nearest RAS orientation (no
resampling: each displayed pixel is one native voxel repeated, nearest neighbour, so that a
3-voxel lesion is not smoothed away). Displays follow the neurological convention: the
patient's left is on the viewer's left, anterior is up on axial slices, superior is up on
coronal and sagittal slices.

- Overlays (`brain_mask_png`, `bias_field_png`, `registration_png`, `regions_png`): a mosaic
  of 6 axial, 6 coronal and 6 sagittal slices spread over the brain mask's extent, drawn with
  matplotlib (Agg, no pyplot state), PNG.
- Lesion crops (`lesion_crop_png`): a triplanar crop of ``CROP_FOV_MM`` (36 mm) centred on the
  lesion's centre of mass, top row the image alone, bottom row with the lesion's outline drawn
  *outside* its voxels (so the outline never hides the lesion), other lesions of the crop
  outlined in cyan; red ticks at the panel edges point at the centre; a 10 mm scale bar in the
  first panel. Composed with NumPy as an 8-bit paletted PNG (Pillow): about 2-5 ms and
  10-30 kB per lesion. Rejected candidates are drawn the same way, outlined in orange when a
  candidate map is given, else marked by the ticks only.
- The display window is the 0.5-99.5 % intensity range inside the brain mask, the same for
  every panel of an image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

matplotlib.rcParams["svg.fonttype"] = "none"

CROP_FOV_MM = 36.0
"""Field of view of a lesion crop (mm)."""
CROP_PANEL_PX = 128
"""Width and height of one crop panel (pixels): about 0.28 mm per pixel."""
SCALE_BAR_MM = 10.0
MOSAIC_SLICES = 6
"""Slices per row (axial, coronal, sagittal) of the overlay mosaics."""

# Palette of the lesion crops: 0..239 grey levels, then the overlay colours.
_N_GREY = 240
LESION_COLOUR = 240  # yellow: the lesion of this crop
OTHER_COLOUR = 241  # cyan: other lesions inside the crop
REJECTED_COLOUR = 242  # orange: a rejected candidate
TICK_COLOUR = 243  # red: ticks pointing at the centre
OUTSIDE_COLOUR = 244  # dark blue-grey: outside the image
BAR_COLOUR = 245  # white: scale bar
GAP_COLOUR = 246  # black: gaps between panels
_PALETTE = np.zeros((256, 3), dtype=np.uint8)
_PALETTE[:_N_GREY] = np.linspace(0, 255, _N_GREY)[:, None].astype(np.uint8)
_PALETTE[LESION_COLOUR] = (255, 216, 0)
_PALETTE[OTHER_COLOUR] = (0, 208, 255)
_PALETTE[REJECTED_COLOUR] = (255, 127, 0)
_PALETTE[TICK_COLOUR] = (255, 48, 48)
_PALETTE[OUTSIDE_COLOUR] = (32, 40, 48)
_PALETTE[BAR_COLOUR] = (255, 255, 255)
_PALETTE[GAP_COLOUR] = (0, 0, 0)

CLASS_COLOURS = {"lobar": "#4daf4a", "deep": "#377eb8", "infratentorial": "#e41a1c"}
"""Colours of the MARS classes, in every figure and in the HTML."""


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A 3D array turned to the nearest RAS orientation, with its affine and voxel sizes (mm)."""

    data: np.ndarray
    affine: np.ndarray
    """RAS affine of `data` (voxel index → scanner mm)."""
    native_affine: np.ndarray
    """Affine of the array before reorientation."""
    ornt: np.ndarray
    crop: tuple[slice, ...] = (slice(None), slice(None), slice(None))
    """Box of the reoriented array kept in `data` (see `cropped`)."""

    @property
    def vox(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])

    def like(self, other: np.ndarray) -> np.ndarray:
        """Reorient another array of the native grid the same way."""
        other = np.asanyarray(other)
        if other.ndim > 3:
            other = other.reshape(other.shape[:3])
        return nib.orientations.apply_orientation(other, self.ornt)[self.crop]

    def cropped(self, mask: np.ndarray, margin_mm: float = 6.0) -> Volume:
        """The same volume cut to the box of a native-grid `mask` plus `margin_mm` (no copy)."""
        m = self.like(mask) > 0
        if not m.any():
            return self
        box = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            present = np.flatnonzero(m.any(axis=other))
            pad = int(np.ceil(margin_mm / self.vox[axis]))
            box.append((max(present[0] - pad, 0), min(present[-1] + pad + 1, m.shape[axis])))
        start = np.array([b[0] for b in box], dtype=float)
        shift = np.eye(4)
        shift[:3, 3] = start
        base = [s.start or 0 for s in self.crop]
        crop = tuple(slice(base[a] + b[0], base[a] + b[1]) for a, b in enumerate(box))
        data = self.data[tuple(slice(b0, b1) for b0, b1 in box)]
        return Volume(data, self.affine @ shift, self.native_affine, self.ornt, crop)

    def index_of_mm(self, xyz: np.ndarray) -> np.ndarray:
        """(n, 3) scanner mm → (n, 3) fractional voxel indices of the reoriented array."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def index_of_native(self, ijk: np.ndarray) -> np.ndarray:
        """(n, 3) native voxel indices → (n, 3) voxel indices of the reoriented array."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        xyz = ijk @ self.native_affine[:3, :3].T + self.native_affine[:3, 3]
        return self.index_of_mm(xyz)


def as_ras(data: np.ndarray, affine: np.ndarray) -> Volume:
    """Turn an array to the nearest RAS orientation (flips and axis swaps only, no resampling)."""
    data = np.asanyarray(data)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(data, ornt)
    new_affine = np.asarray(affine) @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3])
    return Volume(np.asarray(out), new_affine, np.asarray(affine, dtype=np.float64), ornt)


def display_window(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """The 0.5-99.5 % range of `data` inside `mask` (the whole image when the mask is empty)."""
    values = data[mask > 0] if mask is not None and np.any(mask) else data[np.isfinite(data)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > 2_000_000:  # a regular subsample is enough for percentiles
        values = values[:: values.size // 1_000_000]
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def brain_slices(mask: np.ndarray, n: int = MOSAIC_SLICES) -> list[list[int]]:
    """For each axis, `n` slice indices spread over the mask's extent (10-90 %)."""
    shape = mask.shape[:3]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(mask > 0, axis=other)) if np.any(mask) else np.array([])
        lo, hi = (present[0], present[-1]) if present.size else (0, shape[axis] - 1)
        span = hi - lo
        picks = np.linspace(lo + 0.1 * span, hi - 0.1 * span, n) if span > 0 else np.full(n, lo)
        out.append(sorted({int(round(p)) for p in picks}))
    return out


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice as displayed (a view): rows top to bottom, columns left to right."""
    sl: list = [slice(None)] * 3
    sl[axis] = index
    return vol[tuple(sl)].T[::-1]


# ----------------------------------------------------------------------------------------
# Lesion crops (NumPy, paletted PNG)
# ----------------------------------------------------------------------------------------


def _png_paletted(index: np.ndarray) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(index, dtype=np.uint8), mode="P")
    img.putpalette(_PALETTE.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _grey(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    scaled = (np.nan_to_num(values.astype(np.float32), nan=lo) - lo) / (hi - lo)
    return np.clip(scaled * (_N_GREY - 1), 0, _N_GREY - 1).astype(np.uint8)


def _ring(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within `width` pixels outside `mask` (8-neighbourhood dilation minus the mask)."""
    grown = mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:, :] |= grown[:-1, :]
        g[:-1, :] |= grown[1:, :]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        g[1:, 1:] |= grown[:-1, :-1]
        g[:-1, :-1] |= grown[1:, 1:]
        g[1:, :-1] |= grown[:-1, 1:]
        g[:-1, 1:] |= grown[1:, :-1]
        grown = g
    return grown & ~mask


def _sample_indices(
    centre: float, size: int, vox: float, fov_mm: float, px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel index of each display pixel along one axis, and whether it is inside."""
    offsets = (np.arange(px) + 0.5) * (fov_mm / px) - fov_mm / 2
    idx = np.floor(centre + offsets / vox + 0.5).astype(np.int64)
    valid = (idx >= 0) & (idx < size)
    return np.clip(idx, 0, size - 1), valid


def crop_planes(
    vol: np.ndarray,
    vox: np.ndarray,
    centre: np.ndarray,
    *,
    fov_mm: float = CROP_FOV_MM,
    px: int = CROP_PANEL_PX,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Axial, coronal and sagittal crops of a RAS array around `centre` (fractional indices).

    Returns the three display planes (rows top to bottom) and, for each, a boolean map of the
    pixels that fall inside the array. Nearest-neighbour sampling on a square grid of
    `fov_mm / px` mm, so every voxel keeps its true size in mm and no smoothing occurs.
    """
    shape = vol.shape[:3]
    idx, valid = zip(
        *(_sample_indices(centre[a], shape[a], vox[a], fov_mm, px) for a in range(3)), strict=True
    )
    c = [int(np.clip(np.floor(centre[a] + 0.5), 0, shape[a] - 1)) for a in range(3)]
    c_in = [0 <= np.floor(centre[a] + 0.5) < shape[a] for a in range(3)]
    planes, masks = [], []
    for axis in (2, 1, 0):  # axial, coronal, sagittal
        cols, rows = [a for a in range(3) if a != axis]
        sl: list = [None, None, None]
        sl[axis] = c[axis]
        sl[cols] = idx[cols][:, None]
        sl[rows] = idx[rows][None, :]
        plane = vol[tuple(sl)]  # (cols, rows)
        ok = valid[cols][:, None] & valid[rows][None, :] & c_in[axis]
        planes.append(plane.T[::-1])
        masks.append(ok.T[::-1])
    return planes, masks


def lesion_crop_png(
    vol: Volume,
    centre: np.ndarray,
    window: tuple[float, float],
    *,
    labels: np.ndarray | None = None,
    lesion_id: int | None = None,
    rejected: bool = False,
    fov_mm: float = CROP_FOV_MM,
    px: int = CROP_PANEL_PX,
) -> bytes:
    """A triplanar crop around one lesion (see the module docstring), as PNG bytes.

    `vol` is the image (RAS), `centre` the lesion's centre as fractional indices of `vol`,
    `labels` a RAS label map of the same grid (lesion `lesion_id` outlined in yellow, or orange
    when `rejected`; other labels in cyan), `fov_mm` the crop width in mm.
    """
    centre = np.asarray(centre, dtype=np.float64).ravel()
    vox = vol.vox
    planes, inside = crop_planes(vol.data, vox, centre, fov_mm=fov_mm, px=px)
    label_planes = (
        crop_planes(labels, vox, centre, fov_mm=fov_mm, px=px)[0] if labels is not None else None
    )
    gap = 3
    out = np.full((2 * px + gap, 3 * px + 2 * gap), GAP_COLOUR, dtype=np.uint8)
    half = px // 2
    tick = max(6, px // 12)
    for p, (plane, ok) in enumerate(zip(planes, inside, strict=True)):
        grey = _grey(plane, window)
        grey[~ok] = OUTSIDE_COLOUR
        outlined = grey.copy()
        if label_planes is not None:
            lab = label_planes[p]
            own = (lab == lesion_id) & ok if lesion_id is not None else np.zeros_like(ok)
            others = (lab > 0) & ~own & ok
            outlined[_ring(others, 1) & ~own] = OTHER_COLOUR
            outlined[_ring(own, 2)] = REJECTED_COLOUR if rejected else LESION_COLOUR
        for panel in (grey, outlined):
            for sl in (
                (slice(0, tick), slice(half - 1, half + 1)),
                (slice(px - tick, px), slice(half - 1, half + 1)),
                (slice(half - 1, half + 1), slice(0, tick)),
                (slice(half - 1, half + 1), slice(px - tick, px)),
            ):
                panel[sl] = TICK_COLOUR
        x0 = p * (px + gap)
        out[:px, x0 : x0 + px] = grey
        out[px + gap :, x0 : x0 + px] = outlined
    bar = int(round(SCALE_BAR_MM / (fov_mm / px)))
    out[px - 6 : px - 4, 4 : 4 + bar] = BAR_COLOUR
    return _png_paletted(out)


# ----------------------------------------------------------------------------------------
# Overlay mosaics (matplotlib)
# ----------------------------------------------------------------------------------------

_VIEW_NAMES = {2: "axial", 1: "coronal", 0: "sagittal"}
_MOSAIC_GAP_MM = 4.0
_MOSAIC_WIDTH_IN = 12.0


@dataclass
class _Row:
    """One row of a mosaic: several slices of one view side by side, NaN gaps between them."""

    axis: int
    indices: list[int]
    gap: int
    vox: np.ndarray
    plane_shape: tuple[int, int]

    def stack(self, vol: np.ndarray) -> np.ndarray:
        """The row's slices of `vol` (same grid as the background), as one float32 image."""
        parts = []
        for n, index in enumerate(self.indices):
            if n:
                parts.append(np.full((self.plane_shape[0], self.gap), np.nan, np.float32))
            parts.append(np.asarray(_plane(vol, self.axis, index), dtype=np.float32))
        return np.hstack(parts)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        cols, rows = [a for a in range(3) if a != self.axis]
        n = len(self.indices)
        width = (n * self.plane_shape[1] + (n - 1) * self.gap) * self.vox[cols]
        return (0.0, float(width), 0.0, float(self.plane_shape[0] * self.vox[rows]))

    def offset_mm(self, n: int) -> float:
        """Left edge (mm) of the row's `n`-th slice."""
        cols = [a for a in range(3) if a != self.axis][0]
        return n * (self.plane_shape[1] + self.gap) * float(self.vox[cols])


def _rows(vol: Volume, slices: list[list[int]]) -> list[_Row]:
    out = []
    for axis in (2, 1, 0):
        cols, rows = [a for a in range(3) if a != axis]
        gap = max(1, int(round(_MOSAIC_GAP_MM / vol.vox[cols])))
        shape = (vol.shape[rows], vol.shape[cols])
        out.append(_Row(axis, slices[axis], gap, vol.vox, shape))
    return out


def _mosaic(
    vol: Volume,
    window: tuple[float, float],
    slices: list[list[int]],
    draw,
    *,
    title: str,
    colorbar: str | None = None,
    legend: list[tuple[str, str]] | None = None,
) -> bytes:
    """Three rows (axial, coronal, sagittal) of slices; `draw(ax, row)` adds the overlay.

    One axes per row (the slices of a row are stacked into one image), so a mosaic costs
    3 axes, not 18. Each row keeps its physical aspect ratio.
    """
    rows = _rows(vol, slices)
    aspects = [(r.extent[3] / max(r.extent[1], 1e-6)) for r in rows]
    usable = _MOSAIC_WIDTH_IN * (0.9 if colorbar else 0.98)
    heights = [usable * a for a in aspects]
    title_in = 0.35
    fig = Figure(figsize=(_MOSAIC_WIDTH_IN, sum(heights) + title_in + 0.1), dpi=80)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    total = sum(heights) + title_in + 0.1
    fig.text(0.01, 1 - 0.05 / total, title, color="white", fontsize=10, va="top")
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="black")
    top = 1 - title_in / total
    mappable = None
    for row, h in zip(rows, heights, strict=True):
        bottom = top - h / total
        ax = fig.add_axes((0.01, bottom, usable / _MOSAIC_WIDTH_IN, h / total))
        ax.set_axis_off()
        ax.set_facecolor("black")
        ax.imshow(row.stack(vol.data), cmap=cmap, vmin=window[0], vmax=window[1],
                  extent=row.extent, interpolation="nearest", aspect="equal")  # fmt: skip
        mappable = draw(ax, row) or mappable
        ax.text(0.002, 0.98, _VIEW_NAMES[row.axis][0].upper(), color="white", fontsize=8,
                transform=ax.transAxes, va="top")  # fmt: skip
        top = bottom
    if colorbar and mappable is not None:
        cax = fig.add_axes((0.93, 0.12, 0.012, 0.7))
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label(colorbar, color="white", fontsize=8)
        cb.ax.tick_params(colors="white", labelsize=7)
    if legend:
        handles = [Patch(facecolor=colour, label=name) for name, colour in legend]
        fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8,
                   frameon=False, labelcolor="white")  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black")
    return buf.getvalue()


def _contour(ax, image: np.ndarray, extent, colour: str, level: float = 0.5, lw: float = 0.8):
    finite = image[np.isfinite(image)]
    if finite.size and finite.min() < level < finite.max():
        ax.contour(image[::-1], levels=[level], colors=[colour], linewidths=lw,
                   extent=extent, origin="lower")  # fmt: skip


def brain_mask_png(vol: Volume, mask: np.ndarray, window: tuple[float, float]) -> bytes:
    """The brain mask's outline (red) over the input, 18 slices."""
    mask_r = vol.like(mask)

    def draw(ax, row):
        _contour(ax, row.stack(mask_r), row.extent, "#ff3030", lw=1.0)

    n = int(np.count_nonzero(mask_r))
    volume = n * float(np.prod(vol.vox)) / 1000.0
    return _mosaic(
        vol, window, brain_slices(mask_r), draw, title=f"Brain mask (red): {volume:.0f} cm³"
    )


def bias_field_png(vol: Volume, bias: np.ndarray, mask: np.ndarray) -> bytes:
    """The estimated multiplicative bias field inside the brain mask, over the dimmed input."""
    mask_r = vol.like(mask) > 0
    bias_r = vol.like(bias)
    inside = bias_r[mask_r] if mask_r.any() else bias_r.ravel()
    lo, hi = (float(np.min(inside)), float(np.max(inside))) if inside.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-3
    window = display_window(vol.data, mask_r)

    def draw(ax, row):
        shown = np.where(row.stack(mask_r) > 0, row.stack(bias_r), np.nan)
        return ax.imshow(shown, cmap="magma", vmin=lo, vmax=hi, alpha=0.75, extent=row.extent,
                         interpolation="nearest")  # fmt: skip

    return _mosaic(
        vol,
        window,
        brain_slices(mask_r),
        draw,
        title=f"Bias field (N4), range {lo:.2f}-{hi:.2f} (max/min {hi / max(lo, 1e-6):.2f})",
        colorbar="multiplicative bias",
    )


def _template_slab(tx, template, vol: Volume, axis: int, index: int) -> np.ndarray:
    """One slice of a template image brought into the (RAS) native grid, linear."""
    import SimpleITK as sitk

    from ..anatomy.registration import nib_to_sitk

    shape = list(vol.shape)
    shape[axis] = 1
    shift = np.eye(4)
    shift[axis, 3] = index
    ref = nib_to_sitk(nib.Nifti1Image(np.zeros(shape, np.uint8), vol.affine @ shift))
    out = sitk.Resample(template, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def registration_png(
    vol: Volume, mask: np.ndarray, transform_path: str, window: tuple[float, float], report: dict
) -> bytes:
    """The template's brain outline (orange) and white-matter edge (cyan) over the input.

    The template (MNI152NLin2009cAsym T1w) is brought into the native grid through the saved
    native → template transform, only at the displayed slices. Cyan is the template's
    intensity contour half-way between its grey- and white-matter levels.
    """
    from ..anatomy import templates
    from ..anatomy.registration import load_transform, nib_to_sitk

    tx = load_transform(transform_path)
    name = str(report.get("Template") or templates.DEFAULT_TEMPLATE)
    t1 = templates.load_template(name, 1)
    t1_data = np.asanyarray(t1.dataobj)
    brain = t1_data[np.asanyarray(templates.template_mask(name, 1).dataobj) > 0]
    gm, wm = np.percentile(brain, [40, 85]) if brain.size else (0.4, 0.8)
    template = nib_to_sitk(t1)
    edge = 0.15 * float(wm)
    mask_r = vol.like(mask) > 0
    slices = brain_slices(mask_r)
    full = np.zeros(vol.shape, np.float32)
    for axis in range(3):
        for index in slices[axis]:
            sl: list = [slice(None)] * 3
            sl[axis] = slice(index, index + 1)
            full[tuple(sl)] = _template_slab(tx, template, vol, axis, index)

    def draw(ax, row):
        img = row.stack(full)
        _contour(ax, img, row.extent, "#ff9900", level=edge, lw=1.0)
        _contour(ax, img, row.extent, "#00d0ff", level=float(gm + wm) / 2, lw=0.7)

    status = "FLAGGED" if report.get("Flag") else "not flagged"
    return _mosaic(
        vol,
        window,
        slices,
        draw,
        title=f"Registration to {name} ({report.get('Stage', '?')}, {status}): "
        "template brain outline (orange) and white-matter edge (cyan)",
    )


def regions_png(
    vol: Volume,
    regions: np.ndarray,
    mask: np.ndarray,
    window: tuple[float, float],
    lesion_centres: np.ndarray | None = None,
) -> bytes:
    """The MARS map in the native grid, coloured by class, with the detected lesions (yellow)."""
    from ..anatomy.regions import MARS_CLASSES, label_class

    reg = vol.like(regions).astype(np.int64)
    lut = np.zeros(max(int(reg.max(initial=0)), 13) + 1, dtype=np.float32)
    for label in range(1, lut.size):
        cls = label_class(label)
        lut[label] = MARS_CLASSES.index(cls) + 1 if cls in MARS_CLASSES else 0
    classes = lut[np.clip(reg, 0, lut.size - 1)]
    cmap = ListedColormap([CLASS_COLOURS[c] for c in MARS_CLASSES])
    centres = np.zeros((0, 3)) if lesion_centres is None else np.atleast_2d(lesion_centres)

    def draw(ax, row):
        img = row.stack(classes)
        ax.imshow(np.where(img > 0, img, np.nan), cmap=cmap, vmin=0.5, vmax=3.5, alpha=0.35,
                  extent=row.extent, interpolation="nearest")  # fmt: skip
        cols, rows_ = [a for a in range(3) if a != row.axis]
        for n, index in enumerate(row.indices):
            near = np.abs(centres[:, row.axis] - index) * vol.vox[row.axis] <= 3.0
            if len(centres) and np.any(near):
                pts = centres[near]
                x = row.offset_mm(n) + (pts[:, cols] + 0.5) * vol.vox[cols]
                y = (pts[:, rows_] + 0.5) * vol.vox[rows_]
                ax.scatter(x, y, s=40, facecolors="none", edgecolors="#ffd800", linewidths=1.2)

    return _mosaic(
        vol,
        window,
        brain_slices(vol.like(mask) > 0),
        draw,
        title="MARS regions by class; detected lesions within 3 mm of a slice circled (yellow)",
        legend=[(c, CLASS_COLOURS[c]) for c in MARS_CLASSES],
    )


# ----------------------------------------------------------------------------------------
# All the figures of one image
# ----------------------------------------------------------------------------------------

MAX_REJECTED_SHOWN = 12
"""How many rejected candidates (the highest scores: the nearest misses) get a crop."""


@dataclass
class ImageFigures:
    """PNG bytes of one image's figures, and what could not be drawn."""

    overlays: dict[str, bytes]
    """`brainmask`, `bias`, `registration`, `regions` → PNG (those that could be drawn)."""
    lesions: dict[int, bytes]
    """lesion_id → triplanar crop."""
    rejected: list[tuple[int, bytes]]
    """(row of the rejected table, crop), strongest first, at most `MAX_REJECTED_SHOWN`."""
    warnings: list[str]


def score_column(table) -> str | None:
    """The column holding a rejected candidate's score (`probability` or `score`)."""
    for name in ("probability", "score", "student_score"):
        if name in table.columns:
            return name
    return None


def strongest_rejected(table, n: int = MAX_REJECTED_SHOWN) -> list[int]:
    """Row positions of the `n` rejected candidates with the highest scores (stable order)."""
    if table is None or len(table) == 0:
        return []
    col = score_column(table)
    if col is None:
        return list(range(min(n, len(table))))
    scores = np.nan_to_num(np.asarray(table[col], dtype=np.float64), nan=-1.0)
    return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]


def labels_from_mask(mask: np.ndarray, lesions) -> np.ndarray:
    """A label map numbered by the table's `lesion_id`, from a binary mask (26-connectivity).

    Each table row claims the component at its voxel (`i`, `j`, `k`), else the component whose
    centre is nearest; components no row claims keep label 0. Used when only the published
    binary mask is at hand (`--reports-only` without a work dir).
    """
    from scipy import ndimage as ndi

    comp, n = ndi.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool))
    out = np.zeros(comp.shape, dtype=np.int32)
    if n == 0 or lesions is None or len(lesions) == 0:
        return out
    centres = np.asarray(ndi.center_of_mass(comp > 0, comp, np.arange(1, n + 1)))
    lut = np.zeros(n + 1, dtype=np.int32)
    ijk = np.asarray(lesions[["i", "j", "k"]], dtype=np.int64)
    shape = np.asarray(comp.shape)
    for row, lesion_id in enumerate(np.asarray(lesions["lesion_id"], dtype=np.int64)):
        v = np.clip(ijk[row], 0, shape - 1)
        c = int(comp[v[0], v[1], v[2]])
        if c == 0:
            c = int(np.argmin(((centres - ijk[row]) ** 2).sum(axis=1))) + 1
        if lut[c] == 0:
            lut[c] = lesion_id
    return lut[comp]


def _centres(vol: Volume, table) -> np.ndarray:
    """Fractional RAS indices of each row's centre (from x, y, z mm; else from i, j, k)."""
    if len(table) == 0:
        return np.zeros((0, 3))
    if all(c in table.columns for c in ("x", "y", "z")):
        xyz = np.asarray(table[["x", "y", "z"]], dtype=np.float64)
        if np.all(np.isfinite(xyz)):
            return vol.index_of_mm(xyz)
    return vol.index_of_native(np.asarray(table[["i", "j", "k"]], dtype=np.float64))


def make_image_figures(
    image: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    lesions,
    *,
    labels: np.ndarray | None = None,
    rejected=None,
    candidates: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    regions: np.ndarray | None = None,
    transform_path: str | None = None,
    registration: dict | None = None,
    max_rejected: int = MAX_REJECTED_SHOWN,
) -> ImageFigures:
    """Draw every figure of one image; a figure that fails is reported, never raised.

    `image` is the preprocessed image and `mask` the brain mask (native grid, `affine`),
    `lesions` the lesion table (pandas), `labels` the lesion label map (else rebuilt from the
    final binary mask by `labels_from_mask`, pass that as `labels`), `rejected` the rejected
    candidates' table (or None), `candidates` a label map of every candidate numbered by the
    rejected table's `candidate_id` (else `lesion_id`) to outline them (optional), `bias` the bias field, `regions` the MARS map in the native
    grid, `transform_path` the native → template transform with its `registration` report.
    """
    vol = as_ras(np.asarray(image, dtype=np.float32), affine)
    mask = np.asarray(mask)
    window = display_window(vol.data, vol.like(mask))
    warnings: list[str] = []
    overlays: dict[str, bytes] = {}
    box = vol.cropped(mask)
    jobs = {"brainmask": lambda: brain_mask_png(box, mask, window)}
    if bias is not None:
        jobs["bias"] = lambda: bias_field_png(box, bias, mask)
    if transform_path is not None:
        jobs["registration"] = lambda: registration_png(
            box, mask, transform_path, window, registration or {}
        )
    centres = _centres(vol, lesions)
    if regions is not None:
        jobs["regions"] = lambda: regions_png(box, regions, mask, window, _centres(box, lesions))
    for name, job in jobs.items():
        try:
            overlays[name] = job()
        except Exception as err:  # a figure must never fail the image
            warnings.append(f"the {name} figure could not be drawn ({type(err).__name__}: {err})")

    lesion_pngs: dict[int, bytes] = {}
    labels_r = vol.like(labels) if labels is not None else None
    try:
        for lesion_id, centre in zip(
            np.asarray(lesions["lesion_id"], dtype=np.int64), centres, strict=True
        ):
            lesion_pngs[int(lesion_id)] = lesion_crop_png(
                vol, centre, window, labels=labels_r, lesion_id=int(lesion_id)
            )
    except Exception as err:
        warnings.append(f"the lesion crops could not be drawn ({type(err).__name__}: {err})")

    rejected_pngs: list[tuple[int, bytes]] = []
    if rejected is not None and len(rejected):
        try:
            rows = strongest_rejected(rejected, max_rejected)
            rcentres = _centres(vol, rejected.iloc[rows])
            id_col = next((c for c in ("candidate_id", "lesion_id") if c in rejected.columns), None)
            cand_r = vol.like(candidates) if candidates is not None and id_col else None
            for row, centre in zip(rows, rcentres, strict=True):
                if cand_r is not None:  # the candidate's own outline, in orange
                    cid = int(rejected[id_col].iloc[row])
                    png = lesion_crop_png(
                        vol, centre, window, labels=cand_r, lesion_id=cid, rejected=True
                    )
                else:  # its position only (ticks); detected lesions nearby in cyan
                    png = lesion_crop_png(vol, centre, window, labels=labels_r, rejected=True)
                rejected_pngs.append((row, png))
        except Exception as err:
            warnings.append(
                f"the rejected-candidate crops could not be drawn ({type(err).__name__}: {err})"
            )
    return ImageFigures(overlays, lesion_pngs, rejected_pngs, warnings)
