"""Lesion-wise scoring of predicted microbleed masks against reference masks (VALDO 2021 style).

Definitions (these are the rules `cmb-bidsapp-eval` applies; the docs quote them):

Lesions
    A lesion is a 26-connected component (3x3x3 structuring element) of a binary mask. A
    reference or prediction mask voxel counts when its value is > 0; with a probability map
    (`--threshold P`) a voxel counts when its probability is >= P. The lesion's centre is its
    centre of mass in scanner millimetres (voxel centroid mapped through the image's affine), so
    anisotropic voxels and oblique affines are handled.

Candidate pairs (`match`)
    - ``"distance"``: a predicted and a reference lesion may match when their centres are at most
      `match_mm` apart (inclusive; default 3 mm).
    - ``"overlap"``: they may match when they share at least one voxel.
    - ``"both"`` (default): overlap OR distance.

Assignment (one-to-one, optimal, deterministic)
    Each reference lesion is matched to at most one predicted lesion and vice versa. Among all
    one-to-one assignments of candidate pairs, the scorer picks the one that (1) has the most
    matches, then (2) with ``"both"``, the most overlapping matches, then (3) the smallest sum
    of centre distances. It is solved exactly with the Hungarian algorithm
    (`scipy.optimize.linear_sum_assignment`) on a tiered cost matrix, separately for each
    connected group of candidate pairs. The result depends only on the masks and the affine.

Counts
    TP = matched pairs; FN = reference lesions left unmatched; FP = predicted lesions left
    unmatched (two predicted blobs near one reference lesion give 1 TP + 1 FP).
    Sensitivity = TP / (TP + FN), precision = TP / (TP + FP), F1 = 2 TP / (2 TP + FP + FN);
    totals are pooled over all lesions of all scored images (micro-average). Undefined ratios
    (0 / 0) are reported as ``None`` (JSON ``null``, TSV ``n/a``).
    FP per subject and the absolute count difference |n_pred - n_ref| are averaged over scored
    images (one image per subject and session; with one image per subject this is per subject).

Subject level (present / absent)
    An image is CMB-positive in the reference when its reference mask has >= 1 lesion, and
    predicted positive when its prediction has >= 1 lesion. Accuracy, sensitivity, specificity
    and balanced accuracy (mean of the class recalls that are defined) follow. The AUC ranks
    images by a score: the maximum probability when probability maps were read (`--threshold`),
    otherwise the predicted lesion count (ties count one half).

MARS class of a reference lesion
    From the reference `<source>_desc-CMB_lesions.tsv` beside the mask (columns `x`, `y`, `z`
    in scanner mm, and `mars_class`, or `region` mapped through the MARS table): the rows whose
    centre falls inside the component (voxel nearest to the centre); among them, the one nearest
    to the component's centre of mass; if none is inside, the nearest row within `match_mm` of
    the component's centre; otherwise ``unknown`` (also when the TSV is absent).

Input kind of an image (``swi``, ``t2starw``, ``megre``, ``qsm`` or ``unknown``)
    Output names drop the source suffix, so the kind is found, in this order, from:
    (1) the `Sources` list of the reference mask's JSON sidecar, (2) the `Sources` of the
    prediction mask's sidecar, (3) the raw BIDS dataset named by the reference dataset's
    `SourceDatasets` (a local path) or, in the `cmb-bidsapp-synth` layout, the dataset two
    folders above `derivatives/<name>`: the file whose entities, less `echo` and `part`, equal
    the mask's `<source>`, (4) the `acq-` label (contains ``swi``, ``qsm``/``chi``, ``megre``,
    or ``t2s``/``gre``). Suffix to kind: `swi` -> swi; `T2starw` -> t2starw (swi when its `acq-`
    label contains ``swi``); `MEGRE` or any `echo-` entity -> megre; `Chimap` -> qsm.

Which files
    Every `**/*_label-CMB_mask.nii[.gz]` under the reference dataset is a reference (hidden
    folders, nested `derivatives/` datasets and a prediction dataset nested inside it are
    skipped); its prediction is the file with the same relative path in the prediction dataset
    (or `_label-CMB_probseg` with a threshold). A missing prediction is scored as an empty mask
    and listed. A prediction whose shape or affine (tolerance 0.001 mm) differs from its
    reference is not resampled: that image fails with a one-line message and is left out.

Speed
    Masks are cropped to the bounding box of both before labelling; 100 images of
    300x300x150 voxels score in about 18-25 s on 2 shared CPU cores (see the report).
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from .anatomy.regions import MARS_CLASSES, UNKNOWN_REGION, region_class
from .errors import InputError, NoMatchError, UsageError
from .io import load_nifti

MATCH_MODES: tuple[str, ...] = ("both", "distance", "overlap")
KINDS: tuple[str, ...] = ("swi", "t2starw", "megre", "qsm")
UNKNOWN = "unknown"
MASK_ENDING = "_label-CMB_mask"
PROBSEG_ENDING = "_label-CMB_probseg"
LESIONS_ENDING = "_desc-CMB_lesions.tsv"
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_AFFINE_ATOL_MM = 1e-3
_EPS_MM = 1e-6


# ----------------------------------------------------------------------------------------
# One image pair
# ----------------------------------------------------------------------------------------


@dataclass
class _Components:
    """26-connected components of a mask, labelled inside a crop of the full grid."""

    labels: np.ndarray  # int32 labels of the crop, 0 = background
    offset: np.ndarray  # voxel index of the crop's first voxel in the full grid
    centres_mm: np.ndarray  # (n, 3) centre of mass, scanner mm
    n_voxels: np.ndarray  # (n,) voxels per component

    @property
    def n(self) -> int:
        return int(self.n_voxels.size)


def _bbox(masks: list[np.ndarray]) -> tuple[slice, ...] | None:
    """Smallest box holding every nonzero voxel of the masks (same shape), or None if empty."""
    union = masks[0]
    for m in masks[1:]:
        union = union | m
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(slices)


def _label(crop: np.ndarray, offset: np.ndarray, affine: np.ndarray) -> _Components:
    labels, n = ndimage.label(crop, structure=STRUCTURE_26)
    if n == 0:
        return _Components(labels, offset, np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    coords = np.nonzero(labels)
    lab = labels[coords]
    n_vox = np.bincount(lab, minlength=n + 1)[1:]
    centre_vox = (
        np.stack([np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in coords], axis=1)
        / n_vox[:, None]
        + offset[None, :]
    )
    centres_mm = centre_vox @ affine[:3, :3].T + affine[:3, 3]
    return _Components(labels.astype(np.int32, copy=False), offset, centres_mm, n_vox)


def _candidate_pairs(
    pred: _Components, ref: _Components, match_mm: float, match: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate (pred, ref) pairs, 0-based, with centre distance (mm) and whether they overlap."""
    stride = np.int64(ref.n + 1)
    both = (pred.labels > 0) & (ref.labels > 0)
    overlap_keys = np.unique(
        (pred.labels[both].astype(np.int64) - 1) * stride + (ref.labels[both] - 1)
    )
    keys = [overlap_keys] if match in ("overlap", "both") else []
    if match in ("distance", "both"):
        near = cKDTree(pred.centres_mm).sparse_distance_matrix(
            cKDTree(ref.centres_mm), match_mm + _EPS_MM, output_type="ndarray"
        )
        keys.append(near["i"].astype(np.int64) * stride + near["j"].astype(np.int64))
    allk = np.unique(np.concatenate(keys))
    pi, ri = allk // stride, allk % stride
    dist = np.linalg.norm(pred.centres_mm[pi] - ref.centres_mm[ri], axis=1)
    overlaps = np.isin(allk, overlap_keys)
    if match == "overlap":
        keep = overlaps
    elif match == "distance":
        keep = dist <= match_mm + _EPS_MM
    else:
        keep = overlaps | (dist <= match_mm + _EPS_MM)
    return pi[keep], ri[keep], dist[keep], overlaps[keep]


