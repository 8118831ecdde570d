"""Training: detector, teacher, student (with and without distillation), calibration, bundle.

Stages (``--stages``; all by default, in this order)
    ``detector``
        The 3D U-Net on ``DETECTOR_PATCH``³ patches (:mod:`cmb_bidsapp.models.sampling`),
        against the detector target (the reference with microbleeds under 8 voxels dilated by
        one voxel, :func:`~cmb_bidsapp.models.sampling.detector_target`), soft Dice +
        voxel-weighted CE, Adam, cosine learning-rate decay over the maximum number
        of epochs. Validation: the same loss on a fixed set of un-augmented patches of the
        validation subjects. Then ``t_det``: the detector runs on every validation image
        exactly as at inference (:func:`cmb_bidsapp.models.infer.detect`'s steps 1–3, in the
        source grid) and ``t_det`` is the HIGHEST threshold of ``T_DET_GRID`` that keeps at
        least ``sensitivity_target`` (97 %) of the reference microbleeds as candidates (lesion-
        wise, :func:`cmb_bidsapp.evaluation.score_pair`, 3 mm or overlap); when none does, the
        threshold of highest candidate sensitivity (the highest such threshold on ties).
    ``teacher``
        Candidate patches (24³) of the TRAINING subjects: the detector's components at
        ``t_det · HARVEST_FACTOR`` (a lower threshold: the detector has seen these subjects, so
        more low-confidence candidates stand in for the false positives it will make on new
        ones), labelled positive when the component overlaps a reference microbleed or its
        centre lies within 3 mm of one; plus every reference microbleed's centre (positive) and
        every simulated mimic (negative). Batches are drawn half positive, half negative, with
        ±2-voxel shifts and the augmentation of the sampling module. Loss: CE of the patch
        logits + ``seg_weight`` × (soft Dice + weighted CE) of the voxel logits against the
        reference mask in the patch. Validation: the candidates of the validation images at
        ``t_det``, found by the inference path, with their labels; criterion: the class-balanced
        CE (mean over the two classes of the mean CE).
    ``student``
        The same batches; loss :func:`cmb_bidsapp.models.losses.distillation_loss` with the
        teacher's logits (teacher frozen, eval mode, same augmented batch). Trained twice from
        the same seed: with KD (α = ``kd_alpha``) and without (α = 0), on the same data; the
        second (``student_nokd``) is kept in the bundle only to measure the KD gain.

Operating points
    The threshold table: for each threshold of ``THRESHOLD_GRID`` (0.05 … 0.95) on the student
    score, the validation images' candidates with a score >= threshold form the predicted mask,
    scored with :func:`cmb_bidsapp.evaluation.score_pair` in the source grid: lesion-wise
    sensitivity, FP per image, precision, F1 (pooled). The default threshold maximises F1
    subject to FP per image <= ``fp_limit`` (1.0), ties to the lower threshold; when no
    threshold meets the limit, the one with the fewest FP.

Epochs, early stopping, checkpoints
    An epoch is ``*_iters`` optimiser steps. After each, the validation criterion is computed;
    the best state is kept; training stops after ``patience`` epochs without improvement
    (or at the maximum). A checkpoint (model, optimiser, scheduler, history, best state) is
    written atomically after every epoch to ``WORK_DIR/checkpoints/<stage>.pt``; with
    ``resume`` an interrupted stage continues from its last epoch and a finished one is reused.
    Creating the file ``WORK_DIR/STOP-<stage>`` (e.g. ``STOP-detector``) ends that stage after
    its current epoch, keeping its best state, and the run goes on with the next stage (for a
    run that must fit a wall-clock budget on a shared machine; the history records it).

Determinism
    ``torch.manual_seed``, one ``numpy.random.Generator`` per (seed, stage, epoch),
    ``torch.use_deterministic_algorithms(True)``, data prepared in worker processes but consumed
    in a fixed order. On CPU the same seed and thread count give the same weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from ..evaluation import score_pair
from ..io import atomic_write_bytes
from . import networks
from .data import MATCH_MM, Prepared
from .grid import voxel_sizes_of
from .infer import (
    MAX_CANDIDATE_MM3,
    MAX_WINDOW,
    MIN_CANDIDATE_MM3,
    OVERLAP,
    candidates_from_probability,
    classify_patches,
    component_centres,
    detector_probability,
    split_oversized,
    working_inputs,
)
from .losses import KD_ALPHA, KD_TEMPERATURE, distillation_loss, segmentation_loss
from .sampling import (
    CANDIDATE_SHIFT,
    DETECTOR_PATCH,
    augment,
    detector_pools,
    detector_target,
    extract_patch,
    sample_detector_centres,
)

LOGGER = logging.getLogger(__name__)

T_DET_GRID: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7)
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
HARVEST_FACTOR = 0.5
STAGES: tuple[str, ...] = ("detector", "teacher", "student")


@dataclass
class TrainSettings:
    """Every setting of a training run (recorded in the bundle and the model card)."""

    seed: int = 0
    device: str = "auto"
    stages: tuple[str, ...] = STAGES
    detector_epochs: int = 30
    teacher_epochs: int = 20
    student_epochs: int = 20
    patience: int = 5
    detector_patience: int | None = None
    lr: float = 1e-3
    detector_lr: float = 2e-3
    detector_widths: tuple[int, ...] = networks.DETECTOR_WIDTHS
    teacher_widths: tuple[int, ...] = networks.TEACHER_WIDTHS
    student_widths: tuple[int, ...] = networks.STUDENT_WIDTHS
    student_init: str = "random"
    student_lr: float | None = None
    detector_patch: int = DETECTOR_PATCH
    detector_batch: int = 8
    detector_iters: int = 50
    detector_val_patches: int = 96
    patch_size: int = networks.PATCH_SIZE
    disc_batch: int = 16
    disc_iters: int = 40
    seg_weight: float = 1.0
    kd_temperature: float = KD_TEMPERATURE
    kd_alpha: float = KD_ALPHA
    frst_grid: str = "source"
    student_tta: str = "flip8"
    sensitivity_target: float = 0.97
    fp_limit: float = 1.0
    val_fraction: float = 0.2
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


@dataclass
class Context:
    """What every stage needs: settings, device, work folder, resume flag, a log function."""

    settings: TrainSettings
    work_dir: Path
    device: torch.device
    resume: bool = False
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ckpt_dir(self) -> Path:
        d = self.work_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        return d


def set_determinism(seed: int, device: torch.device) -> None:
    """Seed torch and ask for deterministic algorithms (warn-only where none exists)."""
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _progress(iterable, ctx: Context, desc: str, total: int):
    if not ctx.settings.progress:
        return iterable
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------
# Generic fit loop with early stopping and checkpoints
# ----------------------------------------------------------------------------------------


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_ckpt(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def fit(
    ctx: Context,
    name: str,
    stage_id: int,
    model: nn.Module,
    train_step: Callable[[np.random.Generator], float],
    validate: Callable[[], tuple[float, dict[str, float]]],
    max_epochs: int,
    iters: int,
    lr: float | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` with Adam + cosine decay, early stopping and per-epoch checkpoints.

    ``train_step(rng)`` runs one optimiser step and returns its loss; ``validate()`` returns
    ``(criterion, metrics)`` (lower criterion is better). Returns the history; the model ends
    with its best state.
    """
    s = ctx.settings
    opt = torch.optim.Adam(model.parameters(), lr=lr or s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, max_epochs), eta_min=(lr or s.lr) * 0.05
    )
    model._optimizer = opt  # used by train_step
    path = ctx.ckpt_dir / f"{name}.pt"
    state: dict[str, Any] = {
        "epoch": 0,
        "best": float("inf"),
        "best_state": None,
        "bad": 0,
        "history": [],
        "done": False,
    }
    if ctx.resume and path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        ctx.log(f"[{name}] resumed at epoch {state['epoch']} (done={state['done']})")
    t0 = time.perf_counter()
    while not state["done"] and state["epoch"] < max_epochs:
        epoch = state["epoch"]
        rng = np.random.default_rng([s.seed, stage_id, epoch])
        torch.manual_seed(s.seed * 1000 + stage_id * 100 + epoch)
        model.train()
        losses = []
        bar = _progress(range(iters), ctx, f"{name} {epoch + 1}/{max_epochs}", iters)
        for _ in bar:
            losses.append(train_step(rng))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        sched.step()
        model.eval()
        crit, metrics = validate()
        improved = crit < state["best"] - 1e-5
        if improved:
            state["best"] = crit
            state["best_state"] = _state_copy(model)
            state["bad"] = 0
        else:
            state["bad"] += 1
        state["epoch"] = epoch + 1
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val": float(crit)}
        rec.update({k: float(v) for k, v in metrics.items()})
        state["history"].append(rec)
        ctx.log(
            f"[{name}] epoch {epoch + 1}: loss {rec['train_loss']:.4f}, val {crit:.4f}"
            + "".join(f", {k} {v:.3f}" for k, v in metrics.items())
            + (" *" if improved else "")
        )
        if state["bad"] >= (patience or ctx.settings.patience):
            state["done"] = True
        if state["epoch"] >= max_epochs:
            state["done"] = True
        stop = ctx.work_dir / f"STOP-{name}"
        if stop.exists() and not state["done"]:
            state["done"] = True
            state["stopped_by_request"] = state["epoch"]
            ctx.log(f"[{name}] stopped after epoch {state['epoch']} ({stop} exists)")
        _save_ckpt(
            path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "state": state,
            },
        )
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    del model._optimizer
    ctx.timings[f"{name}_s"] = ctx.timings.get(f"{name}_s", 0.0) + time.perf_counter() - t0
    return state


