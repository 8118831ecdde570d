"""Tests of template registration: a known affine is recovered, failures are flagged, not raised."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from cmb_bidsapp.anatomy import registration as reg
from cmb_bidsapp.anatomy import templates
from cmb_bidsapp.anatomy.mars import mars_map_mni

_P = np.diag([-1.0, -1.0, 1.0])


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    out = np.eye(3)
    out[i, i] = out[j, j] = c
    out[i, j], out[j, i] = -s, s
    return out


# The known transform: template (MNI mm) -> subject (scanner mm), y = A x + b.
# About 10 degrees of rotation, 10 mm of translation and 5 % of scaling.
A_TRUE = _rot(0, 10.0) @ _rot(2, -6.0) @ np.diag([1.05, 0.97, 1.03])
B_TRUE = np.array([10.0, -8.0, 6.0])


def _itk_affine(mat: np.ndarray, vec: np.ndarray) -> sitk.AffineTransform:
    """RAS point map y = mat x + vec as an ITK (LPS) transform."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((_P @ mat @ _P).ravel().tolist())
    tx.SetTranslation((_P @ vec).tolist())
    return tx


def _warp(img: nib.Nifti1Image, mat, vec, shape, grid, order=1) -> np.ndarray:
    """Resample `img` into `grid` where grid points y come from template points x = mat^-1 (y - vec)."""
    inv = np.linalg.inv(mat)
    tx = _itk_affine(inv, -inv @ vec)
    ref = reg.nib_to_sitk(nib.Nifti1Image(np.zeros(shape, np.uint8), grid))
    interp = sitk.sitkLinear if order else sitk.sitkNearestNeighbor
    out = sitk.Resample(reg.nib_to_sitk(img), ref, tx, interp, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _oblique_grid(shape, zooms, centre) -> np.ndarray:
    grid = np.eye(4)
    grid[:3, :3] = _rot(0, 15.0) @ _rot(1, 5.0) @ np.diag(zooms)
    grid[:3, 3] = centre - grid[:3, :3] @ ((np.array(shape) - 1) / 2)
    return grid


def make_subject(shape=(200, 250, 60), zooms=(1.0, 1.0, 3.0), seed=0):
    """The template brain under the known affine, on an oblique 1 x 1 x 3 mm grid, contrast
    inverted (dark white matter, bright CSF), with a bias ramp and noise."""
    tpl = templates.load_template()
    mask = templates.template_mask()
    centre = A_TRUE @ np.array([0.0, -18.0, 18.0]) + B_TRUE
    grid = _oblique_grid(shape, zooms, centre)
    data = _warp(tpl, A_TRUE, B_TRUE, shape, grid)
    m = _warp(nib.Nifti1Image(np.asanyarray(mask.dataobj).astype(np.float32), mask.affine),
              A_TRUE, B_TRUE, shape, grid) > 0.5  # fmt: skip
    rng = np.random.default_rng(seed)
    data = np.where(m, 100.0 - data, 0.0)
    data = data * (1 + 0.2 * np.linspace(-1, 1, shape[0])[:, None, None])
    data = np.where(m, data + 2.0 * rng.standard_normal(shape), 0.0).astype(np.float32)
    return nib.Nifti1Image(data, grid), nib.Nifti1Image(m.astype(np.uint8), grid)


def landmarks(n=30, seed=1) -> np.ndarray:
    """MNI mm points well inside the template brain."""
    mask = templates.template_mask()
    inner = ndi.binary_erosion(np.asanyarray(mask.dataobj) > 0, iterations=10)
    ijk = np.argwhere(inner)
    sel = ijk[np.random.default_rng(seed).choice(len(ijk), n, replace=False)]
    return nib.affines.apply_affine(mask.affine, sel)


@pytest.fixture(scope="module")
def subject():
    return make_subject()


@pytest.fixture(scope="module")
def result(subject):
    img, mask = subject
    return reg.register_to_template(img, mask)


def test_nib_sitk_round_trip():
    aff = _oblique_grid((5, 6, 7), (0.5, 0.9, 3.0), np.array([1.0, 2.0, 3.0]))
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    back = reg.sitk_to_nib(reg.nib_to_sitk(nib.Nifti1Image(data, aff)))
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)


