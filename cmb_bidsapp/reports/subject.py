"""Per-image QC record (figures + `desc-qc` JSON) and the per-subject HTML report `sub-XX.html`.

What is written, for each image (all through `bids.DerivativesWriter`, atomically):

- ``sub-XX/figures/<source>_desc-<name>_<suffix>.png`` with ``<name>`` one of ``brainmask``,
  ``bias``, ``registration``, ``regions``, ``lesion<id>`` (one per detected lesion, ``<id>``
  the ``lesion_id`` of the lesion table) and ``rejected<n>`` (the strongest rejected
  candidates, ``<n>`` the row of the rejected table);
- ``sub-XX/figures/<source>_desc-qc_<suffix>.json``: the image's QC record (status, error,
  input info, brain extraction, registration report, threshold, model, counts, warnings,
  figure paths, the run that made the outputs). `--reports-only` and the group level read it.

And one ``OUTPUT_DIR/sub-XX.html`` per subject, covering every image of the subject found in
OUTPUT_DIR (all sessions, also those processed by other jobs) plus the images of this run,
failed ones included with their error and what to do. The page has no script and loads nothing
from the internet: CSS is inline and figures are referenced relatively (``sub-XX/figures/…``).

`--reports-only` regenerates the pages from OUTPUT_DIR alone (no work dir needed): it reuses
the QC JSON and figures, and when they are missing (outputs of an older version) it redraws the
figures it can from the published derivatives (brain mask, lesion crops; not the bias field
nor the registration, whose inputs live only in the work dir).
"""

from __future__ import annotations

import html
import json
import logging
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..anatomy.regions import MARS_CLASSES, MARS_REGIONS, UNKNOWN_REGION
from ..bids import DerivativesWriter, InputImage, build_name

LOGGER = logging.getLogger("cmb_bidsapp.reports")

QC_FORMAT = 1
QC_DESC = "qc"
MANY_LESIONS = 50
"""Above this count the report warns that vessels or artefacts may have been detected."""
BRAIN_VOLUME_CM3 = (800.0, 2200.0)
"""A whole-brain mask outside this range (cm³) is reported (partial coverage or a failed mask)."""
TEMPLATES_DIR = Path(__file__).parent / "templates"

_KIND_NAMES = {
    "swi": "SWI",
    "t2starw": "T2*-weighted GRE",
    "megre": "multi-echo GRE (echoes combined)",
    "qsm": "QSM (susceptibility map)",
}


# ----------------------------------------------------------------------------------------
# Reading the published outputs
# ----------------------------------------------------------------------------------------


def read_tsv(path: str | Path) -> pd.DataFrame | None:
    """A BIDS TSV (``n/a`` → NaN), or None when the file is absent or unreadable."""
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None


def read_json(path: str | Path | None) -> dict[str, Any] | None:
    """A JSON object, or None when absent or broken."""
    if path is None:
        return None
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def output_paths(writer: DerivativesWriter, image: InputImage) -> dict[str, Path]:
    """Where the derivatives of `image` are (whether or not they exist)."""
    return {
        "lesions": writer.path_for(image, "lesions", extension=".tsv", desc="CMB"),
        "rejected": writer.path_for(image, "lesions", extension=".tsv", desc="CMBrejected"),
        "counts": writer.path_for(image, "counts", extension=".tsv", desc="CMB"),
        "mask": writer.path_for(image, "mask", label="CMB"),
        "brainmask": writer.path_for(image, "mask", desc="brain"),
        "preproc": writer.path_for(image, image.output_suffix, desc="preproc"),
        "probseg": writer.path_for(image, "probseg", label="CMB"),
    }


def qc_path(writer: DerivativesWriter, image: InputImage) -> Path:
    """``sub-XX/figures/<source>_desc-qc_<suffix>.json``."""
    return writer.figure_path(image, QC_DESC, ".json")


def _rel(writer: DerivativesWriter, path: Path) -> str:
    return Path(path).relative_to(writer.output_dir).as_posix()


