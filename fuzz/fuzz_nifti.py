"""Atheris (libFuzzer) fuzzer of `cmb_bidsapp.io.load_nifti`; run for minutes, outside CI.

Property: any bytes, named `.nii` or `.nii.gz`, gzip-compressed or not, give a 3D float32 image
with finite voxels and a finite, invertible affine, or an `InputError` with a one-line message.
Anything else (another exception, a hang past -timeout, memory past -rss_limit_mb) is a finding.

    pip install atheris
    python fuzz/fuzz_nifti.py fuzz/corpus-nifti -max_total_time=600 -timeout=10 \\
        -rss_limit_mb=3000

The seed corpus (small valid NIfTI-1/NIfTI-2 images of several data types, byte orders and
scalings) is written to the corpus folder on the first run.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
from pathlib import Path

# Only the app and nibabel are instrumented: the big libraries imported first stay plain (fast start).
import atheris
import numpy as np

with atheris.instrument_imports(include=["cmb_bidsapp", "nibabel"]):
    import nibabel as nib

    from cmb_bidsapp.errors import InputError
    from cmb_bidsapp.io import load_nifti

WORK = Path(tempfile.mkdtemp(prefix="fuzz-nifti-"))


def write_seeds(folder: Path) -> None:
    """Small valid images: the fuzzer starts from real headers."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    aff = np.array([[-1.5, 0.1, 0, 40], [0, 1.5, 0, -50], [0, 0, 3.0, -20], [0, 0, 0, 1]])
    data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) % 37).astype(np.float32)
    seeds = {}
    for dtype in (np.int16, np.uint8, np.float32, np.float64, np.int32):
        img = nib.Nifti1Image(data.astype(dtype), aff)
        if np.dtype(dtype).kind in "iu":
            img.header.set_slope_inter(0.25, 3.0)
        seeds[f"n1-{np.dtype(dtype).name}"] = img.to_bytes()
    be = nib.Nifti1Image(data, aff, header=nib.Nifti1Header().as_byteswapped(">"))
    seeds["n1-big-endian"] = be.to_bytes()
    seeds["n2-float32"] = nib.Nifti2Image(data, aff).to_bytes()
    seeds["n1-4d"] = nib.Nifti1Image(np.stack([data] * 2, -1), aff).to_bytes()
    for name, raw in seeds.items():
        # first byte: flags read by TestOneInput (bit 0: gzip, bit 1: name .nii.gz)
        (folder / name).write_bytes(bytes([0]) + raw)
        (folder / f"{name}-gz").write_bytes(bytes([3]) + raw)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flags, content = data[0], data[1:]
    name = "x.nii.gz" if flags & 2 else "x.nii"
    path = WORK / name
    path.write_bytes(gzip.compress(content, mtime=0) if flags & 1 else content)
    try:
        img = load_nifti(path)
    except InputError as err:
        if "\n" in err.format():
            raise AssertionError(f"message on several lines: {err.format()!r}") from None
        return
    arr = np.asarray(img.dataobj)
    if arr.ndim != 3 or arr.dtype != np.float32 or not np.isfinite(arr).all():
        raise AssertionError(f"bad image: shape {arr.shape}, dtype {arr.dtype}")
    aff = img.affine
    if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) == 0:
        raise AssertionError(f"bad affine {aff}")


def main() -> None:
    corpus = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus:
        write_seeds(Path(corpus))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
