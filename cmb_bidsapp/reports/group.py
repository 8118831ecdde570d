"""Group level: cohort tables from the participant outputs, their figures, and `group.html`.

Reads only tables and JSON files under OUTPUT_DIR, never an image:

- ``sub-*/[ses-*/]anat/<source>_desc-CMB_counts.tsv`` and ``…_desc-CMB_lesions.tsv``;
- ``sub-*/figures/<source>_desc-qc_<suffix>.json`` (the per-image QC record: status, error,
  input kind and files, registration flag, brain-mask warnings);
- ``…_label-CMB_mask.json`` (the mask's sidecar: its ``Sources`` give the input kind) only for
  an image without a QC record.

Writes ``group_desc-CMB_counts.tsv`` (one row per image: identity, status, counts per class and
region, threshold, QC flags, report link), ``group_desc-CMB_lesions.tsv`` (every lesion with
``participant_id``, ``session_id``, ``source``, ``input_kind`` before the lesion columns), their
JSON data dictionaries, and ``group.html`` (self-contained: inline CSS, a small inline script
that sorts the cohort table, figures embedded as SVG or base64 PNG).

Outlier rule (column ``outlier_count``): an image whose total exceeds
``max(OUTLIER_MIN_COUNT, Q3 + 3·IQR)`` of the totals of the successfully processed images
(Q1, Q3: quartiles). With the usual cohort (most scans 0-2 microbleeds) this flags totals above
20, the range where a detector picking up veins or artefacts is more likely than true disease.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..anatomy.regions import MARS_CLASSES, MARS_REGIONS, UNKNOWN_REGION
from ..outputs import COUNT_COLUMNS, LESION_COLUMNS

OUTLIER_MIN_COUNT = 20
"""Totals at or below this are never called outliers."""
OUTLIER_IQR_FACTOR = 3.0

ID_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "Participant label, with its sub- prefix."},
    "session_id": {"Description": "Session label, with its ses- prefix (n/a without sessions)."},
    "source": {
        "Description": "Entities of the source image, the prefix of its derivatives' names."
    },
    "input_kind": {
        "Description": "Input kind the lesions were detected on.",
        "Levels": {
            "swi": "susceptibility-weighted image",
            "t2starw": "T2*-weighted gradient echo",
            "megre": "multi-echo gradient echo (echoes combined)",
            "qsm": "quantitative susceptibility map",
            "n/a": "unknown",
        },
    },
}
_BOOL_LEVELS = {"true": "yes", "false": "no"}
QC_COLUMNS: dict[str, dict[str, Any]] = {
    "input_files": {"Description": "Input file(s), relative to BIDS_DIR, separated by ';'."},
    "status": {
        "Description": "State of the image's outputs.",
        "Levels": {
            "ok": "processed; all outputs present",
            "failed": "the latest participant run of this image failed (see error)",
            "incomplete": "outputs present but the counts table is missing",
        },
    },
    "failed": {"Description": "The latest participant run of this image failed.", "Levels": _BOOL_LEVELS},
    "error": {"Description": "Why it failed, and what to do (n/a when it did not)."},
    "n_rejected": {"Description": "Number of rejected candidates (n/a when not recorded)."},
    "registration_flag": {
        "Description": "The registration to the template was flagged as doubtful: MARS regions and MNI coordinates may be wrong.",
        "Levels": _BOOL_LEVELS,
    },
    "registration_reason": {"Description": "Why the registration was flagged."},
    "registration_mask_dice": {
        "Description": "Dice of the warped brain mask with the template's brain mask."
    },
    "brain_extraction_method": {"Description": "How the brain mask was made."},
    "brain_volume_cm3": {"Description": "Volume of the brain mask.", "Units": "cm^3"},
    "brain_mask_warnings": {"Description": "Brain-extraction warnings, separated by ';'."},
    "n_warnings": {"Description": "Number of warnings in the image's report."},
    "outlier_count": {
        "Description": f"The total is an outlier of the cohort: above max({OUTLIER_MIN_COUNT}, Q3 + {OUTLIER_IQR_FACTOR:g} IQR) of the processed images' totals.",
        "Levels": _BOOL_LEVELS,
    },
    "report": {"Description": "The subject's HTML report (relative to OUTPUT_DIR), with the image's anchor."},
}  # fmt: skip


@dataclass
class GroupData:
    """What the group level found in OUTPUT_DIR."""

    counts: pd.DataFrame
    lesions: pd.DataFrame
    missing_subjects: list[str] = field(default_factory=list)
    """Subjects of BIDS_DIR without any output."""
    outlier_threshold: float = float(OUTLIER_MIN_COUNT)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Reading OUTPUT_DIR
# ----------------------------------------------------------------------------------------

_SOURCE_RE = re.compile(r"^(?P<source>.+)_desc-CMB_counts\.tsv$")
_QC_RE = re.compile(r"^(?P<source>.+)_desc-qc_(?P<suffix>[A-Za-z0-9]+)\.json$")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _label(wanted: list[str] | None, prefix: str) -> set[str] | None:
    if not wanted:
        return None
    return {w if w.startswith(prefix + "-") else f"{prefix}-{w}" for w in wanted}


def _entity(source: str, key: str) -> str | None:
    m = re.search(rf"(?:^|_)({key}-[A-Za-z0-9]+)", source)
    return m.group(1) if m else None


def _kind_from_sources(sources: list[str]) -> str | None:
    for src in sources:
        name = str(src).rsplit("/", 1)[-1]
        if "_MEGRE." in name:
            return "megre"
        if "_Chimap." in name:
            return "qsm"
        if "_swi." in name:
            return "swi"
        if "_T2starw." in name:
            acq = _entity(name, "acq") or ""
            return "swi" if "swi" in acq.lower() else "t2starw"
    return None


def _scan(output_dir: Path, subjects: set[str] | None, sessions: set[str] | None):
    """Yield (subject dir name, anat dirs, figures dir) for each sub-* folder of OUTPUT_DIR."""
    with os.scandir(output_dir) as it:
        subs = sorted(e.name for e in it if e.is_dir() and e.name.startswith("sub-"))
    for sub in subs:
        if subjects is not None and sub not in subjects:
            continue
        root = output_dir / sub
        anat = [root / "anat"]
        try:
            with os.scandir(root) as it:
                anat += [
                    root / e.name / "anat"
                    for e in sorted(it, key=lambda e: e.name)
                    if e.is_dir()
                    and e.name.startswith("ses-")
                    and (sessions is None or e.name in sessions)
                ]
        except OSError:
            continue
        yield sub, [a for a in anat if a.is_dir()], root / "figures"


def _tsv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return (rows[0], rows[1:]) if rows else ([], [])


def _tsv_frame(header: list[str], rows: list[list[str]]) -> pd.DataFrame:
    text = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"
    return pd.read_csv(io.StringIO(text), sep="\t", na_values=["n/a"], keep_default_na=False)


def collect(
    output_dir: str | Path,
    *,
    bids_dir: str | Path | None = None,
    participant_label: list[str] | None = None,
    session_label: list[str] | None = None,
) -> GroupData:
    """Gather every image's counts, QC flags and lesions from OUTPUT_DIR (tables and JSON only)."""
    output_dir = Path(output_dir)
    subjects = _label(participant_label, "sub")
    sessions = _label(session_label, "ses")
    records: dict[str, dict[str, Any]] = {}
    lesion_groups: dict[tuple[str, ...], list[list[str]]] = {}
    notes: list[str] = []
    found_subjects: set[str] = set()

    for sub, anat_dirs, fig_dir in _scan(output_dir, subjects, sessions):
        sub_records: dict[str, dict[str, Any]] = {}
        # QC records first: they know the failed images too.
        if fig_dir.is_dir():
            for path in sorted(fig_dir.glob("*_desc-qc_*.json")):
                m = _QC_RE.match(path.name)
                qc = _read_json(path) if m else None
                if not qc:
                    continue
                ses = qc.get("session_id")
                if sessions is not None and ses not in sessions:
                    continue
                sub_records[m.group("source")] = {"qc": qc, "sub": sub}
        for anat in anat_dirs:
            for path in sorted(anat.glob("*_desc-CMB_counts.tsv")):
                source = _SOURCE_RE.match(path.name).group("source")
                rec = sub_records.setdefault(source, {"qc": None, "sub": sub})
                rec["counts_path"] = path
                rec["anat"] = anat
        for source, rec in sub_records.items():
            anat = rec.get("anat")
            qc = rec["qc"] or {}
            if anat is None:
                tables = qc.get("tables") or {}
                if tables.get("lesions"):
                    anat = (output_dir / tables["lesions"]).parent
            if anat is None:
                continue
            lpath = anat / f"{source}_desc-CMB_lesions.tsv"
            if not lpath.exists():
                continue
            try:
                header, rows = _tsv_rows(lpath)
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                notes.append(f"{lpath.name}: unreadable ({err}); its lesions are left out")
                continue
            if not header:
                continue
            kind = _image_kind(rec, anat, source)
            rec["kind"] = kind
            prefix = [sub, _entity(source, "ses") or "n/a", source, kind or "n/a"]
            bucket = lesion_groups.setdefault(tuple(header), [])
            bucket.extend(prefix + r for r in rows if r)
        records.update(sub_records)
        if sub_records:
            found_subjects.add(sub)

    counts_rows = [
        _counts_row(output_dir, source, rec, notes) for source, rec in sorted(records.items())
    ]
    counts = pd.DataFrame(counts_rows, columns=_count_columns())
    counts = counts.sort_values(["participant_id", "session_id", "source"], na_position="first")
    counts = counts.reset_index(drop=True)
    threshold = _flag_outliers(counts)

    frames = [
        _tsv_frame(["participant_id", "session_id", "source", "input_kind", *header], rows)
        for header, rows in lesion_groups.items()
    ]
    lesions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    id_cols = list(ID_COLUMNS)
    lesion_cols = id_cols + [c for c in LESION_COLUMNS if c in lesions.columns]
    lesion_cols += [c for c in lesions.columns if c not in lesion_cols]
    lesions = lesions.reindex(columns=lesion_cols) if len(lesions) else pd.DataFrame(
        columns=id_cols + list(LESION_COLUMNS)
    )  # fmt: skip
    if len(lesions):
        lesions = lesions.sort_values(
            ["participant_id", "session_id", "source", "lesion_id"], kind="stable"
        ).reset_index(drop=True)

    missing = []
    if bids_dir is not None and Path(bids_dir).is_dir():
        with os.scandir(bids_dir) as it:
            raw = sorted(e.name for e in it if e.is_dir() and e.name.startswith("sub-"))
        missing = [
            s for s in raw if s not in found_subjects and (subjects is None or s in subjects)
        ]
        missing = [s for s in missing if s not in set(counts["participant_id"])]
    return GroupData(counts, lesions, missing, threshold, notes)


