"""Storage variability: the same subject stored RAS/float32 and oblique/permuted/int16 agrees
in scanner space (lesion tables, reference masks, where the image is dark)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cmb_bidsapp.synth import simulate_subject
from cmb_bidsapp.synth.transform import rotation_matrix

LESIONS = dict(
    n_microbleeds=3,
    cmb_diameter_range=(1.8, 2.0),
    cmb_chi_range=(1.2, 1.5),
    mimic_rate=0.0,
    snr=60.0,
)


@pytest.fixture(scope="module")
def pair():
    plain = simulate_subject(
        5, "swi", "small", skull=True, orientation="RAS", rotation=np.eye(3), flips=(False, False, False),
        swap_inplane=False, dtype="float32", **LESIONS,
    )  # fmt: skip
    odd = simulate_subject(
        5, "swi", "small", skull=True, orientation="oblique", rotation=rotation_matrix([17.0, -6.0, 5.0]),
        flips=(True, True, False), swap_inplane=True, dtype="int16", **LESIONS,
    )  # fmt: skip
    return plain, odd


def test_storage_really_differs(pair):
    plain, odd = pair
    assert nib.aff2axcodes(plain.main_image.affine) == ("R", "A", "S")
    rot = odd.main_image.affine[:3, :3] / np.sqrt((odd.main_image.affine[:3, :3] ** 2).sum(0))
    assert np.abs(rot).max(axis=0).min() < 0.99  # oblique axes
    assert odd.main_image.get_data_dtype() == np.int16
    assert odd.main_image.dataobj.slope != 1.0  # scl_slope, applied by get_fdata()
    raw = np.asarray(odd.main_image.dataobj.get_unscaled())
    assert np.allclose(raw * odd.main_image.dataobj.slope, odd.main_image.get_fdata(), atol=1e-3)
    assert plain.main_image.get_data_dtype() == np.float32


def test_lesions_sit_at_the_same_scanner_position(pair):
    plain, odd = pair
    a = plain.lesions[["x", "y", "z"]].to_numpy()
    b = odd.lesions[["x", "y", "z"]].to_numpy()
    assert len(a) == 3
    assert np.abs(a - b).max() < 0.5  # mm: same anatomy whatever the acquisition


@pytest.mark.parametrize("which", [0, 1])
def test_mask_and_image_agree_with_the_table(pair, which):
    sub = pair[which]
    img = sub.main_image
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(sub.reference_mask.dataobj)
    assert mask.shape == data.shape and np.allclose(sub.reference_mask.affine, img.affine)
    inv = np.linalg.inv(img.affine)
    for _, row in sub.lesions.iterrows():
        assert row.visible == 1
        v = np.rint(inv[:3, :3] @ [row.x, row.y, row.z] + inv[:3, 3]).astype(int)
        assert [row.i, row.j, row.k] == v.tolist()
        box = tuple(slice(max(c - 1, 0), c + 2) for c in v)
        assert mask[box].any()
        # the image is dark where the table says: the lesion's mask voxels against a 10 mm shell
        near = tuple(
            slice(max(c - r, 0), c + r + 1)
            for c, r in zip(v, np.ceil(10 / np.sqrt((img.affine[:3, :3] ** 2).sum(0))).astype(int))
        )
        local = data[near]
        lesion_vals = data[near][mask[near] > 0]
        assert lesion_vals.mean() < 0.6 * np.median(local[local > 0])