def _assign(
    pi: np.ndarray, ri: np.ndarray, dist: np.ndarray, preferred: np.ndarray, n_pred: int, n_ref: int
) -> np.ndarray:
    """Indices into the candidate pairs of the optimal one-to-one assignment (module docstring).

    Lexicographic objective: most matches, then most `preferred` (overlapping) matches, then the
    smallest sum of distances.
    """
    if pi.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Connected groups of the bipartite candidate graph: each is solved on its own, small matrix.
    graph = coo_matrix((np.ones(pi.size), (pi, n_pred + ri)), shape=(n_pred + n_ref,) * 2)
    _, group = connected_components(graph, directed=False)
    pair_group = group[pi]
    chosen: list[np.ndarray] = []
    order = np.argsort(pair_group, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_group[order])) + 1
    for sel in np.split(order, bounds):
        if sel.size == 1:
            chosen.append(sel)
            continue
        rows, r_idx = np.unique(pi[sel], return_inverse=True)
        cols, c_idx = np.unique(ri[sel], return_inverse=True)
        k = min(rows.size, cols.size)
        # Tiered costs: any match beats no match, an overlap match beats a distance-only one,
        # then shorter distances win. dnorm < 1, so the sum over <= k pairs stays below k.
        dnorm = dist[sel] / (dist[sel].max() + 1.0)
        tier = float(k + 1)
        forbidden = (k + 1.0) * (tier + 1.0) + 1.0
        cost = np.full((rows.size, cols.size), forbidden)
        cost[r_idx, c_idx] = dnorm + np.where(preferred[sel], 0.0, tier)
        rr, cc = linear_sum_assignment(cost)
        ok = cost[rr, cc] < forbidden
        lookup = np.full((rows.size, cols.size), -1, dtype=np.int64)
        lookup[r_idx, c_idx] = sel
        chosen.append(lookup[rr[ok], cc[ok]])
    return np.sort(np.concatenate(chosen))


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


