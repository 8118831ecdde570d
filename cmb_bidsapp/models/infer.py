"""Inference: detector (sliding window) → candidates in the source grid → student scores → maps.

:func:`detect` is what the app runs on one image, after preprocessing:

1. The lesion-bright image and the radial-symmetry map (source grid, computed by the app's own
   functions) are resampled to the working grid (:mod:`cmb_bidsapp.models.grid`).
2. The detector runs over the working grid's brain bounding box in overlapping windows
   (at most ``MAX_WINDOW`` = 112 voxels a side, ``OVERLAP`` = 16 voxels; the number of windows
   per axis is the smallest that fits, and their size is then shrunk to the smallest multiple of
   4 that covers the axis, so little is computed twice). Windows with no brain voxel are
   skipped. Overlapping predictions are blended with Gaussian weights (σ = 1/8 of the window
   side, as nnU-Net does) so that window borders, where the network sees zero padding, count
   least. Output: the foreground softmax probability ``p_det``.
3. ``p_det`` is mapped back to the source grid (trilinear) and set to 0 outside the brain mask.
   Candidates are the 26-connected components of ``p_det >= t_det`` (``t_det`` from the bundle,
   chosen on validation to keep >= 97 % of reference microbleeds) with a volume within
   [``MIN_CANDIDATE_MM3``, ``MAX_CANDIDATE_MM3``] = [1, 1000] mm³, numbered deterministically
   (:func:`cmb_bidsapp.detect.candidates.label_candidates`: by centre of mass along k, j, i).
   A component larger than the upper bound (a microbleed whose response touches a vein's, or
   several responses merged at a low ``t_det``) is not dropped whole: it is split by raising the
   threshold inside it through ``SPLIT_LEVELS`` until its parts fit
   (:func:`split_oversized`); only what is still too large at 0.9 is dropped.
4. Each candidate gets a 24³ working-grid patch centred on its probability-weighted centre of
   mass, and the student's softmax probability of the "microbleed" class, ``s_c``. Patches are
   scored in batches of ``batch_size``. With the bundle's ``inference.student_tta`` =
   ``flip8`` (test-time augmentation), ``s_c`` is the mean of the softmax probabilities of the
   patch and its 7 mirror images (every combination of flips along the 3 axes, which training
   also draws: :func:`~cmb_bidsapp.models.sampling.augment`); ``none`` (bundles written before
   this setting existed) scores the patch alone.
5. Outputs, all in the source grid:

   - ``probseg`` (``_label-CMB_probseg``): inside candidate ``c``,
     ``s_c · p_det / max_c(p_det)``; 0 elsewhere. Each component's MAXIMUM is therefore exactly
     its student score ``s_c``, so thresholding ``probseg`` at P finds the same lesions as the
     mask at ``--threshold P`` (``cmb-bidsapp-eval --threshold P`` on probseg agrees with the
     mask), and the lesion table's ``probability`` (the maximum of probseg over the lesion) is
     ``s_c``. Within a lesion the map keeps the detector's shape. (Refinement of
     ``s_c · p_det``, whose maximum would be below ``s_c``.)
   - ``labels``: the candidates with ``s_c >= threshold``, renumbered 1..n in the same
     deterministic order; ``scores[i]`` is the score of lesion ``i + 1``.
   - ``rejected``: the other candidates with their scores and positions, for the report.

Determinism: on CPU the same inputs and thread count give bit-identical outputs (no random
operation; PyTorch CPU convolutions are deterministic for a fixed thread count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ..detect.candidates import label_candidates
from ..detect.frst import DEFAULT_RADII_MM
from ..labelstats import LabelStats
from .bundle import Bundle, load_bundle, resolve_device
from .grid import (
    WORKING_VOXEL_MM,
    WorkingGrid,
    mask_to_working,
    to_source,
    to_working,
    voxel_sizes_of,
    working_grid,
)
from .sampling import extract_patch

FRST_RADII_MM: tuple[float, ...] = tuple(DEFAULT_RADII_MM)
"""Default FRST radii (mm); a bundle records its own (``preprocessing.frst_radii_mm``)."""
FRST_GRIDS: tuple[str, ...] = ("source", "working")
"""Where the network's radial-symmetry channel is computed (:func:`working_inputs`)."""
STUDENT_TTA: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip8": ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)),
}
"""Test-time augmentations of the student: the spatial axes flipped in each view (module doc)."""
MAX_WINDOW = 112
OVERLAP = 16
MIN_CANDIDATE_MM3 = 1.0
MAX_CANDIDATE_MM3 = 1000.0
SPLIT_LEVELS: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
"""Thresholds tried, in turn, inside a candidate component larger than the upper bound."""


