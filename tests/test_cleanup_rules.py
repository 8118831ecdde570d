"""Clean-up rules on physical phantoms: each rule removes its mimic and keeps a microbleed beside it.

The phantoms are small GRE images made the way the simulator makes them (susceptibility map on a
0.5 mm grid → dipole field → complex signal → block average to the acquired grid → noise), so
microbleeds bloom and calcifications have the opposite phase dipole. World coordinates are
centred on the field of view; in the pallidal tests they stand for MNI coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import fft as sfft

from cmb_bidsapp.detect import cleanup as C
from cmb_bidsapp.preproc.echoes import highpass_phase

OMEGA = 2 * np.pi * 42.577478e6 * 3.0 * 1e-6  # rad/s per ppm at 3 T
FINE = 0.5


def _dipole_field(chi: np.ndarray, vs: float) -> np.ndarray:
    shape = chi.shape
    kx = sfft.fftfreq(shape[0], vs)[:, None, None]
    ky = sfft.fftfreq(shape[1], vs)[None, :, None]
    kz = sfft.rfftfreq(shape[2], vs)[None, None, :]
    k2 = kx**2 + ky**2 + kz**2
    k2[0, 0, 0] = 1.0
    d = (1.0 / 3.0 - kz**2 / k2).astype(np.float32)
    d[0, 0, 0] = 0.0
    return sfft.irfftn(sfft.rfftn(chi.astype(np.float32)) * d, shape).astype(np.float32)


def _blocks(a: np.ndarray, f: list[int]) -> np.ndarray:
    s = [n // k for n, k in zip(a.shape, f)]
    a = a[: s[0] * f[0], : s[1] * f[1], : s[2] * f[2]]
    return a.reshape(s[0], f[0], s[1], f[1], s[2], f[2]).mean(axis=(1, 3, 5))


def phantom(
    sources=(),
    *,
    fov_mm=(64.0, 64.0, 48.0),
    vs=(1.0, 1.0, 1.0),
    semi=(28.0, 28.0, 22.0),
    zones=(),
    handed: int = 1,
    te: float = 0.02,
    noise: float = 0.02,
    seed: int = 0,
) -> dict:
    """A GRE phantom: ellipsoid brain, sources (spheres, tubes), optional signal-loss zones.

    Returns magnitude, high-pass phase (radians), χ (ppm, acquired grid), brain mask, affine.
    """
    fshape = tuple(int(round(s / FINE)) for s in fov_mm)
    axes = [(np.arange(n) + 0.5) * FINE - s / 2 for n, s in zip(fshape, fov_mm)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    brain = ((g / np.asarray(semi, np.float32)) ** 2).sum(-1) <= 1.0
    chi = np.zeros(fshape, np.float32)
    r2 = np.full(fshape, 20.0, np.float32)
    m0 = brain.astype(np.float32)
    for s in sources:
        c = np.asarray(s["centre"], np.float32)
        if s.get("kind", "sphere") == "sphere":
            inside = ((g - c) ** 2).sum(-1) <= s["radius"] ** 2
        else:
            d = np.asarray(s["axis"], np.float32)
            d /= np.linalg.norm(d)
            rel = g - c
            along = rel @ d
            perp = rel - along[..., None] * d
            inside = ((perp**2).sum(-1) <= s["radius"] ** 2) & (
                np.abs(along) <= s.get("half_length", 1e9)
            )
        inside &= brain
        chi[inside] = s["chi"]
        r2[inside] = s.get("r2s", 100.0)
        m0[inside] = s.get("m0", 0.6)
    for z in zones:
        inside = (((g - np.asarray(z["centre"])) / np.asarray(z["semi"])) ** 2).sum(-1) <= 1.0
        m0[inside & brain] *= z["factor"]
    field = _dipole_field(chi, FINE)
    sig = m0 * np.exp(-te * r2) * np.exp(-1j * handed * OMEGA * field * te).astype(np.complex64)
    f = [int(round(v / FINE)) for v in vs]
    sig = _blocks(sig, f)
    rng = np.random.default_rng(seed)
    sig = sig + noise * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    mask = _blocks(brain.astype(np.float32), f) >= 0.5
    affine = np.diag([*vs, 1.0])
    affine[:3, 3] = -np.asarray(fov_mm) / 2 + np.asarray(vs) / 2
    mag = np.abs(sig).astype(np.float32)
    phase = highpass_phase(mag, np.angle(sig).astype(np.float32), vs)
    return {
        "mag": mag,
        "phase": phase,
        "chi": _blocks(chi, f).astype(np.float32),
        "mask": mask,
        "affine": affine,
    }


def balls(shape, affine, centres, radius=1.3, mask=None) -> np.ndarray:
    """A label map with a ball (radius mm, at least one voxel) per centre (world mm): ids 1..n."""
    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    lab = np.zeros(shape, np.int32)
    for n, c in enumerate(centres, start=1):
        d2 = ((world - np.asarray(c)) ** 2).sum(-1)
        lab[d2 <= max(radius, 0.5 * vs.max()) ** 2] = n
        lab[np.unravel_index(np.argmin(d2), shape)] = n
    if mask is not None:
        lab[~mask] = 0
    return lab


BLEED = {"chi": 0.8, "r2s": 300.0, "m0": 0.55, "radius": 0.8}
CALC = {"chi": -0.8, "r2s": 200.0, "m0": 0.5, "radius": 1.0}
VEIN = {"kind": "tube", "chi": 0.45, "r2s": 100.0, "m0": 0.8, "radius": 0.6}


def _reasons(result: C.CleanupResult) -> dict[int, str]:
    return {int(r.lesion_id): r.rule for r in result.rejected.itertuples()}


# ----------------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vs", [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0), (0.5, 0.5, 3.0)])
def test_size_rule_in_mm3_on_any_grid(vs):
    """A 14 mm dark zone (flow void, haemorrhage) goes, a 3 mm bleed 12 mm away stays."""
    shape = tuple(int(40 / v) for v in vs)
    affine = np.diag([*vs, 1.0])
    affine[:3, 3] = -20.0
    lab = balls(shape, affine, [(-8.0, 0.0, 0.0)], radius=7.0)
    lab += balls(shape, affine, [(9.0, 0.0, 0.0)], radius=1.5) * 2
    geom = C.candidate_geometry(lab, affine)
    reasons, feats = C.size_rule(geom)
    assert set(reasons) == {1}
    assert reasons[1].startswith("size: ") and "mm³" in reasons[1]
    lower, upper = C.size_bounds_mm3(np.asarray(vs), C.CleanupParams())
    assert feats["volume_mm3"][0] > upper and lower <= feats["volume_mm3"][1] <= upper
    # the bounds are physical: the same 10 mm limit in mm³, not in voxels
    assert upper == pytest.approx(np.pi / 6 * np.prod(10.0 + np.asarray(vs)))


def test_size_rule_tiny_component():
    """A single 0.3 mm voxel speck is below a 1.5 mm lesion; a single 1.5 mm voxel is not."""
    for vs, rejected in (((0.3, 0.3, 0.3), True), ((1.5, 1.5, 1.5), False)):
        affine = np.diag([*vs, 1.0])
        lab = np.zeros((20, 20, 20), np.int32)
        lab[10, 10, 10] = 1
        reasons, _ = C.size_rule(C.candidate_geometry(lab, affine))
        assert (1 in reasons) is rejected


# ----------------------------------------------------------------------------------------
# vessels
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vein_phantom():
    veins = [
        dict(VEIN, centre=(0.0, 0.0, 0.0), axis=(0.0, 0.3, 1.0)),
        dict(VEIN, centre=(0.0, 10.0, 5.0), axis=(1.0, 0.0, 0.2)),
        dict(VEIN, centre=(5.0, -14.0, -6.0), axis=(0.5, 0.5, 0.7)),
    ]
    bleeds = [dict(BLEED, centre=(5.0, 0.0, 0.0)), dict(BLEED, centre=(-6.0, 10.0, 0.0))]
    return phantom(veins + bleeds)


def test_vessel_rule_removes_veins_keeps_bleeds_beside(vein_phantom):
    p = vein_phantom
    # candidates on two veins (one along B0, one across), and bleeds 5 mm from each
    centres = [(0.0, 0.0, 0.0), (0.0, 10.0, 5.0), (5.0, 0.0, 0.0), (-6.0, 10.0, 0.0)]
    lab = balls(p["mag"].shape, p["affine"], centres)
    lb = C._lesion_bright(p["mag"], p["mask"], "megre")
    geom = C.candidate_geometry(lab, p["affine"], lb)
    reasons, feats = C.vessel_rule(geom, lb, p["mask"])
    assert set(reasons) == {1, 2}, reasons
    assert all(r.startswith("vessel: ") and "continues" in r for r in reasons.values())
    assert feats["continuity_mm"][0] >= 5 and feats["continuity_mm"][1] >= 5
    assert feats["continuity_mm"][2] < 2 and feats["continuity_mm"][3] < 2


def test_vessel_rule_thick_slices_vein_through_slices():
    """2D-like grid (1 × 1 × 3 mm): a vein crossing the slices looks round in-plane; it goes."""
    vein = dict(VEIN, centre=(0.0, 0.0, 0.0), axis=(0.2, 0.1, 1.0), radius=0.7)
    bleed = dict(BLEED, centre=(6.0, 2.0, 0.0), radius=1.0)
    p = phantom([vein, bleed], vs=(1.0, 1.0, 3.0))
    lab = balls(p["mag"].shape, p["affine"], [(0.0, 0.0, 0.0), (6.0, 2.0, 0.0)], radius=1.4)
    lb = C._lesion_bright(p["mag"], p["mask"], "t2starw")
    geom = C.candidate_geometry(lab, p["affine"], lb)
    assert geom.slice_axis == 2
    reasons, _ = C.vessel_rule(geom, lb, p["mask"])
    assert set(reasons) == {1}, reasons
    assert "slices" in reasons[1]


# ----------------------------------------------------------------------------------------
# diamagnetic sign
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("handed", [1, -1])
def test_diamagnetic_phase_calibrated_on_veins(vein_phantom, handed):
    """Calcification rejected, bleed 10 mm away kept, whatever the scanner's phase handedness."""
    veins = [
        dict(VEIN, centre=(0.0, 0.0, 0.0), axis=(0.0, 0.3, 1.0)),
        dict(VEIN, centre=(0.0, 10.0, 5.0), axis=(1.0, 0.0, 0.2)),
        dict(VEIN, centre=(5.0, -14.0, -6.0), axis=(0.5, 0.5, 0.7)),
        dict(VEIN, centre=(-12.0, 0.0, 0.0), axis=(0.0, 1.0, 0.1)),
    ]
    p = phantom(
        [*veins, dict(CALC, centre=(8.0, -4.0, -8.0)), dict(BLEED, centre=(12.0, 4.0, -2.0))],
        handed=handed,
    )
    lab = balls(p["mag"].shape, p["affine"], [(8.0, -4.0, -8.0), (12.0, 4.0, -2.0)])
    res = C.clean_up(
        lab, {1: 0.9, 2: 0.9}, p["mag"], p["mask"], p["affine"], kind="megre", phase=p["phase"]
    )
    assert res.handedness["calibrated"] and res.handedness["handedness"] == handed
    reasons = _reasons(res)
    assert set(reasons) == {1}, reasons
    assert reasons[1].startswith("diamagnetic: ") and "calcification" in reasons[1]
    assert res.kept_ids == [2]
    sign = res.features.set_index("lesion_id")["dipole_sign"]
    assert sign[1] < -0.3 < 0.3 < sign[2]


