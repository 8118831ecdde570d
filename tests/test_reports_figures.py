"""Report figures: orientation of the crops, native resolution, outlines outside the lesion, speed."""

from __future__ import annotations

import io
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmb_bidsapp.reports import figures as F

VOX = np.array([0.5, 0.5, 2.0])


def _affine(vox=VOX, flip=(False, False, False), shape=(80, 80, 20)):
    """An affine with the given voxel sizes; `flip` reverses axes (LPS-like storage)."""
    aff = np.diag([*vox, 1.0])
    for a, f in enumerate(flip):
        if f:
            aff[a, a] = -vox[a]
            aff[a, 3] = (shape[a] - 1) * vox[a]
    return aff


def _decode(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.mode == "P"
    return np.asarray(img)


def test_crop_orientation_follows_the_scanner_axes():
    """A voxel right/anterior/superior of the centre lands right/up in the right panels,
    whatever the storage order of the array."""
    shape = (80, 80, 20)
    centre_mm = np.array([20.0, 20.0, 20.0])
    for flip in [(False, False, False), (True, True, False), (True, False, True)]:
        aff = _affine(flip=flip, shape=shape)
        data = np.zeros(shape, np.float32)
        inv = np.linalg.inv(aff)

        def put(mm, value, data=data, inv=inv):
            ijk = np.rint(inv[:3, :3] @ mm + inv[:3, 3]).astype(int)
            data[tuple(ijk)] = value

        put(centre_mm + [5.0, 0, 0], 1.0)  # 5 mm to the right
        put(centre_mm + [0, 5.0, 0], 2.0)  # 5 mm anterior
        vol = F.as_ras(data, aff)
        c = vol.index_of_mm(centre_mm)[0]
        (axial, coronal, sagittal), _ = F.crop_planes(vol.data, vol.vox, c, fov_mm=36.0, px=144)
        px_mm = 36.0 / 144
        mid = 72

        def where(plane, value, mid=mid):
            rows, cols = np.nonzero(plane == value)
            return rows.mean() - mid, cols.mean() - mid

        dr, dc = where(axial, 1.0)  # right: to the right on axial (neurological)
        assert abs(dr) < 2 and dc * px_mm == pytest.approx(5.0, abs=0.6)
        dr, dc = where(axial, 2.0)  # anterior: up on axial
        assert -dr * px_mm == pytest.approx(5.0, abs=0.6) and abs(dc) < 2
        dr, dc = where(coronal, 1.0)  # right: to the right on coronal
        assert dc * px_mm == pytest.approx(5.0, abs=0.6)
        dr, dc = where(sagittal, 2.0)  # anterior: to the right on sagittal
        assert dc * px_mm == pytest.approx(5.0, abs=0.6)

    # superior → up on coronal and sagittal (2 mm slices: the voxel one slice above)
    data = np.zeros(shape, np.float32)
    data[40, 40, 11] = 3.0
    vol = F.as_ras(data, _affine())
    (_, coronal, sagittal), _ = F.crop_planes(vol.data, vol.vox, np.array([40.0, 40.0, 10.0]))
    rows, _ = np.nonzero(coronal == 3.0)
    assert rows.mean() < F.CROP_PANEL_PX / 2
    rows, _ = np.nonzero(sagittal == 3.0)
    assert rows.mean() < F.CROP_PANEL_PX / 2


def test_crop_keeps_native_voxels_and_true_size():
    """Nearest neighbour only: a 3-voxel lesion keeps its value and its size in mm."""
    rng = np.random.default_rng(1)
    data = (100 + 5 * rng.standard_normal((80, 80, 20))).astype(np.float32)
    data[40:43, 40, 10] = 10.0  # 3 voxels = 1.5 mm along x
    vol = F.as_ras(data, _affine())
    (axial, _, _), inside = F.crop_planes(vol.data, vol.vox, np.array([41.0, 40.0, 10.0]))
    assert inside[0].all()
    assert axial.min() == 10.0  # not smoothed away
    assert set(np.unique(axial)) <= set(np.unique(data))  # no new (interpolated) values
    width_px = (axial == 10.0).any(axis=0).sum()
    assert width_px * F.CROP_FOV_MM / F.CROP_PANEL_PX == pytest.approx(1.5, abs=0.3)


def test_lesion_outline_is_drawn_outside_the_lesion():
    data = np.full((80, 80, 20), 100.0, np.float32)
    labels = np.zeros(data.shape, np.int32)
    data[39:42, 39:42, 10] = 0.0
    labels[39:42, 39:42, 10] = 7
    labels[50, 40, 10] = 8  # another lesion in view
    vol = F.as_ras(data, _affine())
    png = F.lesion_crop_png(
        vol, np.array([40.0, 40.0, 10.0]), (0.0, 100.0), labels=labels, lesion_id=7
    )
    idx = _decode(png)
    px, gap = F.CROP_PANEL_PX, 3
    assert idx.shape == (2 * px + gap, 3 * px + 2 * gap)
    top, bottom = idx[:px, :px], idx[px + gap :, :px]  # axial, plain and outlined
    lesion = top == 0  # the darkest grey level
    assert lesion.sum() > 0
    assert (bottom[lesion] == 0).all()  # the lesion is not covered by its outline
    ring = bottom == F.LESION_COLOUR
    assert ring.sum() > lesion.sum()  # an outline all around
    rows, cols = np.nonzero(lesion)
    assert ring[rows.min() - 1, cols.min() : cols.max() + 1].all()
    assert (bottom == F.OTHER_COLOUR).any()  # the neighbour in cyan
    assert (top == F.TICK_COLOUR).any() and (top == F.BAR_COLOUR).any()
    assert len(png) < 40_000


def test_rejected_crop_is_marked_in_orange_or_by_ticks():
    data = np.full((40, 40, 10), 100.0, np.float32)
    vol = F.as_ras(data, _affine(shape=(40, 40, 10)))
    idx = _decode(F.lesion_crop_png(vol, np.array([20.0, 20.0, 5.0]), (0.0, 100.0), rejected=True))
    assert (idx == F.TICK_COLOUR).any()
    assert not (idx == F.LESION_COLOUR).any()
    # a crop near the edge marks the outside of the image
    idx = _decode(F.lesion_crop_png(vol, np.array([1.0, 1.0, 5.0]), (0.0, 100.0)))
    assert (idx == F.OUTSIDE_COLOUR).any()


def test_labels_from_mask_follow_the_table_ids():
    mask = np.zeros((30, 30, 10), np.uint8)
    mask[5:7, 5:7, 5] = 1
    mask[20:23, 20, 5] = 1
    mask[10, 25, 2] = 1  # not in the table
    table = pd.DataFrame({"lesion_id": [4, 2], "i": [21, 6], "j": [20, 6], "k": [5, 5]})
    labels = F.labels_from_mask(mask, table)
    assert labels[21, 20, 5] == 4 and labels[5, 5, 5] == 2
    assert labels[10, 25, 2] == 0
    assert set(np.unique(labels)) == {0, 2, 4}


def test_strongest_rejected_are_the_highest_scores():
    table = pd.DataFrame({"score": [0.1, np.nan, 0.45, 0.3]})
    assert F.strongest_rejected(table, 2) == [2, 3]
    assert F.strongest_rejected(pd.DataFrame({"probability": [0.2, 0.4]})) == [1, 0]
    assert F.strongest_rejected(None) == []


def test_a_figure_that_fails_is_a_warning_not_an_error(tmp_path):
    data = np.random.default_rng(0).random((40, 40, 12)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[5:35, 5:35, 2:10] = True
    lesions = pd.DataFrame(
        {"lesion_id": [1], "x": [10.0], "y": [10.0], "z": [12.0], "i": [20], "j": [20], "k": [6]}
    )
    bad = tmp_path / "broken.tfm"
    bad.write_text("not a transform")
    out = F.make_image_figures(
        data, _affine(shape=data.shape), mask, lesions, transform_path=str(bad)
    )
    assert "brainmask" in out.overlays and "registration" not in out.overlays
    assert any("registration" in w for w in out.warnings)
    assert set(out.lesions) == {1}


def test_thirty_lesions_take_a_few_seconds():
    """Measured under load on a shared 2-core machine; the bound is loose on purpose."""
    rng = np.random.default_rng(3)
    shape = (256, 256, 60)
    aff = _affine(vox=(0.9, 0.9, 2.0), shape=shape)
    data = (100 + 10 * rng.standard_normal(shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[30:226, 30:226, 5:55] = True
    centres = rng.integers([60, 60, 10], [196, 196, 50], size=(30, 3))
    labels = np.zeros(shape, np.int32)
    for n, (i, j, k) in enumerate(centres, start=1):
        labels[i - 1 : i + 2, j - 1 : j + 2, k] = n
        data[i - 1 : i + 2, j - 1 : j + 2, k] = 20
    xyz = nib.affines.apply_affine(aff, centres)
    table = pd.DataFrame(
        {"lesion_id": np.arange(1, 31), "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
         "i": centres[:, 0], "j": centres[:, 1], "k": centres[:, 2]}
    )  # fmt: skip
    rejected = table.assign(score=rng.random(30))
    t0 = time.perf_counter()
    out = F.make_image_figures(
        data, aff, mask, table, labels=labels, rejected=rejected, bias=np.ones(shape)
    )
    elapsed = time.perf_counter() - t0
    assert len(out.lesions) == 30 and len(out.rejected) == F.MAX_REJECTED_SHOWN
    assert out.warnings == []
    assert elapsed < 15.0, f"figures took {elapsed:.1f} s"
    total_kb = (sum(map(len, out.lesions.values())) + sum(len(p) for _, p in out.rejected)) / 1e3
    assert total_kb < 42 * 40  # small figures: < 40 kB per crop


def test_rejected_candidates_are_outlined_when_a_candidate_map_is_given():
    data = np.full((60, 60, 12), 100.0, np.float32)
    cand = np.zeros(data.shape, np.int32)
    cand[30:32, 30:32, 6] = 9
    data[30:32, 30:32, 6] = 10.0
    aff = _affine(shape=data.shape)
    xyz = nib.affines.apply_affine(aff, [[30.5, 30.5, 6]])[0]
    rejected = pd.DataFrame(
        {"candidate_id": [9], "x": [xyz[0]], "y": [xyz[1]], "z": [xyz[2]],
         "i": [30], "j": [30], "k": [6], "score": [0.3], "rule": ["student score 0.3 < 0.5"]}
    )  # fmt: skip
    empty = pd.DataFrame(columns=["lesion_id", "i", "j", "k"])
    out = F.make_image_figures(data, aff, data > 50, empty, rejected=rejected, candidates=cand)
    ((row, png),) = out.rejected
    idx = _decode(png)
    assert row == 0 and (idx == F.REJECTED_COLOUR).any() and not (idx == F.LESION_COLOUR).any()
    out = F.make_image_figures(data, aff, data > 50, empty, rejected=rejected)
    assert not (_decode(out.rejected[0][1]) == F.REJECTED_COLOUR).any()  # ticks only
