"""Tests of the lesion table: positions, sizes, probability, regions, hemisphere."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cmb_bidsapp.detect.lesions import COLUMNS, lesion_table


def _affine():
    # Oblique-free but flipped and scaled: i → -x (0.5 mm), j → z (2 mm), k → y (0.8 mm).
    aff = np.zeros((4, 4))
    aff[0, 0] = -0.5
    aff[2, 1] = 2.0
    aff[1, 2] = 0.8
    aff[:3, 3] = (10.0, -20.0, 5.0)
    aff[3, 3] = 1
    return aff


def test_table_columns_positions_sizes():
    labels = np.zeros((20, 20, 20), np.int16)
    labels[2:5, 3:5, 6:8] = 7  # 12 voxels, centre (3, 3.5, 6.5)
    labels[10, 10, 10] = 2
    prob = np.zeros(labels.shape, np.float32)
    prob[labels == 7] = 0.6
    prob[3, 4, 7] = 0.9
    prob[10, 10, 10] = 0.55
    aff = _affine()
    t = lesion_table(labels, aff, prob)
    assert list(t.columns) == list(COLUMNS)
    assert list(t["lesion_id"]) == [2, 7]
    row = t.set_index("lesion_id").loc[7]
    vox_vol = 0.5 * 2.0 * 0.8
    assert np.isclose(row["volume_mm3"], 12 * vox_vol)
    assert np.isclose(row["diameter_mm"], (6 * 12 * vox_vol / np.pi) ** (1 / 3))
    assert np.isclose(row["x"], 10.0 - 0.5 * 3.0)
    assert np.isclose(row["z"], 5.0 + 2.0 * 3.5)
    assert np.isclose(row["y"], -20.0 + 0.8 * 6.5)
    assert (row["i"], row["j"], row["k"]) == (3, 4, 6)  # rint: 3.5 → 4, 6.5 → 6 (half to even)
    assert np.isclose(row["probability"], 0.9)  # the maximum
    assert row["region"] == "unknown" and row["mars_class"] == "unknown"
    assert row["hemisphere"] == "n/a"


def test_regions_majority_and_ties_and_hemisphere():
    labels = np.zeros((20, 20, 20), np.int16)
    regions = np.zeros(labels.shape, np.int16)
    labels[2:6, 2:4, 2:4] = 1  # 16 voxels: 12 in frontal (9), 4 in thalamus (4)
    regions[2:5, 2:4, 2:4] = 9
    regions[5, 2:4, 2:4] = 4
    labels[10, 10, 10] = 5  # centre x = 0 exactly: midline
    labels[12:14, 10, 10] = 2  # a 1:1 tie: centre voxel rint(12.5) = 12 → brainstem (1)
    regions[12, 10, 10] = 1
    regions[13, 10, 10] = 2
    labels[15:17, 15:17, 15] = 3  # a 2:2 tie, centre (15.5, 15.5) → (16, 16) unlabelled → lowest
    regions[15, 15:17, 15] = 11
    regions[16, 15:17, 15] = 3
    labels[18, 18, 18] = 4  # nothing labelled
    prob = (labels > 0).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 3] = (-10, 0, 0)
    t = lesion_table(labels, aff, prob, regions, to_mni=lambda p: p)
    t = t.set_index("lesion_id")
    assert t.loc[1, "region"] == "frontal" and t.loc[1, "mars_class"] == "lobar"
    assert t.loc[2, "region"] == "brainstem" and t.loc[2, "mars_class"] == "infratentorial"
    assert t.loc[3, "region"] == "basal_ganglia" and t.loc[3, "mars_class"] == "deep"
    assert t.loc[4, "region"] == "unknown" and t.loc[4, "mars_class"] == "unknown"
    # x = i - 10: lesion 1 at x = -6.5 (left), 2 at 2.5, 3 at 5.5 and 4 at 8 (right), 5 at 0
    assert list(t["hemisphere"]) == ["left", "right", "right", "right", "midline"]


def test_empty_table_and_tsv():
    t = lesion_table(np.zeros((4, 4, 4), np.uint8), np.eye(4), np.zeros((4, 4, 4), np.float32))
    assert list(t.columns) == list(COLUMNS) and len(t) == 0
    assert isinstance(t, pd.DataFrame)
    assert t.to_csv(sep="\t", index=False).strip().split("\t") == list(COLUMNS)
