"""Shared pieces of the thin interfaces: saving arrays in a node's folder, and user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import CMBError

ERROR_TAG = "CMB-ERROR"
"""Prefix of the message a node raises for a user-fixable error; the runner finds it in crash files."""


class NodeError(RuntimeError):
    """Raised inside a node for a user-fixable problem; carries the one-line message."""


def user_error(err: CMBError) -> NodeError:
    return NodeError(f"{ERROR_TAG}[{err.exit_code}] {err.format()}")


def save_like(data: np.ndarray, affine: np.ndarray, name: str, dtype: Any = np.float32) -> str:
    """Save `data` in the node's working folder and return its absolute path.

    Intermediate files are written uncompressed (a `.nii.gz` name is saved as `.nii`): gzip
    cost about 0.5 s per write and 0.2 s per read of a 7.5-million-voxel image, about 15 % of
    a participant run (benchmarks/bench_pipeline.py). The derivatives stay compressed.
    """
    if name.endswith(".nii.gz"):
        name = name[: -len(".gz")]
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    path = Path(os.getcwd()) / name
    nib.save(img, str(path))
    return str(path)


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an intermediate file written by `save_like` (trusted: it was written by the app)."""
    img = nib.load(path, mmap=False)  # in memory: no array tied to a file of the work dir
    return np.asanyarray(img.dataobj), img.affine


def write_json(obj: Any, name: str) -> str:
    path = Path(os.getcwd()) / name
    path.write_text(json.dumps(obj, indent=2, default=_default))
    return str(path)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def set_threads(n: int) -> None:
    """Limit the threads of torch, SimpleITK and BLAS in this process."""
    n = max(1, int(n))
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:
        pass
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except Exception:
        pass
