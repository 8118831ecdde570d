"""Hand-made BIDS datasets for tests of input discovery and the command line (no simulation)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def write_image(
    path: Path, shape=(12, 12, 8), value: float | None = None, affine=None, dtype=np.float32
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    data = (
        rng.random(shape).astype(dtype) * 100 + 1
        if value is None
        else np.full(shape, value, dtype=dtype)
    )
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def make_dataset(root: Path, files: dict[str, dict | None]) -> Path:
    """`files` maps relative NIfTI paths to their sidecar (None: no sidecar)."""
    write_json(
        root / "dataset_description.json",
        {"Name": "test", "BIDSVersion": "1.10.0", "DatasetType": "raw"},
    )
    subjects = sorted({p.split("/")[0] for p in files})
    (root / "participants.tsv").write_text("participant_id\n" + "\n".join(subjects) + "\n")
    for rel, sidecar in files.items():
        write_image(root / rel)
        if sidecar is not None:
            write_json(root / rel.replace(".nii.gz", ".json").replace(".nii", ".json"), sidecar)
    return root


GRE = {"EchoTime": 0.02, "RepetitionTime": 0.03, "FlipAngle": 15, "MagneticFieldStrength": 3}
