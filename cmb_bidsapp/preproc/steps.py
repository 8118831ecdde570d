"""The per-image preprocessing steps as the workflow calls them: checking and reading the input
(echo combination, phase, QSM units) and choosing how to get the brain mask.

Pre-flight (`check_input`, run on every image before the workflow starts)
-----------------------------------------------------------------------
An image that cannot be processed fails alone, at once, with one line naming the file and the
fix; the other images are processed (exit 1 at the end). An image that is processed anyway but
that the user should know about gives a warning line. The choices:

- fails: unreadable, empty, truncated or corrupt files, wrong magic, broken symlinks and
  git-annex pointers (content not fetched), complex or RGB data, more than 2^29 voxels, a true
  4D image, fewer than 8 voxels along an axis (one slice), voxel sizes outside 0.3–7 mm,
  an all-zero or constant image, MEGRE echoes (or phase) on different grids or without
  `EchoTime`; at brain extraction: no brain (mask under 5 cm³, or only an implausible mask
  over 3000 cm³, as for pure noise).
- processed with a warning: voxel sizes between 0.3 and 0.4 mm or 5 and 7 mm (outside the
  validated 0.4–5 mm: detection not validated there), NaN/Inf voxels (isolated ones take the
  mean of their neighbours, a NaN background becomes 0), qform and sform that disagree (the
  sform is used), no orientation at all (codes 0: voxel sizes with an assumed orientation), a
  compression that disagrees with the file name.
- processed silently: any orientation, oblique or left-handed affines, int or float data with
  `scl_slope`/`scl_inter` applied, NIfTI-1 or NIfTI-2 in either byte order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..io import load_nifti, voxel_sizes

QSM_UNIT_SCALE = {"ppm": 1.0, "": 1.0, "ppb": 1e-3, "ppt": 1e-6}
"""Factors that bring a Chimap to ppm, by its sidecar's `Units`."""

PHASE_TE_TARGET_S = 0.020
"""For MEGRE, the echo nearest this echo time gives the high-pass phase (s)."""

MIN_BRAIN_CM3 = 5.0
"""A mask smaller than this (cm³) means no brain was found."""

MAX_BRAIN_CM3 = 3000.0
"""An implausible mask larger than this (cm³; brain and outer CSF are under about 2400) means no
brain was found either."""

VOXEL_RANGE_MM = (0.4, 5.0)
"""Voxel sizes (mm, every axis) the app is validated for: the contract's range."""

VOXEL_TOLERATED_MM = (0.3, 7.0)
"""Voxel sizes (mm) processed with a warning; outside, the image fails with a message."""

MIN_VOXELS_PER_AXIS = 8
"""Fewer voxels than this along any axis (one slice, a thin slab) cannot be processed in 3D."""


@dataclass
class InputData:
    """The input as arrays in its own grid."""

    image: np.ndarray
    affine: np.ndarray
    phase: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _same_grid(ref: nib.Nifti1Image, other: nib.Nifti1Image, path: str, ref_path: str) -> None:
    if other.shape != ref.shape:
        raise InputError(
            f"has shape {other.shape} but {Path(ref_path).name} has {ref.shape}",
            path=path,
            fix="All echoes (and phase images) of one acquisition must share one grid; re-export them together.",
        )
    if not np.allclose(other.affine, ref.affine, atol=1e-3):
        raise InputError(
            f"has a different affine from {Path(ref_path).name}",
            path=path,
            fix="All echoes (and phase images) of one acquisition must share one grid; re-export them together.",
        )


def _load_all(files: list[str], notes: list[str] | None = None) -> list[nib.Nifti1Image]:
    out = []
    for f in files:
        file_notes: list[str] = []
        out.append(load_nifti(f, notes=file_notes))
        if notes is not None:
            notes.extend(f"{f}: {n}" for n in file_notes)
    return out


def _header_only(path: str) -> nib.Nifti1Image:
    """The image with its header read and its data left on disk, for a grid check.

    Falls back to `load_nifti` (which reads the data, and names any problem of the file) when
    nibabel cannot read the header or the shape is not plainly 3D.
    """
    try:
        img = nib.load(path)
        if len(img.shape) == 3:
            return img
    except Exception:  # the defensive reader names the problem
        pass
    return load_nifti(path)


