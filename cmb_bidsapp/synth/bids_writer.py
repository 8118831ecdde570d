"""BIDS layout of a simulated cohort: raw dataset files and the reference derivatives dataset.

Raw dataset (``OUT_DIR``)::

    dataset_description.json  participants.tsv/.json  README  code/cmb-bidsapp-synth.json
    sub-001/anat/sub-001_swi.nii.gz (+ .json)  sub-001_part-phase_swi.nii.gz (+ .json)
    sub-002/anat/sub-002_T2starw.nii.gz
    sub-003/anat/sub-003_echo-<n>_part-mag_MEGRE.nii.gz, ..._part-phase_MEGRE.nii.gz
    sub-004/anat/sub-004_Chimap.nii.gz

Reference (``OUT_DIR/derivatives/reference``, a derivative dataset)::

    dataset_description.json  .bidsignore  figures/sub-001_preview.png (with --preview)
    sub-001/anat/sub-001_label-CMB_mask.nii.gz (+ .json)     microbleeds, raw grid, uint8 0/1
    sub-001/anat/sub-001_desc-brain_mask.nii.gz (+ .json)    true brain mask, raw grid
    sub-001/anat/sub-001_desc-CMB_lesions.tsv (+ .json)      one row per simulated microbleed
    sub-001/anat/sub-001_desc-mimics_lesions.tsv (+ .json)   calcifications, vein crossings,
                                                             flow voids, air-tissue artefacts

Every file is written atomically (:mod:`cmb_bidsapp.io`), NIfTI with gzip mtime 0, so the same
seed gives the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from .. import __version__
from ..io import atomic_save_nifti, atomic_write_json, atomic_write_text
from .subject import SimulatedSubject

BIDS_VERSION = "1.10.0"
GENERATOR = "cmb-bidsapp-synth"
REFERENCE_NAME = "reference"
SETTINGS_FILE = Path("code") / "cmb-bidsapp-synth.json"

LESION_DICTIONARY = {
    "lesion_id": {
        "Description": "Index of the simulated microbleed (1..n); the reference mask is binary"
    },
    "x": {"Description": "Centre of the microbleed, scanner (world) x", "Units": "mm"},
    "y": {"Description": "Centre of the microbleed, scanner (world) y", "Units": "mm"},
    "z": {
        "Description": "Centre of the microbleed, scanner (world) z (B0 direction)",
        "Units": "mm",
    },
    "i": {"Description": "Voxel index (first axis) of the centre in the raw image's grid"},
    "j": {"Description": "Voxel index (second axis) of the centre in the raw image's grid"},
    "k": {"Description": "Voxel index (third axis) of the centre in the raw image's grid"},
    "true_diameter_mm": {
        "Description": "Diameter of the simulated haemosiderin sphere",
        "Units": "mm",
    },
    "chi_ppm": {
        "Description": "Susceptibility of the source against the surrounding tissue",
        "Units": "ppm",
    },
    "apparent_diameter_mm": {
        "Description": "Equivalent-sphere diameter of the lesion's component of the reference mask "
        "(its visible extent with blooming); 0 when not visible",
        "Units": "mm",
    },
    "volume_mm3": {
        "Description": "Volume of the lesion's reference-mask component",
        "Units": "mm^3",
    },
    "visible": {
        "Description": "1 when the lesion has at least one voxel in the reference mask",
        "Levels": {"0": "not visible at this resolution, TE and contrast", "1": "visible"},
    },
    "mars_class": {
        "Description": "MARS class of the lesion's template position",
        "Levels": {"lobar": "lobar", "deep": "deep", "infratentorial": "infratentorial"},
    },
    "region": {"Description": "MARS region (one of 13) of the lesion's template position"},
    "hemisphere": {
        "Description": "Side of the lesion, from its x coordinate in template (MNI) space",
        "Levels": {"left": "x < 0 in MNI space", "right": "x >= 0 in MNI space"},
    },
}
MIMIC_DICTIONARY = {
    "mimic_id": {"Description": "Index of the mimic (1..n)"},
    "type": {
        "Description": "What mimics a microbleed here",
        "Levels": {
            "calcification": "diamagnetic calcification (dark on magnitude, dark on QSM, phase "
            "opposite to a microbleed)",
            "vein_crossing": "a vein running through the slice (a dark dot on one slice)",
            "flow_void": "signal void in a large artery",
            "air_tissue_artefact": "signal loss from the air/bone field near the skull base",
        },
    },
    "location": {
        "Description": "Where: globus_pallidus, choroid_plexus, parenchyma, the artery, "
        "the vein kind (medullary, cortical) or skull_base"
    },
    "x": {"Description": "Centre, scanner x", "Units": "mm"},
    "y": {"Description": "Centre, scanner y", "Units": "mm"},
    "z": {"Description": "Centre, scanner z", "Units": "mm"},
    "i": {"Description": "Voxel index (first axis) in the raw image's grid"},
    "j": {"Description": "Voxel index (second axis) in the raw image's grid"},
    "k": {"Description": "Voxel index (third axis) in the raw image's grid"},
    "size_mm": {
        "Description": "Diameter (calcification, vessel) or equivalent-sphere diameter "
        "of the artefact zone",
        "Units": "mm",
    },
    "chi_ppm": {
        "Description": "Susceptibility against the surrounding tissue (air: +9.4 against tissue)",
        "Units": "ppm",
    },
}
PARTICIPANTS_DICTIONARY = {
    "participant_id": {"Description": "Subject label"},
    "input_kind": {
        "Description": "The one simulated input of this subject",
        "Levels": {
            "swi": "3D SWI + phase",
            "t2starw": "2D T2*-weighted GRE",
            "megre": "3D multi-echo GRE, magnitude + phase",
            "qsm": "QSM chi map",
        },
    },
    "with_skull": {"Description": "1 when scalp and skull are in the image, 0 when skull-stripped"},
    "size": {
        "Description": "Simulation size",
        "Levels": {
            "small": "coarse grids for tests and the demo",
            "full": "realistic acquired grids, fine grid <= 0.5 mm",
        },
    },
    "n_microbleeds": {"Description": "Number of simulated microbleeds"},
    "n_visible": {"Description": "Number of microbleeds with at least one reference-mask voxel"},
    "subject_seed": {"Description": "Seed of this subject (simulate_subject(subject_seed, ...))"},
}


def subject_label(index: int, n_subjects: int) -> str:
    """Zero-padded label ``001``... (at least three digits)."""
    return f"{index + 1:0{max(3, len(str(n_subjects)))}d}"


def raw_description(settings: dict) -> dict:
    return {
        "Name": f"cmb-bidsapp-synth simulated cohort (seed {settings['seed']})",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0-1.0",
        "Authors": ["cmb-bidsapp developers", "cmb-bidsapp-synth (simulated data)"],
        "GeneratedBy": [_generated_by()],
        "HowToAcknowledge": "Simulated with cmb-bidsapp-synth; no real subjects.",
    }


def reference_description(settings: dict) -> dict:
    return {
        "Name": "Reference microbleed masks of a cmb-bidsapp-synth cohort",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [_generated_by()],
        "SourceDatasets": [{"URL": "../..", "Name": raw_description(settings)["Name"]}],
        "DatasetLinks": {"raw": "../.."},
    }


def _generated_by() -> dict:
    return {
        "Name": GENERATOR,
        "Version": __version__,
        "CodeURL": "https://github.com/cmb-bidsapp/cmb-bidsapp",
        "Description": "Physics-based simulation of SWI, T2*-GRE, multi-echo GRE and QSM with "
        "cerebral microbleeds and mimics",
    }


README = """# Simulated cerebral microbleed cohort