@dataclass
class PairScore:
    """Lesion-wise score of one prediction against one reference (same grid).

    Component ids are 1-based, numbered in the voxel (C) order of the arrays. Centres are in
    scanner mm, volumes in mm^3, distances in mm.
    """

    n_ref: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    matches: list[tuple[int, int, float, bool]]  # (pred_id, ref_id, distance_mm, they overlap)
    ref_centres_mm: np.ndarray
    pred_centres_mm: np.ndarray
    ref_volumes_mm3: np.ndarray
    pred_volumes_mm3: np.ndarray
    ref_matched: np.ndarray  # bool (n_ref,)
    pred_matched: np.ndarray  # bool (n_pred,)
    match_mm: float = 3.0
    match: str = "both"

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def count_difference(self) -> int:
        """Absolute difference between predicted and reference lesion counts."""
        return abs(self.n_pred - self.n_ref)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_ref": self.n_ref,
            "n_pred": self.n_pred,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "sensitivity": self.sensitivity,
            "precision": self.precision,
            "f1": self.f1,
            "count_difference": self.count_difference,
            "match": self.match,
            "match_mm": self.match_mm,
            "matches": [
                {"pred_id": p, "ref_id": r, "distance_mm": round(d, 4), "overlap": o}
                for p, r, d, o in self.matches
            ],
            "ref_centres_mm": np.round(self.ref_centres_mm, 4).tolist(),
            "pred_centres_mm": np.round(self.pred_centres_mm, 4).tolist(),
        }


def _check_args(match_mm: float, match: str) -> None:
    if match not in MATCH_MODES:
        raise UsageError(
            f"unknown match mode {match!r}", fix=f"Use one of {', '.join(MATCH_MODES)}."
        )
    if not np.isfinite(match_mm) or match_mm < 0:
        raise UsageError(f"match distance {match_mm} mm is not >= 0", fix="Give e.g. 3 (mm).")


def _score(
    pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, match_mm: float, match: str
) -> tuple[PairScore, _Components]:
    affine = np.asarray(affine, dtype=np.float64)
    pred_b = np.asarray(pred) > 0
    ref_b = np.asarray(ref) > 0
    if pred_b.shape != ref_b.shape:
        raise ValueError(f"prediction shape {pred_b.shape} != reference shape {ref_b.shape}")
    box = _bbox([pred_b, ref_b])
    if box is None:
        box = tuple(slice(0, 0) for _ in range(ref_b.ndim))
    offset = np.array([s.start for s in box], dtype=np.float64)
    pc = _label(pred_b[box], offset, affine)
    rc = _label(ref_b[box], offset, affine)
    if pc.n and rc.n:
        pi, ri, dist, ov = _candidate_pairs(pc, rc, match_mm, match)
        preferred = ov if match == "both" else np.zeros_like(ov)
        sel = _assign(pi, ri, dist, preferred, pc.n, rc.n)
        pi, ri, dist, ov = pi[sel], ri[sel], dist[sel], ov[sel]
    else:
        pi = ri = np.zeros(0, dtype=np.int64)
        dist, ov = np.zeros(0), np.zeros(0, dtype=bool)
    ref_matched = np.zeros(rc.n, dtype=bool)
    ref_matched[ri] = True
    pred_matched = np.zeros(pc.n, dtype=bool)
    pred_matched[pi] = True
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    tp = int(pi.size)
    score = PairScore(
        n_ref=rc.n,
        n_pred=pc.n,
        tp=tp,
        fp=pc.n - tp,
        fn=rc.n - tp,
        matches=[
            (int(p) + 1, int(r) + 1, float(d), bool(o))
            for p, r, d, o in zip(pi, ri, dist, ov, strict=True)
        ],
        ref_centres_mm=rc.centres_mm,
        pred_centres_mm=pc.centres_mm,
        ref_volumes_mm3=rc.n_voxels * voxel_mm3,
        pred_volumes_mm3=pc.n_voxels * voxel_mm3,
        ref_matched=ref_matched,
        pred_matched=pred_matched,
        match_mm=float(match_mm),
        match=match,
    )
    return score, rc


