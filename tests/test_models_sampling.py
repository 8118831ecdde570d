"""Tests of the detector target and the per-lesion cap of the lesion sampling pool."""

from __future__ import annotations

import numpy as np

from cmb_bidsapp.models.sampling import (
    LESION_POOL_CAP,
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
