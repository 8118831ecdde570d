"""Defensive image reading and atomic file writing: the one place that touches NIfTI bytes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _check_readable(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise InputError(
            "is a broken symbolic link (a DataLad/git-annex file whose content is not present)",
            path=path,
            fix="Fetch it first, e.g. `datalad get <file>`, or exclude it with --bids-filter-file.",
        )
    if not path.exists():
        raise InputError("does not exist", path=path, fix="Check the path.")
    if not os.access(path, os.R_OK):
        raise InputError(
            "cannot be read (permission denied)",
            path=path,
            fix="Make it readable (chmod a+r) by the user running the app.",
        )
    if path.stat().st_size == 0:
        raise InputError("is empty (0 bytes)", path=path, fix="Replace it with the complete file.")


def load_nifti(path: str | Path, *, allow_4d: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI file as float32 with its scaling applied, or raise a one-line InputError.

    Accepts `.nii` and `.nii.gz`, NIfTI-1 and NIfTI-2, int or float storage, any affine.
    Singleton trailing dimensions are dropped. A true 4D image is refused unless `allow_4d`.
    NaN and Inf voxels are set to 0. The sform is preferred, then the qform (as nibabel does).
    """
    path = Path(path)
    _check_readable(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(
            "is not a NIfTI file (.nii or .nii.gz)", path=path, fix="Convert it to NIfTI."
        )
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as err:
        raise InputError(
            f"is not a readable NIfTI image ({type(err).__name__}: {str(err).splitlines()[0][:80]})",
            path=path,
            fix="The file is truncated or corrupt: re-export or re-download it.",
        ) from None
    except nib.filebasedimages.ImageFileError:
        raise InputError(
            "is not a NIfTI image (wrong magic bytes)",
            path=path,
            fix="Re-export it as NIfTI (e.g. with dcm2niix).",
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError("is not a NIfTI image", path=path, fix="Re-export it as NIfTI.")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 and not (allow_4d and data.ndim == 4):
        raise InputError(
            f"has shape {data.shape}; a 3D image is expected",
            path=path,
            fix="Split the volumes (e.g. one file per echo) or select a 3D image with --bids-filter-file.",
        )
    affine = img.affine
    if (
        affine is None
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise InputError(
            "has a singular or non-finite affine (voxel-to-world matrix)",
            path=path,
            fix="Fix the header's sform/qform, e.g. re-convert with dcm2niix.",
        )
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    header = img.header.copy()
    out = nib.Nifti1Image(data, affine, header=None)
    out.header.set_xyzt_units(*header.get_xyzt_units())
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    return out


def voxel_sizes(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel sizes in mm, from the affine (not the pixdim field, which can disagree)."""
    return np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))


# ----------------------------------------------------------------------------------------
# Atomic writing: a file appears complete under its final name, or not at all.
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    The temporary name starts with '.' and ends with '.part', so that a crash leaves nothing
    that looks finished. Concurrent writers of the same file each rename a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    )


def json_default(obj: object) -> object:  # also used by bids.DerivativesWriter
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def nifti_bytes(img: nib.Nifti1Image, *, gzipped: bool) -> bytes:
    """The file bytes of an image; gzip with mtime 0, so the same image gives the same bytes."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gzipped else raw


def atomic_save_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image atomically, with reproducible bytes (gzip mtime fixed to 0)."""
    path = Path(path)
    return atomic_write_bytes(path, nifti_bytes(img, gzipped=str(path).endswith(".nii.gz")))


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
