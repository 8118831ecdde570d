"""Property tests (hypothesis, bounded) of the reading layers: NIfTI bytes and BIDS datasets.

`load_nifti` on mutated and random bytes returns a 3D float32 finite image or raises InputError,
never anything else and never hangs. `collect_inputs`, `read_sidecar` and `load_filters` on
random file names, entity orders and sidecar contents return well-formed inputs or raise a
`CMBError` (exit 16, 18, 64 or a per-image error). The long-running fuzzer is fuzz/fuzz_nifti.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmb_bidsapp.bids import INPUT_KINDS, collect_inputs, load_filters, read_sidecar
from cmb_bidsapp.errors import CMBError, InputError
from cmb_bidsapp.io import load_nifti

# Bounded and repeatable in the suite; CMB_FUZZ_EXAMPLES=5000 explores with random seeds.
_EXAMPLES = int(os.environ.get("CMB_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=not _EXAMPLES,
    database=None,
)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (SIGALRM in the main thread)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _seed_bytes(dtype=np.int16, shape=(6, 5, 4)) -> bytes:
    data = (np.arange(np.prod(shape)).reshape(shape) % 50).astype(dtype)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]))
    img.header.set_data_dtype(dtype)
    if np.dtype(dtype).kind in "iu":
        img.header.set_slope_inter(0.5, 1.0)
    return img.to_bytes()


SEEDS = [_seed_bytes(np.int16), _seed_bytes(np.float32), _seed_bytes(np.uint8, (3, 4, 5, 1))]
SEEDS.append(nib.Nifti2Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_bytes())


@st.composite
def mutated_nifti(draw) -> tuple[bytes, bool]:
    """(file bytes, gzip?) from a small valid NIfTI with header fields and bytes mutated."""
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    n_header = 540 if raw[4:7] == b"n+2" else 348
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["byte", "int16", "float32", "dim"]))
        pos = draw(st.integers(0, n_header - 4))
        if kind == "byte":
            raw[pos] = draw(st.integers(0, 255))
        elif kind == "int16":
            raw[pos : pos + 2] = int(draw(st.integers(-32768, 32767))).to_bytes(
                2, "little", signed=True
            )
        elif kind == "float32":
            value = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            raw[pos : pos + 4] = np.array([value], "<f4").tobytes()
        elif n_header == 348:  # dim[0..7], datatype, bitpix, vox_offset, scl_slope/inter
            field = draw(st.sampled_from([40, 42, 44, 46, 48, 70, 72, 108, 112, 116]))
            raw[field : field + 2] = int(draw(st.integers(-5, 32767))).to_bytes(
                2, "little", signed=True
            )
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    if cut is not None:
        raw = raw[:cut]
    raw += draw(st.binary(max_size=64))
    return bytes(raw), draw(st.booleans())


def _check_loaded(path: Path) -> None:
    with time_limit(20):
        try:
            img = load_nifti(path)
        except InputError as err:
            assert "\n" not in err.format()
            return
    data = np.asarray(img.dataobj)
    assert data.ndim == 3 and data.dtype == np.float32 and np.isfinite(data).all()
    assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 0


@FUZZ
@given(case=mutated_nifti(), name=st.sampled_from(["x.nii", "x.nii.gz"]))
def test_load_nifti_on_mutated_files(case, name):
    content, packed = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(gzip.compress(content, mtime=0) if packed else content)
        _check_loaded(path)


@FUZZ
@given(content=st.binary(max_size=2048), name=st.sampled_from(["r.nii", "r.nii.gz"]))
def test_load_nifti_on_random_bytes(content, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        _check_loaded(path)


# ----------------------------------------------------------------------------------------
# BIDS layer
# ----------------------------------------------------------------------------------------

LABEL = st.text(alphabet="abcXYZ019", min_size=1, max_size=4)
ODD_LABEL = st.one_of(LABEL, st.text(alphabet="ab1-_. é", min_size=0, max_size=4))
SUFFIX = st.sampled_from(["T2starw", "swi", "MEGRE", "Chimap", "T1w", "bold", "junk", ""])
EXT = st.sampled_from([".nii.gz", ".nii", ".json", ".tsv", "", ".nii.gz.bak"])
JSON_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
SIDECAR = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "EchoTime": st.one_of(JSON_VALUE, st.floats(0.001, 0.05)),
            "Units": st.one_of(JSON_VALUE, st.sampled_from(["ppm", "ppb", "Hz"])),
            "MagneticFieldStrength": JSON_VALUE,
        },
    ),
    JSON_VALUE,
)


@st.composite
def bids_file(draw) -> tuple[str, object]:
    """(relative path, content): content is a sidecar object, raw bytes, or None (an image)."""
    sub = draw(LABEL)
    ents = [("ses", draw(ODD_LABEL))] if draw(st.booleans()) else []
    for key in draw(
        st.lists(st.sampled_from(["acq", "run", "echo", "part", "rec"]), max_size=3, unique=True)
    ):
        value = {
            "part": draw(st.sampled_from(["mag", "phase", "real", "x"])),
            "echo": str(draw(st.integers(0, 4))),
        }
        ents.append((key, value.get(key, draw(ODD_LABEL))))
    if draw(st.booleans()):
        ents = draw(st.permutations(ents))
    parts = [f"sub-{sub}", *(f"{k}-{v}" for k, v in ents), draw(SUFFIX)]
    name = "_".join(p for p in parts if p) + draw(EXT)
    folder = f"sub-{sub}/" + (
        f"ses-{dict(ents)['ses']}/" if "ses" in dict(ents) and draw(st.booleans()) else ""
    )
    folder += draw(st.sampled_from(["anat/", "anat/", "func/", ""]))
    if name.endswith(".json"):
        content = draw(st.one_of(SIDECAR, st.binary(max_size=20)))
    else:
        content = None
    return folder + name, content


def _write_dataset(root: Path, files: list[tuple[str, object]]) -> None:
    (root / "dataset_description.json").write_text('{"Name": "fuzz", "BIDSVersion": "1.10.0"}')
    image = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes()
    for rel, content in files:
        path = root / rel
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                path.write_bytes(image if ".nii" in rel else b"x")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(json.dumps(content))


@settings(FUZZ, max_examples=_EXAMPLES or 25)  # a pybids layout per example: slower
@given(
    files=st.lists(bids_file(), min_size=0, max_size=8),
    kind=st.sampled_from(["auto", *INPUT_KINDS]),
    labels=st.one_of(st.just([]), st.lists(ODD_LABEL, max_size=2)),
)
def test_collect_inputs_on_random_datasets(files, kind, labels):
    with tempfile.TemporaryDirectory() as tmp, time_limit(60):
        root = Path(tmp)
        _write_dataset(root, files)
        try:
            inputs, notes = collect_inputs(root, participant_labels=labels, input_kind=kind)
        except CMBError as err:
            assert err.exit_code in (1, 16, 18, 64) and "\n" not in err.format()
            return
    assert inputs and all(isinstance(n, str) for n in notes)
    for image in inputs:
        assert image.kind in INPUT_KINDS and image.files
        assert image.error is None or isinstance(image.error, str)
        if image.error is None and image.kind == "megre":
            assert len(image.echo_times) == len(image.files)
            assert all(isinstance(t, float) and t > 0 for t in image.echo_times)
        assert image.image_id.replace("_", "").isalnum()


class _JsonFile:
    def __init__(self, path: Path, entities: dict):
        self.path = str(path)
        self._entities = entities

    def get_entities(self):
        return dict(self._entities)


@FUZZ
@given(
    sidecars=st.lists(
        st.tuples(
            st.sampled_from(["root", "sub", "anat"]), st.one_of(SIDECAR, st.binary(max_size=30))
        ),
        max_size=3,
    )
)
def test_read_sidecar_merges_or_raises_input_error(sidecars):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = root / "sub-01" / "anat" / "sub-01_T2starw.nii.gz"
        image.parent.mkdir(parents=True)
        files = []
        for i, (level, content) in enumerate(sidecars):
            folder = {"root": root, "sub": root / "sub-01", "anat": image.parent}[level]
            ents = {"suffix": "T2starw", "extension": ".json"}
            if level != "root":
                ents["subject"] = "01"
            path = folder / (("sub-01_" if level != "root" else "") + f"run-{i}_T2starw.json")
            ents["run"] = i
            path = folder / ("sub-01_T2starw.json" if level != "root" else "T2starw.json")
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(json.dumps(content))
            ents.pop("run")
            files.append(_JsonFile(path, ents))
        try:
            meta = read_sidecar(files, image)
        except InputError as err:
            assert "\n" not in err.format() and ".json" in err.format()
            return
        assert isinstance(meta, dict)


@FUZZ
@given(content=st.one_of(JSON_VALUE, st.binary(max_size=40)))
def test_load_filters_returns_a_mapping_or_usage_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "filters.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content))
        try:
            filters = load_filters(path)
        except CMBError as err:
            assert err.exit_code == 64 and "\n" not in err.format()
            return
        assert isinstance(filters, dict)
        assert set(filters) <= {*INPUT_KINDS, "t1w"}
        assert all(isinstance(v, dict) for v in filters.values())


def test_filters_file_that_is_a_folder_or_unreadable(tmp_path):
    with pytest.raises(CMBError) as err:
        load_filters(tmp_path)
    assert err.value.exit_code == 64
