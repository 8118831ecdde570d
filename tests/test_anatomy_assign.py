"""Tests of lesion-to-region assignment: majority, documented tie rules, nearest region, hemisphere."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from cmb_bidsapp.anatomy import assign
from cmb_bidsapp.anatomy.regions import REGION_LABEL, UNKNOWN_REGION
from cmb_bidsapp.detect.lesions import lesion_table

FRONTAL, DEEP_WM, THALAMUS = (
    REGION_LABEL["frontal"],
    REGION_LABEL["deep_periventricular_wm"],
    REGION_LABEL["thalamus"],
)
AFFINE = np.diag([0.5, 0.5, 1.0, 1.0])  # anisotropic voxels: distances must use mm


def _two_regions(shape=(40, 40, 40)) -> np.ndarray:
    regions = np.zeros(shape, np.int16)
    regions[:, :20] = FRONTAL  # j < 20
    regions[:, 20:] = DEEP_WM  # j >= 20
    return regions


def test_straddling_lesion_gets_the_majority_region():
    regions = _two_regions()
    labels = np.zeros(regions.shape, np.int32)
    labels[10:13, 18:23, 10:13] = 7  # j = 18, 19 frontal (18 voxels), 20..22 deep WM (27)
    table = assign.region_table(labels, AFFINE, regions)
    row = table.iloc[0]
    assert (row.lesion_id, row.region, row.mars_class, row.rule) == (
        7,
        "deep_periventricular_wm",
        "deep",
        "majority",
    )
    assert row.n_voxels == 45 and row.n_in_region == 27
    assert assign.assign_regions(labels, AFFINE, regions) == {
        7: ("deep_periventricular_wm", "deep")
    }


def test_exact_tie_is_resolved_by_the_centre_then_the_lowest_label_identically():
    regions = _two_regions()
    labels = np.zeros(regions.shape, np.int32)
    # 1: a 2x2x2 cube across the boundary, 4 frontal voxels (j=19) and 4 deep WM (j=20); its
    # centre of mass (5.5, 19.5, 5.5) rounds half up to voxel (6, 20, 6): deep WM
    labels[5:7, 19:21, 5:7] = 1
    # 2: frontal 1 vote, thalamus 1 vote, the centre voxel unlabelled: the lowest label wins
    labels[20:22, 19:21, 20:22] = 2
    regions[20:22, 19:21, 20:22] = 0
    regions[20, 19, 20], regions[21, 19, 21] = FRONTAL, THALAMUS
    # 3: frontal 2, thalamus 2, and the centre voxel (31, 20, 31) in deep WM (1 vote, not tied)
    labels[30:32, 19:21, 30:32] = 3
    regions[30:32, 19:21, 30:32] = 0
    regions[30, 19, 30] = regions[30, 19, 31] = FRONTAL
    regions[31, 19, 30] = regions[30, 20, 30] = THALAMUS
    regions[31, 20, 31] = DEEP_WM
    runs = [assign.region_table(labels, AFFINE, regions) for _ in range(3)]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0], other)
    t = runs[0].set_index("lesion_id")
    assert (t.loc[1, "region"], t.loc[1, "rule"]) == ("deep_periventricular_wm", "centre")
    # thalamus is label 4, frontal 9
    assert (t.loc[2, "region"], t.loc[2, "rule"]) == ("thalamus", "lowest_label")
    assert (t.loc[3, "region"], t.loc[3, "rule"]) == ("thalamus", "lowest_label")
    # the same answer whatever the lesion ids and their order
    relabelled = np.where(labels > 0, 10 - labels, 0)
    again = assign.assign_regions(relabelled, AFFINE, regions)
    assert again[9] == ("deep_periventricular_wm", "deep") and again[7] == ("thalamus", "deep")


def test_unlabelled_lesion_takes_the_nearest_region_within_5_mm():
    regions = _two_regions()
    regions[:, :, 25:] = 0  # unlabelled slab (k >= 25), 1 mm slices
    labels = np.zeros(regions.shape, np.int32)
    labels[4:6, 4:6, 27:29] = 1  # 3 mm from the last labelled slice (k = 24): frontal
    labels[4:6, 30:32, 33:35] = 2  # 9 mm away: unknown
    table = assign.region_table(labels, AFFINE, regions).set_index("lesion_id")
    assert table.loc[1, "region"] == "frontal" and table.loc[1, "rule"] == "nearest"
    assert table.loc[1, "distance_mm"] == 3.0
    assert table.loc[2, "region"] == UNKNOWN_REGION and table.loc[2, "mars_class"] == "unknown"
    assert table.loc[2, "rule"] == "none"
    # in-plane voxels are 0.5 mm: a lesion 8 voxels (4 mm) beside a region is within reach
    regions2 = np.zeros((40, 40, 10), np.int16)
    regions2[:, :10] = THALAMUS
    labels2 = np.zeros(regions2.shape, np.int32)
    labels2[10:12, 17:19, 5] = 4  # j = 17: 8 voxels x 0.5 mm = 4 mm from j = 9
    assert assign.assign_regions(labels2, AFFINE, regions2) == {4: ("thalamus", "deep")}


def test_hemisphere_and_mni_columns():
    regions = _two_regions()
    labels = np.zeros(regions.shape, np.int32)
    labels[2:4, 2:4, 2:4] = 1
    labels[30:32, 2:4, 2:4] = 2

    def to_mni(xyz):  # a toy mapping: MNI x = scanner x - 10 mm
        return np.asarray(xyz) - [10.0, 0.0, 0.0]

    table = assign.region_table(labels, AFFINE, regions, to_mni=to_mni).set_index("lesion_id")
    assert table.loc[1, "hemisphere"] == "left" and table.loc[2, "hemisphere"] == "right"
    np.testing.assert_allclose(table.loc[1, "mni_x"], 1.25 - 10.0)
    assert assign.hemisphere(0.0) == "midline" and assign.hemisphere(-0.5, 1.0) == "midline"
    assert "hemisphere" in assign.region_table(labels, AFFINE, regions).columns


def test_empty_label_map():
    regions = _two_regions()
    labels = np.zeros(regions.shape, np.int32)
    assert assign.assign_regions(labels, AFFINE, regions) == {}
    assert len(assign.region_table(labels, AFFINE, regions)) == 0


def test_plugs_into_the_lesion_table():
    regions = _two_regions()
    labels = np.zeros(regions.shape, np.int32)
    labels[10:13, 18:23, 10:13] = 1
    prob = (labels > 0).astype(np.float32)
    hook = functools.partial(assign.assign_regions, mars_native=regions)
    table = lesion_table(labels, AFFINE, prob, assign=hook)
    assert table.loc[0, "region"] == "deep_periventricular_wm"
    assert table.loc[0, "mars_class"] == "deep"