def _sidecar(path: Path) -> dict[str, Any]:
    return read_json(Path(str(path).replace(".nii.gz", ".json"))) or {}


VERSION_PACKAGES = (
    "numpy",
    "scipy",
    "nibabel",
    "SimpleITK",
    "nipype",
    "pybids",
    "torch",
    "deepbet",
    "matplotlib",
)


def dependency_versions() -> dict[str, str]:
    """Installed versions of the main dependencies (from package metadata, nothing imported)."""
    from importlib import metadata

    out = {"cmb-bidsapp": __version__}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_MODEL_SKIP = {"Type", "Description", "Sources", "Threshold", "SkullStripped"}


def _model_from_sidecar(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _MODEL_SKIP}


def _counts(lesions: pd.DataFrame | None) -> dict[str, Any]:
    if lesions is None:
        return {}
    classes = lesions["mars_class"] if "mars_class" in lesions else pd.Series([], dtype=str)
    regions = lesions["region"] if "region" in lesions else pd.Series([], dtype=str)
    out: dict[str, Any] = {"total": int(len(lesions))}
    for c in (*MARS_CLASSES, UNKNOWN_REGION):
        out[c] = int((classes == c).sum())
    out["regions"] = {
        name: int((regions == name).sum())
        for name in MARS_REGIONS.values()
        if int((regions == name).sum())
    }
    return out


def _input_info_from_image(img) -> dict[str, Any]:
    import nibabel as nib

    from ..io import voxel_sizes

    vox = [round(float(v), 4) for v in voxel_sizes(img)]
    return {
        "shape": [int(s) for s in img.shape[:3]],
        "voxel_sizes_mm": vox,
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "thick_slices": bool(max(vox) >= 2.0 * min(vox)),
        "note": "read from the preprocessed image (the input's own record was not available)",
    }


def _warnings(qc: dict[str, Any], lesions: pd.DataFrame | None) -> list[str]:
    out: list[str] = []
    reg = qc.get("registration") or {}
    if reg.get("Flag"):
        out.append(
            f"Registration to the template was flagged ({reg.get('Reason') or 'no reason given'}): "
            "MARS regions and MNI coordinates may be wrong. Check the registration figure; a T1w "
            "of the same session improves it."
        )
    brain = qc.get("brain_extraction") or {}
    out += [f"Brain extraction: {w}" for w in brain.get("warnings") or []]
    volume = brain.get("volume_cm3")
    if volume is not None and float(volume) <= 0:
        out.append(
            "The brain mask is empty: no lesion can be found. Check the input's field of view and "
            "contrast, or re-run with --skull-strip skip for an already brain-extracted input."
        )
    elif volume is not None and not BRAIN_VOLUME_CM3[0] <= float(volume) <= BRAIN_VOLUME_CM3[1]:
        out.append(
            f"The brain mask holds {float(volume):.0f} cm³, outside the usual "
            f"{BRAIN_VOLUME_CM3[0]:.0f}-{BRAIN_VOLUME_CM3[1]:.0f} cm³ of a whole brain: a partial "
            "field of view, or a failed brain extraction (check the brain-mask figure)."
        )
    if lesions is not None:
        n_unknown = int((lesions.get("region", pd.Series([], dtype=str)) == UNKNOWN_REGION).sum())
        if n_unknown:
            out.append(
                f"{n_unknown} lesion(s) lie outside every MARS region (region 'unknown'): check "
                "them in the gallery (sulcal CSF, outside the brain, or a registration problem)."
            )
        if len(lesions) > MANY_LESIONS:
            out.append(
                f"Unusually many lesions ({len(lesions)}): check the gallery for veins, "
                "calcifications or artefacts before using the count."
            )
    return out


# ----------------------------------------------------------------------------------------
# The per-image QC record and its figures
# ----------------------------------------------------------------------------------------


def _image_identity(writer: DerivativesWriter, image: InputImage) -> dict[str, Any]:
    return {
        "participant_id": f"sub-{image.subject}",
        "session_id": f"ses-{image.session}" if image.session else None,
        "source": image.source_name,
        "suffix": image.suffix,
        "output_suffix": image.output_suffix,
        "input_kind": image.kind,
        "input_files": [s.removeprefix("bids:raw:") for s in writer.sources(image)],
        "entities": dict(image.entities),
    }