def score_pair(
    pred: np.ndarray,
    ref: np.ndarray,
    affine: np.ndarray,
    match_mm: float = 3.0,
    match: str = "both",
) -> PairScore:
    """Score a predicted mask against a reference mask in the same voxel grid.

    `pred` and `ref` are 3D arrays (voxels > 0 are lesion), `affine` the 4x4 voxel-to-scanner
    matrix (mm), `match_mm` the largest centre-to-centre distance (mm) of a match and `match`
    one of ``"both"``, ``"distance"``, ``"overlap"`` (module docstring for the exact rule).
    """
    _check_args(match_mm, match)
    return _score(pred, ref, affine, match_mm, match)[0]


# ----------------------------------------------------------------------------------------
# MARS class and input kind of a reference image
# ----------------------------------------------------------------------------------------


def _read_lesion_table(path: Path) -> tuple[np.ndarray, list[str]] | None:
    """Centres (n, 3) in mm and MARS classes of a reference lesions TSV, or None if unusable."""
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    centres, classes = [], []
    for row in rows:
        try:
            xyz = [float(row[c]) for c in ("x", "y", "z")]
        except (KeyError, TypeError, ValueError):
            continue
        if not np.all(np.isfinite(xyz)):
            continue
        cls = (row.get("mars_class") or "").strip()
        if cls not in MARS_CLASSES:
            cls = region_class((row.get("region") or "").strip())
        centres.append(xyz)
        classes.append(cls)
    return np.asarray(centres, dtype=np.float64).reshape(-1, 3), classes


def reference_classes(
    comps: _Components,
    affine: np.ndarray,
    table: tuple[np.ndarray, list[str]] | None,
    match_mm: float,
) -> list[str]:
    """MARS class of each reference component from the reference lesion table (module doc)."""
    if comps.n == 0:
        return []
    if table is None or table[0].shape[0] == 0:
        return [UNKNOWN_REGION] * comps.n
    centres, classes = table
    vox = np.rint(
        (np.c_[centres, np.ones(len(centres))] @ np.linalg.inv(affine).T)[:, :3] - comps.offset
    ).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(comps.labels.shape)), axis=1)
    row_comp = np.zeros(len(centres), dtype=np.int64)
    row_comp[inside] = comps.labels[tuple(vox[inside].T)]
    dist = np.linalg.norm(comps.centres_mm[:, None, :] - centres[None, :, :], axis=2)
    own = row_comp[None, :] == np.arange(1, comps.n + 1)[:, None]
    d_in = np.where(own, dist, np.inf)
    d_near = np.where(dist <= match_mm + _EPS_MM, dist, np.inf)
    out = []
    for c in range(comps.n):
        d = d_in[c] if np.isfinite(d_in[c]).any() else d_near[c]
        out.append(classes[int(np.argmin(d))] if np.isfinite(d).any() else UNKNOWN_REGION)
    return out


_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+.]+)$")


def _split_name(name: str) -> tuple[dict[str, str], str]:
    """BIDS entities and suffix of a file name (extension dropped)."""
    base = name.split("/")[-1].split(":")[-1]
    base = re.sub(r"(\.nii\.gz|\.nii|\.json|\.tsv)$", "", base)
    parts = base.split("_")
    entities: dict[str, str] = {}
    suffix = ""
    for part in parts:
        m = _ENTITY.match(part)
        if m:
            entities[m.group(1)] = m.group(2)
        else:
            suffix = part
    return entities, suffix


def kind_from_name(name: str) -> str:
    """Input kind of a source file name from its suffix and entities, or ``unknown``."""
    entities, suffix = _split_name(name)
    acq = entities.get("acq", "").lower()
    if "echo" in entities or suffix == "MEGRE":
        return "megre"
    if suffix == "swi" or (suffix == "T2starw" and "swi" in acq):
        return "swi"
    if suffix == "T2starw":
        return "t2starw"
    if suffix == "Chimap":
        return "qsm"
    return UNKNOWN


