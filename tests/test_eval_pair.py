"""Lesion-wise scoring of one mask pair: components, distances in mm, one-to-one matching."""

from __future__ import annotations

import numpy as np
import pytest

from cmb_bidsapp.errors import UsageError
from cmb_bidsapp.evaluation import score_pair

SHAPE = (48, 48, 32)


def blob(mask: np.ndarray, centre: tuple[int, int, int], r: int = 1) -> np.ndarray:
    """Set a (2r+1)^3 cube of voxels around `centre`."""
    i, j, k = centre
    mask[i - r : i + r + 1, j - r : j + r + 1, k - r : k + r + 1] = True
    return mask


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def reference() -> np.ndarray:
    ref = empty()
    blob(ref, (10, 10, 10))
    blob(ref, (30, 30, 10))
    blob(ref, (10, 35, 20), r=2)
    # Two voxels touching only by a corner: one 26-connected lesion, not two.
    ref[40, 40, 25] = ref[41, 41, 26] = True
    return ref


@pytest.mark.parametrize("match", ["both", "distance", "overlap"])
def test_reference_against_itself_is_perfect(match):
    ref = reference()
    s = score_pair(ref, ref, np.eye(4), match=match)
    assert (s.n_ref, s.tp, s.fp, s.fn) == (4, 4, 0, 0)
    assert s.sensitivity == 1.0 and s.precision == 1.0 and s.f1 == 1.0
    assert s.count_difference == 0


def test_empty_prediction_has_zero_sensitivity():
    s = score_pair(empty(), reference(), np.eye(4))
    assert (s.tp, s.fp, s.fn) == (0, 0, 4)
    assert s.sensitivity == 0.0
    assert s.precision is None  # 0 / 0 is undefined, not 0 or 1
    assert s.count_difference == 4


def test_both_empty_is_undefined_not_perfect():
    s = score_pair(empty(), empty(), np.eye(4))
    assert (s.tp, s.fp, s.fn) == (0, 0, 0)
    assert s.sensitivity is None and s.precision is None and s.f1 is None


@pytest.mark.parametrize("match", ["both", "distance"])
def test_lesion_moved_2mm_is_still_a_true_positive(match):
    ref = blob(empty(), (20, 20, 15), r=0)
    pred = blob(empty(), (22, 20, 15), r=0)  # 1 mm voxels: 2 mm away, no shared voxel
    s = score_pair(pred, ref, np.eye(4), match=match)
    assert (s.tp, s.fp, s.fn) == (1, 0, 0)
    assert s.matches[0][2] == pytest.approx(2.0)


def test_lesion_moved_2mm_without_overlap_fails_overlap_rule():
    ref = blob(empty(), (20, 20, 15), r=0)
    pred = blob(empty(), (22, 20, 15), r=0)
    s = score_pair(pred, ref, np.eye(4), match="overlap")
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)


@pytest.mark.parametrize("match", ["both", "distance", "overlap"])
def test_lesion_moved_8mm_is_one_fp_and_one_fn(match):
    ref = blob(empty(), (20, 20, 15))
    pred = blob(empty(), (28, 20, 15))
    s = score_pair(pred, ref, np.eye(4), match=match)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)
    assert s.sensitivity == 0.0 and s.precision == 0.0


def test_match_mm_sets_the_distance():
    ref = blob(empty(), (20, 20, 15), r=0)
    pred = blob(empty(), (24, 20, 15), r=0)  # 4 mm
    assert score_pair(pred, ref, np.eye(4), match_mm=3).tp == 0
    assert score_pair(pred, ref, np.eye(4), match_mm=4).tp == 1  # the bound is inclusive
    assert score_pair(pred, ref, np.eye(4), match_mm=5).tp == 1


def test_one_to_one_two_blobs_near_one_lesion():
    ref = blob(empty(), (20, 20, 15), r=0)
    pred = empty()
    pred[21, 20, 15] = True  # 1 mm away
    pred[20, 22, 15] = True  # 2 mm away, not touching the first
    s = score_pair(pred, ref, np.eye(4))
    assert (s.n_pred, s.tp, s.fp, s.fn) == (2, 1, 1, 0)
    # The nearer blob is the match.
    assert s.pred_centres_mm[s.matches[0][0] - 1] == pytest.approx([21, 20, 15])