def build_image_qc(
    writer: DerivativesWriter,
    image: InputImage,
    *,
    preproc: str | Path,
    brain_mask: str | Path,
    labels: str | Path | None = None,
    candidates: str | Path | None = None,
    bias: str | Path | None = None,
    regions: str | Path | None = None,
    transform: str | Path | None = None,
    registration: dict[str, Any] | None = None,
    brain_report: dict[str, Any] | None = None,
    input_info: dict[str, Any] | None = None,
    threshold: float | None = None,
    origin: str = "workflow",
) -> dict[str, Any]:
    """Draw the figures of one image, write them and its QC JSON; return the QC record.

    The lesion table, the rejected candidates and the model fields are read from the published
    derivatives in OUTPUT_DIR (so the figures show exactly what was published); the images
    (`preproc`, `brain_mask`, `labels`, `candidates` (every candidate, numbered as the rejected
    table), `bias`, `regions`: NIfTI paths in the source grid) and
    the reports (`registration`, `brain_report`, `input_info`) come from the workflow, or from
    the derivatives when `origin` is ``"derivatives"`` (`--reports-only`). Never raises for a
    figure that cannot be drawn: it becomes a warning.
    """
    import time

    import nibabel as nib

    from . import figures

    t0 = time.monotonic()
    paths = output_paths(writer, image)
    lesions = read_tsv(paths["lesions"])
    rejected = read_tsv(paths["rejected"]) if paths["rejected"].exists() else None
    mask_meta = _sidecar(paths["mask"])
    counts_table = read_tsv(paths["counts"])
    if threshold is None:
        threshold = mask_meta.get("Threshold")
        if threshold is None and counts_table is not None and len(counts_table):
            threshold = counts_table["definite_threshold"].iloc[0]

    img = nib.load(str(preproc))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(brain_mask)).dataobj) > 0
    if labels is not None:
        label_map = np.asarray(nib.load(str(labels)).dataobj).astype(np.int32)
    elif paths["mask"].exists() and lesions is not None:
        label_map = figures.labels_from_mask(
            np.asarray(nib.load(str(paths["mask"])).dataobj), lesions
        )
    else:
        label_map = None
    brain_report = dict(brain_report or {})
    if "volume_cm3" not in brain_report:
        voxel_cm3 = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
        brain_report["volume_cm3"] = round(float(mask.sum()) * voxel_cm3, 1)
    if origin == "derivatives":
        meta = _sidecar(paths["brainmask"])
        brain_report.setdefault("method", meta.get("Method"))
        brain_report.setdefault("skull_detected", meta.get("SkullDetected"))
    figs = figures.make_image_figures(
        data,
        img.affine,
        mask,
        lesions if lesions is not None else pd.DataFrame(columns=["lesion_id", "i", "j", "k"]),
        labels=label_map,
        rejected=rejected,
        candidates=np.asarray(nib.load(str(candidates)).dataobj) if candidates else None,
        bias=np.asarray(nib.load(str(bias)).dataobj) if bias else None,
        regions=np.asarray(nib.load(str(regions)).dataobj) if regions else None,
        transform_path=str(transform) if transform else None,
        registration=registration,
    )

    written: dict[str, str] = {}
    for name, png in figs.overlays.items():
        written[name] = _rel(writer, writer.write_bytes(writer.figure_path(image, name), png))
    lesion_figs = {
        str(lid): _rel(writer, writer.write_bytes(writer.figure_path(image, f"lesion{lid}"), png))
        for lid, png in figs.lesions.items()
    }
    rejected_figs = [
        {
            "row": int(row),
            "figure": _rel(
                writer, writer.write_bytes(writer.figure_path(image, f"rejected{row}"), png)
            ),
        }
        for row, png in figs.rejected
    ]
    _remove_stale(writer, image, keep={*written.values(), *lesion_figs.values()} | {
        r["figure"] for r in rejected_figs
    })  # fmt: skip

    qc: dict[str, Any] = {
        "format": QC_FORMAT,
        "status": "ok" if counts_table is not None else "incomplete",
        "error": None,
        **_image_identity(writer, image),
        "input_info": input_info or _input_info_from_image(img),
        "brain_extraction": brain_report,
        "registration": registration,
        "threshold": None if threshold is None else float(threshold),
        "model": _model_from_sidecar(mask_meta),
        "counts": _counts(lesions),
        "n_rejected": None if rejected is None else int(len(rejected)),
        "figures": written,
        "lesion_figures": lesion_figs,
        "rejected_figures": rejected_figs,
        "tables": {
            k: _rel(writer, p) if p.exists() else None
            for k, p in paths.items()
            if k in ("lesions", "rejected", "counts")
        },
        "figure_warnings": figs.warnings,
        "origin": origin,
        "version": __version__,
        "versions": dependency_versions(),
        "figures_seconds": round(time.monotonic() - t0, 2),
    }
    qc["warnings"] = _warnings(qc, lesions) + figs.warnings
    writer.write_json(qc_path(writer, image), qc)
    return qc


