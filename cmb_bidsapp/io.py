"""Defensive image reading and atomic file writing: the one place that touches NIfTI bytes."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import re
import socket
import stat
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

MAX_VOXELS = 2**29
"""Largest image accepted, in voxels (2 GiB as float32); a larger header is corrupt or needs a crop."""

FLOAT32_MAX = float(np.finfo(np.float32).max)

MAX_AFFINE_MM = 1e6
"""An affine with an entry beyond this (mm: a kilometre) is corrupt."""

QFORM_SFORM_TOLERANCE_MM = 0.1
"""qform and sform that place a corner of the grid further apart than this (mm) are reported."""

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"
_NIFTI1_PAIR_MAGIC = b"ni1\x00"
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
_ANNEX_POINTER = b"/annex/objects/"

# The fixes of the read errors, said once.
_FIX_CORRUPT = "Replace it: re-export it (e.g. with dcm2niix) or re-download it."
_FIX_FETCH = "Fetch it first, e.g. `datalad get <file>`, or exclude it with --bids-filter-file."


def _check_readable(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise InputError(
            "is a broken symbolic link (a DataLad/git-annex file whose content is not present)",
            path=path,
            fix=_FIX_FETCH,
        )
    if not path.exists():
        raise InputError("does not exist", path=path, fix="Check the path.")
    try:
        st = path.stat()
    except OSError as err:
        raise InputError(
            f"cannot be read ({err.strerror})",
            path=path,
            fix="Make it and its folders readable (chmod a+rX) by the user running the app.",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or device)"
        raise InputError(f"is {what}", path=path, fix="Replace it with the NIfTI file itself.")
    if not os.access(path, os.R_OK):
        raise InputError(
            "cannot be read (permission denied)",
            path=path,
            fix="Make it readable (chmod a+r) by the user running the app.",
        )
    if st.st_size == 0:
        raise InputError("is empty (0 bytes)", path=path, fix="Replace it with the complete file.")


def _read_start(path: Path, n: int = 540) -> tuple[bool, bytes]:
    """(gzip-compressed?, the first `n` bytes of the uncompressed content)."""
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
            if not gzipped:
                return False, fh.read(n)
            with gzip.GzipFile(fileobj=fh) as gz:
                return True, gz.read(n)
    except PermissionError:
        raise InputError(
            "cannot be read (permission denied)",
            path=path,
            fix="Make it readable (chmod a+r) by the user running the app.",
        ) from None
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        raise InputError(
            f"is not a readable gzip file ({type(err).__name__})", path=path, fix=_FIX_CORRUPT
        ) from None


def _header_class(path: Path, head: bytes) -> type[nib.Nifti1Image] | type[nib.Nifti2Image]:
    """The NIfTI class of the first bytes `head`, or a one-line InputError saying what they are."""
    if head.startswith(_ANNEX_POINTER):
        raise InputError(
            "is a git-annex pointer file (a DataLad file whose content is not present)",
            path=path,
            fix=_FIX_FETCH,
        )
    if len(head) >= 12 and head[4:12] == _NIFTI2_MAGIC:
        if 540 not in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            raise InputError(
                "has a corrupt NIfTI-2 header (sizeof_hdr is not 540)", path=path, fix=_FIX_CORRUPT
            )
        if len(head) < 540:
            raise InputError(
                f"is too short for a NIfTI-2 header ({len(head)} bytes)",
                path=path,
                fix=_FIX_CORRUPT,
            )
        return nib.Nifti2Image
    if len(head) >= 348 and head[344:348] == _NIFTI1_MAGIC:
        if 348 not in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            # nibabel would guess the byte order from this field and read garbage
            raise InputError(
                "has a corrupt NIfTI-1 header (sizeof_hdr is not 348)", path=path, fix=_FIX_CORRUPT
            )
        return nib.Nifti1Image
    if len(head) >= 348 and head[344:348] == _NIFTI1_PAIR_MAGIC:
        raise InputError(
            "is the header of a NIfTI .hdr/.img pair, not a single-file NIfTI",
            path=path,
            fix="Convert the pair to one .nii.gz file (e.g. `fslchfiletype NIFTI_GZ` or nibabel).",
        )
    if len(head) < 348:
        raise InputError(
            f"is too short for a NIfTI header ({len(head)} bytes)", path=path, fix=_FIX_CORRUPT
        )
    raise InputError(
        "is not a NIfTI image (wrong magic bytes)",
        path=path,
        fix="Re-export it as NIfTI (e.g. with dcm2niix).",
    )


def _load_proxy(path: Path, klass, gzipped: bool, notes: list[str]):
    """The nibabel image (data not yet read), tolerating a compression that disagrees with the name."""
    named_gz = path.name.endswith(".gz")
    if gzipped == named_gz:
        return klass.from_filename(str(path))
    notes.append(
        "is gzip-compressed although its name ends in .nii; it was read anyway"
        if gzipped
        else "is not gzip-compressed although its name ends in .nii.gz; it was read anyway"
    )
    raw = path.read_bytes()
    return klass.from_bytes(gzip.decompress(raw) if gzipped else raw)


def _affine_problem(affine: np.ndarray | None) -> str | None:
    if affine is None or not np.all(np.isfinite(affine)):
        return "non-finite"
    if np.abs(affine).max() > MAX_AFFINE_MM:
        return "implausible"
    if abs(np.linalg.det(np.asarray(affine)[:3, :3])) < 1e-12:
        return "singular"
    return None


def _corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the positions two affines give the corners of the grid."""
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape[:3]], indexing="ij"))
    ijk = np.vstack([corners.reshape(3, -1), np.ones((1, corners[0].size))])
    return float(np.abs((np.asarray(a) - np.asarray(b)) @ ijk)[:3].max())