def test_diamagnetic_without_phase_does_nothing():
    p = phantom([dict(CALC, centre=(8.0, -4.0, -8.0))])
    lab = balls(p["mag"].shape, p["affine"], [(8.0, -4.0, -8.0)])
    geom = C.candidate_geometry(lab, p["affine"])
    lb = C._lesion_bright(p["mag"], p["mask"], "t2starw")
    reasons, feats, hand = C.diamagnetic_rule(
        geom, kind="t2starw", brain_mask=p["mask"], lesion_bright=lb, phase=None
    )
    assert reasons == {} and hand == {}


def test_diamagnetic_qsm():
    """On a χ map (ppm, with streaky reconstruction blur) the dark calcification goes."""
    p = phantom([dict(CALC, centre=(8.0, -4.0, -8.0)), dict(BLEED, centre=(-8.0, 4.0, 4.0))])
    from scipy import ndimage as ndi

    chi = ndi.gaussian_filter(p["chi"], 0.7) + np.random.default_rng(1).normal(
        0, 0.01, p["chi"].shape
    ).astype(np.float32)
    chi[~p["mask"]] = 0
    # the detector's candidate next to the calcification (a bright streak lobe) and the bleed
    lab = balls(chi.shape, p["affine"], [(8.0, -4.0, -6.5), (-8.0, 4.0, 4.0)], radius=1.0)
    res = C.clean_up(lab, None, chi, p["mask"], p["affine"], kind="qsm")
    reasons = _reasons(res)
    assert set(reasons) == {1}, reasons
    assert "χ" in reasons[1] and "ppm" in reasons[1]


