"""Counts and data dictionaries of the TSV outputs against the contract (after clean-up)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cmb_bidsapp.anatomy.regions import MARS_CLASSES, MARS_REGIONS
from cmb_bidsapp.detect.cleanup import REJECTED_COLUMNS as CLEANUP_REJECTED
from cmb_bidsapp.detect.lesions import COLUMNS, lesion_table
from cmb_bidsapp.outputs import COUNT_COLUMNS, LESION_COLUMNS, REJECTED_COLUMNS, counts_row

CONTRACT_LESION = (
    "lesion_id x y z i j k volume_mm3 diameter_mm probability mars_class region hemisphere".split()
)
CONTRACT_COUNTS = ["total", "lobar", "deep", "infratentorial", "definite_threshold"]


def test_lesion_columns_and_dictionary_cover_the_contract():
    assert set(CONTRACT_LESION) <= set(COLUMNS)
    assert set(COLUMNS) <= set(LESION_COLUMNS)
    for col, unit in (("x", "mm"), ("volume_mm3", "mm^3"), ("diameter_mm", "mm")):
        assert LESION_COLUMNS[col]["Units"] == unit
    assert set(LESION_COLUMNS["mars_class"]["Levels"]) == {*MARS_CLASSES, "unknown"}
    assert set(LESION_COLUMNS["region"]["Levels"]) == {*MARS_REGIONS.values(), "unknown"}


def test_rejected_table_dictionary_covers_cleanup_columns():
    for col in CLEANUP_REJECTED:
        assert col in REJECTED_COLUMNS or col in LESION_COLUMNS, col


def test_counts_row_after_cleanup():
    """Counts follow the kept lesions: total, per class, per region, unknown, threshold."""
    labels = np.zeros((20, 20, 20), np.int32)
    labels[2:4, 2:4, 2:4] = 1
    labels[10:12, 10:12, 10:12] = 2
    labels[15:17, 15:17, 15:17] = 3
    regions = np.zeros_like(labels)
    regions[:8] = 9  # frontal
    regions[8:14] = 4  # thalamus
    table = lesion_table(labels, np.eye(4), np.full(labels.shape, 0.9, np.float32), regions)
    kept = table[table["lesion_id"] != 2]  # lesion 2 rejected by the clean-up
    row = counts_row(kept, 0.62).iloc[0]
    assert list(counts_row(kept, 0.62).columns) == list(COUNT_COLUMNS)
    assert set(CONTRACT_COUNTS) | set(MARS_REGIONS.values()) <= set(COUNT_COLUMNS)
    assert row["total"] == 2 and row["lobar"] == 1 and row["deep"] == 0
    assert row["unknown"] == 1 and row["frontal"] == 1 and row["thalamus"] == 0
    assert row["total"] == row[list(MARS_CLASSES)].sum() + row["unknown"]
    assert row["definite_threshold"] == 0.62
    empty = counts_row(pd.DataFrame(columns=COLUMNS), 0.5).iloc[0]
    assert empty["total"] == 0 and empty[list(MARS_REGIONS.values())].sum() == 0