def _image_kind(rec: dict[str, Any], anat: Path, source: str) -> str | None:
    qc = rec.get("qc") or {}
    if qc.get("input_kind"):
        return qc["input_kind"]
    meta = _read_json(anat / f"{source}_label-CMB_mask.json") or {}
    return _kind_from_sources([str(s) for s in meta.get("Sources") or []])


def _count_columns() -> list[str]:
    cols = list(ID_COLUMNS) + ["input_files", "status", "failed", "error"]
    cols += list(COUNT_COLUMNS) + ["n_rejected"]
    cols += [c for c in QC_COLUMNS if c not in cols]
    return cols


def _bool(value: Any) -> str:
    return "true" if value else "false"


def _counts_row(
    output_dir: Path, source: str, rec: dict[str, Any], notes: list[str]
) -> dict[str, Any]:
    qc = rec.get("qc") or {}
    sub = rec["sub"]
    row: dict[str, Any] = {
        "participant_id": sub,
        "session_id": qc.get("session_id") or _entity(source, "ses"),
        "source": source,
        "input_kind": rec.get("kind") or qc.get("input_kind"),
        "input_files": ";".join(qc.get("input_files") or []) or None,
    }
    counts_path = rec.get("counts_path")
    have_counts = False
    if counts_path is not None:
        try:
            header, rows = _tsv_rows(counts_path)
            if rows:
                values = dict(zip(header, rows[0], strict=False))
                for c in COUNT_COLUMNS:
                    v = values.get(c)
                    row[c] = None if v in (None, "", "n/a") else float(v)
                have_counts = True
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
            notes.append(f"{counts_path.name}: unreadable ({err})")
    if row["input_kind"] is None and rec.get("anat") is not None:
        row["input_kind"] = _image_kind(rec, rec["anat"], source)
    status = qc.get("status") or ("ok" if have_counts else "incomplete")
    if status == "ok" and not have_counts:
        status = "incomplete"
    row["status"] = status
    row["failed"] = _bool(status == "failed")
    row["error"] = qc.get("error") if status == "failed" else None
    row["n_rejected"] = qc.get("n_rejected")
    reg = qc.get("registration") or {}
    row["registration_flag"] = _bool(reg.get("Flag")) if reg else None
    row["registration_reason"] = reg.get("Reason") or None if reg.get("Flag") else None
    row["registration_mask_dice"] = (reg.get("Quality") or {}).get("mask_dice")
    brain = qc.get("brain_extraction") or {}
    row["brain_extraction_method"] = brain.get("method")
    row["brain_volume_cm3"] = brain.get("volume_cm3")
    row["brain_mask_warnings"] = "; ".join(brain.get("warnings") or []) or None
    row["n_warnings"] = len(qc.get("warnings") or []) if qc else None
    anchor = re.sub(r"[^A-Za-z0-9_-]", "_", f"{source}_{qc.get('suffix', '')}") if qc else ""
    has_page = (output_dir / f"{sub}.html").exists()
    row["report"] = (f"{sub}.html" + (f"#{anchor}" if anchor else "")) if has_page else None
    return row