# ----------------------------------------------------------------------------------------
# bilateral pallidal mineralisation
# ----------------------------------------------------------------------------------------


def _identity(points):
    return np.asarray(points, dtype=float)


def test_pallidal_pair_removed_single_kept():
    shape, vs = (64, 64, 48), 1.0
    affine = np.diag([vs, vs, vs, 1.0])
    affine[:3, 3] = [-31.5, -31.5, -23.5]
    pair = [(20.0, -4.0, -2.0), (-19.0, -3.0, -1.0)]
    lab = balls(shape, affine, [*pair, (-20.0, 10.0, 6.0)])
    reasons, feats = C.pallidal_rule(C.candidate_geometry(lab, affine), to_mni=_identity)
    assert set(reasons) == {1, 2}
    assert reasons[1].startswith("pallidal: ") and "lesion 2" in reasons[1]
    assert list(feats["pallidal_pair"]) == [2, 1, 0]
    # one pallidal lesion alone, or a pair that is not mirrored, is kept
    lab = balls(shape, affine, [(20.0, -4.0, -2.0), (-20.0, 6.0, 5.0)])
    reasons, _ = C.pallidal_rule(C.candidate_geometry(lab, affine), to_mni=_identity)
    assert reasons == {}
    lab = balls(shape, affine, [(20.0, -4.0, -2.0)])
    reasons, _ = C.pallidal_rule(C.candidate_geometry(lab, affine), to_mni=_identity)
    assert reasons == {}
    # a mirrored pair outside the pallidum (lobar) is not this rule's business
    lab = balls(shape, affine, [(30.0, 20.0, 10.0), (-30.0, 20.0, 10.0)])
    reasons, _ = C.pallidal_rule(C.candidate_geometry(lab, affine), to_mni=_identity)
    assert reasons == {}


