"""Inference: windows, candidate assembly, determinism, networks, and the default bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmb_bidsapp.models import networks
from cmb_bidsapp.models.bundle import default_bundle_path, load_bundle, save_bundle
from cmb_bidsapp.models.infer import (
    STUDENT_TTA,
    assemble,
    classify_patches,
    detect,
    detector_probability,
    gaussian_importance,
    plan_windows,
    working_inputs,
)


@pytest.mark.parametrize("shape", [(190, 235, 210), (40, 50, 30), (113, 112, 111)])
def test_windows_cover_the_volume(shape):
    size, starts = plan_windows(shape, 112, 16)
    assert all(s % 4 == 0 and s <= 112 + 3 for s in size)
    cover = np.zeros(shape, dtype=bool)
    for st in starts:
        cover[tuple(slice(a, a + w) for a, w in zip(st, size))] = True
    assert cover.all()
    w = gaussian_importance(size)
    assert w.max() == 1.0 and w.min() >= 1e-3


def test_network_shapes_and_parameter_counts():
    x = torch.zeros(2, 2, 24, 24, 24)
    det = networks.UNet3D()
    assert det(torch.zeros(1, 2, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    t = networks.Teacher()
    zc, zs = t(x)
    assert zc.shape == (2, 2) and zs.shape == (2, 2, 24, 24, 24)
    s = networks.Student()
    assert s(x).shape == (2, 2)
    assert networks.n_parameters(s) < networks.n_parameters(t)
    # BatchNorm folding keeps the outputs.
    det.eval()
    xin = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        for m in det.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        ref = det(xin)
        fused = networks.fuse_batchnorm(det)(xin)
    assert torch.allclose(ref, fused, atol=1e-4)


def test_assemble_probseg_peaks_at_student_score():
    cand = np.zeros((20, 20, 10), dtype=np.int32)
    cand[2:5, 2:5, 2:4] = 1
    cand[10:13, 10:13, 5:7] = 2
    p = np.where(cand > 0, 0.3, 0.0).astype(np.float32)
    p[3, 3, 3] = 0.9
    p[11, 11, 6] = 0.6
    scores = np.array([0.8, 0.2], dtype=np.float32)
    centres = np.array([[3.0, 3.0, 2.5], [11.0, 11.0, 5.5]])
    probseg, labels, kept, rejected = assemble(p, cand, scores, 0.5, centres, centres, np.eye(4))
    assert probseg[cand == 1].max() == pytest.approx(0.8)
    assert probseg[cand == 2].max() == pytest.approx(0.2)
    assert probseg[cand == 0].max() == 0.0
    assert labels.max() == 1 and np.array_equal(labels > 0, cand == 1)
    assert kept.tolist() == [pytest.approx(0.8)]
    assert len(rejected) == 1 and rejected[0]["candidate_id"] == 2
    # Thresholding probseg at the operating point finds the same lesions as the mask.
    from scipy import ndimage as ndi

    assert ndi.label(probseg >= 0.5)[1] == 1


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(0)
    models = {
        "detector": networks.UNet3D((4, 8, 8)),
        "teacher": networks.Teacher((4, 8, 8)),
        "student": networks.Student((4, 8, 8)),
    }
    meta = {
        "name": "tiny",
        "version": "0",
        "networks": {
            "detector": {"widths": [4, 8, 8]},
            "teacher": {"widths": [4, 8, 8], "patch_size": 24},
            "student": {"widths": [4, 8, 8], "patch_size": 24},
        },
        "t_det": 0.5,
        "default_threshold": 0.5,
    }
    return save_bundle(tmp_path_factory.mktemp("b") / "bundle", models, meta)


def test_detect_is_deterministic_and_in_source_grid(tiny_bundle):
    from cmb_bidsapp.models.data import preprocess, raw_from_toy

    raw = raw_from_toy(3)
    lb, fr = preprocess(raw.image, raw.affine, raw.brain, "swi")
    b = load_bundle(tiny_bundle, "cpu")
    r1 = detect(lb, fr, raw.brain, raw.affine, b, t_det=0.0001, threshold=0.0)
    r2 = detect(lb, fr, raw.brain, raw.affine, b, t_det=0.0001, threshold=0.0)
    assert r1.probseg.shape == raw.image.shape
    assert np.array_equal(r1.probseg, r2.probseg) and np.array_equal(r1.labels, r2.labels)
    assert r1.probseg[raw.brain == 0].max() == 0.0
    assert set(r1.seconds) >= {"detector", "student", "total"}


def test_detector_probability_matches_single_window():
    torch.manual_seed(1)
    det = networks.UNet3D((4, 8, 8)).eval()
    vol = np.random.default_rng(0).random((2, 40, 36, 28)).astype(np.float32)
    whole = detector_probability(det, vol, max_window=112)
    tiled = detector_probability(det, vol, max_window=24, overlap=8)
    # Tiles see zero padding at their borders; the Gaussian blending keeps them close inside.
    inner = (slice(8, -8),) * 3
    assert np.corrcoef(whole[inner].ravel(), tiled[inner].ravel())[0, 1] > 0.95


def _default_bundle_or_skip():
    if not (default_bundle_path() / "bundle.json").exists():
        pytest.skip("no default bundle shipped yet")
    return load_bundle(None, "cpu")


def test_default_bundle_loads_and_is_small():
    b = _default_bundle_or_skip()
    size = sum(f.stat().st_size for f in default_bundle_path().iterdir())
    assert size <= 50 * 1024 * 1024
    assert 0.0 < b.t_det < 1.0 and 0.0 < b.default_threshold < 1.0
    card = (default_bundle_path() / "model_card.md").read_text()
    assert "SIMULATED" in card
    assert b.thresholds and {"threshold", "sensitivity", "fp_per_subject"} <= set(b.thresholds[0])


@pytest.mark.slow
def test_default_bundle_finds_simulated_microbleeds():
    """A full simulated SWI with 4 clearly visible microbleeds: found within 2 mm, on CPU."""
    b = _default_bundle_or_skip()
    from scipy import ndimage as ndi

    from cmb_bidsapp.models.data import preprocess, raw_from_simulated
    from cmb_bidsapp.synth.subject import simulate_subject

    sim = simulate_subject(
        424242,
        "swi",
        size="full",
        skull=False,
        n_microbleeds=4,
        cmb_diameter_range=(1.4, 2.0),
        cmb_chi_range=(1.0, 1.5),
        mimic_rate=0.0,
    )
    raw = raw_from_simulated(sim, "sub-t", "t")
    lb, fr = preprocess(raw.image, raw.affine, raw.brain, "swi")
    res = detect(lb, fr, raw.brain, raw.affine, b)
    ref = np.asarray(sim.reference_mask.dataobj) > 0
    rl, rn = ndi.label(ref, structure=np.ones((3, 3, 3)))
    assert rn >= 3
    aff = raw.affine
    ref_c = np.asarray(ndi.center_of_mass(ref, rl, range(1, rn + 1))) @ aff[:3, :3].T + aff[:3, 3]
    n = int(res.labels.max())
    pred = res.labels > 0
    pred_c = np.asarray(ndi.center_of_mass(pred, res.labels, range(1, n + 1))).reshape(-1, 3)
    pred_c = pred_c @ aff[:3, :3].T + aff[:3, 3]
    d = np.sqrt(((ref_c[:, None] - pred_c[None]) ** 2).sum(-1)) if n else np.full((rn, 1), 99.0)
    found = (d.min(axis=1) <= 2.0).sum()
    assert found >= rn - 1, (found, rn, d.min(axis=1))
    assert n - found <= 2  # few false positives on this subject


def _one_voxel_source(shape=(80, 72, 40), vs=(0.68, 0.75, 1.38)):
    """A bright one-voxel microbleed (QSM-like: tissue 0.5, lesion 0.8) on an anisotropic grid."""
    rng = np.random.default_rng(0)
    lb = (0.5 + rng.normal(0, 0.02, shape)).astype(np.float32)
    centre = (40, 36, 20)
    lb[centre] = 0.8
    brain = np.zeros(shape, np.uint8)
    brain[5:-5, 5:-5, 3:-3] = 1
    lb[brain == 0] = 0
    affine = np.diag([*vs, 1.0])
    return lb, brain, affine, centre


def test_working_frst_keeps_a_one_voxel_peak_that_resampling_loses():
    """The reason for ``frst_grid = working`` (:func:`working_frst`): a one-voxel source's FRST
    peak is one voxel wide, and resampling the source grid's map to the working grid loses much
    of it (the networks see absolute values); computed on the working grid it stays high and
    above the background. Four positions of the source against the working grid."""
    from cmb_bidsapp.detect.frst import frst

    vs = (0.68, 0.75, 1.38)
    resampled, working, background = [], [], []
    for centre in [(40, 36, 20), (41, 37, 21), (40, 37, 20), (39, 35, 19)]:
        lb, brain, affine, _ = _one_voxel_source(vs=vs)
        lb[40, 36, 20] = lb[40, 36, 19]
        lb[centre] = 0.8
        fr = frst(lb, vs, bright=True, mask=brain > 0)
        grid, v_src, bw = working_inputs(lb, fr, brain, affine, frst_grid="source")
        _, v_work, bw2 = working_inputs(lb, None, brain, affine, frst_grid="working")
        assert np.array_equal(bw, bw2) and np.array_equal(v_src[0], v_work[0])
        assert v_work[1].min() >= 0 and v_work[1].max() <= 1
        w = np.rint(grid.world_to_voxel((np.asarray(centre, float) * vs)[None]))[0]
        sl = tuple(slice(int(c) - 2, int(c) + 3) for c in w)
        resampled.append(v_src[1][sl].max())
        working.append(v_work[1][sl].max())
        background.append(np.percentile(v_work[1][bw > 0], 99.9))
    assert np.mean(working) > np.mean(resampled) + 0.15
    assert np.mean(working) > 1.3 * np.mean(background)
    lb, brain, affine, _ = _one_voxel_source(vs=vs)
    with pytest.raises(ValueError, match="frst_map"):
        working_inputs(lb, None, brain, affine, frst_grid="source")
    with pytest.raises(ValueError, match="frst_grid"):
        working_inputs(lb, lb, brain, affine, frst_grid="native")


def test_bundle_frst_grid_defaults_to_source_for_older_bundles(tiny_bundle, tmp_path):
    """A bundle without ``preprocessing.frst_grid`` (written before it existed) resamples the
    source map, as it was trained to; one that says ``working`` needs no source map."""
    import json
    import shutil

    b = load_bundle(tiny_bundle, "cpu")
    assert b.frst_grid == "source" and b.frst_radii_mm == (1.0, 1.5, 2.0, 2.5)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta.setdefault("preprocessing", {})["frst_grid"] = "working"
    (copy / "bundle.json").write_text(json.dumps(meta))
    bw = load_bundle(copy, "cpu")
    assert bw.frst_grid == "working"
    lb, brain, affine, _ = _one_voxel_source()
    res = detect(lb, None, brain, affine, bw, t_det=0.0001, threshold=0.0)
    assert res.probseg.shape == lb.shape and res.probseg[brain == 0].max() == 0.0


class _LeftRight(torch.nn.Module):
    """A patch classifier that is NOT mirror-symmetric: logit = mean of the patch's first half
    along the last axis minus that of the second half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        d = x[:, 0, ..., :half].mean(dim=(1, 2, 3)) - x[:, 0, ..., half:].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(d), 10 * d], dim=1)