def _kind_from_entities(entities: dict[str, str]) -> str:
    acq = entities.get("acq", "").lower()
    if "echo" in entities or "megre" in acq:
        return "megre"
    if "swi" in acq:
        return "swi"
    if "qsm" in acq or "chi" in acq:
        return "qsm"
    if "t2s" in acq or "gre" in acq:
        return "t2starw"
    return UNKNOWN


def _kind_from_sources(sidecar: Path) -> str:
    try:
        sources = json.loads(sidecar.read_text(encoding="utf-8")).get("Sources", [])
    except (OSError, ValueError, AttributeError):
        return UNKNOWN
    if isinstance(sources, str):
        sources = [sources]
    kinds = [kind_from_name(str(s)) for s in sources if isinstance(s, str)]
    kinds = [k for k in kinds if k != UNKNOWN]
    if "megre" in kinds:
        return "megre"
    return kinds[0] if kinds else UNKNOWN


def _sidecar(nifti: Path) -> Path:
    return nifti.with_name(re.sub(r"(\.nii\.gz|\.nii)$", ".json", nifti.name))


def raw_dataset_of(reference_dir: Path) -> Path | None:
    """The raw BIDS dataset behind a reference derivatives dataset, when it can be found."""
    desc = reference_dir / "dataset_description.json"
    try:
        sources = json.loads(desc.read_text(encoding="utf-8")).get("SourceDatasets", [])
    except (OSError, ValueError, AttributeError):
        sources = []
    for src in sources if isinstance(sources, list) else []:
        url = str(src.get("URL", "")) if isinstance(src, dict) else ""
        if url.startswith("file://"):
            url = url[len("file://") :]
        if url and "://" not in url:
            cand = (reference_dir / url).resolve()
            if (cand / "dataset_description.json").is_file():
                return cand
    if reference_dir.resolve().parent.name == "derivatives":
        cand = reference_dir.resolve().parent.parent
        if (cand / "dataset_description.json").is_file():
            return cand
    return None


def infer_kind(
    ref_mask: Path, pred_mask: Path | None = None, raw_dir: Path | None = None
) -> tuple[str, str]:
    """Input kind of the image a reference mask belongs to, and how it was found (module doc)."""
    kind = _kind_from_sources(_sidecar(ref_mask))
    if kind != UNKNOWN:
        return kind, "reference Sources"
    if pred_mask is not None:
        kind = _kind_from_sources(_sidecar(pred_mask))
        if kind != UNKNOWN:
            return kind, "prediction Sources"
    source = _source_name(ref_mask)
    entities, _ = _split_name(source + "_x")
    if raw_dir is not None and "sub" in entities:
        folder = raw_dir / f"sub-{entities['sub']}"
        if "ses" in entities:
            folder = folder / f"ses-{entities['ses']}"
        kinds = set()
        for f in sorted((folder / "anat").glob(f"{source}_*.nii*")):
            ents, _ = _split_name(f.name)
            ents.pop("echo", None)
            ents.pop("part", None)
            if ents == entities:
                kinds.add(kind_from_name(f.name))
        kinds.discard(UNKNOWN)
        if len(kinds) == 1:
            return kinds.pop(), "raw dataset"
    kind = _kind_from_entities(entities)
    return kind, ("entities" if kind != UNKNOWN else "not found")


def _source_name(mask: Path) -> str:
    """`<source>` of a `<source>_label-CMB_mask|probseg.nii[.gz]` file name."""
    return re.sub(r"_label-CMB_(mask|probseg)(\.nii\.gz|\.nii)$", "", mask.name)


# ----------------------------------------------------------------------------------------
# A whole derivatives dataset against a reference dataset
# ----------------------------------------------------------------------------------------