@dataclass
class DetectionResult:
    """What :func:`detect` returns (all maps in the source grid)."""

    probseg: np.ndarray
    """float32, learned probability (module docstring), 0 outside candidates."""
    labels: np.ndarray
    """int32, kept lesions numbered 1..n (0 elsewhere)."""
    scores: np.ndarray
    """float (n,), student score of lesion ``i + 1``."""
    candidate_labels: np.ndarray
    """int32, every candidate numbered 1..m (before the student)."""
    candidate_scores: np.ndarray
    """float (m,), student score of every candidate."""
    rejected: list[dict[str, Any]]
    """Candidates below the threshold: id, x, y, z (mm), i, j, k, volume_mm3, score."""
    t_det: float
    threshold: float
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    p_det: np.ndarray | None = None
    """float32, the detector probability in the source grid (0 outside the brain)."""
    candidate_centres: np.ndarray | None = None
    """(m, 3) scanner mm of every candidate's probability-weighted centre."""
    candidate_centres_working: np.ndarray | None = None
    """(m, 3) int, the same centres in working-grid voxels (the student's patch centres)."""

    @property
    def n_lesions(self) -> int:
        return int(len(self.scores))

    @property
    def mask(self) -> np.ndarray:
        return (self.labels > 0).astype(np.uint8)


def _axis_plan(length: int, max_window: int, overlap: int) -> tuple[int, list[int]]:
    def ceil4(x: float) -> int:
        return int(4 * np.ceil(x / 4.0))

    if length <= max_window:
        return ceil4(length), [0]
    n = int(np.ceil((length - overlap) / (max_window - overlap)))
    size = ceil4(np.ceil((length + (n - 1) * overlap) / n))
    starts = np.rint(np.linspace(0, length - size, n)).astype(int).tolist()
    return size, starts


def plan_windows(
    shape: tuple[int, ...], max_window: int = MAX_WINDOW, overlap: int = OVERLAP
) -> tuple[tuple[int, int, int], list[tuple[int, int, int]]]:
    """Window size (multiples of 4) and the start corners of the windows covering ``shape``."""
    plans = [_axis_plan(int(s), max_window, overlap) for s in shape[:3]]
    size = tuple(p[0] for p in plans)
    starts = [(a, b, c) for a in plans[0][1] for b in plans[1][1] for c in plans[2][1]]
    return size, starts