def test_student_flip8_averages_the_mirror_images():
    """``flip8`` is the mean softmax of the patch and its 7 mirror images: a classifier that
    only sees left against right is fooled without it and averages to 0.5 with it."""
    rng = np.random.default_rng(0)
    vol = np.zeros((2, 40, 40, 40), dtype=np.float32)
    vol[0, 10:30, 10:30, 10:20] = 1.0  # bright on the low side of the last axis
    vol += rng.normal(0, 0.01, vol.shape).astype(np.float32)
    centres = np.array([[20, 20, 20], [20, 20, 21]])
    plain = classify_patches(_LeftRight(), vol, centres, tta="none")
    flip = classify_patches(_LeftRight(), vol, centres, tta="flip8")
    assert np.all(plain > 0.9)
    np.testing.assert_allclose(flip, 0.5, atol=0.02)
    # explicit mean over the 8 views of each patch
    from cmb_bidsapp.models.sampling import extract_patch

    for c, got in zip(centres, flip):
        x = torch.from_numpy(extract_patch(vol, c, 24))[None]
        views = [torch.flip(x, [a + 2 for a in axes]) for axes in STUDENT_TTA["flip8"]]
        want = np.mean([torch.softmax(_LeftRight()(v), 1)[0, 1].item() for v in views])
        assert got == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="test-time augmentation"):
        classify_patches(_LeftRight(), vol, centres, tta="rot90")


def test_bundle_student_tta_follows_bundle_json(tiny_bundle, tmp_path, monkeypatch):
    """Bundles written before ``inference.student_tta`` existed score the patch alone; a bundle
    that says ``flip8`` gets it in :func:`detect`."""
    import json
    import shutil

    from cmb_bidsapp.models import infer

    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    meta.get("inference", {}).pop("student_tta", None)
    bundles = {}
    for tta in ("none", "flip8"):
        copy = tmp_path / tta
        shutil.copytree(tiny_bundle, copy)
        if tta != "none":
            meta.setdefault("inference", {})["student_tta"] = tta
        (copy / "bundle.json").write_text(json.dumps(meta))
        bundles[tta] = load_bundle(copy, "cpu")
        assert bundles[tta].student_tta == tta
    seen = []
    real = infer.classify_patches

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tta"))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "classify_patches", spy)
    lb, brain, affine, _ = _one_voxel_source()
    for b in bundles.values():
        detect(lb, np.zeros_like(lb), brain, affine, b, threshold=0.0)
    assert seen == ["none", "flip8"]