def _flag_outliers(counts: pd.DataFrame) -> float:
    ok = pd.to_numeric(counts.loc[counts["status"] == "ok", "total"], errors="coerce").dropna()
    if len(ok) >= 4:
        q1, q3 = np.percentile(ok, [25, 75])
        threshold = max(float(OUTLIER_MIN_COUNT), float(q3 + OUTLIER_IQR_FACTOR * (q3 - q1)))
    else:
        threshold = float(OUTLIER_MIN_COUNT)
    totals = pd.to_numeric(counts["total"], errors="coerce")
    counts["outlier_count"] = np.where(totals > threshold, "true", "false")
    counts.loc[totals.isna(), "outlier_count"] = None
    return threshold


# ----------------------------------------------------------------------------------------
# Dictionaries
# ----------------------------------------------------------------------------------------


def counts_dictionary() -> dict[str, Any]:
    """Data dictionary of `group_desc-CMB_counts.tsv`."""
    out = {**ID_COLUMNS}
    for c in _count_columns():
        out.setdefault(c, QC_COLUMNS.get(c) or COUNT_COLUMNS.get(c) or {"Description": c})
    return out


def lesions_dictionary(columns: list[str]) -> dict[str, Any]:
    """Data dictionary of `group_desc-CMB_lesions.tsv` (the image's columns first)."""
    extra = {
        "x_mni": {"Description": "Centre of mass in MNI152NLin2009cAsym, x (n/a when registration failed).", "Units": "mm"},
        "y_mni": {"Description": "Centre of mass in MNI152NLin2009cAsym, y.", "Units": "mm"},
        "z_mni": {"Description": "Centre of mass in MNI152NLin2009cAsym, z.", "Units": "mm"},
    }  # fmt: skip
    return {
        c: ID_COLUMNS.get(c) or LESION_COLUMNS.get(c) or extra.get(c) or {"Description": c}
        for c in columns
    }


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------

