"""BIDS in and out: finding the input images with pybids, and naming and writing every derivative.

This is the only module that knows BIDS names. Inputs are found per subject and session, one
image per session by the contract's preference order (swi, t2starw, megre, qsm) unless
`--input-kind` or a filter file says otherwise. Outputs are named from the source's entities and
written through `DerivativesWriter`, which writes atomically and adds the JSON sidecars.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError, InvalidDatasetError, NoMatchError, UsageError
from .io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_default,
    nifti_bytes,
    part_file,
)

LOGGER = logging.getLogger("cmb_bidsapp.bids")

INPUT_KINDS: tuple[str, ...] = ("swi", "t2starw", "megre", "qsm")
"""Input kinds in the contract's order of preference for `--input-kind auto`."""

LESION_DARK = {"swi": True, "t2starw": True, "megre": True, "qsm": False}
"""Whether microbleeds are dark (magnitude-like) or bright (QSM) on each input kind."""

# BIDS entity order for file names (subset relevant to anatomical derivatives).
ENTITY_ORDER: tuple[tuple[str, str], ...] = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("reconstruction", "rec"),
    ("direction", "dir"),
    ("run", "run"),
    ("echo", "echo"),
    ("part", "part"),
    ("space", "space"),
    ("label", "label"),
    ("desc", "desc"),
)
SOURCE_ENTITIES = (
    "subject",
    "session",
    "task",
    "acquisition",
    "ceagent",
    "reconstruction",
    "direction",
    "run",
)
SWI_ACQ = re.compile(r"swi", re.IGNORECASE)

# Files of the derivatives that the BIDS validator does not know, listed in .bidsignore.
BIDSIGNORE_LINES = (
    "*_swi.nii.gz",
    "*_swi.json",
    "*_desc-CMB_lesions.tsv",
    "*_desc-CMB_lesions.json",
    "*_desc-CMB_counts.tsv",
    "*_desc-CMB_counts.json",
    "*_desc-CMBrejected_lesions.tsv",
    "*_desc-CMBrejected_lesions.json",
    "group_desc-CMB_*",
    "*.html",
    "figures/",
    "**/figures",  # the validator does not apply "figures/" to sub-XX/figures itself
    "logs/",
    "eval/",
    "eval",  # the validator reports the folder itself ("/eval/") unless a bare name matches it
    "*.tfm",
    "*_xfm.*",
)


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


@dataclass
class InputImage:
    """One image to process: a single file, or the echoes of a multi-echo GRE."""

    subject: str
    session: str | None
    kind: str
    files: list[Path]
    """The magnitude file(s); for MEGRE one per echo, in echo order."""
    phase_files: list[Path] = field(default_factory=list)
    """Phase file(s) beside the magnitude (MEGRE part-phase per echo, or an SWI phase image)."""
    echo_times: list[float] = field(default_factory=list)
    """Echo times in seconds (MEGRE: one per echo; single-echo: one or empty)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    entities: dict[str, str] = field(default_factory=dict)
    """Source entities kept in the output names (echo and part dropped)."""
    suffix: str = ""
    """Suffix of the source ('swi', 'T2starw', 'MEGRE', 'Chimap')."""
    t1w: Path | None = None
    """A T1w of the same session, if present (better brain mask and registration)."""
    error: str | None = None
    """Why this image cannot be processed (found while collecting inputs), or None."""

    @property
    def source_name(self) -> str:
        """`sub-01_ses-1_acq-x` — the entity part of every output name."""
        return build_name(self.entities)

    @property
    def output_suffix(self) -> str:
        """Suffix of the preprocessed image: the source's, except MEGRE → T2starw."""
        return "T2starw" if self.kind == "megre" else self.suffix

    @property
    def image_id(self) -> str:
        """A short identifier usable as a Nipype node name."""
        return re.sub(r"[^A-Za-z0-9]", "_", self.source_name + "_" + self.suffix)

    @property
    def anat_dir(self) -> Path:
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        return Path(*parts, "anat")

    @property
    def lesions_dark(self) -> bool:
        return LESION_DARK[self.kind]

    def all_files(self) -> list[Path]:
        return [*self.files, *self.phase_files]


def build_name(entities: dict[str, Any], suffix: str | None = None, extension: str = "") -> str:
    """Join entities in BIDS order: `sub-01_ses-1_acq-swi_desc-preproc_swi.nii.gz`."""
    parts = [
        f"{key}-{entities[name]}"
        for name, key in ENTITY_ORDER
        if entities.get(name) not in (None, "")
    ]
    if suffix:
        parts.append(suffix)
    return "_".join(parts) + extension