@dataclass
class ImageScore:
    """Score of one reference image, with where it came from."""

    subject: str
    session: str | None
    source: str
    kind: str
    kind_from: str
    reference: str  # path relative to the reference dataset
    prediction: str | None  # path relative to the derivatives dataset; None when missing
    pair: PairScore
    ref_classes: list[str]
    score: float  # subject-level ranking score: max probability, or predicted lesion count

    @property
    def missing(self) -> bool:
        return self.prediction is None

    def row(self) -> dict[str, Any]:
        p = self.pair
        return {
            "participant_id": f"sub-{self.subject}",
            "session_id": f"ses-{self.session}" if self.session else None,
            "source": self.source,
            "kind": self.kind,
            "prediction": "missing" if self.missing else "ok",
            "n_ref": p.n_ref,
            "n_pred": p.n_pred,
            "tp": p.tp,
            "fp": p.fp,
            "fn": p.fn,
            "sensitivity": p.sensitivity,
            "precision": p.precision,
            "f1": p.f1,
            "count_difference": p.count_difference,
            "ref_present": p.n_ref > 0,
            "pred_present": p.n_pred > 0,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.row()
        d.update(
            kind_from=self.kind_from,
            reference=self.reference,
            prediction_file=self.prediction,
            ref_classes=self.ref_classes,
            score=self.score,
            matches=self.pair.to_dict()["matches"],
        )
        return d


def _lesion_figures(tp: int, fp: int, fn: int, n_images: int) -> dict[str, Any]:
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fp_per_subject": _ratio(fp, n_images),
    }


def _auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Scores:
    """Scores of every reference image of a dataset, with pooled, per-class and per-kind figures."""

    images: list[ImageScore]
    failed: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def missing_predictions(self) -> list[str]:
        return [i.reference for i in self.images if i.missing]

    def totals(self) -> dict[str, Any]:
        n = len(self.images)
        tp = sum(i.pair.tp for i in self.images)
        fp = sum(i.pair.fp for i in self.images)
        fn = sum(i.pair.fn for i in self.images)
        ref_pos = np.array([i.pair.n_ref > 0 for i in self.images], dtype=bool)
        pred_pos = np.array([i.pair.n_pred > 0 for i in self.images], dtype=bool)
        sens = _ratio(int((ref_pos & pred_pos).sum()), int(ref_pos.sum()))
        spec = _ratio(int((~ref_pos & ~pred_pos).sum()), int((~ref_pos).sum()))
        recalls = [r for r in (sens, spec) if r is not None]
        out = {
            "n_images": n,
            "n_subjects": len({i.subject for i in self.images}),
            "n_missing_predictions": len(self.missing_predictions),
            "n_failed": len(self.failed),
            "n_ref": sum(i.pair.n_ref for i in self.images),
            "n_pred": sum(i.pair.n_pred for i in self.images),
        }
        out.update(_lesion_figures(tp, fp, fn, n))
        out.update(
            mean_abs_count_difference=_ratio(sum(i.pair.count_difference for i in self.images), n),
            subject_accuracy=_ratio(int((ref_pos == pred_pos).sum()), n),
            subject_sensitivity=sens,
            subject_specificity=spec,
            subject_balanced_accuracy=float(np.mean(recalls)) if recalls else None,
            subject_auc=_auc(np.array([i.score for i in self.images]), ref_pos),
        )
        return out

    def per_class(self) -> dict[str, dict[str, Any]]:
        """Sensitivity per MARS class of the reference lesions (``unknown`` when unassigned)."""
        out: dict[str, dict[str, Any]] = {}
        for cls in (*MARS_CLASSES, UNKNOWN_REGION):
            tp = fn = 0
            for img in self.images:
                cl = np.array(img.ref_classes, dtype=object)
                sel = cl == cls
                tp += int(img.pair.ref_matched[sel].sum())
                fn += int((~img.pair.ref_matched[sel]).sum())
            if cls == UNKNOWN_REGION and tp + fn == 0:
                continue
            out[cls] = {"n_ref": tp + fn, "tp": tp, "fn": fn, "sensitivity": _ratio(tp, tp + fn)}
        return out

    def per_kind(self) -> dict[str, dict[str, Any]]:
        """Lesion-wise figures per input kind (only kinds that have images)."""
        out: dict[str, dict[str, Any]] = {}
        for kind in (*KINDS, UNKNOWN):
            imgs = [i for i in self.images if i.kind == kind]
            if not imgs:
                continue
            d: dict[str, Any] = {
                "n_images": len(imgs),
                "n_ref": sum(i.pair.n_ref for i in imgs),
                "n_pred": sum(i.pair.n_pred for i in imgs),
            }
            d.update(
                _lesion_figures(
                    sum(i.pair.tp for i in imgs),
                    sum(i.pair.fp for i in imgs),
                    sum(i.pair.fn for i in imgs),
                    len(imgs),
                )
            )
            out[kind] = d
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per scored image, then a ``total`` row (the TSV's content)."""
        rows = [i.row() for i in self.images]
        t = self.totals()
        rows.append(
            {
                "participant_id": "total",
                "session_id": None,
                "source": None,
                "kind": None,
                "prediction": f"{t['n_missing_predictions']} missing",
                "n_ref": t["n_ref"],
                "n_pred": t["n_pred"],
                "tp": t["tp"],
                "fp": t["fp"],
                "fn": t["fn"],
                "sensitivity": t["sensitivity"],
                "precision": t["precision"],
                "f1": t["f1"],
                "count_difference": t["mean_abs_count_difference"],
                "ref_present": int(sum(r["ref_present"] for r in rows)),
                "pred_present": int(sum(r["pred_present"] for r in rows)),
            }
        )
        return rows

    def lesion_rows(self) -> list[dict[str, Any]]:
        """One row per reference and per predicted lesion, with its match."""
        out = []
        for img in self.images:
            p = img.pair
            to_pred = {r: (q, d, o) for q, r, d, o in p.matches}
            to_ref = {q: (r, d, o) for q, r, d, o in p.matches}
            for origin, centres, vols, partner in (
                ("reference", p.ref_centres_mm, p.ref_volumes_mm3, to_pred),
                ("prediction", p.pred_centres_mm, p.pred_volumes_mm3, to_ref),
            ):
                for k in range(centres.shape[0]):
                    other = partner.get(k + 1)
                    out.append(
                        {
                            "participant_id": f"sub-{img.subject}",
                            "session_id": f"ses-{img.session}" if img.session else None,
                            "source": img.source,
                            "kind": img.kind,
                            "origin": origin,
                            "component": k + 1,
                            "x": round(float(centres[k, 0]), 3),
                            "y": round(float(centres[k, 1]), 3),
                            "z": round(float(centres[k, 2]), 3),
                            "volume_mm3": round(float(vols[k]), 3),
                            "mars_class": img.ref_classes[k] if origin == "reference" else None,
                            "matched": other is not None,
                            "matched_component": other[0] if other else None,
                            "distance_mm": round(other[1], 3) if other else None,
                            "overlap": other[2] if other else None,
                        }
                    )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "totals": self.totals(),
            "per_class": self.per_class(),
            "per_kind": self.per_kind(),
            "missing_predictions": self.missing_predictions,
            "failed": self.failed,
            "images": [i.to_dict() for i in self.images],
            "elapsed_s": round(self.elapsed_s, 3),
        }


