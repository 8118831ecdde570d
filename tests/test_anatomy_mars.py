"""Tests of the MARS region map in MNI152NLin2009cAsym space."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.anatomy import mars
from cmb_bidsapp.anatomy.regions import MARS_REGIONS, REGION_LABEL, label_class


def _label_at(img, xyz_mm):
    ijk = np.rint(np.linalg.inv(img.affine) @ np.r_[xyz_mm, 1.0])[:3].astype(int)
    return int(np.asanyarray(img.dataobj)[tuple(ijk)])


def test_map_grid_and_labels():
    img = mars.mars_map_mni()
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8
    assert img.shape == (193, 229, 193)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 1.0)
    np.testing.assert_allclose(img.affine[:3, 3], [-96.0, -132.0, -78.0])
    assert set(np.unique(data)) == set(range(14))
    # plausible volumes (mm^3): brain about 1.2-1.9 l, every region present and not tiny
    counts = np.bincount(data.ravel(), minlength=14)
    assert 1.2e6 < counts[1:].sum() < 1.9e6
    assert counts[1:].min() > 5000


def test_map_cache_is_read_only_and_class_map_consistent():
    a, b = mars.mars_map_mni(), mars.mars_map_mni()
    assert a is not b
    with pytest.raises(ValueError):
        np.asarray(a.dataobj)[0, 0, 0] = 5
    labels = np.asanyarray(a.dataobj)
    classes = np.asanyarray(mars.mars_class_map_mni().dataobj)
    for label in range(14):
        expected = {"lobar": 1, "deep": 2, "infratentorial": 3}.get(label_class(label), 0)
        assert np.all(classes[labels == label] == expected)


@pytest.mark.parametrize(
    ("xyz", "region"),
    [
        ((0, -30, -35), "brainstem"),
        ((20, -60, -40), "cerebellum"),
        ((-25, 2, 2), "basal_ganglia"),
        ((12, -18, 8), "thalamus"),
        ((0, -5, 25), "corpus_callosum"),
        ((-31, 3, 0), "external_capsule"),
        ((-40, 30, 20), "frontal"),
        ((40, -40, 45), "parietal"),
        ((-55, -20, -10), "temporal"),
        ((-38, 0, 5), "insula"),
        ((30, -10, 28), "deep_periventricular_wm"),
    ],
)
def test_landmarks(xyz, region):
    assert MARS_REGIONS[_label_at(mars.mars_map_mni(), xyz)] == region


def test_left_internal_capsule_posterior_limb():
    img = mars.mars_map_mni()
    # posterior limb of the internal capsule, between thalamus and putamen/pallidum
    labels = [_label_at(img, (-20 + dx, -12, 8)) for dx in (-2, -1, 0, 1, 2)]
    assert REGION_LABEL["internal_capsule"] in labels


def test_agreement_with_reference_atlas(shared_data):
    ref = mars.load_reference_mars(
        shared_data / "mars-atlas" / "MARS_scale_parcellation_map_mni.nii.gz"
    )
    res = mars.compare_maps(mars.mars_map_mni(), ref)
    print(res)
    assert res["n_both"] > 1_400_000
    assert res["class_agreement"] >= 0.85
    # each region is recognisably the same structure
    assert min(res["dice"].values()) > 0.5
    assert res["dice"]["cerebellum"] > 0.9 and res["dice"]["thalamus"] > 0.8


@pytest.mark.slow
def test_shipped_map_is_reproducible():
    built = np.asanyarray(mars.build_mars_map().dataobj)
    shipped = np.asanyarray(mars.mars_map_mni().dataobj)
    assert np.array_equal(built, shipped)
