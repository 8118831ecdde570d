"""Training data preparation: the app's own preprocessing, then the working grid; cache and splits.

Every training image goes through exactly the functions the app runs on an input, in the same
order, so that training and inference see the same network inputs:

1. :func:`cmb_bidsapp.preproc.steps.read_input` (MEGRE echoes combined, QSM in ppm);
2. a brain mask: for a BIDS dataset, the ``_desc-brain_mask`` found beside the reference mask
   (what the app wrote) or else :func:`cmb_bidsapp.preproc.steps.brain_mask` (deepbet); for
   SIMULATED subjects, for speed, the simulator's true brain mask randomly eroded or dilated by
   0–2 mm (a signed distance threshold, ``MASK_JITTER_MM``) — deepbet's masks differ from the
   true mask by about that much (dependencies.md), so the networks see both tight and loose
   masks;
3. :func:`cmb_bidsapp.preproc.bias.n4_correct` (not for QSM);
4. :func:`cmb_bidsapp.preproc.normalise.lesion_bright`;
5. :func:`cmb_bidsapp.detect.frst.frst` on the lesion-bright image, radii ``FRST_RADII_MM``
   (mm; 3D, or per slice for thick slices), bright blobs, inside the mask;
6. both maps, the brain mask and the reference mask to the working grid
   (:mod:`cmb_bidsapp.models.grid`).

A prepared subject is cached as a folder of ``.npy`` files (memory-mapped when read) and a
``meta.json``: ``image.npy`` (2, D, H, W) float16 (lesion-bright, FRST), ``brain.npy`` and
``ref.npy`` uint8, mimic positions in working voxels. Validation subjects also keep their
source-grid maps (``src_*.npy``, float32) so that validation runs the app's exact inference
path, components and scoring in the source grid.

Splits (:func:`split_by_subject`) are by SUBJECT: all sessions and images of one subject go to
the same side, so no subject is in both training and validation; subjects are stratified by
input kind so that every kind is validated.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..detect.frst import DEFAULT_RADII_MM
from ..io import atomic_write_json
from .grid import WorkingGrid, mask_to_working, to_working, voxel_sizes_of, working_grid

LOGGER = logging.getLogger(__name__)

FRST_RADII_MM: tuple[float, ...] = tuple(DEFAULT_RADII_MM)
MASK_JITTER_MM = 2.0
MATCH_MM = 3.0
"""A candidate whose centre lies within this distance (mm) of a reference lesion is positive."""


@dataclass
class RawSubject:
    """One training image before preprocessing, in its source grid."""

    key: str
    """Unique name, e.g. ``sub-001`` or ``sub-001_ses-1_acq-swi``."""
    subject: str
    session: str | None
    kind: str
    image: np.ndarray
    """After ``read_input``: magnitude (MEGRE combined) or χ in ppm (QSM)."""
    affine: np.ndarray
    brain: np.ndarray
    reference: np.ndarray
    mimics_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    mimic_types: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A prepared subject (working grid), possibly memory-mapped from the cache."""

    key: str
    subject: str
    session: str | None
    kind: str
    image: np.ndarray
    brain: np.ndarray
    ref: np.ndarray
    grid: WorkingGrid
    mimics_vox: np.ndarray
    mimic_types: list[str]
    lesions_vox: np.ndarray
    source: dict[str, np.ndarray] | None = None
    """``lb``, ``frst``, ``brain``, ``ref`` and ``affine`` in the source grid (validation)."""

    @property
    def n_lesions(self) -> int:
        return int(len(self.lesions_vox))


def jitter_mask(mask: np.ndarray, affine: np.ndarray, offset_mm: float) -> np.ndarray:
    """Dilate (``offset_mm`` > 0) or erode (< 0) a mask by a distance in mm (anisotropy-aware)."""
    mask = np.asarray(mask) > 0
    if abs(offset_mm) < 1e-6 or not mask.any():
        return mask.astype(np.uint8)
    vs = voxel_sizes_of(affine)
    if offset_mm > 0:
        out = ndi.distance_transform_edt(~mask, sampling=vs) <= offset_mm
    else:
        out = ndi.distance_transform_edt(mask, sampling=vs) > -offset_mm
        if out.sum() < 0.5 * mask.sum():
            out = mask
    return out.astype(np.uint8)