def test_pallidal_pair_from_mars_map_in_an_oblique_grid():
    """Without an MNI mapping: the MARS basal-ganglia blobs give the midline (rotated head)."""
    from cmb_bidsapp.anatomy.regions import REGION_LABEL

    shape = (64, 64, 48)
    theta = np.deg2rad(20)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ np.array([31.5, 31.5, 23.5])
    # basal ganglia blobs at ±20 mm along the head's left-right axis (rotated in the scanner)
    lr = rot @ np.array([1.0, 0.0, 0.0])
    bg_centres = [20 * lr, -20 * lr]
    regions = balls(shape, affine, bg_centres, radius=7.0)
    regions = np.where(regions > 0, REGION_LABEL["basal_ganglia"], 0)
    pair = [20 * lr + [0, 0, 1], -20 * lr + [0.5, 0, 1]]
    lab = balls(shape, affine, [*pair, 20 * lr + rot @ np.array([0, 0, -4.0])])
    reasons, _ = C.pallidal_rule(C.candidate_geometry(lab, affine), regions=regions)
    assert set(reasons) == {1, 2}, reasons


# ----------------------------------------------------------------------------------------
# brain edge and CSF
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_phantom():
    rim = {"chi": 0.0, "r2s": 20.0, "m0": 0.1, "radius": 2.0}  # dark spot on the brain edge
    p = phantom(
        [
            dict(rim, centre=(28.0, 0.0, 0.0)),
            dict(BLEED, centre=(0.0, 25.5, 2.0)),  # juxtacortical: 2.5 mm under the surface
            dict(BLEED, centre=(0.0, 0.0, 0.0)),  # in the "ventricle"
        ]
    )
    shape, affine = p["mag"].shape, p["affine"]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    rad = np.sqrt(((w / np.array([28.0, 28.0, 22.0])) ** 2).sum(-1))
    vent = ((w / np.array([4.0, 8.0, 4.0])) ** 2).sum(-1) <= 1
    gm = ((rad > 0.88) & (rad <= 1.0)).astype(np.float32)
    csf = vent.astype(np.float32)
    wm = ((rad <= 0.88) & ~vent).astype(np.float32)
    p["tissue"] = {"CSF": csf, "GM": gm, "WM": wm}
    labels = balls(shape, affine, [(28.0, 0.0, 0.0)], radius=2.0, mask=p["mask"])
    others = balls(shape, affine, [(0.0, 25.5, 2.0), (0.0, 0.0, 0.0)], mask=p["mask"])
    p["labels"] = np.where(others > 0, others + 1, labels).astype(np.int32)
    return p


def test_edge_and_csf_rules_keep_juxtacortical_bleed(edge_phantom):
    p = edge_phantom
    res = C.clean_up(
        p["labels"], None, p["mag"], p["mask"], p["affine"], kind="t2starw", tissue=p["tissue"]
    )
    reasons = _reasons(res)
    assert set(reasons) == {1, 3}, reasons
    assert reasons[1].startswith("brain_edge: ")
    assert reasons[3].startswith("csf: ")
    assert res.kept_ids == [2]
    # the published rule (everything within 8 voxels of the mask edge) would delete lesion 2
    from scipy import ndimage as ndi

    dist_vox = ndi.distance_transform_edt(p["mask"])
    assert dist_vox[p["labels"] == 2].min() <= 8