def check_geometry(img: nib.Nifti1Image, path: str | Path) -> list[str]:
    """Refuse a grid the app cannot process; return warnings for one it processes unvalidated.

    Voxel sizes (from the affine, mm) within `VOXEL_RANGE_MM` are the contract's range; within
    `VOXEL_TOLERATED_MM` the image is processed with a warning; outside, `InputError`. Every axis
    needs `MIN_VOXELS_PER_AXIS` voxels (a single slice, or a few, cannot be processed in 3D).
    """
    vs = voxel_sizes(img)
    shown = " × ".join(f"{v:.2g}" for v in vs)
    lo, hi = VOXEL_RANGE_MM
    tlo, thi = VOXEL_TOLERATED_MM
    if vs.min() < tlo or vs.max() > thi:
        raise InputError(
            f"has voxels of {shown} mm; the app supports {lo:g}–{hi:g} mm along every axis "
            f"(and tolerates {tlo:g}–{thi:g} mm with a warning)",
            path=path,
            fix=f"Resample it into that range (e.g. {max(lo, min(hi, float(np.median(vs)))):.1f} mm with "
            "`mri_convert -vs` or `flirt -applyisoxfm`), or check the header's voxel sizes.",
        )
    warnings = []
    if vs.min() < lo or vs.max() > hi:
        warnings.append(
            f"{path}: has voxels of {shown} mm, outside the validated {lo:g}–{hi:g} mm: it is "
            "processed, but detection was not validated there (microbleeds may be missed)"
        )
    if min(img.shape[:3]) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            f"has shape {tuple(img.shape[:3])}: fewer than {MIN_VOXELS_PER_AXIS} voxels along an "
            "axis (a single slice or a thin slab) cannot be processed in 3D",
            path=path,
            fix="Give the whole 3D volume (all slices in one file).",
        )
    return warnings


def check_input(image) -> list[str]:
    """Pre-flight of an `InputImage`: every file read, grids checked; warnings returned.

    Raises `InputError` (one line, with the file and the fix) when the image cannot be processed:
    unreadable or corrupt files, not 3D, voxel sizes outside the tolerated range, too few slices,
    MEGRE echoes on different grids or without EchoTime, an all-zero or constant image. Returns
    one line per thing the user should know about an image that is processed anyway (NaN voxels
    set to 0, qform/sform disagreement, unvalidated voxel sizes, a misnamed compression).

    A T1w that cannot be read is optional help (registration): it is dropped from the image
    (`image.t1w = None`) with a warning, and the image is processed without it.
    """
    notes: list[str] = []
    if getattr(image, "t1w", None) is not None:
        try:
            _load_all([str(image.t1w)])
        except InputError as err:
            notes.append(f"{err.format()} This T1w is not used; registration uses the image alone.")
            image.t1w = None
    imgs = _load_all([str(f) for f in image.files], notes)
    notes.extend(check_geometry(imgs[0], image.files[0]))
    for img, f in zip(imgs[1:], image.files[1:]):
        _same_grid(imgs[0], img, str(f), str(image.files[0]))
    if image.kind == "megre" and len(image.echo_times) != len(image.files):
        raise InputError(
            "has echoes without EchoTime",
            path=image.files[0],
            fix="Add EchoTime (s) to every echo's sidecar.",
        )
    for f in image.phase_files:
        _same_grid(imgs[0], _load_all([str(f)], notes)[0], str(f), str(image.files[0]))
    data = np.asanyarray(imgs[0].dataobj)
    if not np.any(data):
        raise InputError(
            "is all zeros" + (" (after its NaN/Inf voxels were set to 0)" if notes else ""),
            path=image.files[0],
            fix="Check the export of this image.",
        )
    if np.ptp(data) == 0:
        raise InputError(
            f"is a constant image (every voxel is {float(data.flat[0]):g})",
            path=image.files[0],
            fix="Check the export of this image.",
        )
    return notes


