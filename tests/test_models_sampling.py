"""Tests of the detector target and the per-lesion cap of the lesion sampling pool."""

from __future__ import annotations

import numpy as np

from cmb_bidsapp.models.sampling import (
    LESION_POOL_CAP,
    augment,
    detector_pools,
    detector_target,
)


def _ref() -> np.ndarray:
    ref = np.zeros((40, 40, 40), dtype=np.uint8)
    ref[10, 10, 10] = 1  # a 1-voxel microbleed (QSM-like)
    ref[25:30, 25:30, 25:30] = 1  # a 125-voxel bloom (SWI-like)
    return ref


def test_detector_target_grows_only_small_lesions():
    ref = _ref()
    t = detector_target(ref)
    assert t[10, 10, 10] == 1 and t[11, 10, 10] == 1 and t[10, 9, 10] == 1
    assert t[11, 11, 10] == 0  # 6-connected growth: no diagonal
    assert int(t[5:15, 5:15, 5:15].sum()) == 7
    # the large lesion is unchanged
    assert np.array_equal(t[20:35, 20:35, 20:35], ref[20:35, 20:35, 20:35])
    assert not detector_target(np.zeros((5, 5, 5))).any()


def test_lesion_pool_capped_per_lesion():
    ref = _ref()
    brain = np.ones_like(ref)
    pools = detector_pools(ref, brain, np.zeros(ref.shape, np.float32), np.zeros((0, 3)), seed=0)
    big = np.all((pools.lesion >= 25) & (pools.lesion < 30), axis=1)
    assert big.sum() == LESION_POOL_CAP
    assert (~big).sum() == 1  # the 1-voxel lesion is kept
    assert np.all(ref[tuple(pools.lesion.T)] == 1)


def test_augment_scales_contrast_about_the_tissue_level():
    """The contrast factor moves a microbleed's difference from the tissue, both ways; values
    stay in [0, 1] and 0 outside the brain. The lesion sits at the centre of an odd-sized patch,
    so the flips do not move it."""
    size = 9
    image = np.zeros((2, size, size, size), dtype=np.float32)
    brain = np.zeros((size, size, size), dtype=np.uint8)
    brain[1:-1, 1:-1, 1:-1] = 1
    image[0][brain > 0] = 0.5  # tissue (QSM: chi = 0)
    image[0][4, 4, 4] = 0.8  # a microbleed, contrast 0.3
    image[1][brain > 0] = 0.2
    image[1][4, 4, 4] = 0.9
    label = np.zeros((size, size, size), dtype=np.uint8)
    label[4, 4, 4] = 1
    contrasts = []
    for seed in range(300):
        out, (lab,) = augment(image, [label], brain, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        assert lab[4, 4, 4] == 1 and lab.sum() == 1
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.all(out[0][brain == 0] == 0.0)
        tissue = np.median(out[0][brain > 0])
        contrasts.append(out[0][4, 4, 4] - tissue)
    contrasts = np.asarray(contrasts)
    # Fainter microbleeds than the input are produced (k down to 0.6), and stronger ones.
    assert contrasts.min() < 0.75 * 0.3
    assert contrasts.max() > 0.3
    # The lesion stays brighter than the tissue (the noise is at most 0.05 s.d.).
    assert np.mean(contrasts > 0.05) > 0.95
