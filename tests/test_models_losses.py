"""Losses: distillation equals the formula; voxel weights apply before the reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmb_bidsapp.models.losses import (
    distillation_loss,
    segmentation_loss,
    soft_dice_loss,
    voxel_weights,
    weighted_cross_entropy,
)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    "temperature,alpha", [(4.0, 0.3), (1.0, 0.5), (2.5, 0.1), (8.0, 0.0), (3.0, 1.0)]
)
def test_distillation_matches_hand_formula(temperature, alpha):
    zs = np.array([[2.0, -1.0], [0.3, 0.8], [-1.5, 2.5]])
    zt = np.array([[3.0, -2.0], [-0.2, 1.1], [0.5, 0.4]])
    y = np.array([0, 1, 1])
    ps = _softmax(zs / temperature)
    pt = _softmax(zt / temperature)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    ce = np.mean(-np.log(_softmax(zs)[np.arange(3), y]))
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = distillation_loss(
        torch.tensor(zs), torch.tensor(zt), torch.tensor(y), temperature=temperature, alpha=alpha
    )
    assert math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_distillation_class_weight_and_teacher_detached():
    zs = torch.tensor([[2.0, -1.0], [0.3, 0.8]], requires_grad=True)
    zt = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    w = torch.tensor([1.0, 3.0])
    loss = distillation_loss(zs, zt, y, temperature=2.0, alpha=0.0, class_weight=w)
    ce = -(1.0 * torch.log_softmax(zs, 1)[0, 0] + 3.0 * torch.log_softmax(zs, 1)[1, 1]) / 4.0
    assert torch.isclose(loss, ce)
    distillation_loss(zs, zt, y, alpha=0.5).backward()
    assert zt.grad is None and zs.grad is not None


def test_weighted_ce_weights_before_reduction():
    # Two voxels: the heavy voxel is badly predicted, the light one well predicted.
    # (n=1, C=2, 2 voxels): voxel 0 -> class 0, voxel 1 -> class 1
    logits = torch.tensor([[[3.0, -3.0], [-3.0, 3.0]]])
    target = torch.tensor([[1, 1]])  # voxel 0 wrong, voxel 1 right
    weights = torch.tensor([[10.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    got = weighted_cross_entropy(logits, target, weights)
    assert torch.isclose(got, (weights * ce).mean())
    wrong = ce.mean() * weights.mean()  # the published code's reduction order
    assert not torch.isclose(got, wrong, rtol=0.05)
    assert float(got) > 1.5 * float(wrong)


def test_voxel_weights_single_voxel_lesion_gets_full_weight():
    target = torch.zeros(1, 9, 9, 9, dtype=torch.long)
    target[0, 4, 4, 4] = 1
    w = voxel_weights(target, w0=100.0, sigma_vox=1.25)
    assert float(w[0, 4, 4, 4]) == pytest.approx(101.0)
    assert 1.0 < float(w[0, 4, 4, 5]) < 101.0
    assert float(w[0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-3)


def test_voxel_weights_peak_on_lesion():
    target = torch.zeros(1, 15, 15, 15, dtype=torch.long)
    target[0, 6:9, 6:9, 6:9] = 1
    w = voxel_weights(target, w0=10.0, sigma_vox=2.0)
    assert torch.isclose(w.min(), torch.tensor(1.0), atol=1e-3)
    assert float(w[0, 7, 7, 7]) > 2.0
    assert float(w[0, 7, 7, 7]) == float(w.max())


def test_dice_and_segmentation_loss_order():
    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, 3:5, 3:5, 3:5] = 1
    good = torch.stack([(1 - target) * 20.0, target * 20.0], 1).float() - 10.0
    bad = -good
    assert float(soft_dice_loss(good, target)) < 0.1 < 0.9 < float(soft_dice_loss(bad, target))
    assert float(segmentation_loss(good, target)) < float(segmentation_loss(bad, target))