def find_reference_masks(
    reference_dir: Path,
    participant_label: list[str] | None = None,
    session_label: list[str] | None = None,
    exclude: Path | None = None,
) -> list[Path]:
    """Reference masks `**/*_label-CMB_mask.nii[.gz]`, sorted.

    Hidden folders, nested `derivatives/` datasets and anything under `exclude` (a prediction
    dataset nested in the reference dataset) are skipped.
    """
    excluded = exclude.resolve() if exclude is not None else None
    if excluded is not None and excluded == reference_dir.resolve():
        excluded = None
    found = []
    for ending in (".nii.gz", ".nii"):
        for path in reference_dir.rglob(f"*{MASK_ENDING}{ending}"):
            rel = path.relative_to(reference_dir)
            if any(part.startswith(".") or part == "derivatives" for part in rel.parts[:-1]):
                continue
            if excluded is not None and path.resolve().is_relative_to(excluded):
                continue
            if path.is_file():
                found.append(path)
    subs = {s.removeprefix("sub-") for s in participant_label or []}
    sess = {s.removeprefix("ses-") for s in session_label or []}
    out = []
    for path in sorted(set(found)):
        ents, _ = _split_name(_source_name(path) + "_x")
        if subs and ents.get("sub") not in subs:
            continue
        if sess and ents.get("ses") not in sess:
            continue
        out.append(path)
    return out


def _prediction_path(deriv_dir: Path, rel: Path, threshold: float | None) -> Path | None:
    name = _source_name(rel) + (MASK_ENDING if threshold is None else PROBSEG_ENDING)
    for ending in (".nii.gz", ".nii"):
        cand = deriv_dir / rel.parent / (name + ending)
        if cand.is_file():
            return cand
    return None


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=_AFFINE_ATOL_MM, rtol=0))