Written by `cmb-bidsapp-synth` (cmb-bidsapp {version}). Every image is SIMULATED: there is no
real subject in this dataset. Settings: `code/cmb-bidsapp-synth.json`; the same settings and
version give the same bytes.

Each subject has one input kind (see `participants.tsv`): 3D SWI with its phase
(`_swi`, `_part-phase_swi`), 2D T2*-weighted GRE (`_T2starw`), 3D multi-echo GRE
(`_echo-<n>_part-mag|phase_MEGRE`) or a QSM map (`_Chimap`, ppm).

The reference (microbleed masks in each raw grid, lesion and mimic tables, true brain masks)
is the derivative dataset `derivatives/reference/`.

Phase convention: phase = -gamma * deltaB * TE; B0 is along scanner z (the world z axis of the
NIfTI affines). A microbleed (paramagnetic) has negative phase above and below it along B0, a
calcification (diamagnetic) positive.
"""


REFERENCE_README = """# Reference of a simulated cerebral microbleed cohort

Written by `cmb-bidsapp-synth` (cmb-bidsapp {version}) beside the raw dataset two folders up.
Per subject, in the grid of its raw image: `_label-CMB_mask` (the visible extent of each
simulated microbleed, defined from the simulated signal; see the mask's sidecar),
`_desc-brain_mask` (the true brain), `_desc-CMB_lesions.tsv` (one row per simulated
microbleed, visible or not) and `_desc-mimics_lesions.tsv` (calcifications, veins running
through the slice, flow voids, air/bone artefact zones). `figures/` holds previews.
"""


def write_dataset_files(out_dir: Path, settings: dict, participants: pd.DataFrame) -> None:
    """Top-level files of the raw and the reference datasets (after all subjects)."""
    out_dir = Path(out_dir)
    ref = out_dir / "derivatives" / REFERENCE_NAME
    atomic_write_json(out_dir / "dataset_description.json", raw_description(settings))
    atomic_write_text(out_dir / "README", README.format(version=__version__))
    atomic_write_json(out_dir / SETTINGS_FILE, settings)
    atomic_write_text(out_dir / "participants.tsv", _tsv(participants))
    atomic_write_json(out_dir / "participants.json", PARTICIPANTS_DICTIONARY)
    atomic_write_json(ref / "dataset_description.json", reference_description(settings))
    atomic_write_text(ref / "README", REFERENCE_README.format(version=__version__))
    atomic_write_text(ref / ".bidsignore", "*_lesions.tsv\n*_lesions.json\nfigures/\n**/figures\n")


def _tsv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, sep="\t", index=False, lineterminator="\n", na_rep="n/a")
    return buf.getvalue()


def write_subject(out_dir: Path, label: str, subject: SimulatedSubject) -> list[Path]:
    """Write one subject's raw images, sidecars and reference files; return the paths."""
    out_dir = Path(out_dir)
    sub = f"sub-{label}"
    raw = out_dir / sub / "anat"
    ref = out_dir / "derivatives" / REFERENCE_NAME / sub / "anat"
    written = []
    for key, img in subject.images.items():
        name = f"{sub}_{key}"
        written.append(atomic_save_nifti(img, raw / f"{name}.nii.gz"))
        written.append(atomic_write_json(raw / f"{name}.json", subject.sidecars[key]))
    sources = [f"bids:raw:{sub}/anat/{sub}_{key}.nii.gz" for key in subject.images]
    from .reference import DEFINITION

    mask_meta = {
        "Type": "Lesion",
        "Sources": sources,
        "Description": "Simulated cerebral microbleeds: " + DEFINITION[subject.kind],
        "GeneratedBy": f"{GENERATOR} {__version__}",
    }
    written.append(atomic_save_nifti(subject.reference_mask, ref / f"{sub}_label-CMB_mask.nii.gz"))
    written.append(atomic_write_json(ref / f"{sub}_label-CMB_mask.json", mask_meta))
    brain_meta = {
        "Type": "Brain",
        "Sources": sources,
        "Description": "True brain mask of the simulation (template brain mask deformed to the "
        "subject, >= 50 % partial volume), in the raw grid",
    }
    written.append(atomic_save_nifti(subject.brain_mask, ref / f"{sub}_desc-brain_mask.nii.gz"))
    written.append(atomic_write_json(ref / f"{sub}_desc-brain_mask.json", brain_meta))
    written.append(atomic_write_text(ref / f"{sub}_desc-CMB_lesions.tsv", _tsv(subject.lesions)))
    written.append(atomic_write_json(ref / f"{sub}_desc-CMB_lesions.json", LESION_DICTIONARY))
    written.append(atomic_write_text(ref / f"{sub}_desc-mimics_lesions.tsv", _tsv(subject.mimics)))
    written.append(atomic_write_json(ref / f"{sub}_desc-mimics_lesions.json", MIMIC_DICTIONARY))
    return written


def is_synth_output(out_dir: Path) -> bool:
    """True when `out_dir` holds a dataset written by cmb-bidsapp-synth."""
    desc = Path(out_dir) / "dataset_description.json"
    try:
        content = json.loads(desc.read_text(encoding="utf-8"))
        return any(g.get("Name") == GENERATOR for g in content.get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return False