def test_recovers_known_affine(result):
    assert not result.flag, result.reason
    assert result.stage == "affine"
    lm = landmarks()
    err = np.linalg.norm(result.mni_to_native(lm) - (lm @ A_TRUE.T + B_TRUE), axis=1)
    assert err.mean() < 1.0 and err.max() < 2.0, err
    q = result.quality
    assert q["mask_dice"] > 0.95 and q["nmi"] > reg.MIN_NMI + 0.1
    np.testing.assert_allclose([q["scale_min"], q["scale_max"]], [0.97, 1.05], atol=0.02)


def test_round_trip_native_mni_native(result):
    lm = landmarks(n=10, seed=3)
    native = result.mni_to_native(lm)
    np.testing.assert_allclose(result.native_to_mni(native), lm, atol=0.5)
    np.testing.assert_allclose(reg.mni_to_native(reg.native_to_mni(native, result), result),
                               native, atol=0.5)  # fmt: skip


@pytest.mark.parametrize("ext", [".tfm", ".h5"])
def test_transforms_save_and_load(result, tmp_path, ext):
    lm = landmarks(n=5, seed=4)
    path = result.save(tmp_path / f"native_to_template{ext}", tmp_path / f"inverse{ext}")
    fwd = reg.load_transform(path)
    inv = reg.load_transform(tmp_path / f"inverse{ext}")
    native = result.mni_to_native(lm)
    np.testing.assert_allclose(reg._transform_points(fwd, native), lm, atol=1e-6)
    np.testing.assert_allclose(reg._transform_points(inv, lm), native, atol=1e-6)
    paths = reg.save_transforms(result, tmp_path / "xfm", prefix="sub-01_")
    assert paths["template_to_native"].name.startswith("sub-01_from-native_to-MNI152NLin2009cAsym")
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_mars_in_native_matches_mni_labels(result, subject):
    img, _ = subject
    regions = reg.mars_in_native(result, img)
    assert regions.shape == img.shape and regions.dtype == np.int16
    mars = mars_map_mni()
    lm = landmarks(n=60, seed=5)
    mni_labels = np.asanyarray(mars.dataobj)[
        tuple(np.rint(nib.affines.apply_affine(np.linalg.inv(mars.affine), lm)).astype(int).T)
    ]
    native_vox = np.rint(
        nib.affines.apply_affine(np.linalg.inv(img.affine), lm @ A_TRUE.T + B_TRUE)
    ).astype(int)
    inside = np.all((native_vox >= 0) & (native_vox < img.shape), axis=1)
    native_labels = regions[tuple(native_vox[inside].T)]
    # 3 mm slices: a few landmarks near a region boundary may differ
    assert inside.sum() > 45
    assert (native_labels == mni_labels[inside]).mean() >= 0.85


def test_deterministic(subject, result):
    img, mask = subject
    again = reg.register_to_template(img, mask)
    lm = landmarks(n=5, seed=6)
    np.testing.assert_array_equal(again.mni_to_native(lm), result.mni_to_native(lm))


def test_pure_noise_is_flagged_without_raising(subject):
    img = subject[0].slicer[::2, ::2, ::2]  # 2 x 2 x 6 mm: the optimiser wanders, keep it small
    rng = np.random.default_rng(7)
    noise = nib.Nifti1Image(rng.random(img.shape).astype(np.float32) + 0.01, img.affine)
    res = reg.register_to_template(noise, None)
    assert res.flag
    assert "mutual information" in res.reason
    assert res.report()["Flag"] is True


def test_noise_inside_a_brain_mask_is_flagged(subject):
    img, mask = (x.slicer[::2, ::2, ::2] for x in subject)
    rng = np.random.default_rng(8)
    noise = rng.random(img.shape).astype(np.float32) * np.asanyarray(mask.dataobj)
    res = reg.register_to_template(nib.Nifti1Image(noise, img.affine), mask)
    assert res.flag and "mutual information" in res.reason