def _choose_affine(img, shape: tuple[int, ...], path: Path, notes: list[str]) -> np.ndarray:
    """The voxel-to-world matrix nibabel would use (sform, then qform), checked, with notes."""
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sform = hdr.get_sform() if scode > 0 else None
        try:
            qform = hdr.get_qform() if qcode > 0 else None
        except Exception:  # a corrupt quaternion
            qform = None
        fallback = hdr.get_base_affine()
    if sform is not None and _affine_problem(sform) is None:
        if qform is not None and _affine_problem(qform) is None:
            moved = _corner_distance_mm(sform, qform, shape)
            if moved > QFORM_SFORM_TOLERANCE_MM:
                notes.append(
                    f"has a qform and an sform that disagree by up to {moved:.1f} mm; the sform "
                    "was used (as nibabel, FSL and fMRIPrep do): check the orientation in the report"
                )
        return sform
    if qform is not None and _affine_problem(qform) is None:
        if sform is not None:
            notes.append(f"has a {_affine_problem(sform)} sform; the qform was used instead")
        return qform
    if sform is None and qform is None and _affine_problem(fallback) is None:
        notes.append(
            "has no orientation (qform_code and sform_code are 0): the voxel sizes were used "
            "with an assumed orientation, so left and right may be swapped in the lesion table"
        )
        return fallback
    raise InputError(
        "has a singular, non-finite or implausible affine (voxel-to-world matrix)",
        path=path,
        fix="Fix the header's sform/qform, e.g. re-convert with dcm2niix.",
    )