_HIST_BINS = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 9), (10, 19), (20, 49), (50, None)]


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg") :], flags=re.S)
    return text


def _png_data_uri(fig, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def count_histogram_svg(totals: np.ndarray) -> str:
    """Bar chart of the number of images by total count (0, 1, 2, 3, 4, 5-9, …, ≥50)."""
    totals = np.asarray(totals, dtype=float)
    totals = totals[np.isfinite(totals)]
    labels, values = [], []
    for lo, hi in _HIST_BINS:
        labels.append(str(lo) if lo == hi else (f"≥{lo}" if hi is None else f"{lo}-{hi}"))
        sel = totals >= lo if hi is None else (totals >= lo) & (totals <= hi)
        values.append(int(sel.sum()))
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(5.2, 2.8)
    ax = fig.add_subplot(111)
    bars = ax.bar(labels, values, color="#4a78b5")
    ax.bar_label(bars, fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("microbleeds per image")
    ax.set_ylabel("images")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg(fig)


def prevalence_svg(counts: pd.DataFrame) -> str:
    """Percentage of processed images with ≥ 1 lesion, overall, per MARS class and region."""
    from .figures import CLASS_COLOURS

    ok = counts[counts["status"] == "ok"]
    n = max(len(ok), 1)
    names = ["any", *MARS_CLASSES, UNKNOWN_REGION]
    cols = ["total", *MARS_CLASSES, UNKNOWN_REGION]
    values = [100.0 * (pd.to_numeric(ok[c], errors="coerce") > 0).sum() / n for c in cols]
    colours = ["#555555", *[CLASS_COLOURS[c] for c in MARS_CLASSES], "#aaaaaa"]
    regions = list(MARS_REGIONS.values())
    rvalues = [100.0 * (pd.to_numeric(ok[r], errors="coerce") > 0).sum() / n for r in regions]
    from ..anatomy.regions import region_class

    rcolours = [CLASS_COLOURS[region_class(r)] for r in regions]
    fig = _new_figure(8.6, 3.2)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    bars = ax1.bar(names, values, color=colours)
    ax1.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax1.set_ylabel(f"% of {len(ok)} processed images")
    ax1.set_title("images with ≥ 1 microbleed", fontsize=9)
    ax2.barh([r.replace("_", " ") for r in regions][::-1], rvalues[::-1], color=rcolours[::-1])
    ax2.set_xlabel("% of images")
    ax2.set_title("by MARS region", fontsize=9)
    ax2.tick_params(axis="y", labelsize=8)
    for ax in (ax1, ax2):
        ax.spines[["top", "right"]].set_visible(False)
    ax1.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    return _svg(fig)


def _projections() -> tuple[list[np.ndarray], list[tuple[float, ...]]]:
    from ..anatomy import templates

    img = templates.template_mask(templates.DEFAULT_TEMPLATE, 2)
    mask = np.asanyarray(img.dataobj) > 0
    aff = img.affine
    lo = aff[:3, 3] + np.minimum(0, np.diag(aff)[:3]) * np.asarray(mask.shape)
    size = np.abs(np.diag(aff)[:3]) * np.asarray(mask.shape)
    ext = [(lo[a], lo[a] + size[a]) for a in range(3)]
    # sagittal (y → right, z up), coronal (x → right, z up), axial (x → right, y up)
    projs = [mask.any(axis=0), mask.any(axis=1), mask.any(axis=2)]
    extents = [(*ext[1], *ext[2]), (*ext[0], *ext[2]), (*ext[0], *ext[1])]
    return projs, extents


def glass_brain_png(lesions: pd.DataFrame) -> str | None:
    """Lesion centres in MNI space over the template brain's three projections (data URI)."""
    from .figures import CLASS_COLOURS

    if not {"x_mni", "y_mni", "z_mni"} <= set(lesions.columns):
        return None
    xyz = lesions[["x_mni", "y_mni", "z_mni"]].apply(pd.to_numeric, errors="coerce")
    good = xyz.notna().all(axis=1).to_numpy()
    pts = xyz.to_numpy(dtype=float)[good]
    classes = lesions.get("mars_class", pd.Series(["unknown"] * len(lesions)))
    classes = classes.astype(str).to_numpy()[good]
    projs, extents = _projections()
    size, alpha = (28.0, 0.8) if len(pts) < 200 else (7.0, 0.5)
    fig = _new_figure(11, 3.6)
    axes = fig.subplots(1, 3)
    coords = [(1, 2), (0, 2), (0, 1)]
    titles = [
        "sagittal (anterior →)",
        "coronal (left on the left)",
        "axial (left on the left, anterior ↑)",
    ]
    for ax, proj, ext, (c, r), title in zip(axes, projs, extents, coords, titles, strict=True):
        ax.imshow(proj.T.astype(float), origin="lower", extent=ext, cmap="Greys", vmin=0, vmax=6)
        ax.contour(proj.T.astype(float), levels=[0.5], colors=["#777777"], linewidths=0.8,
                   extent=ext, origin="lower")  # fmt: skip
        for cls in (*MARS_CLASSES, UNKNOWN_REGION):
            sel = classes == cls
            if np.any(sel):
                ax.scatter(pts[sel, c], pts[sel, r], s=size, alpha=alpha, linewidths=0,
                           color=CLASS_COLOURS.get(cls, "#555555"),
                           label=f"{cls} ({int(sel.sum())})")  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False, markerscale=2)  # fmt: skip
    fig.suptitle(f"{len(pts)} lesion(s) with MNI coordinates", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return _png_data_uri(fig)


# ----------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------

_TABLE_COLUMNS = [
    ("participant_id", "participant"),
    ("session_id", "session"),
    ("source", "source"),
    ("input_kind", "kind"),
    ("status", "status"),
    ("total", "total"),
    ("lobar", "lobar"),
    ("deep", "deep"),
    ("infratentorial", "infratent."),
    ("unknown", "unknown"),
    ("definite_threshold", "threshold"),
    ("n_rejected", "rejected"),
    ("registration_flag", "reg. flag"),
    ("brain_volume_cm3", "brain cm³"),
    ("n_warnings", "warnings"),
    ("outlier_count", "outlier"),
]


def _cell(value: Any) -> tuple[str, str]:
    """(text, sort key) of a cell."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a", ""
    if isinstance(value, float | np.floating):
        v = float(value)
        text = f"{v:.0f}" if v.is_integer() or abs(v) >= 100 else f"{v:.3g}"
        return text, repr(float(value))
    if isinstance(value, int | np.integer):
        return str(value), str(int(value))
    return str(value), str(value)


def cohort_table_html(counts: pd.DataFrame) -> str:
    """The sortable cohort table (rows link to the subject reports)."""
    head = "".join(
        f'<th data-col="{i}" data-type="{"num" if c in COUNT_COLUMNS or c in ("n_rejected", "brain_volume_cm3", "n_warnings") else "text"}">{html.escape(label)}</th>'
        for i, (c, label) in enumerate(_TABLE_COLUMNS)
    )  # fmt: skip
    lines = []
    records = counts.astype(object).where(counts.notna(), None).to_dict(orient="records")
    for row in records:
        cls = ""
        if row.get("status") == "failed":
            cls = "flag-failed"
        elif row.get("registration_flag") == "true" or row.get("outlier_count") == "true":
            cls = "flag-warn"
        cells = []
        for c, _ in _TABLE_COLUMNS:
            text, key = _cell(row.get(c))
            if c == "participant_id" and not row.get("report"):
                cells.append(f'<td data-v="{html.escape(key)}">{html.escape(text)}</td>')
            elif c == "participant_id":
                link = html.escape(str(row["report"]), quote=True)
                cells.append(f'<td data-v="{html.escape(key)}"><a href="{link}">{html.escape(text)}</a></td>')  # fmt: skip
            else:
                title = ""
                if c == "status" and row.get("error"):
                    title = f' title="{html.escape(str(row["error"]), quote=True)}"'
                if c == "registration_flag" and row.get("registration_reason"):
                    title = f' title="{html.escape(str(row["registration_reason"]), quote=True)}"'
                cells.append(f'<td data-v="{html.escape(key, quote=True)}"{title}>{html.escape(text)}</td>')  # fmt: skip
        lines.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    return (
        '<table class="sortable" id="cohort"><thead><tr>'
        + head
        + "</tr></thead><tbody>\n"
        + "\n".join(lines)
        + "\n</tbody></table>"
    )


def render_group_html(data: GroupData, *, command: str | None = None) -> str:
    """The group report (see the module docstring)."""
    import jinja2

    from .figures import CLASS_COLOURS
    from .subject import TEMPLATES_DIR

    counts = data.counts
    ok = counts[counts["status"] == "ok"]
    totals = pd.to_numeric(ok["total"], errors="coerce").to_numpy()
    failed = counts[counts["status"] == "failed"]
    incomplete = counts[counts["status"] == "incomplete"]
    reg_flag = counts[counts["registration_flag"] == "true"]
    outliers = counts[counts["outlier_count"] == "true"]
    brain_warn = counts[counts["brain_mask_warnings"].notna()]

    def rows(frame: pd.DataFrame, *cols: str) -> list[dict[str, Any]]:
        return frame.astype(object).where(frame.notna(), None)[["participant_id", "source", "report", *cols]].to_dict(orient="records")  # fmt: skip

    stats = {
        "images": len(counts),
        "subjects": counts["participant_id"].nunique(),
        "processed": len(ok),
        "failed": len(failed),
        "lesions": len(data.lesions),
        "with_cmb": int((totals > 0).sum()) if len(totals) else 0,
        "median": float(np.median(totals)) if len(totals) else None,
        "max": float(np.max(totals)) if len(totals) else None,
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("group.html.j2").render(
        css=(TEMPLATES_DIR / "report.css").read_text(),
        js=(TEMPLATES_DIR / "sortable.js").read_text(),
        version=__version__,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        stats=stats,
        table=cohort_table_html(counts),
        histogram=count_histogram_svg(totals),
        prevalence=prevalence_svg(counts) if len(ok) else None,
        glass=glass_brain_png(data.lesions) if len(data.lesions) else None,
        has_mni="x_mni" in data.lesions.columns,
        failed=rows(failed, "error"),
        incomplete=rows(incomplete),
        reg_flag=rows(reg_flag, "registration_reason"),
        outliers=rows(outliers, "total"),
        brain_warn=rows(brain_warn, "brain_mask_warnings"),
        outlier_threshold=data.outlier_threshold,
        missing=data.missing_subjects,
        notes=data.notes,
        class_colours=CLASS_COLOURS,
    )
