"""Tests of skull detection, brain extraction (deepbet and fallback) and non-zero masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cmb_bidsapp.preproc import brain
from cmb_bidsapp.preproc.brain import (
    extract_brain,
    extract_brain_with_info,
    has_skull,
    mask_from_nonzero,
)


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """A T2*-like head at 2 mm from nilearn's MNI152 masks: brain, CSF, dark skull, scalp."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_mask,
        load_mni152_wm_mask,
    )

    step = 2
    bm = load_mni152_brain_mask(resolution=1)
    b = np.asarray(bm.dataobj)[::step, ::step, ::step] > 0
    gm = np.asarray(load_mni152_gm_mask(resolution=1).dataobj)[::step, ::step, ::step] > 0
    wm = np.asarray(load_mni152_wm_mask(resolution=1).dataobj)[::step, ::step, ::step] > 0
    aff = bm.affine.copy()
    aff[:3, :3] *= step
    pad = 12
    b, gm, wm = (np.pad(x, pad) for x in (b, gm, wm))
    aff[:3, 3] -= pad * step * np.sign(np.diag(aff)[:3])
    brain_img = np.where(b, 0.95, 0.0)
    brain_img[gm & b] = 0.7
    brain_img[wm & b] = 0.55
    rng = np.random.default_rng(0)
    d = ndi.distance_transform_edt(~b, sampling=(step,) * 3)
    head = brain_img.copy()
    head[(d > 0) & (d <= 2)] = 0.95  # outer CSF
    head[(d > 2) & (d <= 8)] = 0.06  # skull: dark on GRE
    head[(d > 8) & (d <= 14)] = 0.6  # scalp
    head = np.abs(head + rng.normal(0, 0.03, head.shape)).astype(np.float32)
    stripped = np.where(b, brain_img + rng.normal(0, 0.03, b.shape), 0).astype(np.float32)
    return {"head": head, "stripped": stripped, "affine": aff, "truth": b}


def _reorient_thick(img, aff):
    """The same head stored A-L-S (transposed, flipped) with 4 mm slices."""
    out = img[::-1, :, ::2].transpose(1, 0, 2).copy()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1
    new_aff = aff @ flip @ np.diag([1, 1, 2, 1.0]) @ np.eye(4)[[1, 0, 2, 3]]
    return out, new_aff


def test_has_skull(phantom, shared_data):
    import nibabel as nib

    aff = phantom["affine"]
    assert has_skull(phantom["head"], aff)
    assert not has_skull(phantom["stripped"], aff)
    thick, thick_aff = _reorient_thick(phantom["head"], aff)
    assert has_skull(thick, thick_aff)
    assert not has_skull(*_reorient_thick(phantom["stripped"], aff))
    # A QSM map: signed values inside the brain, zero outside.
    rng = np.random.default_rng(1)
    chi = np.where(phantom["truth"], rng.normal(0, 0.05, phantom["truth"].shape), 0)
    assert not has_skull(chi.astype(np.float32), aff)
    # A skull-stripped head whose background is a constant other than 0.
    assert not has_skull(np.where(phantom["truth"], phantom["stripped"], -1.0), aff)
    # The real MEGRE crop: a piece of brain, no skull.
    img = nib.load(shared_data / "real-megre" / "Mag.nii")
    assert not has_skull(np.asarray(img.dataobj, dtype=np.float32)[..., 0], img.affine)


def test_mask_from_nonzero():
    data = np.zeros((30, 30, 30), np.float32)
    data[5:25, 5:25, 5:25] = 1.0
    data[14:16, 14:16, 14:16] = 0.0  # a lesion of exactly 0 inside
    data[1, 1, 1] = 3.0  # a speck outside
    m = mask_from_nonzero(data)
    assert m.dtype == np.uint8
    assert m[15, 15, 15] == 1 and m[1, 1, 1] == 0 and m.sum() == 20**3


def test_deepbet_on_head_with_skull_any_orientation(phantom):
    img, aff = _reorient_thick(phantom["head"], phantom["affine"])
    truth, _ = _reorient_thick(phantom["truth"].astype(np.float32), phantom["affine"])
    mask, info = extract_brain_with_info(img, aff, threads=2)
    assert info["method"] == "deepbet", info
    assert mask.shape == img.shape and mask.dtype == np.uint8
    assert dice(mask, truth) > 0.9


def test_fallback_on_head_with_skull(phantom):
    mask = extract_brain(phantom["head"], phantom["affine"], method="fallback")
    assert dice(mask, phantom["truth"]) > 0.9
    # The scalp is not in the mask.
    d = ndi.distance_transform_edt(~phantom["truth"], sampling=(2, 2, 2))
    assert mask[(d > 9) & (d <= 14)].mean() < 0.05


def test_fallback_when_deepbet_fails_or_is_implausible(phantom, monkeypatch):
    def broken(x, threads=1):
        raise RuntimeError("boom")

    monkeypatch.setattr(brain, "_deepbet_mask", broken)
    mask, info = extract_brain_with_info(phantom["head"], phantom["affine"])
    assert info["method"] == "fallback" and "boom" in info["fallback_reason"]
    assert dice(mask, phantom["truth"]) > 0.9

    monkeypatch.setattr(
        brain,
        "_deepbet_mask",
        lambda x, threads=1: np.zeros(x.shape, bool) | (np.indices(x.shape)[0] < 3),
    )
    mask, info = extract_brain_with_info(phantom["head"], phantom["affine"])
    assert info["method"] == "fallback" and "outside" in info["fallback_reason"]


def test_crop_uses_fallback_without_deepbet(shared_data, monkeypatch):
    import nibabel as nib

    def never(x, threads=1):
        raise AssertionError("deepbet must not run on a crop")

    monkeypatch.setattr(brain, "_deepbet_mask", never)
    img = nib.load(shared_data / "real-megre" / "Mag.nii")
    data = np.asarray(img.dataobj, dtype=np.float32)[..., 0]
    mask, info = extract_brain_with_info(data, img.affine)
    assert info["method"] == "fallback" and "crop" in info["fallback_reason"]
    assert mask.shape == data.shape and mask.mean() > 0.5


def test_mask_from_nonzero_with_a_non_zero_constant_background():
    """An int16 QSM map with scl_inter stores its zero background as a small constant: the mask
    is the brain, not the field of view."""
    from cmb_bidsapp.preproc.brain import background_value, mask_from_nonzero

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :48, :36]
    brain = ((xx - 18) / 14) ** 2 + ((yy - 24) / 18) ** 2 + ((zz - 20) / 15) ** 2 <= 1
    chi = np.where(brain, rng.normal(0, 0.05, brain.shape), 0.0).astype(np.float32)
    slope, inter = 1.5e-5, 0.3547
    stored = np.round((chi - inter) / slope).astype(np.int16)  # what an int16 file holds
    read = stored.astype(np.float32) * np.float32(slope) + np.float32(inter)
    assert np.all(read[~brain] == read[0, 0, 0]) and read[0, 0, 0] != 0
    assert background_value(read) == float(read[0, 0, 0])
    mask = mask_from_nonzero(read).astype(bool)
    # (a brain voxel whose χ rounds to the stored zero can only be lost on the brain's surface)
    assert not (mask & ~brain).any() and (brain & ~mask).sum() <= 2
    # an ordinary brain-extracted image keeps the zero background
    assert background_value(np.where(brain, 1.0 + chi, 0.0).astype(np.float32)) == 0.0