def test_exception_gives_flagged_centre_of_mass_fallback():
    empty = nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4))
    res = reg.register_to_template(empty, None)
    assert res.flag and res.stage == "center-of-mass"
    assert res.reason.startswith("registration failed")
    # the fallback is a usable, translation-only transform
    pts = res.mni_to_native(np.zeros((1, 3)))
    np.testing.assert_allclose(res.native_to_mni(pts), np.zeros((1, 3)), atol=1e-6)


@pytest.mark.slow
def test_t1w_composition_and_mask(subject):
    """A T1w of the same subject (rigid head motion, 1.2 mm grid) is composed correctly."""
    img, mask = subject
    r1, b1 = _rot(2, 8.0) @ _rot(0, -5.0), np.array([-5.0, 12.0, -4.0])
    mat, vec = r1 @ A_TRUE, r1 @ B_TRUE + b1
    grid = np.diag([1.2, 1.2, 1.2, 1.0])
    grid[:3, 3] = [-95.0, -130.0, -75.0]
    shape = (160, 190, 160)
    t1 = _warp(templates.load_template(), mat, vec, shape, grid)
    tmask = templates.template_mask()
    t1m = _warp(nib.Nifti1Image(np.asanyarray(tmask.dataobj).astype(np.float32), tmask.affine),
                mat, vec, shape, grid) > 0.5  # fmt: skip
    t1w, t1w_mask = nib.Nifti1Image(t1, grid), nib.Nifti1Image(t1m.astype(np.uint8), grid)
    res = reg.register_to_template(img, mask, t1w=t1w, t1w_mask=t1w_mask)
    assert not res.flag, res.reason
    assert res.report()["UsedT1w"] and "nmi_t1w" in res.quality
    lm = landmarks()
    err = np.linalg.norm(res.mni_to_native(lm) - (lm @ A_TRUE.T + B_TRUE), axis=1)
    assert err.mean() < 1.0 and err.max() < 2.0
    native_mask = reg.mask_from_t1w(t1w_mask, res, img)
    truth = np.asanyarray(mask.dataobj) > 0
    dice = 2 * (native_mask.astype(bool) & truth).sum() / (native_mask.sum() + truth.sum())
    assert dice > 0.95


@pytest.mark.slow
def test_deformable_stage(subject):
    img, mask = subject
    res = reg.register_to_template(img, mask, deformable=True)
    assert not res.flag, res.reason
    assert res.stage == "deformable"
    lm = landmarks()
    native = res.mni_to_native(lm)
    err = np.linalg.norm(native - (lm @ A_TRUE.T + B_TRUE), axis=1)
    assert err.mean() < 1.0 and err.max() < 2.0
    np.testing.assert_allclose(res.native_to_mni(native), lm, atol=0.5)


def test_lesions_placed_in_mni_get_their_region_in_native_space(result, subject):
    """Spheres of 2.5 mm radius at MNI points deep inside regions, drawn in the oblique native
    grid through the true transform, are assigned through the registration."""
    from cmb_bidsapp.anatomy.assign import region_table

    img, _ = subject
    points = {
        1: ((12.0, -18.0, 8.0), "thalamus", "right"),
        2: ((-25.0, 2.0, 2.0), "basal_ganglia", "left"),
        3: ((20.0, -60.0, -40.0), "cerebellum", "right"),
        4: ((0.0, -30.0, -35.0), "brainstem", "midline"),
        5: ((-40.0, 30.0, 20.0), "frontal", "left"),
    }
    ijk = np.indices(img.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(img.affine, ijk)
    labels = np.zeros(img.shape, np.int32)
    for lid, (mni, _, _) in points.items():
        centre = A_TRUE @ np.array(mni) + B_TRUE
        near = np.linalg.norm(world - centre, axis=1) <= 2.5
        labels.reshape(-1)[near] = lid
    regions = reg.mars_in_native(result, img)
    table = region_table(
        labels, img.affine, regions, to_mni=result.native_to_mni, midline_mm=2.0
    ).set_index("lesion_id")
    for lid, (mni, region, side) in points.items():
        assert table.loc[lid, "region"] == region, (lid, table.loc[lid].to_dict())
        assert table.loc[lid, "hemisphere"] == side
        got = table.loc[lid, ["mni_x", "mni_y", "mni_z"]].to_numpy(float)
        assert np.linalg.norm(got - mni) < 2.0
