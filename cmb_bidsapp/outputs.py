"""The TSV outputs: their columns, data dictionaries (with units) and the counts per MARS class."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .anatomy.regions import MARS_CLASSES, MARS_REGIONS, UNKNOWN_REGION

LESION_COLUMNS: dict[str, dict[str, Any]] = {
    "lesion_id": {
        "Description": "Lesion number; the same integer labels the lesion in any labelled map of this image.",
    },
    "x": {"Description": "Centre of mass, scanner x coordinate (RAS+).", "Units": "mm"},
    "y": {"Description": "Centre of mass, scanner y coordinate (RAS+).", "Units": "mm"},
    "z": {"Description": "Centre of mass, scanner z coordinate (RAS+).", "Units": "mm"},
    "i": {"Description": "Voxel index (first axis) nearest the centre of mass, 0-based."},
    "j": {"Description": "Voxel index (second axis) nearest the centre of mass, 0-based."},
    "k": {"Description": "Voxel index (third axis) nearest the centre of mass, 0-based."},
    "volume_mm3": {"Description": "Lesion volume on the image grid.", "Units": "mm^3"},
    "diameter_mm": {
        "Description": "Diameter of the sphere with the lesion's volume.",
        "Units": "mm",
    },
    "probability": {
        "Description": "The lesion's score after discrimination (the highest voxel probability in the lesion).",
        "Units": "arbitrary (0-1)",
    },
    "mars_class": {
        "Description": "MARS class of the lesion's region.",
        "Levels": {c: c for c in MARS_CLASSES} | {UNKNOWN_REGION: "outside every MARS region"},
    },
    "region": {
        "Description": "MARS region holding most of the lesion's voxels (see the documentation for ties).",
        "Levels": {name: name.replace("_", " ") for name in MARS_REGIONS.values()}
        | {UNKNOWN_REGION: "outside every MARS region"},
    },
    "x_mni": {
        "Description": "Centre of mass in MNI152NLin2009cAsym space, x (n/a when registration failed).",
        "Units": "mm",
    },
    "y_mni": {"Description": "Centre of mass in MNI152NLin2009cAsym space, y.", "Units": "mm"},
    "z_mni": {"Description": "Centre of mass in MNI152NLin2009cAsym space, z.", "Units": "mm"},
    "hemisphere": {
        "Description": "Side of the lesion's centre in template space.",
        "Levels": {
            "left": "left",
            "right": "right",
            "midline": "centre exactly on the template midline (MNI x = 0)",
            "n/a": "unknown",
        },
    },
}

REJECTED_COLUMNS: dict[str, dict[str, Any]] = {
    "candidate_id": {"Description": "Candidate number (before discrimination and clean-up)."},
    "lesion_id": {
        "Description": "Candidate number in the lesion label map, when it was a lesion before clean-up."
    },
    "probability": {
        "Description": "The candidate's score from the student classifier.",
        "Units": "arbitrary (0-1)",
    },
    "rule": {
        "Description": "What removed the candidate: the student's score below the threshold, or a clean-up rule with its measured values (the first rule that applies, in the order size, diamagnetic, pallidal, air_artefact, vessel, brain_edge, csf; see the method documentation)."
    },
    "rules": {
        "Description": "Every clean-up rule that applies to the candidate, separated by ' | ', each with its measured values."
    },
}

COUNT_COLUMNS: dict[str, dict[str, Any]] = {
    "total": {"Description": "Number of lesions in the final mask."},
    **{c: {"Description": f"Number of lesions of MARS class {c}."} for c in MARS_CLASSES},
    UNKNOWN_REGION: {"Description": "Number of lesions outside every MARS region."},
    **{
        name: {"Description": f"Number of lesions in the MARS region {name.replace('_', ' ')}."}
        for name in MARS_REGIONS.values()
    },
    "definite_threshold": {
        "Description": "Probability threshold used for the final mask.",
        "Units": "arbitrary (0-1)",
    },
}


def counts_row(lesions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row: total, per class, per region, and the threshold used."""
    row: dict[str, Any] = {"total": len(lesions)}
    classes = lesions["mars_class"] if "mars_class" in lesions else pd.Series([], dtype=str)
    regions = lesions["region"] if "region" in lesions else pd.Series([], dtype=str)
    for c in (*MARS_CLASSES, UNKNOWN_REGION):
        row[c] = int((classes == c).sum())
    for name in MARS_REGIONS.values():
        row[name] = int((regions == name).sum())
    row["definite_threshold"] = float(threshold)
    return pd.DataFrame([row], columns=list(COUNT_COLUMNS))