def gaussian_importance(size: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian blending weights for a window (max 1, floor 1e-3)."""
    grids = []
    for s in size:
        x = np.arange(s, dtype=np.float32) - (s - 1) / 2.0
        grids.append(np.exp(-0.5 * (x / max(s * sigma_scale, 1.0)) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


@torch.inference_mode()
def detector_probability(
    model: torch.nn.Module,
    volume: np.ndarray,
    brain: np.ndarray | None = None,
    *,
    device: torch.device | str = "cpu",
    max_window: int = MAX_WINDOW,
    overlap: int = OVERLAP,
) -> np.ndarray:
    """Foreground probability of the detector over a (2, D, H, W) working-grid volume."""
    device = resolve_device(device)
    model.eval()
    shape = volume.shape[1:]
    size, starts = plan_windows(shape, max_window, overlap)
    padded = tuple(max(s, w) for s, w in zip(shape, size))
    vol = np.zeros((volume.shape[0], *padded), dtype=np.float32)
    vol[:, : shape[0], : shape[1], : shape[2]] = volume
    acc = np.zeros(padded, dtype=np.float32)
    wsum = np.zeros(padded, dtype=np.float32)
    weight = gaussian_importance(size)
    for start in starts:
        sl = tuple(slice(a, a + w) for a, w in zip(start, size))
        if brain is not None and not np.any(brain[sl]):
            continue
        x = torch.from_numpy(np.ascontiguousarray(vol[(slice(None), *sl)]))[None].to(device)
        prob = torch.softmax(model(x), dim=1)[0, 1].float().cpu().numpy()
        acc[sl] += prob * weight
        wsum[sl] += weight
    out = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
    return out[: shape[0], : shape[1], : shape[2]]


@torch.inference_mode()
def classify_patches(
    model: torch.nn.Module,
    volume: np.ndarray,
    centres: np.ndarray,
    *,
    patch_size: int = 24,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    tta: str = "none",
) -> np.ndarray:
    """Softmax probability of class 1 for patches of ``volume`` (C, D, H, W) at ``centres`` (n, 3).

    ``tta``: a key of :data:`STUDENT_TTA`; the probability is averaged over its views.
    """
    if tta not in STUDENT_TTA:
        raise ValueError(f"unknown student test-time augmentation {tta!r}: {sorted(STUDENT_TTA)}")
    device = resolve_device(device)
    model.eval()
    centres = np.asarray(centres, dtype=int).reshape(-1, 3)
    out = np.zeros(len(centres), dtype=np.float32)
    views = STUDENT_TTA[tta]
    for b in range(0, len(centres), batch_size):
        batch = np.stack(
            [extract_patch(volume, c, patch_size) for c in centres[b : b + batch_size]]
        )
        x = torch.from_numpy(batch.astype(np.float32, copy=False)).to(device)
        acc = torch.zeros(len(batch), dtype=torch.float32, device=device)
        for axes in views:
            xv = torch.flip(x, dims=[a + 2 for a in axes]) if axes else x
            acc += torch.softmax(model(xv), dim=1)[:, 1].float()
        out[b : b + len(batch)] = (acc / len(views)).cpu().numpy()
    return out


def component_centres(prob: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Probability-weighted centre of mass (voxel indices, (n, 3) float) of components 1..n."""
    if n == 0:
        return np.zeros((0, 3))
    w = np.asarray(prob, dtype=np.float64) + 1e-12
    return LabelStats(labels, np.arange(1, n + 1)).centres(w)


def split_oversized(
    prob: np.ndarray,
    threshold: float,
    voxel_sizes: tuple[float, ...],
    max_volume_mm3: float = MAX_CANDIDATE_MM3,
    levels: tuple[float, ...] = SPLIT_LEVELS,
) -> np.ndarray:
    """``prob`` with every component of ``prob >= threshold`` above ``max_volume_mm3`` (mm³)
    reduced to its parts at the next higher level of ``levels`` (voxels below it set to 0),
    repeated until no component is too large or the levels run out. Other voxels are unchanged,
    so ``prob_split >= threshold`` gives the ordinary components plus the split parts.
    """
    out = np.asarray(prob, dtype=np.float32)
    copied = False
    vvol = float(np.prod(np.asarray(voxel_sizes, dtype=float)))
    structure = np.ones((3, 3, 3), dtype=bool)
    for level in (lv for lv in levels if lv > threshold):
        lab, n = ndi.label(out >= threshold, structure=structure)
        if n == 0:
            break
        big = np.flatnonzero(np.bincount(lab.ravel(), minlength=n + 1)[1:] * vvol > max_volume_mm3)
        if big.size == 0:
            break
        lut = np.zeros(n + 1, dtype=bool)
        lut[big + 1] = True
        if not copied:
            out, copied = out.copy(), True
        out[lut[lab] & (out < level)] = 0.0
    return out


def working_inputs(
    lesion_bright: np.ndarray,
    frst_map: np.ndarray | None,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    *,
    frst_grid: str = "source",
    radii_mm: tuple[float, ...] = FRST_RADII_MM,
) -> tuple[WorkingGrid, np.ndarray, np.ndarray]:
    """Step 1: ``(grid, volume (2, D, H, W) float32, brain (D, H, W) uint8)`` on the working grid.

    ``frst_grid`` (the bundle's :attr:`~cmb_bidsapp.models.bundle.Bundle.frst_grid`): ``source``
    resamples ``frst_map``; ``working`` computes the radial-symmetry map on the working grid
    from the resampled lesion-bright image (:func:`working_frst`; ``frst_map`` is not used).
    """
    lesion_bright = np.asarray(lesion_bright, dtype=np.float32)
    brain_mask = np.asarray(brain_mask) > 0
    affine = np.asarray(affine, dtype=float)
    if frst_grid not in FRST_GRIDS:
        raise ValueError(f"frst_grid must be one of {FRST_GRIDS}, not {frst_grid!r}")
    grid = working_grid(lesion_bright.shape, affine, brain_mask)
    lb_w, _ = to_working(lesion_bright, affine, grid=grid)
    lb_w = np.clip(lb_w, 0, 1)
    brain_w = mask_to_working(brain_mask, affine, grid, keep_components=False)
    if frst_grid == "working":
        fr_w = working_frst(lb_w, brain_w, radii_mm)
    else:
        if frst_map is None:
            raise ValueError("this bundle resamples the source grid's FRST map: give frst_map")
        fr_w, _ = to_working(np.asarray(frst_map, dtype=np.float32), affine, grid=grid)
    volume = np.stack([lb_w, np.clip(fr_w, 0, 1)]).astype(np.float32)
    return grid, volume, brain_w


def candidates_from_probability(
    p_w: np.ndarray,
    grid: WorkingGrid,
    brain: np.ndarray,
    affine: np.ndarray,
    t_det: float,
    inference: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """Step 3 (module docstring): detector probability to candidates in the source grid.

    Returns ``(p_src, candidate_labels, n, centres_src (n, 3) voxel, centres_world (n, 3) mm,
    centres_working (n, 3) int)``.
    """
    inf = inference or {}
    p_src = to_source(p_w, grid.affine, brain.shape, affine)
    p_src[~(np.asarray(brain) > 0)] = 0.0
    vs = tuple(voxel_sizes_of(affine))
    max_mm3 = float(inf.get("max_candidate_mm3", MAX_CANDIDATE_MM3))
    cand, n = label_candidates(
        split_oversized(p_src, t_det, vs, max_mm3),
        t_det,
        vs,
        min_volume_mm3=float(inf.get("min_candidate_mm3", MIN_CANDIDATE_MM3)),
        max_volume_mm3=max_mm3,
    )
    centres_src = component_centres(p_src, cand, n)
    if n:
        world = centres_src @ affine[:3, :3].T + affine[:3, 3]
        centres_w = np.rint(grid.world_to_voxel(world)).astype(int)
    else:
        world, centres_w = np.zeros((0, 3)), np.zeros((0, 3), dtype=int)
    return p_src, cand, n, centres_src, world, centres_w


def working_frst(
    lesion_bright_w: np.ndarray, brain_w: np.ndarray, radii_mm: tuple[float, ...] = FRST_RADII_MM
) -> np.ndarray:
    """The radial-symmetry map computed on the working grid (float32, [0, 1]).

    Why not resample the source grid's map: a microbleed of one or two source voxels gives a
    FRST peak one voxel wide, and resampling (anti-aliasing along axes finer than the working
    grid, then trilinear interpolation off the peak) loses most of it. Measured on a simulated
    QSM (0.68 × 0.75 × 1.38 mm): five visible microbleeds (lesion-bright 0.70-0.81 on tissue
    0.50) had resampled FRST 0.25-0.49 against 0.76-0.89 when computed on the working grid,
    where the background's 99.9th percentile is 0.50; the first detector, trained on resampled
    maps, gave them p < 0.04.
    """
    from ..detect.frst import frst

    vs = (WORKING_VOXEL_MM,) * 3
    out = frst(
        np.asarray(lesion_bright_w, dtype=np.float32),
        vs,
        radii_mm=tuple(radii_mm),
        bright=True,
        mask=np.asarray(brain_w) > 0,
    )
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def assemble(
    p_src: np.ndarray,
    cand: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    centres_src: np.ndarray,
    world: np.ndarray,
    affine: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Step 5: ``(probseg, labels, kept_scores, rejected)`` from candidates and student scores."""
    n = len(scores)
    ids = np.arange(1, n + 1)
    lut_s = np.zeros(n + 1, dtype=np.float32)
    lut_s[1:] = scores
    pmax = np.ones(n + 1, dtype=np.float32)
    if n:
        pmax[1:] = np.maximum(LabelStats(cand, ids).maximum(p_src).astype(np.float32), 1e-6)
    probseg = np.where(cand > 0, lut_s[cand] * p_src / pmax[cand], 0.0).astype(np.float32)
    probseg = np.clip(probseg, 0.0, 1.0)
    keep = np.asarray(scores) >= threshold
    lut_new = np.zeros(n + 1, dtype=np.int32)
    lut_new[ids[keep]] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = lut_new[cand]
    volumes = np.bincount(cand.ravel(), minlength=n + 1)[1:] * float(
        np.prod(voxel_sizes_of(affine))
    )
    rejected = [
        {
            "candidate_id": int(ids[i]),
            "x": round(float(world[i, 0]), 2),
            "y": round(float(world[i, 1]), 2),
            "z": round(float(world[i, 2]), 2),
            "i": int(round(centres_src[i, 0])),
            "j": int(round(centres_src[i, 1])),
            "k": int(round(centres_src[i, 2])),
            "volume_mm3": round(float(volumes[i]), 3),
            "score": round(float(scores[i]), 4),
        }
        for i in np.flatnonzero(~keep)
    ]
    return probseg, labels.astype(np.int32), np.asarray(scores)[keep].astype(np.float32), rejected


def detect(
    lesion_bright: np.ndarray,
    frst_map: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    bundle: Bundle | None = None,
    *,
    device: str = "auto",
    threshold: float | None = None,
    batch_size: int = 64,
    t_det: float | None = None,
    student: torch.nn.Module | None = None,
    keep_p_det: bool = False,
) -> DetectionResult:
    """Detect microbleeds in one preprocessed image (module docstring for every step).

    Parameters
    ----------
    lesion_bright, frst_map
        The app's normalised image (microbleeds bright, [0, 1]) and radial-symmetry map, in the
        source grid.
    brain_mask
        Brain mask, source grid (non-zero inside).
    affine
        4x4 voxel-to-scanner matrix of the source grid (mm).
    bundle
        A loaded :class:`~cmb_bidsapp.models.bundle.Bundle` (default: the package's, on ``device``).
    device
        ``auto`` (CUDA if available), ``cpu`` or ``cuda``; ignored when ``bundle`` is given
        (its networks already sit on a device).
    threshold
        Student-score operating point; the bundle's ``default_threshold`` when None.
    batch_size
        Candidate patches per student batch.
    t_det, student
        Overrides used by training and benchmarks (candidate threshold, another student).
    """
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if bundle is None:
        bundle = load_bundle(None, device)
    dev = bundle.device
    t_det = bundle.t_det if t_det is None else float(t_det)
    threshold = bundle.default_threshold if threshold is None else float(threshold)
    student = bundle.student if student is None else student
    inf = bundle.meta.get("inference", {})
    affine = np.asarray(affine, dtype=float)
    brain = np.asarray(brain_mask) > 0
    grid, volume, brain_w = working_inputs(
        lesion_bright,
        frst_map,
        brain,
        affine,
        frst_grid=bundle.frst_grid,
        radii_mm=bundle.frst_radii_mm,
    )
    times["to_working"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    p_w = detector_probability(
        bundle.detector,
        volume,
        brain_w,
        device=dev,
        max_window=int(inf.get("max_window", MAX_WINDOW)),
        overlap=int(inf.get("overlap", OVERLAP)),
    )
    times["detector"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    p_src, cand, n, centres_src, world, centres_w = candidates_from_probability(
        p_w, grid, brain, affine, t_det, inf
    )
    times["candidates"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    scores = classify_patches(
        student,
        volume,
        centres_w,
        patch_size=bundle.patch_size,
        device=dev,
        batch_size=batch_size,
        tta=bundle.student_tta,
    )
    times["student"] = time.perf_counter() - t3

    probseg, labels, kept, rejected = assemble(
        p_src, cand, scores, threshold, centres_src, world, affine
    )
    times["total"] = time.perf_counter() - t0
    return DetectionResult(
        probseg=probseg,
        labels=labels,
        scores=kept,
        candidate_labels=cand.astype(np.int32),
        candidate_scores=scores.astype(np.float32),
        rejected=rejected,
        t_det=t_det,
        threshold=threshold,
        device=str(dev),
        seconds={k: round(v, 3) for k, v in times.items()},
        p_det=p_src if keep_p_det else None,
        candidate_centres=world,
        candidate_centres_working=centres_w,
    )


def rescore(
    result: DetectionResult,
    lesion_bright: np.ndarray,
    frst_map: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    student: torch.nn.Module,
    threshold: float,
    *,
    patch_size: int = 24,
    device: str | torch.device = "cpu",
    frst_grid: str = "source",
    radii_mm: tuple[float, ...] = FRST_RADII_MM,
    tta: str = "none",
) -> DetectionResult:
    """The same candidates scored by another student (e.g. the no-KD ablation); no detector run.

    ``frst_grid``, ``radii_mm`` and ``tta``: those of the bundle the student comes from.
    """
    affine = np.asarray(affine, dtype=float)
    _, volume, _ = working_inputs(
        lesion_bright, frst_map, brain_mask, affine, frst_grid=frst_grid, radii_mm=radii_mm
    )
    cand = result.candidate_labels
    scores = classify_patches(
        student,
        volume,
        result.candidate_centres_working,
        patch_size=patch_size,
        device=device,
        tta=tta,
    )
    inv = np.linalg.inv(affine)
    centres_src = result.candidate_centres @ inv[:3, :3].T + inv[:3, 3]
    base = result.p_det if result.p_det is not None else result.probseg
    probseg, labels, kept, rejected = assemble(
        base, cand, scores, threshold, centres_src, result.candidate_centres, affine
    )
    return DetectionResult(
        probseg=probseg,
        labels=labels,
        scores=kept,
        candidate_labels=cand,
        candidate_scores=scores,
        rejected=rejected,
        t_det=result.t_det,
        threshold=float(threshold),
        device=result.device,
        candidate_centres=result.candidate_centres,
        candidate_centres_working=result.candidate_centres_working,
    )