def _remove_stale(writer: DerivativesWriter, image: InputImage, keep: set[str]) -> None:
    """Delete crops of lesions that a newer run no longer has (only this image's own files)."""
    folder = writer.figure_path(image, "x").parent
    prefix = build_name(image.entities) + "_desc-"
    pattern = re.compile(
        re.escape(prefix) + r"(lesion|rejected)\d+_" + re.escape(image.output_suffix) + r"\.png"
    )
    for path in folder.glob(f"{prefix}*.png"):
        if pattern.fullmatch(path.name) and _rel(writer, path) not in keep:
            path.unlink(missing_ok=True)


def failed_qc(
    writer: DerivativesWriter, image: InputImage, message: str, previous: dict | None
) -> dict[str, Any]:
    """The QC record of an image whose latest run failed (earlier results are kept, marked)."""
    qc = dict(previous or {})
    qc.update(_image_identity(writer, image))
    qc.update(
        {
            "format": QC_FORMAT,
            "status": "failed",
            "error": message,
            "earlier_results": bool(previous and previous.get("status") == "ok"),
        }
    )
    qc.setdefault("warnings", [])
    qc.setdefault("figures", {})
    qc.setdefault("lesion_figures", {})
    qc.setdefault("rejected_figures", [])
    return qc


def _qc_from_derivatives(writer: DerivativesWriter, image: InputImage) -> dict[str, Any] | None:
    """Rebuild the QC record and figures from OUTPUT_DIR alone (None when nothing is there)."""
    paths = output_paths(writer, image)
    if not (paths["preproc"].exists() and paths["brainmask"].exists()):
        return None
    return build_image_qc(
        writer,
        image,
        preproc=paths["preproc"],
        brain_mask=paths["brainmask"],
        origin="derivatives",
    )


# ----------------------------------------------------------------------------------------
# The subject page
# ----------------------------------------------------------------------------------------