def test_assignment_is_optimal_not_greedy():
    """Greedy nearest-first matching would give 1 TP here; the optimal assignment gives 2."""
    aff = np.diag([0.5, 0.5, 0.5, 1.0])
    ref, pred = empty(), empty()
    ref[10, 5, 5] = ref[17, 5, 5] = True  # R1 at x = 5 mm, R2 at x = 8.5 mm
    pred[12, 5, 5] = True  # P1 at 6 mm: 1 mm from R1, 2.5 mm from R2
    pred[5, 5, 5] = True  # P2 at 2.5 mm: 2.5 mm from R1 only
    s = score_pair(pred, ref, aff, match="distance")
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)


def test_overlap_pairs_are_preferred_with_both():
    ref, pred = empty(), empty()
    ref[5, 20, 10] = True  # R1: overlapped by the long prediction, centre 8 mm away
    ref[13, 22, 10] = True  # R2: not overlapped, centre 2 mm away
    pred[5:22, 20, 10] = True  # P: a 17-voxel line, centre at x = 13
    s = score_pair(pred, ref, np.eye(4), match="both")
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    pred_id, ref_id, dist, overlaps = s.matches[0]
    assert s.ref_centres_mm[ref_id - 1] == pytest.approx([5, 20, 10])
    assert overlaps and dist == pytest.approx(8.0)
    # With distance only, the nearer R2 is the match.
    s = score_pair(pred, ref, np.eye(4), match="distance")
    assert s.ref_centres_mm[s.matches[0][1] - 1] == pytest.approx([13, 22, 10])


def _oblique_affine() -> np.ndarray:
    """0.5 x 0.5 x 4 mm voxels, rotated 30 degrees about z then 20 about x, shifted."""
    a, b = np.deg2rad(30), np.deg2rad(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rx @ rz @ np.diag([0.5, 0.5, 4.0])
    aff[:3, 3] = [-90.0, 12.5, -40.0]
    return aff


def test_anisotropic_oblique_distances_are_in_mm():
    aff = _oblique_affine()
    ref = blob(empty(), (20, 20, 10), r=0)
    # 4 voxels along i is 2 mm: a match; 1 voxel along k is 4 mm: not within 3 mm.
    near = blob(empty(), (24, 20, 10), r=0)
    far = blob(empty(), (20, 20, 11), r=0)
    s_near = score_pair(near, ref, aff, match="distance")
    s_far = score_pair(far, ref, aff, match="distance")
    assert (s_near.tp, s_near.fp, s_near.fn) == (1, 0, 0)
    assert s_near.matches[0][2] == pytest.approx(2.0)
    assert (s_far.tp, s_far.fp, s_far.fn) == (0, 1, 1)
    assert score_pair(far, ref, aff, match="distance", match_mm=4.5).tp == 1
    # Centres are in scanner mm through the full affine.
    assert s_near.ref_centres_mm[0] == pytest.approx(aff[:3, :3] @ [20, 20, 10] + aff[:3, 3])


def test_centre_of_mass_of_an_irregular_lesion():
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    ref = empty()
    ref[10:13, 10, 5] = True
    ref[10, 11, 5] = True  # voxel mean (10.75, 10.25, 5)
    s = score_pair(ref, ref, aff)
    assert s.ref_centres_mm[0] == pytest.approx([8.6, 8.2, 10.0])
    assert s.ref_volumes_mm3[0] == pytest.approx(4 * 0.8 * 0.8 * 2.0)


def test_many_lesions_counted_and_matched():
    rng = np.random.default_rng(0)
    ref = empty()
    centres = [(i, j, k) for i in range(4, 44, 6) for j in range(4, 44, 6) for k in (6, 16, 26)]
    for c in centres:
        blob(ref, c, r=0)
    keep = rng.random(len(centres)) < 0.6
    pred = empty()
    for c, kept in zip(centres, keep, strict=True):
        if kept:
            blob(pred, (c[0] + 1, c[1], c[2]), r=0)
    pred[1, 1, 1] = True  # one false positive far from all
    s = score_pair(pred, ref, np.eye(4))
    assert s.n_ref == len(centres)
    assert s.tp == int(keep.sum()) and s.fn == int((~keep).sum()) and s.fp == 1


def test_bad_arguments():
    with pytest.raises(UsageError):
        score_pair(empty(), empty(), np.eye(4), match="centre")
    with pytest.raises(UsageError):
        score_pair(empty(), empty(), np.eye(4), match_mm=-1)