def read_input(
    files: list[str],
    *,
    kind: str,
    phase_files: list[str] | None = None,
    echo_times: list[float] | None = None,
    units: str = "",
) -> InputData:
    """Read the image(s) of one input as float32 in the source grid.

    MEGRE: magnitudes combined by `preproc.echoes.combine_echoes`. QSM: converted to ppm.
    Phase (MEGRE part-phase, or an SWI phase image): scaled to radians and high-pass filtered.
    """
    from ..detect.frst import thick_slice_axis
    from .echoes import combine_echoes, highpass_phase, phase_to_radians

    imgs = _load_all(files)
    for img, f in zip(imgs[1:], files[1:]):
        _same_grid(imgs[0], img, f, files[0])
    ref = imgs[0]
    echo_times = list(echo_times or [])
    if kind == "megre":
        if len(echo_times) != len(imgs):
            raise InputError(
                f"has {len(imgs)} echoes but {len(echo_times)} EchoTime values",
                path=files[0],
                fix="Add EchoTime (s) to every echo's sidecar.",
            )
        mags = [np.asarray(i.dataobj, dtype=np.float32) for i in imgs]
        image = combine_echoes(mags, echo_times) if len(mags) > 1 else mags[0]
    else:
        image = np.asarray(ref.dataobj, dtype=np.float32)
    if kind == "qsm":
        scale = QSM_UNIT_SCALE.get(units.strip().lower())
        if scale is None:
            raise InputError(
                f"has Units {units!r}; ppm, ppb or ppt are understood",
                path=files[0],
                fix='Set "Units": "ppm" in the Chimap\'s sidecar if the values are in ppm.',
            )
        image = image * np.float32(scale)
    else:
        image = np.maximum(image, 0)  # magnitudes are non-negative; negative values are artefacts

    phase = None
    if phase_files:
        if kind == "megre" and echo_times:
            idx = int(np.argmin([abs(te - PHASE_TE_TARGET_S) for te in echo_times]))
            mag_for_phase = np.asarray(imgs[idx].dataobj, dtype=np.float32)
        else:
            idx = 0
            mag_for_phase = image
        # Only the phase echo used is read; the others' grids are checked from their headers.
        phase_img = _load_all([phase_files[idx]])[0]
        for f in phase_files:
            _same_grid(ref, _header_only(f), f, files[0])
        radians = phase_to_radians(np.asarray(phase_img.dataobj, dtype=np.float32))
        vs_ref = voxel_sizes(ref)
        phase = highpass_phase(mag_for_phase, radians, vs_ref, slice_axis=thick_slice_axis(vs_ref))

    vs = voxel_sizes(ref)
    info = {
        "kind": kind,
        "shape": list(ref.shape),
        "voxel_sizes_mm": [round(float(v), 4) for v in vs],
        "orientation": "".join(nib.aff2axcodes(ref.affine)),
        "oblique": bool(nib.affines.obliquity(ref.affine).max() > 1e-3),
        "thick_slices": bool(vs.max() > 1.6 * vs.min()),
        "n_echoes": len(imgs),
        "echo_times_s": echo_times,
        "has_phase": phase is not None,
        "stored_dtype": str(ref.get_data_dtype()) if hasattr(ref, "get_data_dtype") else "float32",
    }
    return InputData(
        image=image.astype(np.float32, copy=False), affine=ref.affine, phase=phase, info=info
    )


def brain_mask(
    data: np.ndarray, affine: np.ndarray, *, kind: str, mode: str = "auto", threads: int = 1
) -> tuple[np.ndarray, dict[str, Any]]:
    """The brain mask for `--skull-strip {auto,force,skip}`, and a report of what was done.

    `auto`: deepbet when the image has a skull, otherwise the image's non-zero support.
    QSM maps are brain-masked by their reconstruction: their support is used unless `force`.
    """
    from .brain import extract_brain_with_info, has_skull, mask_from_nonzero

    report: dict[str, Any] = {"mode": mode, "warnings": []}
    if mode == "skip":
        mask = mask_from_nonzero(data)
        if mask.all() or not mask.any():
            mask = np.ones(data.shape, dtype=bool)
            report["warnings"].append(
                "brain extraction skipped and the image has no zero background: the whole field of view is used"
            )
        report.update(method="non-zero support (skip)", skull_detected=None)
    else:
        skull = (
            True if mode == "force" else (False if kind == "qsm" else bool(has_skull(data, affine)))
        )
        report["skull_detected"] = skull
        if skull:
            mask, info = extract_brain_with_info(data, affine, threads=threads)
            report.update({k: v for k, v in info.items() if k not in report})
            report["method"] = info.get("method", "deepbet")
        else:
            mask = mask_from_nonzero(data)
            report["method"] = "non-zero support (already brain-extracted)"
    mask = np.asarray(mask) > 0
    volume_cm3 = float(mask.sum() * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)
    report["volume_cm3"] = round(volume_cm3, 1)
    if volume_cm3 < MIN_BRAIN_CM3:
        raise InputError(
            f"no brain was found (mask volume {volume_cm3:.1f} cm³)",
            path=None,
            fix="Check that the image shows a head; try --skull-strip skip for a pre-masked or cropped image.",
        )
    if report.get("warning") and volume_cm3 > MAX_BRAIN_CM3 and mode != "skip":
        # Both deepbet and the fallback failed, and what is left is larger than any brain:
        # processing it would report microbleeds in noise or background.
        raise InputError(
            f"no brain was found: the only mask found is {volume_cm3:.0f} cm³, larger than any "
            "brain (is the image noise, or not a head?)",
            path=None,
            fix="Check the image; for an image without background use --skull-strip skip.",
        )
    if report.get("warning"):
        report["warnings"].append(f"implausible brain mask: {report['warning']}")
    return mask.astype(np.uint8), report
