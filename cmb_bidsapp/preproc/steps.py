"""The per-image preprocessing steps as the workflow calls them: checking and reading the input
(echo combination, phase, QSM units) and choosing how to get the brain mask."""

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


def _load_all(files: list[str]) -> list[nib.Nifti1Image]:
    return [load_nifti(f) for f in files]


def check_input(image) -> None:
    """Pre-flight: every file of an `InputImage` readable, 3D, consistent; raises `InputError`."""
    imgs = _load_all([str(f) for f in image.files])
    for img, f in zip(imgs[1:], image.files[1:]):
        _same_grid(imgs[0], img, str(f), str(image.files[0]))
    if image.kind == "megre" and len(image.echo_times) != len(image.files):
        raise InputError(
            "has echoes without EchoTime",
            path=image.files[0],
            fix="Add EchoTime (s) to every echo's sidecar.",
        )
    for f in image.phase_files:
        _same_grid(imgs[0], load_nifti(f), str(f), str(image.files[0]))
    data = np.asanyarray(imgs[0].dataobj)
    if not np.any(data):
        raise InputError("is all zeros", path=image.files[0], fix="Check the export of this image.")
    if np.ptp(data) == 0:
        raise InputError(
            "is a constant image", path=image.files[0], fix="Check the export of this image."
        )
    if min(s for s in imgs[0].shape[:3]) < 1:
        raise InputError(
            "has an empty dimension", path=image.files[0], fix="Check the export of this image."
        )


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
        phase_imgs = _load_all(phase_files)
        for img, f in zip(phase_imgs, phase_files):
            _same_grid(ref, img, f, files[0])
        if kind == "megre" and echo_times:
            idx = int(np.argmin([abs(te - PHASE_TE_TARGET_S) for te in echo_times]))
            mag_for_phase = np.asarray(imgs[idx].dataobj, dtype=np.float32)
        else:
            idx = 0
            mag_for_phase = image
        radians = phase_to_radians(np.asarray(phase_imgs[idx].dataobj, dtype=np.float32))
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
    return mask.astype(np.uint8), report