def test_edge_rule_without_tissue_maps(edge_phantom):
    p = edge_phantom
    geom = C.candidate_geometry(p["labels"], p["affine"])
    edge, csf, feats = C.edge_rule(geom, p["mask"], None)
    assert set(edge) == {1} and csf == {}
    assert feats["outside_fraction"][0] >= 0.25 > feats["outside_fraction"][1]


# ----------------------------------------------------------------------------------------
# air-tissue artefact zones
# ----------------------------------------------------------------------------------------


def test_artefact_zone_removed_bleed_beside_kept():
    zone = {"centre": (0.0, 20.0, -14.0), "semi": (12.0, 9.0, 7.0), "factor": 0.15}
    p = phantom([dict(BLEED, centre=(0.0, 4.0, -6.0))], zones=[zone])
    lab = balls(p["mag"].shape, p["affine"], [(0.0, 19.0, -13.0), (0.0, 4.0, -6.0)])
    res = C.clean_up(lab, {1: 0.7, 2: 0.8}, p["mag"], p["mask"], p["affine"], kind="swi")
    reasons = _reasons(res)
    assert set(reasons) == {1}, reasons
    assert reasons[1].startswith("air_artefact: ")
    assert res.rejected.set_index("lesion_id").loc[1, "probability"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------


def test_clean_up_keeps_ids_and_explains(edge_phantom):
    p = edge_phantom
    lab = p["labels"] * 7  # ids 7, 14, 21: kept ids are not renumbered
    res = C.clean_up(lab, {7: 0.5}, p["mag"], p["mask"], p["affine"], kind="t2starw")
    assert set(np.unique(res.labels)) <= {0, 7, 14, 21}
    assert 14 in res.kept_ids and 7 not in res.kept_ids
    assert list(res.rejected.columns) == list(C.REJECTED_COLUMNS)
    row = res.rejected.set_index("lesion_id").loc[7]
    assert row["probability"] == 0.5 and any(ch.isdigit() for ch in row["rule"])
    assert np.isnan(res.features.set_index("lesion_id").loc[14, "probability"])
    assert res.rule_counts() == {"brain_edge": 1}
    assert res.seconds < 5.0


def test_clean_up_empty_and_rule_selection(edge_phantom):
    p = edge_phantom
    empty = C.clean_up(np.zeros_like(p["labels"]), {}, p["mag"], p["mask"], p["affine"], kind="swi")
    assert empty.kept_ids == [] and len(empty.rejected) == 0
    only_size = C.clean_up(
        p["labels"],
        None,
        p["mag"],
        p["mask"],
        p["affine"],
        kind="swi",
        tissue=p["tissue"],
        params=C.CleanupParams(rules=("size",)),
    )
    assert len(only_size.rejected) == 0


def test_clean_up_orientation_invariant(edge_phantom):
    """The same head stored with permuted and flipped axes gives the same decisions."""
    p = edge_phantom
    base = C.clean_up(
        p["labels"], None, p["mag"], p["mask"], p["affine"], kind="t2starw", tissue=p["tissue"]
    )
    perm, flip = (2, 0, 1), (True, False, True)

    def tf(a):
        a = np.transpose(a, perm)
        for ax, f in enumerate(flip):
            if f:
                a = np.flip(a, ax)
        return np.ascontiguousarray(a)

    # new voxel index n relates to old index o by o[perm[ax]] = n[ax] (or flipped)
    shape_new = tf(p["mask"]).shape
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for ax, old in enumerate(perm):
        if flip[ax]:
            m[old, ax] = -1
            m[old, 3] = shape_new[ax] - 1
        else:
            m[old, ax] = 1
    affine2 = p["affine"] @ m
    res = C.clean_up(
        tf(p["labels"]),
        None,
        tf(p["mag"]),
        tf(p["mask"]),
        affine2,
        kind="t2starw",
        tissue={k: tf(v) for k, v in p["tissue"].items()},
    )
    assert res.kept_ids == base.kept_ids
    assert [r.split(":")[0] for r in res.rejected["rule"]] == [
        r.split(":")[0] for r in base.rejected["rule"]
    ]
    np.testing.assert_allclose(
        res.rejected[["x", "y", "z"]].to_numpy(),
        base.rejected[["x", "y", "z"]].to_numpy(),
        atol=0.01,
    )
