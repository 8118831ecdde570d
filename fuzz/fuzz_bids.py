"""Atheris (libFuzzer) fuzzer of the BIDS-reading layer; run for minutes, outside CI.

Each input is decoded into a small dataset: file names (entities in any order, odd labels, any
suffix and extension), sidecar contents (any bytes or JSON), a filter file and an input kind.
Property: `load_filters` returns a mapping or raises `UsageError`; `collect_inputs` returns
well-formed inputs (kinds known, MEGRE echo times one positive float per echo, node-safe ids)
or raises a `CMBError` with a one-line message. Anything else is a finding.

    pip install atheris
    python fuzz/fuzz_bids.py fuzz/corpus-bids -max_total_time=600 -timeout=30
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

# Only the app and pybids are instrumented: the big libraries imported first stay plain (fast start).
import atheris
import nibabel as nib
import numpy as np
import pandas  # noqa: F401

with atheris.instrument_imports(include=["cmb_bidsapp", "bids"]):
    from cmb_bidsapp.bids import INPUT_KINDS, collect_inputs, load_filters
    from cmb_bidsapp.errors import CMBError

IMAGE = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes()
SUFFIXES = ["T2starw", "swi", "MEGRE", "Chimap", "T1w", "bold", "x", ""]
KEYS = ["ses", "acq", "run", "echo", "part", "rec", "desc", "x"]
EXTS = [".nii.gz", ".nii", ".json", ".tsv", "", ".json.json"]
FOLDERS = ["anat", "func", "", "anat/x"]


def _label(fdp) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 5)).replace("/", "")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    root = Path(tempfile.mkdtemp(prefix="fuzz-bids-"))
    try:
        (root / "dataset_description.json").write_text('{"Name": "f", "BIDSVersion": "1.10.0"}')
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            sub = _label(fdp) or "01"
            parts = [f"sub-{sub}"]
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                parts.append(f"{fdp.PickValueInList(KEYS)}-{_label(fdp)}")
            parts.append(fdp.PickValueInList(SUFFIXES))
            name = "_".join(p for p in parts if p) + fdp.PickValueInList(EXTS)
            folder = root / f"sub-{sub}" / fdp.PickValueInList(FOLDERS)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / name
                if ".nii" in name and not name.endswith(".json"):
                    path.write_bytes(IMAGE if fdp.ConsumeBool() else fdp.ConsumeBytes(40))
                else:
                    path.write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))
            except (OSError, ValueError):
                continue  # a name the file system refuses is not the app's business
        filt = root.parent / f"{root.name}-filters.json"
        filt.write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))
        try:
            filters = load_filters(filt)
            if not isinstance(filters, dict):
                raise AssertionError("filters not a mapping")
        except CMBError as err:
            if err.exit_code != 64:
                raise AssertionError(f"filter file: exit {err.exit_code}") from None
            filters = {}
        kind = fdp.PickValueInList(["auto", *INPUT_KINDS])
        try:
            inputs, _ = collect_inputs(root, input_kind=kind, filters=filters)
        except CMBError as err:
            if "\n" in err.format():
                raise AssertionError(f"message on several lines: {err.format()!r}") from None
            return
        for image in inputs:
            if image.kind not in INPUT_KINDS or not image.files:
                raise AssertionError(f"bad input {image}")
            if image.error is None and image.kind == "megre":
                if len(image.echo_times) != len(image.files):
                    raise AssertionError(f"echo times {image.echo_times} for {image.files}")
            if not image.image_id.replace("_", "").isalnum():
                raise AssertionError(f"node-unsafe id {image.image_id!r}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        (root.parent / f"{root.name}-filters.json").unlink(missing_ok=True)


def main() -> None:
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            Path(arg).mkdir(parents=True, exist_ok=True)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