def load_nifti(
    path: str | Path, *, allow_4d: bool = False, notes: list[str] | None = None
) -> nib.Nifti1Image:
    """Load a NIfTI file as float32 with its scaling applied, or raise a one-line InputError.

    Accepts `.nii` and `.nii.gz` (also when the compression disagrees with the name), NIfTI-1 and
    NIfTI-2, either byte order, int or float storage, any affine. Singleton trailing dimensions
    are dropped and a 2D image becomes one slice. A true 4D image is refused unless `allow_4d`.
    The sform is used, then the qform, then the voxel sizes alone (as nibabel does). Isolated
    NaN and Inf voxels take the mean of their neighbours, the others (a NaN background) 0.
    Anything the user should know (qform/sform disagreement, no orientation, non-finite voxels,
    a misnamed compression) is appended to `notes`, one sentence each, without the path.

    Any other problem of the file raises `InputError`, never anything else: the file is checked
    before nibabel reads it (regular file, size, gzip and NIfTI magic, header size), and an image
    over `MAX_VOXELS` voxels or with complex or RGB data is refused before its data is read.
    """
    path = Path(path)
    notes = notes if notes is not None else []
    _check_readable(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(
            "is not a NIfTI file (.nii or .nii.gz)", path=path, fix="Convert it to NIfTI."
        )
    gzipped, head = _read_start(path)
    klass = _header_class(path, head)
    try:
        with _quiet_nibabel():
            img = _load_proxy(path, klass, gzipped, notes)
            shape = tuple(int(n) for n in img.shape)
            dtype = img.get_data_dtype()
    except InputError:
        raise
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise InputError(
            f"has a corrupt NIfTI header ({type(err).__name__}: {_first_line(err)})",
            path=path,
            fix=_FIX_CORRUPT,
        ) from None
    if not shape or min(shape) < 1:
        raise InputError(f"has an empty dimension (shape {shape})", path=path, fix=_FIX_CORRUPT)
    n_voxels = int(np.prod(shape, dtype=np.float64))
    if n_voxels > MAX_VOXELS:
        raise InputError(
            f"has {n_voxels:.3g} voxels (shape {shape}), more than the {MAX_VOXELS:.3g} the app "
            "reads",
            path=path,
            fix="Crop or resample it (the header may also be corrupt).",
        )
    if dtype.fields is not None or dtype.kind not in "biuf":
        what = "complex" if dtype.kind == "c" else "RGB" if dtype.fields else str(dtype)
        raise InputError(
            f"has {what} voxel values; a real-valued image is expected",
            path=path,
            fix="Export the magnitude (or the QSM map) as a real-valued image.",
        )
    # A header may promise more data than the file can hold: refuse before allocating it.
    # Deflate expands at most about 1032 times, which bounds a gzip file's content.
    on_disk = path.stat().st_size
    promised = int(img.header.get_data_offset()) + n_voxels * dtype.itemsize
    if promised > (on_disk * 1032 + 1024 if gzipped else on_disk):
        raise InputError(
            f"is truncated ({on_disk} bytes on disk for {promised} bytes of header and data)",
            path=path,
            fix=_FIX_CORRUPT,
        )
    try:
        with _quiet_nibabel(), np.errstate(all="ignore"):
            data = np.asanyarray(img.dataobj, dtype=np.float32)
        if isinstance(data, np.memmap) or not data.flags.writeable:
            data = np.array(data)  # in memory, never a map of the user's (uncompressed) file
    except PermissionError:
        raise InputError(
            "cannot be read (permission denied)",
            path=path,
            fix="Make it readable (chmod a+r) by the user running the app.",
        ) from None
    except MemoryError:
        raise InputError(
            f"does not fit in memory (shape {shape})",
            path=path,
            fix="Give the job more memory, or crop the image.",
        ) from None
    except Exception as err:  # truncated data: EOFError, zlib.error, OSError, ...
        raise InputError(_data_error(err), path=path, fix=_FIX_CORRUPT) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 and not (allow_4d and data.ndim == 4):
        raise InputError(
            f"has shape {data.shape}; a 3D image is expected",
            path=path,
            fix="Split the volumes (e.g. one file per echo) or select a 3D image with "
            "--bids-filter-file.",
        )
    affine = _choose_affine(img, data.shape, path, notes)
    finite = np.isfinite(data)
    if not finite.all():
        filled = _fill_non_finite(data, finite)
        notes.append(
            f"has {int(data.size - finite.sum())} NaN or infinite voxels; {filled} isolated ones "
            "were filled with the mean of their neighbours, the others set to 0"
        )
    out = nib.Nifti1Image(data, affine, header=None)
    with contextlib.suppress(Exception):
        out.header.set_xyzt_units(*img.header.get_xyzt_units())
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    return out


def _fill_non_finite(data: np.ndarray, finite: np.ndarray) -> int:
    """Replace NaN/Inf voxels in place; return how many were filled from their neighbours.

    A non-finite voxel with at least half of its 3×3×3 neighbourhood finite (an isolated bad
    voxel) takes the mean of those finite neighbours; the others (a NaN background, as QSM maps
    often have) become 0. Zeros inside the brain would look like dark microbleeds.
    """
    from scipy import ndimage as ndi

    size = (3, 3, 3) + (1,) * (data.ndim - 3)
    n_box = float(np.prod(size))
    values = np.where(finite, data, 0).astype(np.float64)  # float64: no overflow near 3e38
    total = ndi.uniform_filter(values, size, mode="constant") * n_box
    count = np.rint(ndi.uniform_filter(finite.astype(np.float64), size, mode="constant") * n_box)
    bad = ~finite
    isolated = bad & (count >= n_box / 2)
    data[bad] = 0.0
    data[isolated] = np.clip(total[isolated] / count[isolated], -FLOAT32_MAX, FLOAT32_MAX)
    return int(isolated.sum())


def _data_error(err: BaseException) -> str:
    """What went wrong reading the voxel data, in a few words."""
    short = re.search(r"Expected (\d+) bytes, got (\d+) bytes", str(err))
    if short:
        return f"is truncated ({int(short.group(2))} of {int(short.group(1))} bytes of image data)"
    if isinstance(err, EOFError):
        return "is truncated (the gzip stream ends early)"
    if isinstance(err, zlib.error | gzip.BadGzipFile):
        return f"is a corrupt gzip file ({_first_line(err)})"
    return f"is not a readable NIfTI image ({type(err).__name__}: {_first_line(err)})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else "no detail")[:100]


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs and warns about the headers it fixes; the app reports its own notes."""
    logger = logging.getLogger("nibabel")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def voxel_sizes(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel sizes in mm, from the affine (not the pixdim field, which can disagree)."""
    return np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))


