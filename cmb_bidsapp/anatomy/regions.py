"""The 13 MARS regions and 3 classes: the names every module and output uses."""

from __future__ import annotations

# Label values follow the MARS reference atlas (Sundaresan et al.): 1..13.
MARS_REGIONS: dict[int, str] = {
    1: "brainstem",
    2: "cerebellum",
    3: "basal_ganglia",
    4: "thalamus",
    5: "internal_capsule",
    6: "external_capsule",
    7: "corpus_callosum",
    8: "deep_periventricular_wm",
    9: "frontal",
    10: "parietal",
    11: "temporal",
    12: "occipital",
    13: "insula",
}
MARS_CLASSES: tuple[str, ...] = ("lobar", "deep", "infratentorial")
REGION_CLASS: dict[str, str] = {
    "brainstem": "infratentorial",
    "cerebellum": "infratentorial",
    "basal_ganglia": "deep",
    "thalamus": "deep",
    "internal_capsule": "deep",
    "external_capsule": "deep",
    "corpus_callosum": "deep",
    "deep_periventricular_wm": "deep",
    "frontal": "lobar",
    "parietal": "lobar",
    "temporal": "lobar",
    "occipital": "lobar",
    "insula": "lobar",
}
REGION_LABEL: dict[str, int] = {name: label for label, name in MARS_REGIONS.items()}
UNKNOWN_REGION = "unknown"  # outside every region (e.g. a lesion in a sulcus): class "unknown"


def region_class(region: str) -> str:
    """MARS class ('lobar', 'deep', 'infratentorial') of a region name, or 'unknown'."""
    return REGION_CLASS.get(region, UNKNOWN_REGION)


def label_class(label: int) -> str:
    """MARS class of an integer region label (0 or unknown labels give 'unknown')."""
    return region_class(MARS_REGIONS.get(int(label), UNKNOWN_REGION))
