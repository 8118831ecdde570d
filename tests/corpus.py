"""Hostile inputs for the robustness tests: broken, odd and good images in one BIDS dataset.

Every image derives from ONE small simulated T2*-weighted subject (`cmb-bidsapp-synth --size
small`), so that the images the app should process are processed fast. `build_image_corpus`
writes one dataset with one subject per case and returns the cases with the behaviour chosen for
each: `failed` (the image fails alone, with a one-line message naming the file and the fix) or
`processed` (outputs written, with a warning where the user should know). The dataset-level
cases (not BIDS, no description, empty, ...) are built in the tests themselves.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

GRE_META = {"EchoTime": 0.02, "RepetitionTime": 0.04, "FlipAngle": 15, "MagneticFieldStrength": 3}


@dataclass(frozen=True)
class Case:
    """One hostile input and the behaviour chosen for it."""

    name: str
    """The subject label in the corpus dataset (`sub-<name>`)."""
    group: str
    """dataset, broken file, odd image or MEGRE (the issue's groups)."""
    what: str
    """The input, in a few words."""
    expect: str
    """`failed` or `processed`."""
    behaviour: str
    """What the app does, in a line (the report's table)."""
    words: tuple[str, ...] = ()
    """Words the message (failed) or the warning (processed) on stderr must hold."""
    named: str = ""
    """The file name the message must hold (default: the subject's first image)."""


def _save(path: Path, img: nib.Nifti1Image, *, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = img.to_bytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def _image(data, affine, *, like: nib.Nifti1Header | None = None, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _sidecar(path: Path, meta: dict | str) -> None:
    json_path = path.with_name(path.name.split(".")[0] + ".json")
    json_path.write_text(meta if isinstance(meta, str) else json.dumps(meta, indent=1))


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    a, b = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def with_voxel_sizes(affine: np.ndarray, sizes) -> np.ndarray:
    """The affine with its columns rescaled to `sizes` (mm), centre of the grid kept roughly."""
    out = np.array(affine, dtype=float)
    norms = np.sqrt((out[:3, :3] ** 2).sum(axis=0))
    out[:3, :3] = out[:3, :3] / norms * np.asarray(sizes, dtype=float)
    return out


def flip_x(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image in world space with its first voxel axis reversed (handedness flipped)."""
    flipped = np.ascontiguousarray(data[::-1])
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = data.shape[0] - 1
    return flipped, affine @ flip


def build_image_corpus(
    root: Path, base_file: Path, base_meta: dict, *, unreadable: bool
) -> tuple[Path, list[Case]]:
    """Write the image-level corpus under `root` (a BIDS dataset) and return its cases.

    `base_file` is a small simulated T2starw image; `unreadable` adds the chmod-000 case (only
    meaningful when the app runs without CAP_DAC_OVERRIDE: not as plain root).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "robustness corpus", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    base_img = nib.load(base_file)
    base = np.asarray(base_img.dataobj, dtype=np.float32)
    aff = base_img.affine.copy()
    meta = dict(base_meta)
    cases: list[Case] = []

    def t2s(name: str, img=None, *, meta_obj=meta, gz=True) -> Path:
        path = root / f"sub-{name}" / "anat" / f"sub-{name}_T2starw.nii{'.gz' if gz else ''}"
        if img is not None:
            _save(path, img)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        if meta_obj is not None:
            _sidecar(path, meta_obj)
        return path

    def add(*args, **kwargs) -> None:
        cases.append(Case(*args, **kwargs))

    # -- good images -----------------------------------------------------------------------
    t2s("good", _image(base, aff))
    add("good", "good", "the simulated T2*-GRE subject", "processed", "processed")
    tes = (0.010, 0.020, 0.030)
    for e, te in enumerate(tes, 1):
        path = root / "sub-megre" / "anat" / f"sub-megre_echo-{e}_MEGRE.nii.gz"
        _save(path, _image(base * np.exp(-(te - 0.02) / 0.04), aff))
        _sidecar(path, {**meta, "EchoTime": te})
    add("megre", "good", "3-echo MEGRE made from it", "processed", "processed (echoes combined)")

    # -- broken files ----------------------------------------------------------------------
    raw = _image(base, aff).to_bytes()
    packed = gzip.compress(raw, mtime=0)
    t2s("trunc").write_bytes(packed[: len(packed) // 3])
    add(
        "trunc",
        "broken file",
        "truncated .nii.gz",
        "failed",
        "fails before processing: 'is truncated'",
        ("truncated", "re-export"),
    )
    wrong = bytearray(raw)
    wrong[344:348] = b"xyz\x00"
    t2s("magic").write_bytes(gzip.compress(bytes(wrong), mtime=0))
    add(
        "magic",
        "broken file",
        "wrong NIfTI magic",
        "failed",
        "fails: 'not a NIfTI image (wrong magic bytes)'",
        ("wrong magic", "dcm2niix"),
    )
    t2s("garbage").write_bytes(np.random.default_rng(1).bytes(4096))
    add(
        "garbage",
        "broken file",
        "random bytes named .nii.gz (no gzip, no NIfTI magic)",
        "failed",
        "fails: 'wrong magic bytes'",
        ("wrong magic",),
    )
    t2s("notgzip").write_bytes(raw)
    add(
        "notgzip",
        "broken file",
        "an uncompressed NIfTI named .nii.gz",
        "processed",
        "processed, with a warning (read by its magic, not its name)",
        ("not gzip-compressed",),
    )
    t2s("empty").write_bytes(b"")
    add(
        "empty",
        "broken file",
        "a 0-byte file",
        "failed",
        "fails: 'is empty (0 bytes)'",
        ("empty", "complete file"),
    )
    link = t2s("annexlink")
    key = "SHA256E-s1024--0123456789abcdef.nii.gz"
    os.symlink(f"../../.git/annex/objects/Xx/Yy/{key}/{key}", link)
    add(
        "annexlink",
        "broken file",
        "broken symlink (DataLad/git-annex content not fetched)",
        "failed",
        "fails: 'broken symbolic link', fix `datalad get`",
        ("broken symbolic link", "datalad get"),
    )
    t2s("annexptr").write_bytes(f"/annex/objects/{key}\n".encode())
    add(
        "annexptr",
        "broken file",
        "git-annex pointer file (unlocked DataLad file not fetched)",
        "failed",
        "fails: 'git-annex pointer file', fix `datalad get`",
        ("git-annex pointer", "datalad get"),
    )
    if unreadable:
        path = t2s("unreadable", _image(base, aff))
        path.chmod(0)
        add(
            "unreadable",
            "broken file",
            "an unreadable file (chmod 000, app without CAP_DAC_OVERRIDE)",
            "failed",
            "fails: 'cannot be read (permission denied)', fix chmod",
            ("permission denied", "chmod"),
        )
    t2s("badjson", _image(base, aff), meta_obj='{"EchoTime": 0.02, "FlipAngle": 15,')
    add(
        "badjson",
        "broken file",
        "malformed JSON sidecar",
        "failed",
        "fails (found while reading the dataset): 'not valid JSON', names the .json",
        ("not valid JSON", "Fix the sidecar"),
        named="sub-badjson_T2starw.json",
    )
    hdr = bytearray(raw)
    hdr[0:4] = (0).to_bytes(4, "little")
    t2s("hdrsize").write_bytes(gzip.compress(bytes(hdr), mtime=0))
    add(
        "hdrsize",
        "broken file",
        "corrupt sizeof_hdr (nibabel would guess the byte order wrong)",
        "failed",
        "fails: 'corrupt NIfTI-1 header'",
        ("corrupt NIfTI-1 header",),
    )
    t2s("complex", _image(base * (1 + 1j), aff, dtype=np.complex64))
    add(
        "complex",
        "broken file",
        "complex-valued voxels",
        "failed",
        "fails: 'complex voxel values; a real-valued image is expected'",
        ("complex", "real-valued"),
    )
    huge = bytearray(raw)
    huge[42:48] = np.array([32000, 32000, 32000], dtype="<i2").tobytes()
    t2s("hugedims").write_bytes(gzip.compress(bytes(huge), mtime=0))
    add(
        "hugedims",
        "broken file",
        "header claiming 32000³ voxels",
        "failed",
        "fails before reading the data: 'more than the 5.37e+08 the app reads'",
        ("voxels", "Crop or resample"),
    )

    # -- odd images ------------------------------------------------------------------------
    t2s("fourd", _image(np.stack([base] * 3, axis=-1), aff))
    add(
        "fourd",
        "odd image",
        "4D (3 volumes) where 3D is expected",
        "failed",
        "fails: 'a 3D image is expected', fix: split the volumes",
        ("3D image is expected", "Split"),
    )
    nan = base.copy()
    rng = np.random.default_rng(2)
    idx = rng.choice(nan.size, 200, replace=False)
    nan.flat[idx[:100]] = np.nan
    nan.flat[idx[100:]] = np.inf
    t2s("naninf", _image(nan, aff))
    add(
        "naninf",
        "odd image",
        "100 NaN and 100 Inf voxels",
        "processed",
        "processed, with a warning: isolated NaN/Inf take their neighbours' mean (0 would look "
        "like dark microbleeds), a NaN background becomes 0",
        ("200 NaN or infinite voxels",),
    )
    t2s("zeros", _image(np.zeros_like(base), aff))
    add("zeros", "odd image", "all-zero image", "failed", "fails: 'is all zeros'", ("all zeros",))
    t2s("constant", _image(np.full_like(base, 7.0), aff))
    add(
        "constant",
        "odd image",
        "constant image",
        "failed",
        "fails: 'is a constant image'",
        ("constant image",),
    )
    mid = base.shape[2] // 2
    t2s("oneslice", _image(base[:, :, mid : mid + 1], aff))
    add(
        "oneslice",
        "odd image",
        "one slice",
        "failed",
        "fails: fewer than 8 voxels along an axis, fix: give the whole volume",
        ("fewer than 8 voxels", "whole 3D volume"),
    )
    t2s("vox02", _image(base, with_voxel_sizes(aff, (0.2, 0.2, 0.2))))
    add(
        "vox02",
        "odd image",
        "0.2 mm voxels",
        "failed",
        "fails: outside 0.3–7 mm (supported 0.4–5 mm), fix: resample",
        ("0.4–5 mm", "Resample"),
    )
    t2s("vox10", _image(base, with_voxel_sizes(aff, (10.0, 10.0, 10.0))))
    add(
        "vox10",
        "odd image",
        "10 mm voxels",
        "failed",
        "fails: outside 0.3–7 mm (supported 0.4–5 mm), fix: resample",
        ("0.4–5 mm", "Resample"),
    )
    t2s("aniso", _image(base, with_voxel_sizes(aff, (0.4, 0.4, 6.0))))
    add(
        "aniso",
        "odd image",
        "0.4 × 0.4 × 6 mm voxels",
        "processed",
        "processed (2D per slice), with a warning: outside the validated 0.4–5 mm",
        ("outside the validated",),
    )
    oblique = aff.copy()
    oblique[:3, :3] = _rotation(25, 10) @ aff[:3, :3]
    t2s("oblique", _image(base, oblique))
    add("oblique", "odd image", "oblique affine (25° and 10°)", "processed", "processed")
    flipped, flipped_aff = flip_x(base, aff)
    t2s("lefthand", _image(flipped, flipped_aff))
    add(
        "lefthand",
        "odd image",
        "left-handed affine (x axis reversed)",
        "processed",
        "processed; same brain mask as the original, flipped",
    )
    img = _image(base, aff)
    shifted = aff.copy()
    shifted[:3, 3] += (12.0, 0.0, 0.0)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(shifted, code=1)
    t2s("qsform", img)
    add(
        "qsform",
        "odd image",
        "qform 12 mm away from the sform",
        "processed",
        "processed with the sform (as nibabel/FSL/fMRIPrep), with a warning",
        ("disagree by up to 12.0 mm", "sform was used"),
    )
    img = nib.Nifti1Image(base, None)  # no affine: nibabel leaves both codes at 0
    img.header.set_zooms(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    t2s("noorient", img)
    add(
        "noorient",
        "odd image",
        "qform_code = sform_code = 0 (no orientation)",
        "processed",
        "processed with the voxel sizes, with a warning (left/right unknown)",
        ("has no orientation",),
    )
    slope = float(np.abs(base).max()) / 30000.0
    img = nib.Nifti1Image(np.round(base / slope).astype(np.int16), aff)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, 0.0)
    t2s("scl", img)
    add(
        "scl",
        "odd image",
        f"int16 with scl_slope {slope:.3g}",
        "processed",
        "processed with the scaling applied (values within slope/2 of the original)",
    )
    blob = np.zeros_like(base)
    c = [n // 2 for n in base.shape]
    blob[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 1 : c[2] + 2] = 1.0 + rng.random(
        (10, 10, 3)
    )
    t2s("nobrain", _image(blob, aff))
    add(
        "nobrain",
        "odd image",
        "a 3 cm³ object in an empty field of view",
        "failed",
        "fails at brain extraction: 'no brain was found (mask volume …)'",
        ("no brain was found",),
    )
    noise = np.abs(rng.normal(0, 1, base.shape) + 1j * rng.normal(0, 1, base.shape))
    t2s("noise", _image(noise, aff))
    add(
        "noise",
        "odd image",
        "pure noise (no head)",
        "failed",
        "fails at brain extraction: the only mask is larger than any brain",
        ("no brain was found", "larger than any brain"),
    )

    # -- MEGRE problems --------------------------------------------------------------------
    for name in ("megreshape", "megrete"):
        for e, te in enumerate(tes, 1):
            path = root / f"sub-{name}" / "anat" / f"sub-{name}_echo-{e}_MEGRE.nii.gz"
            echo = base * np.exp(-(te - 0.02) / 0.04)
            if name == "megreshape" and e == 2:
                echo = echo[:-4, :-2]
            _save(path, _image(echo, aff))
            echo_meta = {**meta, "EchoTime": te}
            if name == "megrete" and e == 2:
                del echo_meta["EchoTime"]
            _sidecar(path, echo_meta)
    add(
        "megreshape",
        "MEGRE",
        "echoes of different shapes",
        "failed",
        "fails: 'has shape … but … has …', fix: one grid for all echoes",
        ("has shape", "share one grid"),
        named="sub-megreshape_echo-2_MEGRE.nii.gz",
    )
    add(
        "megrete",
        "MEGRE",
        "an echo without EchoTime",
        "failed",
        "fails (found while reading the dataset): 'has no valid EchoTime'",
        ("EchoTime",),
        named="sub-megrete_echo-2_MEGRE.nii.gz",
    )
    subjects = sorted(c.name for c in cases)
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects)
    )
    return root, cases


def first_image(bids: Path, case: Case) -> Path:
    """The file the message about `case` must name."""
    anat = bids / f"sub-{case.name}" / "anat"
    if case.named:
        return anat / case.named
    return sorted(p for p in anat.iterdir() if ".nii" in p.name)[0]


# ----------------------------------------------------------------------------------------
# Running the app in the robustness tests
# ----------------------------------------------------------------------------------------

BIN = Path(sys.executable).parent
BASE_SEED = 5
"""`cmb-bidsapp-synth --seed 5 --size small --kinds t2starw`: 146 × 152 × 35 voxels of about
1.37 × 1.55 × 4.79 mm, skull-stripped, 3 simulated microbleeds."""


def simulated_base(tmp_root: Path) -> tuple[Path, dict]:
    """The one small simulated subject every robustness dataset derives from (made once a session).

    Returns its T2starw file and sidecar. `tmp_root` is pytest's session base temporary folder.
    """
    root = Path(tmp_root) / "robust-base"
    image = root / "sub-001" / "anat" / "sub-001_T2starw.nii.gz"
    if not image.exists():
        subprocess.run(
            [
                str(BIN / "cmb-bidsapp-synth"),
                str(root),
                "--n-subjects",
                "1",
                "--seed",
                str(BASE_SEED),
                "--size",
                "small",
                "--kinds",
                "t2starw",
                "--skull-fraction",
                "0",
                "--overwrite",
            ],
            check=True,
            capture_output=True,
        )
    return image, json.loads(image.with_name("sub-001_T2starw.json").read_text())


def build_good_dataset(root: Path, base_file: Path, base_meta: dict, names: list[str]) -> Path:
    """A dataset of `names` subjects that the app processes: copies and flipped/scaled variants.

    The first subject is the base image itself; the others are, in turn, a 3-echo MEGRE made
    from it, its left-right mirror (x axis reversed) and its int16-with-scl_slope copy.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "robustness", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    base_img = nib.load(base_file)
    base = np.asarray(base_img.dataobj, dtype=np.float32)
    aff = base_img.affine
    for n, name in enumerate(names):
        anat = root / f"sub-{name}" / "anat"
        kind = n % 4
        if kind == 1:
            for e, te in enumerate((0.010, 0.020, 0.030), 1):
                path = anat / f"sub-{name}_echo-{e}_MEGRE.nii.gz"
                _save(path, _image(base * np.exp(-(te - 0.02) / 0.04), aff))
                _sidecar(path, {**base_meta, "EchoTime": te})
            continue
        path = anat / f"sub-{name}_T2starw.nii.gz"
        if kind == 0:
            img = _image(base, aff)
        elif kind == 2:
            img = _image(*flip_x(base, aff))
        else:
            slope = float(np.abs(base).max()) / 30000.0
            img = nib.Nifti1Image(np.round(base / slope).astype(np.int16), aff)
            img.header.set_slope_inter(slope, 0.0)
        _save(path, img)
        _sidecar(path, base_meta)
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in names)
    )
    return root


def unprivileged_prefix() -> list[str] | None:
    """A command prefix that runs the app without the root's right to read anything.

    As root (the tests run as root here), `chmod 000` does not stop reads: CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH are dropped from the bounding set with `setpriv`, so the app runs as
    uid 0 but under the ordinary permission checks. As another user, nothing is needed ([]).
    None when the case cannot be made real (root without setpriv).
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def app_command(*args) -> list[str]:
    return [str(BIN / "cmb-bidsapp"), *map(str, args)]


def run_app(*args, prefix: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmb-bidsapp` (optionally behind `prefix`) and return the finished process."""
    return subprocess.run(
        [*(prefix or []), *app_command(*args)], capture_output=True, text=True, **kwargs
    )


def descendants(pid: int) -> list[int]:
    """Running (non-zombie) processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def running(pid: int) -> bool:
    """Whether `pid` runs (zombies do not)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def incomplete_files(out: Path) -> list[str]:
    """Visible files under `out` that are not complete: NIfTIs that do not load fully, TSVs
    with ragged rows, JSON that does not parse. Hidden files (`.part`) are not looked at."""
    bad = []
    for path in sorted(out.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(out).parts):
            continue
        try:
            if path.name.endswith(".nii.gz"):
                np.asarray(nib.load(path).dataobj)
            elif path.suffix == ".tsv":
                lines = path.read_text().splitlines()
                widths = {len(line.split("\t")) for line in lines}
                if not lines or len(widths) != 1:
                    bad.append(f"{path}: ragged TSV")
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # any failure to read is what this looks for
            bad.append(f"{path}: {type(err).__name__}")
    return bad


def part_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.part"))


def digests(root: Path) -> dict[str, str]:
    """sha256 of every image, table and sidecar under sub-*/ (figures excluded)."""
    out = {}
    for path in sorted(root.glob("sub-*/**/*")):
        if (
            path.is_file()
            and "figures" not in path.parts
            and path.suffix in (".gz", ".tsv", ".json")
        ):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