def preprocess(
    image: np.ndarray,
    affine: np.ndarray,
    brain: np.ndarray,
    kind: str,
    *,
    radii_mm: tuple[float, ...] = FRST_RADII_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """The app's preprocessing after the brain mask: N4 (not QSM), lesion_bright, FRST.

    Returns ``(lesion_bright, frst_map)``, float32 in the source grid.
    """
    from ..detect.frst import frst
    from ..preproc.bias import n4_correct
    from ..preproc.normalise import lesion_bright

    data = np.asarray(image, dtype=np.float32)
    inside = np.asarray(brain) > 0
    if kind != "qsm":
        data, _ = n4_correct(data, inside, affine)
    lb = lesion_bright(data, inside, kind)
    fr = frst(lb, tuple(voxel_sizes_of(affine)), radii_mm=radii_mm, bright=True, mask=inside)
    return lb.astype(np.float32), np.asarray(fr, dtype=np.float32)


def lesion_centres_vox(ref: np.ndarray) -> np.ndarray:
    """Centres of mass (voxel indices, (n, 3)) of the 26-connected components of a mask."""
    ref = np.asarray(ref) > 0
    labels, n = ndi.label(ref, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros((0, 3))
    return np.asarray(ndi.center_of_mass(ref, labels, np.arange(1, n + 1))).reshape(-1, 3)


def prepare(
    raw: RawSubject,
    *,
    keep_source: bool = False,
    radii_mm: tuple[float, ...] = FRST_RADII_MM,
) -> Prepared:
    """Preprocess one raw subject and bring it to the working grid (module docstring)."""
    affine = np.asarray(raw.affine, dtype=float)
    brain = np.asarray(raw.brain) > 0
    lb, fr = preprocess(raw.image, affine, brain, raw.kind, radii_mm=radii_mm)
    grid = working_grid(lb.shape, affine, brain)
    lb_w, _ = to_working(lb, affine, grid=grid)
    fr_w, _ = to_working(fr, affine, grid=grid)
    brain_w = mask_to_working(brain, affine, grid, keep_components=False)
    ref_w = mask_to_working(raw.reference, affine, grid, keep_components=True)
    mimics = np.asarray(raw.mimics_mm, dtype=float).reshape(-1, 3)
    mimics_vox = grid.world_to_voxel(mimics) if len(mimics) else np.zeros((0, 3))
    image = np.stack([np.clip(lb_w, 0, 1), np.clip(fr_w, 0, 1)]).astype(np.float16)
    source = None
    if keep_source:
        source = {
            "lb": lb,
            "frst": fr,
            "brain": brain.astype(np.uint8),
            "ref": (np.asarray(raw.reference) > 0).astype(np.uint8),
            "affine": affine,
        }
    return Prepared(
        key=raw.key,
        subject=raw.subject,
        session=raw.session,
        kind=raw.kind,
        image=image,
        brain=brain_w,
        ref=ref_w,
        grid=grid,
        mimics_vox=mimics_vox,
        mimic_types=list(raw.mimic_types),
        lesions_vox=lesion_centres_vox(ref_w),
        source=source,
    )


def save_prepared(p: Prepared, folder: str | Path) -> Path:
    """Write a prepared subject to ``folder`` (replaced atomically as a whole)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "image.npy", p.image)
    np.save(tmp / "brain.npy", p.brain)
    np.save(tmp / "ref.npy", p.ref)
    if p.source is not None:
        for name in ("lb", "frst", "brain", "ref"):
            np.save(tmp / f"src_{name}.npy", p.source[name])
    meta = {
        "key": p.key,
        "subject": p.subject,
        "session": p.session,
        "kind": p.kind,
        "grid": p.grid.to_dict(),
        "mimics_vox": np.asarray(p.mimics_vox).tolist(),
        "mimic_types": p.mimic_types,
        "lesions_vox": np.asarray(p.lesions_vox).tolist(),
        "source_affine": None if p.source is None else np.asarray(p.source["affine"]).tolist(),
    }
    atomic_write_json(tmp / "meta.json", meta)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


WORKING_FRST_FILE = "image_frst-working.npy"
"""The working-grid image with its FRST channel computed on the working grid (cached)."""


def ensure_working_frst(folder: str | Path, radii_mm: tuple[float, ...] = FRST_RADII_MM) -> Path:
    """Cache beside ``image.npy`` the same image whose channel 1 is the radial-symmetry map
    computed on the working grid from channel 0 (:func:`cmb_bidsapp.models.infer.working_frst`,
    what inference does for a bundle with ``frst_grid`` = ``working``). Returns its path."""
    from .infer import working_frst

    folder = Path(folder)
    out = folder / WORKING_FRST_FILE
    if out.is_file():
        return out
    image = np.load(folder / "image.npy")
    brain = np.load(folder / "brain.npy")
    lb = np.asarray(image[0], dtype=np.float32)
    fr = working_frst(lb, brain, radii_mm)
    tmp = folder / (WORKING_FRST_FILE + ".part.npy")
    np.save(tmp, np.stack([image[0], fr.astype(image.dtype)]))
    tmp.replace(out)
    return out


def load_prepared(
    folder: str | Path, *, mmap: bool = True, source: bool = True, frst_grid: str = "source"
) -> Prepared:
    """Read a prepared subject written by :func:`save_prepared` (arrays memory-mapped).

    ``frst_grid="working"`` reads the image whose FRST channel was computed on the working grid
    (:func:`ensure_working_frst`, computed and cached when missing).
    """
    folder = Path(folder)
    image_file = ensure_working_frst(folder).name if frst_grid == "working" else "image.npy"
    meta = json.loads((folder / "meta.json").read_text())
    mode = "r" if mmap else None
    src = None
    if source and meta.get("source_affine") is not None:
        src = {
            n: np.load(folder / f"src_{n}.npy", mmap_mode=mode)
            for n in ("lb", "frst", "brain", "ref")
        }
        src["affine"] = np.asarray(meta["source_affine"], dtype=float)
    return Prepared(
        key=meta["key"],
        subject=meta["subject"],
        session=meta.get("session"),
        kind=meta["kind"],
        image=np.load(folder / image_file, mmap_mode=mode),
        brain=np.load(folder / "brain.npy", mmap_mode=mode),
        ref=np.load(folder / "ref.npy", mmap_mode=mode),
        grid=WorkingGrid.from_dict(meta["grid"]),
        mimics_vox=np.asarray(meta["mimics_vox"], dtype=float).reshape(-1, 3),
        mimic_types=list(meta.get("mimic_types", [])),
        lesions_vox=np.asarray(meta["lesions_vox"], dtype=float).reshape(-1, 3),
        source=src,
    )


def is_prepared(folder: str | Path) -> bool:
    return (Path(folder) / "meta.json").is_file()


def split_by_subject(
    items: list[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split image keys into (train, validation) by SUBJECT, stratified by input kind.

    ``items`` are dicts with ``key``, ``subject`` and ``kind``. Every image of a subject goes to
    the side of that subject (its first image's kind decides its stratum). With two or more
    subjects, at least one is validated and at least one trained on.
    """
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        by_subject[str(it["subject"])].append(it)
    subjects = sorted(by_subject)
    if len(subjects) < 2:
        raise ValueError("a split by subject needs at least two subjects")
    strata: dict[str, list[str]] = defaultdict(list)
    for s in subjects:
        strata[sorted(by_subject[s], key=lambda it: it["key"])[0]["kind"]].append(s)
    rng = np.random.default_rng(seed)
    val_subjects: set[str] = set()
    n_val_total = max(1, int(round(val_fraction * len(subjects))))
    # Per stratum: the rounded share; then top up or trim to the total, deterministically.
    for kind in sorted(strata):
        members = list(strata[kind])
        rng.shuffle(members)
        take = int(round(val_fraction * len(members)))
        val_subjects.update(members[:take])
    remaining = [s for s in subjects if s not in val_subjects]
    rng.shuffle(remaining)
    while len(val_subjects) < n_val_total and remaining:
        val_subjects.add(remaining.pop())
    val_list = sorted(val_subjects)
    while len(val_list) > n_val_total:
        val_list.pop(int(rng.integers(len(val_list))))
    if len(val_list) == len(subjects):
        val_list = val_list[:-1]
    val_set = set(val_list)
    train_keys = sorted(it["key"] for s in subjects if s not in val_set for it in by_subject[s])
    val_keys = sorted(it["key"] for s in subjects if s in val_set for it in by_subject[s])
    return train_keys, val_keys


def raw_from_toy(seed: int, kind: str = "swi", **kwargs: Any) -> RawSubject:
    """A :class:`RawSubject` from the hand-made phantom (tests and smoke runs)."""
    from .toy import toy_subject

    t = toy_subject(seed, **kwargs)
    return RawSubject(
        key=f"sub-toy{seed:03d}",
        subject=f"toy{seed:03d}",
        session=None,
        kind=kind,
        image=t.image,
        affine=t.affine,
        brain=t.brain,
        reference=t.reference,
        mimics_mm=t.mimics_mm,
        mimic_types=t.mimic_types,
    )


# ----------------------------------------------------------------------------------------
# Simulated subjects (cmb_bidsapp.synth) and BIDS datasets
# ----------------------------------------------------------------------------------------


def _app_mask_or_jittered(
    image: np.ndarray, affine: np.ndarray, kind: str, skull: bool, true_mask: np.ndarray, rng
) -> tuple[np.ndarray, str]:
    """The brain mask of a simulated image (module docstring, step 2).

    Without a skull (or for QSM) the app uses the image's non-zero support, and so does this
    (the app's own function); with a skull, the true brain mask jittered by ±0–2 mm stands in
    for deepbet.
    """
    from ..preproc.brain import mask_from_nonzero

    if kind == "qsm" or not skull:
        return mask_from_nonzero(image), "non-zero support (as the app)"
    offset = float(rng.uniform(-MASK_JITTER_MM, MASK_JITTER_MM))
    return jitter_mask(true_mask, affine, offset), f"true mask {offset:+.2f} mm"


def raw_from_simulated(
    sim: Any,
    key: str,
    subject: str,
    session: str | None = None,
    *,
    mask_seed: int = 0,
    tmp_dir: str | Path | None = None,
) -> RawSubject:
    """A :class:`RawSubject` from a :class:`cmb_bidsapp.synth.subject.SimulatedSubject`.

    The raw images are written as NIfTI to a temporary folder and read back with the app's
    :func:`~cmb_bidsapp.preproc.steps.read_input` (echo combination, QSM units).
    """
    import tempfile

    import nibabel as nib

    from ..preproc.steps import read_input

    kind = sim.kind
    if kind == "megre":
        names = [f"echo-{e}_part-mag_MEGRE" for e in range(1, len(sim.echo_times) + 1)]
    else:
        names = [{"swi": "swi", "t2starw": "T2starw", "qsm": "Chimap"}[kind]]
    with tempfile.TemporaryDirectory(dir=tmp_dir) as td:
        files = []
        for name in names:
            f = Path(td) / f"sub-{subject}_{name}.nii"
            nib.save(sim.images[name], str(f))
            files.append(str(f))
        inp = read_input(
            files,
            kind=kind,
            echo_times=list(sim.echo_times) if kind == "megre" else None,
            units=str(sim.sidecars[names[0]].get("Units", "")),
        )
    true_mask = np.asarray(sim.brain_mask.dataobj) > 0
    brain, how = _app_mask_or_jittered(
        inp.image, inp.affine, kind, bool(sim.skull), true_mask, np.random.default_rng(mask_seed)
    )
    mim = sim.mimics
    mimics_mm = mim[["x", "y", "z"]].to_numpy(float) if len(mim) else np.zeros((0, 3))
    types = [str(t) for t in mim["type"]] if len(mim) else []
    raw = RawSubject(
        key=key,
        subject=subject,
        session=session,
        kind=kind,
        image=inp.image,
        affine=inp.affine,
        brain=brain,
        reference=np.asarray(sim.reference_mask.dataobj) > 0,
        mimics_mm=mimics_mm,
        mimic_types=types,
    )
    raw.mask_method = how  # type: ignore[attr-defined]
    return raw


def simulated_training_overrides(seed: int, enrich: bool = True) -> dict[str, Any]:
    """Simulator overrides of a TRAINING/VALIDATION subject: more microbleeds and mimics.

    With ``enrich`` (default for training), 15 % of subjects have no microbleed and the others
    1–12 (uniform), and mimics are 1.5 times as frequent as in the simulator's default cohort,
    so that each simulated subject, which costs about 30–40 s, gives more examples of both
    classes. Held-out test cohorts use the simulator's realistic defaults (no overrides).
    """
    if not enrich:
        return {}
    rng = np.random.default_rng([seed, 77])
    n = 0 if rng.random() < 0.15 else int(rng.integers(1, 13))
    return {"n_microbleeds": n, "mimic_rate": 1.5}


def simulate_and_prepare(
    seed: int,
    kind: str,
    size: str,
    key: str,
    folder: str | Path,
    *,
    keep_source: bool = False,
    enrich: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Simulate one subject, prepare it and cache it in ``folder`` (skipped when cached).

    Runs in a worker process; returns a small summary (key, kind, lesion count, seconds).
    """
    import time

    import torch

    torch.set_num_threads(max(1, threads))
    folder = Path(folder)
    if is_prepared(folder):
        meta = json.loads((folder / "meta.json").read_text())
        return {"key": key, "kind": meta["kind"], "cached": True, "seconds": 0.0}
    from ..synth.subject import simulate_subject

    t0 = time.perf_counter()
    sim = simulate_subject(seed, kind, size=size, **simulated_training_overrides(seed, enrich))
    t1 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    raw = raw_from_simulated(
        sim, key, key.replace("sub-", ""), mask_seed=seed, tmp_dir=folder.parent
    )
    p = prepare(raw, keep_source=keep_source)
    save_prepared(p, folder)
    t2 = time.perf_counter()
    return {
        "key": key,
        "kind": kind,
        "cached": False,
        "n_lesions": p.n_lesions,
        "n_mimics": int(len(p.mimics_vox)),
        "mask": getattr(raw, "mask_method", ""),
        "simulate_s": round(t1 - t0, 1),
        "prepare_s": round(t2 - t1, 1),
        "seconds": round(t2 - t0, 1),
    }


def raw_from_bids(
    image: Any,
    reference_mask: str | Path,
    *,
    brain_mask_file: str | Path | None = None,
    skull_strip: str = "auto",
) -> RawSubject:
    """A :class:`RawSubject` from a BIDS input (:class:`cmb_bidsapp.bids.InputImage`).

    The brain mask is ``brain_mask_file`` (the app's ``_desc-brain_mask`` beside the reference)
    when given, else the app's :func:`~cmb_bidsapp.preproc.steps.brain_mask`.
    """
    from ..errors import InputError
    from ..io import load_nifti
    from ..preproc.steps import brain_mask, read_input

    inp = read_input(
        [str(f) for f in image.files],
        kind=image.kind,
        echo_times=list(image.echo_times) or None,
        units=str(image.metadata.get("Units", "")),
    )
    ref_img = load_nifti(reference_mask)
    if ref_img.shape[:3] != inp.image.shape or not np.allclose(
        ref_img.affine, inp.affine, atol=1e-3
    ):
        raise InputError(
            "is not in the grid of its source image",
            path=reference_mask,
            fix="Reference masks must have the source image's shape and affine (as the app writes them).",
        )
    if brain_mask_file is not None:
        brain = np.asarray(load_nifti(brain_mask_file).dataobj) > 0
    else:
        brain, _ = brain_mask(inp.image, inp.affine, kind=image.kind, mode=skull_strip)
    key = image.source_name + ("" if image.kind != "megre" else "")
    return RawSubject(
        key=key,
        subject=image.subject,
        session=image.session,
        kind=image.kind,
        image=inp.image,
        affine=inp.affine,
        brain=np.asarray(brain) > 0,
        reference=np.asarray(ref_img.dataobj) > 0,
    )


def bids_prepare(
    image: Any,
    reference_mask: str,
    folder: str | Path,
    *,
    brain_mask_file: str | None = None,
    keep_source: bool = False,
    threads: int = 1,
) -> dict[str, Any]:
    """Prepare one BIDS image and cache it in ``folder`` (worker-process entry point)."""
    import time

    import torch

    torch.set_num_threads(max(1, threads))
    folder = Path(folder)
    if is_prepared(folder):
        return {"key": image.source_name, "kind": image.kind, "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    raw = raw_from_bids(image, reference_mask, brain_mask_file=brain_mask_file)
    p = prepare(raw, keep_source=keep_source)
    save_prepared(p, folder)
    return {
        "key": raw.key,
        "kind": raw.kind,
        "cached": False,
        "n_lesions": p.n_lesions,
        "seconds": round(time.perf_counter() - t0, 1),
    }