def markdown_to_html(text: str) -> str:
    """A small Markdown subset (headings, paragraphs, lists, emphasis, code) as HTML."""

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", s)
        return s

    out: list[str] = []
    para: list[str] = []
    in_list = False

    def flush() -> None:
        nonlocal in_list
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if in_list:
            out.append("</ul>")
            in_list = False

    for line in text.splitlines():
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = min(len(heading.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif re.match(r"^[-*]\s+", stripped):
            if para:
                out.append(f"<p>{inline(' '.join(para))}</p>")
                para.clear()
            if not in_list:
                out.append("<ul>")
                in_list = True
            item = re.sub(r"^[-*]\s+", "", stripped)
            out.append(f"<li>{inline(item)}</li>")
        else:
            if in_list:
                out.append("</ul>")
                in_list = False
            para.append(stripped)
    flush()
    return "\n".join(out)


def model_card(config) -> dict[str, Any] | None:
    """The model card of the bundle used (`--models-dir`, else the shipped default), if any."""
    folder = getattr(config, "models_dir", None)
    if folder is None:
        folder = Path(__file__).resolve().parents[1] / "data" / "models" / "default"
    folder = Path(folder)
    card = read_json(folder / "model_card.json")
    md = None
    try:
        md = (folder / "model_card.md").read_text()
    except OSError:
        pass
    if card is None and md is None:
        return None
    scalars = {
        k: v
        for k, v in (card or {}).items()
        if isinstance(v, str | int | float | bool) and len(str(v)) < 300
    }
    return {
        "path": str(folder),
        "summary": scalars,
        "html": markdown_to_html(md) if md else None,
        "json": json.dumps(card, indent=2) if card else None,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return str(value)


def _table_rows(table: pd.DataFrame | None) -> list[dict[str, Any]]:
    if table is None:
        return []
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def _image_entry(output_dir: Path, qc: dict[str, Any]) -> dict[str, Any]:
    """What the template needs for one image: the QC record plus the table rows and figures."""
    tables = qc.get("tables") or {}
    lesions = read_tsv(output_dir / tables["lesions"]) if tables.get("lesions") else None
    rejected = read_tsv(output_dir / tables["rejected"]) if tables.get("rejected") else None
    lesion_figs = qc.get("lesion_figures") or {}
    rows = []
    for row in _table_rows(lesions):
        lid = row.get("lesion_id")
        key = str(int(lid)) if lid is not None else ""
        rows.append({"row": row, "figure": lesion_figs.get(key)})
    rej_rows = []
    from .figures import score_column

    score = score_column(rejected) if rejected is not None else None
    all_rej = _table_rows(rejected)
    for item in qc.get("rejected_figures") or []:
        r = int(item["row"])
        if 0 <= r < len(all_rej):
            rej = all_rej[r]
            rej_rows.append(
                {
                    "row": rej,
                    "figure": item.get("figure"),
                    "score": rej.get(score) if score else None,
                    "rule": rej.get("rule"),
                    "id": rej.get("lesion_id", rej.get("candidate_id", r + 1)),
                }
            )
    info = qc.get("input_info") or {}
    counts = qc.get("counts") or {}
    title = qc.get("source", "?") + "_" + str(qc.get("suffix", ""))
    return {
        "qc": qc,
        "anchor": re.sub(r"[^A-Za-z0-9_-]", "_", title),
        "title": title,
        "kind_name": _KIND_NAMES.get(qc.get("input_kind"), qc.get("input_kind") or "?"),
        "info": info,
        "counts": counts,
        "lesions": rows,
        "n_lesion_rows": 0 if lesions is None else len(lesions),
        "has_mni": lesions is not None and "x_mni" in lesions.columns,
        "rejected": rej_rows,
        "n_rejected": None if rejected is None else len(rejected),
        "rejected_table": tables.get("rejected"),
    }


def _jinja_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    from .figures import CLASS_COLOURS

    env.globals["class_colours"] = CLASS_COLOURS
    return env


def _css() -> str:
    return (TEMPLATES_DIR / "report.css").read_text()


def render_subject_html(
    subject: str, qcs: list[dict[str, Any]], output_dir: Path, config=None
) -> str:
    """The HTML page of one subject from its images' QC records (see the module docstring)."""
    from .figures import CROP_FOV_MM, CROP_PANEL_PX

    output_dir = Path(output_dir)
    entries = [_image_entry(output_dir, qc) for qc in qcs]
    try:
        citation = (output_dir / "logs" / "CITATION.md").read_text()
    except OSError:
        citation = None
    runs = []
    for qc in qcs:
        run = qc.get("run")
        if run and run not in runs:
            runs.append(run)
    versions = next((qc["versions"] for qc in qcs if qc.get("versions")), None)
    regenerated = None
    if config is not None and getattr(config, "reports_only", False):
        regenerated = shlex.join(str(c) for c in config.command)
    return (
        _jinja_env()
        .get_template("subject.html.j2")
        .render(
            subject=subject,
            entries=entries,
            css=_css(),
            version=__version__,
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            methods_html=markdown_to_html(re.sub(r"\A\s*# Methods\s*\n", "", citation))
            if citation
            else None,
            runs=runs,
            versions=versions or dependency_versions(),
            regenerated=regenerated,
            card=model_card(config) if config is not None else None,
            mars_classes=MARS_CLASSES,
            mars_regions=list(MARS_REGIONS.values()),
            crop_fov=CROP_FOV_MM,
            crop_size=(3 * CROP_PANEL_PX + 6, 2 * CROP_PANEL_PX + 3),
            has_group=(output_dir / "group.html").exists(),
        )
    )


def _subject_qcs(output_dir: Path, subject: str) -> dict[str, dict[str, Any]]:
    """Every QC record of a subject in OUTPUT_DIR, keyed by file name."""
    out = {}
    for path in sorted((output_dir / f"sub-{subject}" / "figures").glob("*_desc-qc_*.json")):
        qc = read_json(path)
        if qc and qc.get("format") == QC_FORMAT:
            out[path.name] = qc
    return out


def _qc_key(qc: dict[str, Any]) -> tuple:
    return (qc.get("session_id") or "", qc.get("source") or "", qc.get("suffix") or "")


def write_reports(config, inputs: list[InputImage], failures: dict[str, str]) -> list[Path]:
    """Write the QC records of this run's images and one `sub-XX.html` per subject.

    `failures` maps `InputImage.image_id` to the one-line message of an image that failed.
    Images with outputs but no QC record (older outputs, `--reports-only` after the work dir
    was deleted) get one rebuilt from OUTPUT_DIR. Returns the HTML paths written.
    """
    output_dir = Path(config.output_dir)
    writer = DerivativesWriter(output_dir, config.bids_dir)
    run = {
        "run_uuid": getattr(config, "run_uuid", None),
        "command": shlex.join(str(c) for c in getattr(config, "command", []) or []),
        "version": __version__,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "log_dir": _rel(writer, config.log_dir) if hasattr(config, "log_dir") else None,
    }
    current: dict[str, dict[str, dict[str, Any]]] = {}
    for image in inputs:
        path = qc_path(writer, image)
        qc = read_json(path)
        if qc is not None and qc.get("format") != QC_FORMAT:
            qc = None
        try:
            if image.image_id in failures:
                qc = failed_qc(writer, image, failures[image.image_id], qc)
                if not config.reports_only:
                    qc["run"] = run
                writer.write_json(path, qc)
            elif qc is None or _stale(writer, image, path):
                qc = _qc_from_derivatives(writer, image)
                if qc is None:
                    qc = {
                        **_image_identity(writer, image),
                        "format": QC_FORMAT,
                        "status": "missing",
                        "error": "no outputs yet: this image has not been processed (run the "
                        "participant level without --reports-only)",
                        "warnings": [],
                    }
                elif not config.reports_only:
                    qc["run"] = run
                    writer.write_json(path, qc)
            elif not config.reports_only:
                qc["run"] = run
                writer.write_json(path, qc)
        except Exception as err:  # one image's report must not stop the others
            LOGGER.warning("report of %s: %s", image.source_name, err)
            qc = failed_qc(writer, image, failures.get(image.image_id, ""), qc)
            qc["warnings"] = [*qc.get("warnings", []), f"report error: {err}"]
        current.setdefault(image.subject, {})[path.name] = qc

    written = []
    for subject in sorted(current):
        qcs = _subject_qcs(output_dir, subject)
        qcs.update(current[subject])
        ordered = sorted(qcs.values(), key=_qc_key)
        page = render_subject_html(f"sub-{subject}", ordered, output_dir, config)
        written.append(writer.write_text(output_dir / f"sub-{subject}.html", page))
    return written


def _stale(writer: DerivativesWriter, image: InputImage, qc_file: Path) -> bool:
    """True when the counts TSV is newer than the QC record (outputs rewritten without it)."""
    counts = output_paths(writer, image)["counts"]
    try:
        return counts.stat().st_mtime > qc_file.stat().st_mtime + 1.0
    except OSError:
        return False