# ----------------------------------------------------------------------------------------
# Atomic writing: a file appears complete under its final name, or not at all.
# ----------------------------------------------------------------------------------------


_PART_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)@(?P<ns>\d+)@(?P<pid>\d+)\.[^./]+\.part$")
STALE_PART_AGE_S = 3600.0
"""A `.part` file of another machine older than this (s) is left over from a killed job."""


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_namespace() -> int:
    try:
        return int(re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or 0)
    except OSError:
        return 0


def part_file(path: str | Path) -> tuple[int, Path]:
    """Create the temporary file of a write of `path`, beside it: (open fd, its path).

    The name is hidden and says who writes it, `.<name>.<host>@<pid-namespace>@<pid>.<random>.part`,
    so that `remove_stale_parts` can tell the leftovers of a killed job from a write in flight.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{_host()}@{_pid_namespace()}@{os.getpid()}"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner}.", suffix=".part", dir=path.parent)
    return fd, Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_parts(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Delete the `.part` files that killed jobs left under `root`; return them.

    A `.part` file is stale when its writer (named in the file name) ran on this machine, in
    this PID namespace, and is no longer running, or when it is older than `STALE_PART_AGE_S`
    (a writer on another cluster node). Writes in flight of concurrent jobs are kept.
    """
    removed = []
    now = time.time()
    here = (_host(), _pid_namespace())
    root = Path(root)
    for part in root.rglob(".*.part") if recursive else root.glob(".*.part"):
        m = _PART_RE.match(part.name)
        try:
            if m and (m["host"], int(m["ns"])) == here:
                stale = int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))
            else:
                stale = now - part.stat().st_mtime > STALE_PART_AGE_S
            if stale:
                part.unlink()
                removed.append(part)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    The temporary name starts with '.' and ends with '.part' (see `part_file`), so that a crash
    leaves nothing that looks finished. Concurrent writers of the same file each rename a
    complete file.
    """
    path = Path(path)
    fd, tmp_path = part_file(path)
    os.close(fd)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, 0o644)
        except OSError as err:  # a full disk: name the file, not its hidden temporary file
            if err.filename not in (None, str(tmp_path)):
                raise
            raise OSError(err.errno, err.strerror, str(path)) from None
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