def _step(model: nn.Module, loss: torch.Tensor) -> float:
    opt = model._optimizer
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def detector_batch(
    subjects: Sequence[Prepared],
    pools: Sequence[Any],
    n: int,
    size: int,
    rng: np.random.Generator,
    augmented: bool = True,
    targets: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` detector patches: images (n, 2, s, s, s) float32 and labels (n, s, s, s) int64.

    The labels come from ``targets`` (one per subject; :func:`~.sampling.detector_target`)
    when given, else from the reference masks.
    """
    xs, ys = [], []
    for _ in range(n):
        i = int(rng.integers(len(subjects)))
        p = subjects[i]
        c = sample_detector_centres(pools[i], 1, rng)
        if len(c) == 0:
            c = np.asarray(p.brain.shape)[None] // 2
        c = c[0]
        x = _f32(extract_patch(p.image, c, size))
        y = extract_patch(p.ref if targets is None else targets[i], c, size)
        if augmented:
            b = extract_patch(p.brain, c, size)
            x, (y,) = augment(x, [y], b, rng)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys).astype(np.int64)


def train_detector(
    ctx: Context, train: Sequence[Prepared], val: Sequence[Prepared], model: nn.Module
) -> dict[str, Any]:
    s = ctx.settings
    dev = ctx.device
    targets = [detector_target(p.ref) for p in train]
    vtargets = [detector_target(p.ref) for p in val]
    pools = [
        detector_pools(t, p.brain, p.image[1], p.mimics_vox, seed=s.seed + i)
        for i, (p, t) in enumerate(zip(train, targets))
    ]
    vpools = [
        detector_pools(t, p.brain, p.image[1], p.mimics_vox, seed=s.seed + 10_000 + i)
        for i, (p, t) in enumerate(zip(val, vtargets))
    ]
    vx, vy = detector_batch(
        val,
        vpools,
        s.detector_val_patches,
        s.detector_patch,
        np.random.default_rng([s.seed, 11]),
        augmented=False,
        targets=vtargets,
    )
    model.to(dev)

    def train_step(rng: np.random.Generator) -> float:
        x, y = detector_batch(
            train, pools, s.detector_batch, s.detector_patch, rng, targets=targets
        )
        x_t, y_t = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        return _step(model, segmentation_loss(model(x_t), y_t))

    @torch.no_grad()
    def validate() -> tuple[float, dict[str, float]]:
        losses, inter, psum, ysum = [], 0.0, 0.0, 0.0
        for b in range(0, len(vx), 8):
            x_t = torch.from_numpy(vx[b : b + 8]).to(dev)
            y_t = torch.from_numpy(vy[b : b + 8]).to(dev)
            logits = model(x_t)
            losses.append(float(segmentation_loss(logits, y_t)) * len(x_t))
            pred = (torch.softmax(logits, 1)[:, 1] >= 0.5).float()
            inter += float((pred * (y_t > 0)).sum())
            psum += float(pred.sum())
            ysum += float((y_t > 0).sum())
        dice = 2 * inter / max(psum + ysum, 1.0)
        return float(np.sum(losses) / len(vx)), {"dice": dice}

    return fit(
        ctx,
        "detector",
        1,
        model,
        train_step,
        validate,
        s.detector_epochs,
        s.detector_iters,
        lr=s.detector_lr,
        patience=s.detector_patience,
    )


# ----------------------------------------------------------------------------------------
# Validation images through the inference path
# ----------------------------------------------------------------------------------------


@dataclass
class ValImage:
    """A validation image run through inference steps 1–2 (detector probability, source grid)."""

    key: str
    kind: str
    affine: np.ndarray
    ref: np.ndarray
    brain: np.ndarray
    grid: Any
    volume: np.ndarray
    p_w: np.ndarray


def run_detector_on_validation(
    ctx: Context, detector: nn.Module, val: Sequence[Prepared]
) -> list[ValImage]:
    """Steps 1–2 of inference on each validation image (source-grid inputs)."""
    out = []
    t0 = time.perf_counter()
    for p in val:
        src = p.source
        if src is None:
            raise ValueError(f"{p.key}: validation subjects must keep their source-grid maps")
        grid, volume, brain_w = working_inputs(
            src["lb"],
            src["frst"],
            src["brain"],
            src["affine"],
            frst_grid=ctx.settings.frst_grid,
        )
        p_w = detector_probability(
            detector, volume, brain_w, device=ctx.device, max_window=MAX_WINDOW, overlap=OVERLAP
        )
        out.append(
            ValImage(
                p.key,
                p.kind,
                src["affine"],
                np.asarray(src["ref"]),
                np.asarray(src["brain"]) > 0,
                grid,
                volume,
                p_w,
            )
        )
    ctx.timings["val_detector_s"] = ctx.timings.get("val_detector_s", 0.0) + (
        time.perf_counter() - t0
    )
    return out


def choose_t_det(
    ctx: Context, vals: Sequence[ValImage], grid: Sequence[float] = T_DET_GRID
) -> tuple[float, list[dict[str, float]]]:
    """The highest threshold keeping >= the target share of reference lesions (module doc)."""
    rows = []
    for t in grid:
        tp = fn = ncand = 0
        for v in vals:
            _, cand, n, *_ = candidates_from_probability(v.p_w, v.grid, v.brain, v.affine, t)
            sc = score_pair(cand > 0, v.ref, v.affine, match_mm=MATCH_MM)
            tp += sc.tp
            fn += sc.fn
            ncand += n
        sens = tp / (tp + fn) if tp + fn else 1.0
        rows.append(
            {"t_det": t, "sensitivity": sens, "candidates_per_image": ncand / max(len(vals), 1)}
        )
        ctx.log(
            f"[t_det] {t:.2f}: candidate sensitivity {sens:.3f}, {ncand / max(len(vals), 1):.1f} candidates/image"
        )
    ok = [r for r in rows if r["sensitivity"] >= ctx.settings.sensitivity_target]
    if ok:
        t_det = max(r["t_det"] for r in ok)
    else:  # the target is out of reach: the most sensitive threshold (the highest on ties)
        best = max(r["sensitivity"] for r in rows)
        t_det = max(r["t_det"] for r in rows if r["sensitivity"] >= best - 1e-9)
    return float(t_det), rows


@dataclass
class CandidateSet:
    """Discriminator examples: which subject, patch centre (working voxels), label, origin."""

    subject: np.ndarray
    centres: np.ndarray
    labels: np.ndarray
    origin: np.ndarray

    @classmethod
    def empty(cls) -> CandidateSet:
        return cls(np.zeros(0, int), np.zeros((0, 3), int), np.zeros(0, int), np.zeros(0, "U9"))

    def __len__(self) -> int:
        return len(self.labels)


def _label_candidates_against(
    cand: np.ndarray, n: int, centres_vox: np.ndarray, ref: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """1 where a candidate overlaps the reference or its centre is within 3 mm of a lesion."""
    if n == 0:
        return np.zeros(0, dtype=int)
    ref = np.asarray(ref) > 0
    overlap = np.zeros(n + 1, dtype=bool)
    overlap[np.unique(cand[ref & (cand > 0)])] = True
    labels = overlap[1:].copy()
    rl, rn = ndi.label(ref, structure=np.ones((3, 3, 3), dtype=bool))
    if rn:
        rc = np.asarray(ndi.center_of_mass(ref, rl, np.arange(1, rn + 1))).reshape(-1, 3)
        a = np.asarray(affine, float)
        rw = rc @ a[:3, :3].T + a[:3, 3]
        cw = np.asarray(centres_vox, float) @ a[:3, :3].T + a[:3, 3]
        d = np.sqrt(((cw[:, None, :] - rw[None, :, :]) ** 2).sum(-1))
        labels |= d.min(axis=1) <= MATCH_MM
    return labels.astype(int)


def validation_candidates(
    vals: Sequence[ValImage], t_det: float
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Candidates of each validation image at ``t_det`` (inference step 3), labelled.

    Returns per-image records (candidate labels, centres …), all patches (n, 2, 24³) and labels.
    """
    records, patches, labels = [], [], []
    for v in vals:
        p_src, cand, n, centres_src, world, centres_w = candidates_from_probability(
            v.p_w, v.grid, v.brain, v.affine, t_det
        )
        lab = _label_candidates_against(cand, n, centres_src, v.ref, v.affine)
        records.append(
            {
                "key": v.key,
                "kind": v.kind,
                "cand": cand,
                "n": n,
                "centres_src": centres_src,
                "world": world,
                "centres_w": centres_w,
                "labels": lab,
                "p_src": p_src,
            }
        )
        for c in centres_w:
            patches.append(extract_patch(v.volume, c, networks.PATCH_SIZE))
        labels.extend(lab.tolist())
    x = (
        np.stack(patches).astype(np.float32)
        if patches
        else np.zeros((0, 2, 24, 24, 24), np.float32)
    )
    return records, x, np.asarray(labels, dtype=np.int64)


def harvest_training_candidates(
    ctx: Context, detector: nn.Module, train: Sequence[Prepared], threshold: float
) -> CandidateSet:
    """Discriminator examples of the training subjects (module docstring, ``teacher`` stage)."""
    subj, centres, labels, origin = [], [], [], []
    t0 = time.perf_counter()
    bar = _progress(enumerate(train), ctx, "harvest", len(train))
    for i, p in bar:
        image = _f32(p.image)
        p_w = detector_probability(detector, image, p.brain, device=ctx.device)
        p_w[np.asarray(p.brain) == 0] = 0.0
        vs = tuple(voxel_sizes_of(p.grid.affine))
        p_split = split_oversized(p_w, threshold, vs, MAX_CANDIDATE_MM3)
        cand, n = ndi.label(p_split >= threshold, structure=np.ones((3, 3, 3), dtype=bool))
        if n:
            sizes = np.bincount(cand.ravel(), minlength=n + 1)[1:]
            vol = sizes * float(np.prod(voxel_sizes_of(p.grid.affine)))
            keep_ids = np.flatnonzero((vol >= MIN_CANDIDATE_MM3) & (vol <= MAX_CANDIDATE_MM3)) + 1
            cw = component_centres(p_w, cand, n)[keep_ids - 1]
            lab = _label_candidates_against(
                cand, n, component_centres(p_w, cand, n), p.ref, p.grid.affine
            )[keep_ids - 1]
            subj.extend([i] * len(keep_ids))
            centres.extend(np.rint(cw).astype(int).tolist())
            labels.extend(lab.tolist())
            origin.extend(["candidate"] * len(keep_ids))
        for c in np.asarray(p.lesions_vox).reshape(-1, 3):
            subj.append(i)
            centres.append(np.rint(c).astype(int).tolist())
            labels.append(1)
            origin.append("lesion")
        mim = np.asarray(p.mimics_vox).reshape(-1, 3)
        if len(mim) and len(p.lesions_vox):
            d = np.sqrt(((mim[:, None] - np.asarray(p.lesions_vox)[None]) ** 2).sum(-1)).min(1)
            mim = mim[d * 0.8 > MATCH_MM]
        inside = np.all((mim >= 0) & (mim < np.asarray(p.brain.shape)), axis=1) if len(mim) else []
        for c in mim[inside] if len(mim) else []:
            subj.append(i)
            centres.append(np.rint(c).astype(int).tolist())
            labels.append(0)
            origin.append("mimic")
    ctx.timings["harvest_s"] = time.perf_counter() - t0
    cs = CandidateSet(
        np.asarray(subj, dtype=int),
        np.asarray(centres, dtype=int).reshape(-1, 3),
        np.asarray(labels, dtype=int),
        np.asarray(origin),
    )
    counts = {o: int((cs.origin == o).sum()) for o in ("candidate", "lesion", "mimic")}
    ctx.log(
        f"[harvest] {len(cs)} examples ({int(cs.labels.sum())} positive): {counts}, "
        f"threshold {threshold:.3f}"
    )
    return cs


def disc_batch(
    subjects: Sequence[Prepared],
    cs: CandidateSet,
    n: int,
    rng: np.random.Generator,
    size: int,
    with_seg: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A balanced, augmented batch of candidate patches: x, class labels, reference patches."""
    pos = np.flatnonzero(cs.labels == 1)
    neg = np.flatnonzero(cs.labels == 0)
    n_pos = n // 2 if len(pos) and len(neg) else (n if len(pos) else 0)
    idx = np.concatenate(
        [
            rng.choice(pos, n_pos) if n_pos else np.zeros(0, int),
            rng.choice(neg, n - n_pos) if n - n_pos else np.zeros(0, int),
        ]
    ).astype(int)
    xs, ys, segs = [], [], []
    for j in idx:
        p = subjects[int(cs.subject[j])]
        c = cs.centres[j] + rng.integers(-CANDIDATE_SHIFT, CANDIDATE_SHIFT + 1, 3)
        x = _f32(extract_patch(p.image, c, size))
        seg = extract_patch(p.ref, c, size)
        b = extract_patch(p.brain, c, size)
        x, (seg,) = augment(x, [seg], b, rng)
        xs.append(x)
        segs.append(seg)
        ys.append(int(cs.labels[j]))
    seg_arr = np.stack(segs).astype(np.int64) if with_seg else None
    return np.stack(xs), np.asarray(ys, dtype=np.int64), seg_arr


def _balanced_ce(logits: torch.Tensor, y: torch.Tensor) -> float:
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    parts = [ce[y == k].mean() for k in (0, 1) if bool((y == k).any())]
    return float(torch.stack(parts).mean()) if parts else 0.0


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); 0.5 when a class is missing."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels).astype(bool)
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        return 0.5
    from scipy.stats import rankdata

    r = rankdata(scores)
    return float((r[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


@torch.no_grad()
def _logits(
    model: nn.Module, x: np.ndarray, dev: torch.device, teacher: bool = False
) -> torch.Tensor:
    out = []
    for b in range(0, len(x), 64):
        z = model(torch.from_numpy(x[b : b + 64]).to(dev))
        out.append((z[0] if teacher else z).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def train_teacher(
    ctx: Context,
    train: Sequence[Prepared],
    cs: CandidateSet,
    vx: np.ndarray,
    vy: np.ndarray,
    model: nn.Module,
) -> dict[str, Any]:
    s = ctx.settings
    dev = ctx.device
    model.to(dev)
    vy_t = torch.from_numpy(vy)

    def train_step(rng: np.random.Generator) -> float:
        x, y, seg = disc_batch(train, cs, s.disc_batch, rng, s.patch_size, True)
        zc, zs = model(torch.from_numpy(x).to(dev))
        y_t = torch.from_numpy(y).to(dev)
        loss = torch.nn.functional.cross_entropy(zc, y_t) + s.seg_weight * segmentation_loss(
            zs, torch.from_numpy(seg).to(dev)
        )
        return _step(model, loss)

    def validate() -> tuple[float, dict[str, float]]:
        if len(vx) == 0:
            return 0.0, {}
        z = _logits(model, vx, dev, teacher=True)
        p = torch.softmax(z, 1)[:, 1].numpy()
        return _balanced_ce(z, vy_t), {"auc": auc(p, vy)}

    return fit(ctx, "teacher", 2, model, train_step, validate, s.teacher_epochs, s.disc_iters)


def train_student(
    ctx: Context,
    train: Sequence[Prepared],
    cs: CandidateSet,
    vx: np.ndarray,
    vy: np.ndarray,
    model: nn.Module,
    teacher: nn.Module,
    alpha: float,
    name: str = "student",
) -> dict[str, Any]:
    s = ctx.settings
    dev = ctx.device
    model.to(dev)
    teacher.to(dev).eval()
    vy_t = torch.from_numpy(vy)

    def train_step(rng: np.random.Generator) -> float:
        x, y, _ = disc_batch(train, cs, s.disc_batch, rng, s.patch_size, False)
        x_t = torch.from_numpy(x).to(dev)
        with torch.no_grad():
            zt = teacher(x_t)[0]
        zs = model(x_t)
        loss = distillation_loss(
            zs, zt, torch.from_numpy(y).to(dev), temperature=s.kd_temperature, alpha=alpha
        )
        return _step(model, loss)

    def validate() -> tuple[float, dict[str, float]]:
        if len(vx) == 0:
            return 0.0, {}
        z = _logits(model, vx, dev)
        p = torch.softmax(z, 1)[:, 1].numpy()
        return _balanced_ce(z, vy_t), {"auc": auc(p, vy)}

    # The same stage id for both students: identical batches and initial weights for a seed.
    return fit(
        ctx, name, 3, model, train_step, validate, s.student_epochs, s.disc_iters, lr=s.student_lr
    )


# ----------------------------------------------------------------------------------------
# Threshold table
# ----------------------------------------------------------------------------------------


def threshold_table(
    records: Sequence[dict[str, Any]],
    scores: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    affines: Sequence[np.ndarray],
    grid: Sequence[float] = THRESHOLD_GRID,
) -> list[dict[str, Any]]:
    """Lesion-wise figures on validation for each student-score threshold (module docstring)."""
    rows = []
    n_img = max(len(records), 1)
    for t in grid:
        tp = fp = fn = 0
        for rec, sc, ref, aff in zip(records, scores, refs, affines):
            keep_ids = np.flatnonzero(np.asarray(sc) >= t) + 1
            pred = np.isin(rec["cand"], keep_ids) if len(keep_ids) else np.zeros(ref.shape, bool)
            r = score_pair(pred, ref, aff, match_mm=MATCH_MM)
            tp, fp, fn = tp + r.tp, fp + r.fp, fn + r.fn
        rows.append(
            {
                "threshold": float(t),
                "sensitivity": tp / (tp + fn) if tp + fn else None,
                "fp_per_subject": fp / n_img,
                "precision": tp / (tp + fp) if tp + fp else None,
                "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
                "tp": tp,
                "fp": fp,
                "fn": fn,
            }
        )
    return rows


def choose_threshold(rows: Sequence[dict[str, Any]], fp_limit: float) -> tuple[float, str]:
    """Default operating point (module docstring) and a sentence saying how it was chosen."""
    ok = [r for r in rows if r["fp_per_subject"] <= fp_limit]
    if ok:
        best = max(ok, key=lambda r: ((r["f1"] or 0.0), -r["threshold"]))
        return float(best["threshold"]), (
            f"maximum F1 on validation with at most {fp_limit:g} false positive per image"
        )
    best = min(rows, key=lambda r: (r["fp_per_subject"], -(r["f1"] or 0.0)))
    return float(best["threshold"]), (
        f"no threshold reached {fp_limit:g} FP per image on validation: fewest false positives"
    )


def score_students(
    ctx: Context,
    vals: Sequence[ValImage],
    records: Sequence[dict[str, Any]],
    students: dict[str, nn.Module],
) -> dict[str, dict[str, Any]]:
    """Threshold table, default threshold, candidate AUC and figures for each student."""
    out = {}
    refs = [v.ref for v in vals]
    affs = [v.affine for v in vals]
    for name, model in students.items():
        scores = [
            classify_patches(
                model, v.volume, rec["centres_w"], device=ctx.device, tta=ctx.settings.student_tta
            )
            for v, rec in zip(vals, records)
        ]
        rows = threshold_table(records, scores, refs, affs)
        thr, how = choose_threshold(rows, ctx.settings.fp_limit)
        at = next(r for r in rows if r["threshold"] == thr)
        allsc = np.concatenate(scores) if scores else np.zeros(0)
        alllab = np.concatenate([r["labels"] for r in records]) if records else np.zeros(0)
        out[name] = {
            "rows": rows,
            "threshold": thr,
            "how": how,
            "at_default": at,
            "candidate_auc": auc(allsc, alllab),
            "scores": scores,
        }
        ctx.log(
            f"[{name}] validation at threshold {thr:.2f}: sensitivity {at['sensitivity']}, "
            f"FP/image {at['fp_per_subject']:.2f}, precision {at['precision']}, F1 {at['f1']}, "
            f"candidate AUC {out[name]['candidate_auc']:.3f}"
        )
    return out


def stage_finished(ctx: Context, name: str) -> bool:
    """True when ``--resume`` will reuse a FINISHED stage ``name`` from the work folder as it is."""
    path = ctx.ckpt_dir / f"{name}.pt"
    if not (ctx.resume and path.exists()):
        return False
    return bool(torch.load(path, map_location="cpu", weights_only=False)["state"].get("done"))


def load_stage_from_ckpt(ctx: Context, name: str, model: nn.Module) -> bool:
    """Load a FINISHED stage's best state from the work folder; False when there is none."""
    path = ctx.ckpt_dir / f"{name}.pt"
    if not path.exists():
        return False
    ck = torch.load(path, map_location="cpu", weights_only=False)
    st = ck["state"]
    if not st.get("done"):
        return False
    model.load_state_dict(st["best_state"] if st["best_state"] is not None else ck["model"])
    model.to(ctx.device).eval()
    return True


@contextlib.contextmanager
def timed(ctx: Context, key: str):
    t0 = time.perf_counter()
    yield
    ctx.timings[key] = ctx.timings.get(key, 0.0) + time.perf_counter() - t0


def history_summary(state: dict[str, Any]) -> dict[str, Any]:
    hist = state.get("history", [])
    if not hist:
        return {"epochs": 0}
    best = min(hist, key=lambda r: r["val"])
    out = {"epochs": len(hist), "best_epoch": best["epoch"], "best": best}
    if state.get("stopped_by_request"):
        out["stopped_by_request_after_epoch"] = state["stopped_by_request"]
    return out


def dumps(obj: Any) -> str:
    from ..io import json_default

    return json.dumps(obj, indent=2, default=json_default)


# ----------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------


def _init_models(s: TrainSettings, init_from: Any | None) -> dict[str, nn.Module]:
    """Fresh networks (seeded), or the networks of ``init_from`` (a loaded Bundle) to fine-tune."""
    torch.manual_seed(s.seed)
    if init_from is not None:
        nets = init_from.meta["networks"]
        det = networks.build("detector", nets["detector"])
        det.load_state_dict(init_from.detector.state_dict())
        teacher = networks.build("teacher", nets["teacher"])
        if init_from.teacher is not None:
            teacher.load_state_dict(init_from.teacher.state_dict())
        torch.manual_seed(s.seed + 3)
        student = networks.build("student", nets["student"])
        student.load_state_dict(init_from.student.state_dict())
        torch.manual_seed(s.seed + 3)
        nokd = networks.build("student", nets["student"])
        nokd.load_state_dict(init_from.student.state_dict())
        return {"detector": det, "teacher": teacher, "student": student, "student_nokd": nokd}
    det = networks.UNet3D(s.detector_widths)
    torch.manual_seed(s.seed + 2)
    teacher = networks.Teacher(s.teacher_widths, patch_size=s.patch_size)
    torch.manual_seed(s.seed + 3)
    student = networks.Student(s.student_widths, patch_size=s.patch_size)
    torch.manual_seed(s.seed + 3)  # the no-KD student starts from the same weights
    nokd = networks.Student(s.student_widths, patch_size=s.patch_size)
    return {"detector": det, "teacher": teacher, "student": student, "student_nokd": nokd}


def train_all(
    ctx: Context,
    train: Sequence[Prepared],
    val: Sequence[Prepared],
    *,
    init_from: Any | None = None,
) -> dict[str, Any]:
    """Run the stages; returns the models, t_det, the tables and every figure for the card."""
    s = ctx.settings
    set_determinism(s.seed, ctx.device)
    models = _init_models(s, init_from)
    for m in models.values():
        m.to(ctx.device)
    result: dict[str, Any] = {"histories": {}}

    # -- detector --------------------------------------------------------------------------
    if "detector" in s.stages:
        st = train_detector(ctx, train, val, models["detector"])
        result["histories"]["detector"] = history_summary(st)
    elif not load_stage_from_ckpt(ctx, "detector", models["detector"]) and init_from is None:
        raise ValueError("the detector stage is skipped but no trained detector is available")
    with timed(ctx, "calibration_s"):
        vals = run_detector_on_validation(ctx, models["detector"], val)
        t_det, t_rows = choose_t_det(ctx, vals)
    result["t_det"] = t_det
    result["t_det_rows"] = t_rows
    ctx.log(f"[t_det] chosen {t_det:.3f}")

    # -- candidates ------------------------------------------------------------------------
    # Training candidates are needed only by a discriminator stage that will train, not by
    # finished stages that --resume reuses (e.g. to re-score validation into a new bundle);
    # their counts, for the card, are kept in the work folder.
    trains = {"teacher": ("teacher",), "student": ("student", "student_nokd")}
    need_disc = any(
        stage in s.stages and not all(stage_finished(ctx, n) for n in names)
        for stage, names in trains.items()
    )
    records, vx, vy = validation_candidates(vals, t_det)
    result["val_candidates"] = {"n": int(len(vy)), "positive": int(vy.sum())}
    counts_path = ctx.ckpt_dir / "training_candidates.json"
    cs = CandidateSet.empty()
    if need_disc:
        cs = harvest_training_candidates(ctx, models["detector"], train, t_det * HARVEST_FACTOR)
        result["train_candidates"] = {
            "n": int(len(cs)),
            "positive": int(cs.labels.sum()),
            **{o: int((cs.origin == o).sum()) for o in ("candidate", "lesion", "mimic")},
        }
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        counts_path.write_text(dumps(result["train_candidates"]))
    elif counts_path.exists():
        result["train_candidates"] = json.loads(counts_path.read_text())

    # -- teacher ---------------------------------------------------------------------------
    if "teacher" in s.stages:
        st = train_teacher(ctx, train, cs, vx, vy, models["teacher"])
        result["histories"]["teacher"] = history_summary(st)
    elif not load_stage_from_ckpt(ctx, "teacher", models["teacher"]) and (
        init_from is None or init_from.teacher is None
    ):
        if "student" in s.stages and s.kd_alpha > 0:
            raise ValueError("the student needs a teacher: train it or give --init-from")

    # -- students --------------------------------------------------------------------------
    if "student" in s.stages and s.student_init == "teacher":
        # Both students (KD and no-KD) start from the trained teacher's Tf + Tc (same widths).
        for key in ("student", "student_nokd"):
            models[key].tf.load_state_dict(models["teacher"].tf.state_dict())
            models[key].tc.load_state_dict(models["teacher"].tc.state_dict())
        ctx.log("[student] both students start from the teacher's Tf + Tc")
    if "student" in s.stages:
        st = train_student(
            ctx, train, cs, vx, vy, models["student"], models["teacher"], s.kd_alpha, "student"
        )
        result["histories"]["student"] = history_summary(st)
        st = train_student(
            ctx, train, cs, vx, vy, models["student_nokd"], models["teacher"], 0.0, "student_nokd"
        )
        result["histories"]["student_nokd"] = history_summary(st)
    else:
        load_stage_from_ckpt(ctx, "student", models["student"])
        load_stage_from_ckpt(ctx, "student_nokd", models["student_nokd"])

    # -- operating points ------------------------------------------------------------------
    with timed(ctx, "calibration_s"):
        scored = score_students(
            ctx,
            vals,
            records,
            {"student": models["student"], "student_nokd": models["student_nokd"]},
        )
        tz = _logits(models["teacher"], vx, ctx.device, teacher=True) if len(vx) else None
    result["teacher_candidate_auc"] = (
        auc(torch.softmax(tz, 1)[:, 1].numpy(), vy) if tz is not None else None
    )
    result["scored"] = scored
    result["models"] = models
    result["val_keys"] = [v.key for v in vals]
    result["val_kinds"] = [v.kind for v in vals]
    return result