def strip_label(label: str, prefix: str) -> str:
    """`sub-01` → `01`; `01` → `01`."""
    label = label.strip()
    return label[len(prefix) + 1 :] if label.startswith(f"{prefix}-") else label


def load_filters(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a `--bids-filter-file`: {input kind: {entity: value}}, as in fMRIPrep."""
    if path is None:
        return {}
    path = Path(path)
    try:
        filters = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            "the BIDS filter file does not exist", path=path, fix="Check the path."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(
            f"is not valid JSON ({err})", path=path, fix="Fix the JSON syntax of the filter file."
        ) from None
    except OSError as err:
        raise UsageError(
            f"cannot be read ({err.strerror})", path=path, fix="Give a readable JSON file."
        ) from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(
            "must be a JSON object of {input kind: {entity: value}}",
            path=path,
            fix='For example {"swi": {"acquisition": "highres"}}.',
        )
    unknown = sorted(set(filters) - set(INPUT_KINDS) - {"t1w"})
    if unknown:
        raise UsageError(
            f"has unknown keys {unknown}",
            path=path,
            fix=f"Use the input kinds {', '.join(INPUT_KINDS)} (or t1w) as keys.",
        )
    return filters


def check_dataset(bids_dir: Path) -> None:
    """Refuse, with exit 16, a folder that is not a BIDS dataset at all (before pybids sees it)."""
    desc = bids_dir / "dataset_description.json"
    if not desc.exists():
        raise InvalidDatasetError(
            "is not a BIDS dataset: it has no dataset_description.json",
            path=bids_dir,
            fix="Point BIDS_DIR at the root of a BIDS dataset (https://bids.neuroimaging.io).",
        )
    try:
        content = json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise InvalidDatasetError(
            f"is not valid JSON ({type(err).__name__})",
            path=desc,
            fix="Fix its JSON syntax; it needs at least Name and BIDSVersion.",
        ) from None
    if not isinstance(content, dict) or "Name" not in content or "BIDSVersion" not in content:
        raise InvalidDatasetError(
            "lacks the required keys Name and BIDSVersion",
            path=desc,
            fix='Add them, e.g. {"Name": "My study", "BIDSVersion": "1.10.0"}.',
        )
    unreadable = _unreadable_folder(bids_dir)
    if unreadable is not None:
        raise InvalidDatasetError(
            "cannot be read (permission denied)",
            path=unreadable,
            fix="Make the dataset readable by the user running the app (chmod -R a+rX BIDS_DIR).",
        )


_NOT_INDEXED = {"derivatives", "sourcedata", "code", "models", "stimuli"}


def _unreadable_folder(bids_dir: Path) -> Path | None:
    """The first folder of the dataset (as pybids indexes it) that cannot be listed, or None."""
    failed: list[OSError] = []
    for root, dirs, _ in os.walk(bids_dir, onerror=failed.append):
        if failed:
            break
        here = Path(root)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not (here == bids_dir and d in _NOT_INDEXED)
        ]
        for d in dirs:
            if not os.access(here / d, os.R_OK | os.X_OK):
                return here / d
    return Path(failed[0].filename) if failed and failed[0].filename else None


def _layout(bids_dir: Path):
    os.environ.setdefault("NO_ET", "1")
    from bids import BIDSLayout, BIDSLayoutIndexer

    try:
        indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)
    except PermissionError as err:
        where = Path(err.filename) if err.filename else bids_dir
        if where.name == "layout_config.json":  # pybids looks for it in every folder it reads
            where = where.parent
        raise InvalidDatasetError(
            "cannot be read (permission denied)",
            path=where,
            fix="Make the dataset readable by the user running the app (chmod -R a+rX BIDS_DIR).",
        ) from None
    except Exception as err:  # pybids raises many types for broken datasets
        raise InvalidDatasetError(
            f"could not be indexed by pybids ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
            path=bids_dir,
            fix="Check the dataset with the BIDS validator.",
        ) from None


def read_sidecar(layout_files: list, image: Path) -> dict[str, Any]:
    """Merge the JSON sidecars that apply to `image` by the BIDS inheritance principle."""
    ents = _entities_of(image)
    img_dir = image.parent
    chain = []
    for jf in layout_files:
        jpath = Path(jf.path)
        jents = {k: v for k, v in jf.get_entities().items() if k not in ("extension", "datatype")}
        if jents.get("suffix") != ents.get("suffix"):
            continue
        if any(str(ents.get(k)) != str(v) for k, v in jents.items()):
            continue
        if jpath.parent != img_dir and jpath.parent not in img_dir.parents:
            continue
        chain.append((len(jpath.parent.parts), len(jents), jpath))
    meta: dict[str, Any] = {}
    for _, _, jpath in sorted(chain):
        try:
            content = json.loads(jpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(
                f"is not valid JSON ({err.__class__.__name__}: {str(err)[:80]})",
                path=jpath,
                fix="Fix the sidecar's JSON syntax.",
            ) from None
        except OSError as err:
            raise InputError(
                f"cannot be read ({err.strerror})", path=jpath, fix="Check its permissions."
            ) from None
        if not isinstance(content, dict):
            raise InputError(
                "is not a JSON object", path=jpath, fix="A sidecar must be a JSON object."
            )
        meta.update(content)
    return meta


_ENTITY_RE = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")
_KEY_TO_NAME = {key: name for name, key in ENTITY_ORDER}


def _entities_of(path: Path) -> dict[str, str]:
    name = path.name
    stem = name.split(".")[0]
    parts = stem.split("_")
    ents = {"suffix": parts[-1]}
    for part in parts[:-1]:
        m = _ENTITY_RE.fullmatch(part)
        if m:
            ents[_KEY_TO_NAME.get(m.group(1), m.group(1))] = m.group(2)
    return ents


def _source_entities(f) -> dict[str, str]:
    ents = f.get_entities()
    out = {}
    for name in SOURCE_ENTITIES:
        if ents.get(name) not in (None, ""):
            value = ents[name]
            out[name] = f"{int(value)}" if name == "run" and isinstance(value, int) else str(value)
    return out


def _run_key(f) -> int:
    run = f.get_entities().get("run")
    try:
        return int(run)
    except (TypeError, ValueError):
        return 0


def _classify(f) -> str | None:
    """Input kind of one BIDS file, or None if it is not an input the app uses."""
    ents = f.get_entities()
    suffix = ents.get("suffix")
    part = ents.get("part")
    if ents.get("extension") not in (".nii", ".nii.gz"):
        return None
    if suffix == "swi":
        return "swi" if part in (None, "mag") else None
    if suffix == "T2starw":
        if part not in (None, "mag"):
            return None
        return "swi" if SWI_ACQ.search(str(ents.get("acquisition", ""))) else "t2starw"
    if suffix == "MEGRE":
        return "megre" if part in (None, "mag") else None
    if suffix == "Chimap":
        return "qsm"
    return None


def _matches(f, filters: dict[str, Any]) -> bool:
    ents = f.get_entities()
    for key, wanted in filters.items():
        have = ents.get(key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if have is None:
            if None in options:
                continue
            return False
        if not any(
            str(have) == str(o) or (isinstance(o, str) and re.fullmatch(o, str(have)))
            for o in options
            if o is not None
        ):
            return False
    return True


def collect_inputs(
    bids_dir: str | Path,
    *,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    input_kind: str = "auto",
    filters: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[InputImage], list[str]]:
    """Find the images to process.

    Returns the inputs (one per subject/session by default) and human-readable notes on what was
    skipped and why. Raises `NoMatchError` (exit 18) when nothing matches the selection, and
    `UsageError` for labels that are not in the dataset.
    """
    bids_dir = Path(bids_dir).resolve()
    filters = filters or {}
    layout = _layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise NoMatchError(
            "contains no subject folder (sub-*)",
            path=bids_dir,
            fix="Check BIDS_DIR points at a dataset with data.",
        )
    if participant_labels:
        wanted = [strip_label(p, "sub") for p in participant_labels]
        missing = [p for p in wanted if p not in subjects]
        if missing:
            raise NoMatchError(
                f"has no participant(s) {', '.join('sub-' + m for m in missing)}",
                path=bids_dir,
                fix=f"Available: {', '.join('sub-' + s for s in subjects[:10])}{' …' if len(subjects) > 10 else ''}.",
            )
        subjects = wanted
    sessions_wanted = [strip_label(s, "ses") for s in session_labels] if session_labels else None

    all_files = layout.get(subject=subjects, return_type="object")
    json_files = [f for f in layout.get(extension=".json", return_type="object")]
    groups: dict[tuple[str, str | None], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    t1ws: dict[tuple[str, str | None], list] = defaultdict(list)
    phases: list = []
    for f in all_files:
        ents = f.get_entities()
        key = (ents.get("subject"), ents.get("session"))
        if sessions_wanted is not None and key[1] not in sessions_wanted:
            continue
        if ents.get("suffix") == "T1w" and ents.get("extension") in (".nii", ".nii.gz"):
            if _matches(f, filters.get("t1w", {})):
                t1ws[key].append(f)
            continue
        if ents.get("part") == "phase" and ents.get("extension") in (".nii", ".nii.gz"):
            phases.append(f)
            continue
        kind = _classify(f)
        if kind is None:
            continue
        if input_kind != "auto" and kind != input_kind:
            continue
        if not _matches(f, filters.get(kind, {})):
            continue
        groups[key][kind].append(f)

    notes: list[str] = []
    inputs: list[InputImage] = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] or "")):
        subject, session = key
        kinds = groups[key]
        chosen_kind = next(k for k in INPUT_KINDS if kinds.get(k))
        others = [k for k in INPUT_KINDS if kinds.get(k) and k != chosen_kind]
        where = f"sub-{subject}" + (f" ses-{session}" if session else "")
        if others:
            notes.append(
                f"{where}: using {chosen_kind}; also present: {', '.join(others)} (choose with --input-kind)"
            )
        files = kinds[chosen_kind]
        try:
            image = _make_input(
                chosen_kind, files, phases, json_files, subject, session, notes, where
            )
        except InputError as err:
            # The image fails alone; the others are still processed (exit 1 at the end).
            first = Path(sorted(files, key=lambda f: f.path)[0].path)
            ents = {k: v for k, v in _source_entities(files[0]).items()}
            image = InputImage(
                subject,
                session,
                chosen_kind,
                [first],
                entities=ents,
                suffix=first.name.split(".")[0].split("_")[-1],
                error=err.format(),
            )
        if t1ws.get(key):
            image.t1w = Path(sorted(t1ws[key], key=_run_key)[-1].path)
        inputs.append(image)

    if not inputs:
        what = "input image" if input_kind == "auto" else f"input of kind '{input_kind}'"
        sel = []
        if participant_labels:
            sel.append(f"participants {', '.join(participant_labels)}")
        if session_labels:
            sel.append(f"sessions {', '.join(session_labels)}")
        if filters:
            sel.append("the filter file")
        raise NoMatchError(
            f"contains no {what}" + (f" for {' and '.join(sel)}" if sel else ""),
            path=bids_dir,
            fix="Inputs are *_swi, *_T2starw, *_echo-<n>_MEGRE or *_Chimap NIfTI files in anat/; check --participant-label, --session-label, --input-kind and the filter file.",
        )
    return inputs, notes


def _make_input(kind, files, phases, json_files, subject, session, notes, where) -> InputImage:
    if kind == "megre":
        # Group the echoes by their entities except echo and part; keep the latest run.
        series: dict[tuple, list] = defaultdict(list)
        for f in files:
            ents = _source_entities(f)
            series[tuple(sorted(ents.items()))].append(f)
        key = sorted(series, key=lambda k: (dict(k).get("run", "0"), k))[-1]
        if len(series) > 1:
            notes.append(
                f"{where}: {len(series)} MEGRE series; using {build_name(dict(key))} (choose with --bids-filter-file)"
            )
        echoes = sorted(series[key], key=lambda f: int(f.get_entities().get("echo", 0) or 0))
        mags = [Path(f.path) for f in echoes]
        metas = [read_sidecar(json_files, m) for m in mags]
        echo_times = []
        for mag, meta in zip(mags, metas):
            te = meta.get("EchoTime")
            if not isinstance(te, int | float) or te <= 0:
                raise InputError(
                    "has no valid EchoTime in its sidecar",
                    path=mag,
                    fix='Add "EchoTime" (in seconds) to its JSON sidecar.',
                )
            echo_times.append(float(te))
        phase_files = []
        for f in echoes:
            ents = f.get_entities()
            match = [
                p
                for p in phases
                if p.get_entities().get("suffix") == "MEGRE" and _same_except(p, f, ("part",))
            ]
            if match:
                phase_files.append(Path(match[0].path))
        if phase_files and len(phase_files) != len(mags):
            notes.append(f"{where}: phase is missing for some echoes; phase is not used")
            phase_files = []
        return InputImage(
            subject=subject,
            session=session,
            kind=kind,
            files=mags,
            phase_files=phase_files,
            echo_times=echo_times,
            metadata=metas[0],
            entities=dict(key),
            suffix="MEGRE",
        )
    chosen = sorted(files, key=lambda f: (_run_key(f), f.path))[-1]
    if len(files) > 1:
        skipped = [Path(f.path).name for f in files if f is not chosen]
        notes.append(
            f"{where}: {len(files)} {kind} images; using {Path(chosen.path).name}, skipping {', '.join(skipped)} (choose with --bids-filter-file)"
        )
    path = Path(chosen.path)
    meta = read_sidecar(json_files, path)
    ents = chosen.get_entities()
    phase_files = [
        Path(p.path)
        for p in phases
        if p.get_entities().get("suffix") == ents.get("suffix")
        and _same_except(p, chosen, ("part",))
    ]
    te = meta.get("EchoTime")
    return InputImage(
        subject=subject,
        session=session,
        kind=kind,
        files=[path],
        phase_files=phase_files[:1],
        echo_times=[float(te)] if isinstance(te, int | float) and te > 0 else [],
        metadata=meta,
        entities=_source_entities(chosen),
        suffix=ents.get("suffix"),
    )


def _same_except(a, b, ignore: tuple[str, ...]) -> bool:
    ea = {k: v for k, v in a.get_entities().items() if k not in ignore}
    eb = {k: v for k, v in b.get_entities().items() if k not in ignore}
    return ea == eb


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------


def dataset_description(bids_dir: Path | None, container: str | None = None) -> dict[str, Any]:
    """The derivative dataset's description: deterministic, so concurrent jobs write the same bytes."""
    generated = {
        "Name": "cmb-bidsapp",
        "Version": __version__,
        "CodeURL": "https://github.com/cmb-bidsapp/cmb-bidsapp",
        "Description": "Cerebral microbleed detection",
    }
    container = container or os.environ.get("CMB_BIDSAPP_CONTAINER")
    if container:
        generated["Container"] = {
            "Type": container.split(":")[0],
            "Tag": container.split(":", 1)[-1],
        }
    desc: dict[str, Any] = {
        "Name": "cmb-bidsapp outputs",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "HowToAcknowledge": "Cite cmb-bidsapp and the methods in logs/CITATION.md.",
    }
    if bids_dir is not None:
        source = {"URL": Path(bids_dir).resolve().as_uri()}
        try:
            src_desc = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
            if src_desc.get("DatasetDOI"):
                source["DOI"] = src_desc["DatasetDOI"]
            if src_desc.get("Name"):
                source["Name"] = src_desc["Name"]
        except (OSError, json.JSONDecodeError):
            pass
        desc["SourceDatasets"] = [source]
    return desc


class DerivativesWriter:
    """The one writer of derivatives: BIDS names from the source, sidecars, atomic writes.

    Inside `with writer.transaction():` every file is first written completely under a hidden
    temporary name, and all of them are renamed into place only when the block succeeds, in the
    order written (so the counts TSV, written last, marks a complete image). If the block fails
    (an error, a full disk), nothing new appears and earlier outputs stay as they were.
    """

    def __init__(self, output_dir: str | Path, bids_dir: str | Path | None = None):
        self.output_dir = Path(output_dir)
        self.bids_dir = Path(bids_dir) if bids_dir is not None else None
        self._pending: list[tuple[Path, Path]] | None = None

    @contextlib.contextmanager
    def transaction(self):
        """Stage every write of the block; publish all of them at the end, or none."""
        self._pending = []
        try:
            yield self
        except BaseException:
            for tmp, _ in self._pending:
                tmp.unlink(missing_ok=True)
            raise
        else:
            for tmp, final in self._pending:
                os.replace(tmp, final)
        finally:
            self._pending = None

    def _write_bytes(self, path: Path, data: bytes) -> Path:
        if _same_content(path, data):
            return path  # unchanged: keep the file (and its time stamp, which Nipype's cache uses)
        if self._pending is None:
            return atomic_write_bytes(path, data)
        fd, tmp = part_file(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
        except OSError as err:  # a full disk: name the output, not its hidden temporary file
            Path(tmp).unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(path)) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._pending.append((Path(tmp), path))
        return path

    def _write_json(self, path: Path, obj: Any) -> Path:
        return self._write_bytes(
            path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode()
        )

    # -- dataset-level files ---------------------------------------------------------------
    def init_dataset(self) -> None:
        """Write dataset_description.json and .bidsignore (idempotent and concurrency-safe)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        desc_path = self.output_dir / "dataset_description.json"
        desc = dataset_description(self.bids_dir)
        if not desc_path.exists() or _read_json(desc_path) != desc:
            atomic_write_json(desc_path, desc)
        ignore_path = self.output_dir / ".bidsignore"
        text = "\n".join(BIDSIGNORE_LINES) + "\n"
        if not ignore_path.exists() or ignore_path.read_text() != text:
            atomic_write_text(ignore_path, text)

    # -- names -----------------------------------------------------------------------------
    def path_for(
        self,
        image: InputImage,
        suffix: str,
        *,
        extension: str = ".nii.gz",
        desc: str | None = None,
        label: str | None = None,
        space: str | None = None,
    ) -> Path:
        ents = dict(image.entities)
        ents.update({"space": space, "label": label, "desc": desc})
        return self.output_dir / image.anat_dir / build_name(ents, suffix, extension)

    def relpath(self, path: Path) -> str:
        return str(Path(path).relative_to(self.output_dir))

    def sources(self, image: InputImage) -> list[str]:
        """`Sources` entries: BIDS URIs of the raw inputs."""
        out = []
        for f in image.all_files():
            try:
                rel = (
                    Path(f).resolve().relative_to(self.bids_dir.resolve())
                    if self.bids_dir
                    else Path(f).name
                )
            except ValueError:
                rel = Path(f).name
            out.append(f"bids:raw:{rel}")
        return out

    # -- writers ---------------------------------------------------------------------------
    def write_nifti(
        self,
        image: InputImage,
        data: np.ndarray,
        affine: np.ndarray,
        suffix: str,
        *,
        desc: str | None = None,
        label: str | None = None,
        dtype: Any = np.float32,
        meta: dict[str, Any] | None = None,
        header_from: nib.Nifti1Header | None = None,
    ) -> Path:
        """Write one image in the source grid with its JSON sidecar."""
        path = self.path_for(image, suffix, desc=desc, label=label)
        arr = np.asarray(data).astype(dtype, copy=False)
        img = nib.Nifti1Image(arr, affine)
        img.header.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        if np.issubdtype(np.dtype(dtype), np.integer):
            img.header["scl_slope"] = 1
            img.header["scl_inter"] = 0
        sidecar = {"Sources": self.sources(image), **(meta or {})}
        self._write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        self._write_bytes(path, nifti_bytes(img, gzipped=True))
        return path

    def write_tsv(
        self,
        image: InputImage | None,
        table: pd.DataFrame,
        *,
        desc: str,
        suffix: str,
        dictionary: dict[str, Any],
        name: str | None = None,
    ) -> Path:
        """Write a TSV (n/a for missing values) and its JSON data dictionary."""
        if image is not None:
            path = self.path_for(image, suffix, extension=".tsv", desc=desc)
        else:
            path = self.output_dir / (name or f"group_desc-{desc}_{suffix}.tsv")
        text = table.to_csv(
            sep="\t", index=False, na_rep="n/a", lineterminator="\n", float_format="%.6g"
        )
        self._write_json(path.with_suffix(".json"), dictionary)
        self._write_bytes(path, text.encode("utf-8"))
        return path

    def write_json(self, path: Path, obj: Any) -> Path:
        return self._write_json(Path(path), obj)

    # -- report files (figures, QC JSON, HTML) -------------------------------------------
    def figure_path(self, image: InputImage, desc: str, extension: str = ".png") -> Path:
        """`OUTPUT_DIR/sub-XX/figures/<source>_desc-<desc>_<suffix><extension>` (report files)."""
        ents = dict(image.entities)
        ents["desc"] = desc
        name = build_name(ents, image.output_suffix, extension)
        return self.output_dir / f"sub-{image.subject}" / "figures" / name

    def write_bytes(self, path: Path, data: bytes) -> Path:
        """Write any file under OUTPUT_DIR atomically (staged when inside a transaction)."""
        return self._write_bytes(Path(path), data)

    def write_text(self, path: Path, text: str) -> Path:
        """Write a UTF-8 text file under OUTPUT_DIR atomically."""
        return self._write_bytes(Path(path), text.encode("utf-8"))


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