def score_image(
    ref_path: Path,
    deriv_dir: Path,
    reference_dir: Path,
    *,
    match_mm: float = 3.0,
    match: str = "both",
    threshold: float | None = None,
    raw_dir: Path | None = None,
) -> ImageScore:
    """Score the prediction for one reference mask; a missing prediction scores as empty.

    Raises InputError when the prediction is unreadable or not in the reference's grid.
    """
    rel = ref_path.relative_to(reference_dir)
    ref_img = load_nifti(ref_path)
    ref = np.asanyarray(ref_img.dataobj) > 0
    affine = np.asarray(ref_img.affine, dtype=np.float64)
    pred_path = _prediction_path(deriv_dir, rel, threshold)
    if pred_path is None:
        pred = np.zeros_like(ref)
        score = 0.0
    else:
        pred_img = load_nifti(pred_path)
        if pred_img.shape != ref_img.shape or not _same_grid(pred_img.affine, affine):
            raise InputError(
                f"is not in the grid of its reference {ref_path} (shape {pred_img.shape} vs "
                f"{ref_img.shape}, or a different affine)",
                path=pred_path,
                fix="Score predictions written in the grid of the source image, as the app does.",
            )
        data = np.asanyarray(pred_img.dataobj)
        if threshold is None:
            pred = data > 0
            score = None
        else:
            pred = data >= threshold
            score = float(data.max()) if data.size else 0.0
    pair, ref_comps = _score(pred, ref, affine, match_mm, match)
    if score is None:
        score = float(pair.n_pred)
    table = _read_lesion_table(ref_path.with_name(_source_name(ref_path) + LESIONS_ENDING))
    classes = reference_classes(ref_comps, affine, table, match_mm)
    kind, kind_from = infer_kind(ref_path, pred_path, raw_dir)
    ents, _ = _split_name(_source_name(ref_path) + "_x")
    return ImageScore(
        subject=ents.get("sub", UNKNOWN),
        session=ents.get("ses"),
        source=_source_name(ref_path),
        kind=kind,
        kind_from=kind_from,
        reference=str(rel),
        prediction=str(pred_path.relative_to(deriv_dir)) if pred_path else None,
        pair=pair,
        ref_classes=classes,
        score=score,
    )


def score_dirs(
    deriv_dir: str | Path,
    reference_dir: str | Path,
    *,
    match_mm: float = 3.0,
    match: str = "both",
    participant_label: list[str] | None = None,
    session_label: list[str] | None = None,
    threshold: float | None = None,
) -> Scores:
    """Score every reference mask of `reference_dir` against the same-named file in `deriv_dir`.

    Raises UsageError for a missing folder or bad option, NoMatchError (exit 18) when no
    reference mask is selected. Images whose prediction cannot be scored are listed in
    `Scores.failed` and left out of the figures.
    """
    t0 = time.perf_counter()
    _check_args(match_mm, match)
    deriv_dir, reference_dir = Path(deriv_dir), Path(reference_dir)
    for name, folder in (("DERIV_DIR", deriv_dir), ("REFERENCE_DIR", reference_dir)):
        if not folder.is_dir():
            raise UsageError(f"{name} is not a folder", path=folder, fix="Check the path.")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold} is outside 0..1", fix="Give e.g. 0.5.")
    masks = find_reference_masks(reference_dir, participant_label, session_label, deriv_dir)
    if not masks:
        sel = (
            " for the selected participants/sessions" if participant_label or session_label else ""
        )
        raise NoMatchError(
            f"no reference masks (*{MASK_ENDING}.nii.gz){sel} found",
            path=reference_dir,
            fix="Give a derivatives dataset laid out as "
            f"sub-XX[/ses-YY]/anat/<source>{MASK_ENDING}.nii.gz "
            "(e.g. OUT_DIR/derivatives/reference written by cmb-bidsapp-synth).",
        )
    raw_dir = raw_dataset_of(reference_dir)
    images, failed = [], []
    for ref_path in masks:
        try:
            images.append(
                score_image(
                    ref_path,
                    deriv_dir,
                    reference_dir,
                    match_mm=match_mm,
                    match=match,
                    threshold=threshold,
                    raw_dir=raw_dir,
                )
            )
        except InputError as err:
            failed.append(
                {"reference": str(ref_path.relative_to(reference_dir)), "error": str(err)}
            )
    settings = {
        "deriv_dir": str(deriv_dir.resolve()),
        "reference_dir": str(reference_dir.resolve()),
        "raw_dir": str(raw_dir) if raw_dir else None,
        "match": match,
        "match_mm": float(match_mm),
        "threshold": threshold,
        "prediction": "probseg >= threshold" if threshold is not None else "mask > 0",
        "connectivity": 26,
    }
    return Scores(images, failed, settings, time.perf_counter() - t0)
