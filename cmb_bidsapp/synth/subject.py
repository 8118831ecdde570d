"""One simulated subject in memory: :func:`simulate_subject` and :class:`SimulatedSubject`.

Pipeline (all steps seeded from the subject's seed; see the other modules for the physics):

1. draw the protocol, tissue parameters, head pose and a smooth deformation of the template;
2. coarse grid (2–3 mm, whole head): head χ (air/bone/tissue) → dipole field → shim
   (2nd-order polynomial over the brain);
3. mid grid (1 mm): template tissue maps → M0·steady state, R2*, brain χ; upsampled linearly to
   the fine grid (≤ 0.5 mm for ``full``, ≤ 1 mm for ``small``);
4. fine grid: veins (tubes), microbleeds and mimics (spheres, cylinders) drawn with partial
   volumes; local field of the brain χ (zero-padded FFT) plus the upsampled shimmed field;
5. complex GRE signal per echo on the fine grid, reduced to the acquired grid (k-space
   truncation for 3D axes, slice integration for 2D slices);
6. reference masks from the noise-free acquired signal (:mod:`cmb_bidsapp.synth.reference`);
7. receive bias and phase offset, complex Gaussian noise (Rician magnitude), then the outputs
   of the kind (SWI + phase; T2*w magnitude; MEGRE magnitude + phase per echo; QSM χ map);
8. skull stripping for subjects without skull (the true brain mask dilated by 0–2.5 mm), the
   storage orientation and data type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi

from .. import __version__
from .acquisition import Grids, Protocol, make_grids, sample_protocol, storage_transform, to_storage
from .anatomy import TemplateAnatomy, brain_surface_points, load_template_anatomy
from .grids import Grid, b0_direction, resample_aligned, slice_average, truncate_axis, upsample2
from .lesions import (
    Source,
    sample_cmb_count,
    sample_microbleeds,
    sample_mimics,
    stamp_cylinder,
    stamp_sphere,
)
from .physics import (
    OMEGA_PER_PPM,
    apply_rfft_filter,
    dipole_field,
    gre_signal,
    homodyne_phase,
    padded_shape,
    shim,
    smooth_separable_field,
    swi_from_complex,
    tkd_inverse,
)
from .reference import LesionStamp, ReferenceContext, microbleed_masks
from .tissue import AIR_CHI_PPM, TissueParams, build_maps, sample_tissue_params
from .transform import SubjectTransform, add_deformation, random_waves, sample_pose
from .vessels import sample_veins, stamp_tubes

PHASE_CONVENTION = (
    "phase = -gamma * deltaB * TE (right-handed): a paramagnetic source (microbleed, vein) has "
    "negative phase along B0 (scanner z) above and below it and positive phase in its "
    "equatorial plane; a diamagnetic calcification has the opposite pattern"
)
LESION_OVERRIDES = (
    "vein_chi",
    "n_microbleeds",
    "p_no_microbleeds",
    "cmb_diameter_range",
    "cmb_chi_range",
    "class_probabilities",
    "mimic_rate",
    "n_medullary",
    "n_cortical",
)
_RNG_STREAMS = (
    "protocol",
    "tissue",
    "pose",
    "deform",
    "texture",
    "veins",
    "cmb",
    "mimics",
    "noise",
    "recon",
)


@dataclass
class SimulatedSubject:
    """A simulated subject: raw images (nibabel, stored orientation), reference and metadata.

    `images` maps the BIDS name after ``sub-<label>_`` (e.g. ``"swi"``, ``"part-phase_swi"``,
    ``"T2starw"``, ``"echo-1_part-mag_MEGRE"``, ``"Chimap"``) to an image; `sidecars` has the
    same keys. `reference_mask` (uint8 0/1) and `brain_mask` (uint8 0/1) share the images' grid.
    `lesions` and `mimics` are the reference tables (scanner mm and voxel indices of this grid).
    """

    seed: int
    kind: str
    size: str
    skull: bool
    images: dict[str, nib.Nifti1Image]
    sidecars: dict[str, dict]
    reference_mask: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    lesions: pd.DataFrame
    mimics: pd.DataFrame
    acquisition: dict
    echo_times: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main_image(self) -> nib.Nifti1Image:
        """The image a detector reads (SWI, T2*w, last-echo MEGRE magnitude or χ map)."""
        key = {"swi": "swi", "t2starw": "T2starw", "qsm": "Chimap"}.get(self.kind)
        if key is None:
            key = f"echo-{len(self.echo_times)}_part-mag_MEGRE"
        return self.images[key]


@lru_cache(maxsize=2)
def _surface_points(tpl: TemplateAnatomy) -> tuple[np.ndarray, np.ndarray]:
    return brain_surface_points(tpl, 14.0, step=3), brain_surface_points(tpl, 0.0, step=2)


def _reduce_volume(sig: torch.Tensor, grids: Grids, two_d: bool, out: torch.Tensor) -> None:
    acq = grids.acquired.shape
    if two_d:
        out.copy_(slice_average(sig, 2, acq[2], grids.n_pitch, grids.n_sub))
    else:
        truncate_axis(sig, 2, acq[2], out=out)


def _reduce_chunked(
    make, shape, n_out: int, grids: Grids, two_d: bool, chunk_voxels: int = 8_000_000, skip=None
) -> list[torch.Tensor]:
    """Reduce `n_out` fine-grid complex volumes produced block by block by ``make(index)``.

    ``make((slice0, slice1))`` returns a list of `n_out` complex blocks (all of the third,
    slice axis). Each block is reduced along the slice axis at once, so no full fine complex
    volume exists in memory; the two in-plane axes are reduced afterwards. Where ``skip`` (a
    tensor of the fine shape) is all zero (air), the signal is zero and is not formed.
    """
    acq = grids.acquired.shape
    n0, n1 = shape[0], shape[1]
    chunk = max(8, chunk_voxels // (shape[1] * shape[2]))
    parts = [torch.zeros((n0, n1, acq[2]), dtype=torch.complex64) for _ in range(n_out)]
    for i in range(0, n0, chunk):
        sl0 = slice(i, min(i + chunk, n0))
        sl1 = slice(0, n1)
        if skip is not None:
            used = torch.nonzero(skip[sl0].abs().amax(dim=(0, 2)) > 0).squeeze(1)
            if len(used) == 0:
                continue  # only air in this slab: no signal
            sl1 = slice(int(used[0]), int(used[-1]) + 1)
        for part, sig in zip(parts, make((sl0, sl1))):
            _reduce_volume(sig, grids, two_d, part[sl0, sl1])
    out = []
    for part in parts:
        for axis in (0, 1):
            part = truncate_axis(part, axis, acq[axis])
        out.append(part)
    return out


def _signals_acquired(
    amp, r2s, field, tes: list[float], grids: Grids, two_d: bool
) -> list[torch.Tensor]:
    """GRE signals at echo times `tes` (s), formed on the fine grid, reduced to the acquired grid.

    Equally spaced echoes use S(TE + ΔTE) = S(TE) · exp(−(R2* + iγΔB)·ΔTE).
    """
    steps = np.diff(tes)
    uniform = len(tes) > 2 and np.allclose(steps, steps[0], rtol=1e-6)

    def make(sl):
        first = gre_signal(amp[sl], r2s[sl], field[sl], tes[0])
        out = [first]
        if uniform:
            q = gre_signal(torch.ones_like(amp[sl]), r2s[sl], field[sl], float(steps[0]))
            for _ in tes[1:]:
                out.append(out[-1] * q)
        else:
            out += [gre_signal(amp[sl], r2s[sl], field[sl], te) for te in tes[1:]]
        return out

    return _reduce_chunked(make, tuple(amp.shape), len(tes), grids, two_d, skip=amp)


def _lattice_noise(tr: SubjectTransform, rng: np.random.Generator, channels: int) -> torch.Tensor:
    """Smooth tissue texture (16–40 mm waves on template positions) on the transform's lattice."""
    lattice = tr.lattice
    nodes = lattice.to_world(np.indices(lattice.shape).reshape(3, -1).T)
    noise = random_waves(tr.affine_to_template(nodes), rng, channels, (16.0, 40.0))
    return torch.from_numpy(
        np.clip(noise, -3, 3).reshape(channels, *lattice.shape).astype(np.float32)
    )


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    lesion = {k: overrides[k] for k in LESION_OVERRIDES if k in overrides}
    proto = {k: v for k, v in overrides.items() if k not in LESION_OVERRIDES}
    return lesion, proto


def simulate_subject(
    seed: int,
    kind: str,
    size: str = "full",
    skull: bool | None = None,
    *,
    debug: dict | None = None,
    **overrides,
) -> SimulatedSubject:
    """Simulate one subject of input `kind` (swi, t2starw, megre, qsm) at `size` (small, full).

    `skull` None draws it (50 %). `overrides` replace drawn values: any :class:`Protocol`
    field (e.g. ``echo_times_s=[0.02]``, ``snr=30``, ``orientation="oblique"``,
    ``dtype="int16"``) or ``n_microbleeds``, ``p_no_microbleeds``, ``cmb_diameter_range``
    (mm), ``cmb_chi_range`` (ppm), ``class_probabilities`` (lobar, deep, infratentorial),
    ``mimic_rate`` (scales mimic prevalence; 0 = none), ``n_medullary``, ``n_cortical``,
    ``vein_chi`` (ppm).
    The same arguments give the same result. `debug`, when a dict, receives intermediate
    arrays (grids, fields, noise-free signals) for inspection.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lesion_over, proto_over = _split_overrides(dict(overrides))
    children = np.random.SeedSequence(int(seed)).spawn(len(_RNG_STREAMS))
    rng = {name: np.random.default_rng(c) for name, c in zip(_RNG_STREAMS, children)}
    proto = sample_protocol(rng["protocol"], kind, size, skull, **proto_over)
    tpl = load_template_anatomy()
    params = sample_tissue_params(rng["tissue"])
    if "vein_chi" in lesion_over:
        params.vein_chi = float(lesion_over["vein_chi"])
    timings["setup"] = time.perf_counter() - t0

    # 1. pose, grids and deformation
    t = time.perf_counter()
    tr = sample_pose(rng["pose"])
    head_t, brain_t = _surface_points(tpl)
    grids = make_grids(proto, tr.affine_to_scanner(head_t), tr.affine_to_scanner(brain_t))
    rot = proto.rotation
    c_lo = grids.coarse.origin @ rot
    tr = add_deformation(tr, tpl, rot, c_lo, c_lo + grids.coarse.fov, rng["deform"])
    texture_lat = _lattice_noise(tr, rng["texture"], 2)
    two_d = proto.mr_acquisition_type == "2D"
    timings["grids"] = time.perf_counter() - t

    # 2. coarse head field, shimmed
    t = time.perf_counter()
    coarse = grids.coarse
    xt_c = tr.template_points(coarse)
    maps_c = build_maps(
        tpl, xt_c, params, proto.repetition_time_s, proto.flip_angle_deg, tr, coarse, head_only=True
    )
    del xt_c
    pad_c = padded_shape(coarse.shape, 0.6 * coarse.fov, coarse.spacing)
    field_c = dipole_field(
        torch.from_numpy(maps_c["chi_head"]), coarse.spacing, b0_direction(coarse), pad_shape=pad_c
    )
    brain_c = maps_c["brain"] >= 0.5
    field_c = shim(field_c.numpy(), brain_c, [coarse.axis_positions(a) for a in range(3)], order=2)
    timings["background_field"] = time.perf_counter() - t

    # 3. anatomy on the mid grid, then the fine grid
    t = time.perf_counter()
    mid, fine = grids.mid, grids.fine
    xt_m = tr.template_points(mid)
    tex_m = resample_aligned(texture_lat, tr.lattice, mid).numpy()
    maps_m = build_maps(
        tpl, xt_m, params, proto.repetition_time_s, proto.flip_angle_deg, tr, mid, texture=tex_m
    )
    del xt_m, tex_m
    amp, r2s, chi = (torch.from_numpy(maps_m[k]) for k in ("amp", "r2s", "chi_brain"))
    if mid is not fine:
        amp = resample_aligned(amp, mid, fine)
        r2s = resample_aligned(r2s, mid, fine)
        chi = resample_aligned(chi, mid, fine)
    for key in ("amp", "r2s", "chi_brain", "chi_head"):
        maps_m.pop(key, None)
    timings["anatomy"] = time.perf_counter() - t

    # 4. veins, microbleeds, mimics on the fine grid
    t = time.perf_counter()
    veins = sample_veins(
        tpl, rng["veins"], lesion_over.get("n_medullary"), lesion_over.get("n_cortical")
    )
    drawn = veins.decimated(float(fine.spacing.min()))
    vein_vox = fine.to_voxel(tr.to_scanner(drawn.points))
    cov = stamp_tubes(fine.shape, fine.spacing, vein_vox, drawn.radius).view(-1)
    idx = cov.nonzero().squeeze(1)
    w = cov[idx]
    del cov
    a_blood = params.amplitude("blood", proto.repetition_time_s, proto.flip_angle_deg)
    for arr, value in ((amp, a_blood), (r2s, params.r2s("blood")), (chi, params.vein_chi)):
        flat = arr.view(-1)
        flat[idx] = torch.lerp(flat[idx], torch.full_like(w, float(value)), w)
    del idx, w
    timings["veins"] = time.perf_counter() - t

    t = time.perf_counter()
    if "n_microbleeds" in lesion_over:
        n_cmb = int(lesion_over["n_microbleeds"])
    else:
        n_cmb = sample_cmb_count(
            rng["cmb"], p_none=float(lesion_over.get("p_no_microbleeds", 0.35))
        )
    cmbs = sample_microbleeds(
        rng["cmb"],
        tpl,
        n_cmb,
        diameter_range=tuple(lesion_over.get("cmb_diameter_range", (0.5, 2.0))),
        chi_range=tuple(lesion_over.get("cmb_chi_range", (0.3, 1.5))),
        class_probs=lesion_over.get("class_probabilities"),
    )
    mimics = sample_mimics(rng["mimics"], tpl, rate=float(lesion_over.get("mimic_rate", 1.0)))
    stamps: list[LesionStamp | None] = []
    for src in cmbs + mimics:
        stamps.append(_draw_source(src, tr, fine, grids.acquired, params, proto, amp, r2s, chi))
    cmb_stamps = stamps[: len(cmbs)]
    timings["lesions"] = time.perf_counter() - t

    # 5. local field and signals
    t = time.perf_counter()
    b0_f = b0_direction(fine)
    # zero padding: 12 mm through the slab; in-plane the field of view already holds the scalp
    # and a margin (>= 19 mm between the brain and the edge), so only an FFT-friendly size
    pad_f = padded_shape(fine.shape, (0.0, 0.0, 12.0), fine.spacing)
    field = dipole_field(chi, fine.spacing, b0_f, pad_shape=pad_f)
    bg_mid = resample_aligned(torch.from_numpy(field_c), coarse, mid)
    if mid is fine:
        field.add_(bg_mid)
    elif np.allclose(mid.spacing, 2 * fine.spacing) and np.allclose(mid.origin, fine.origin):
        field.add_(upsample2(bg_mid, fine.shape, contiguous=False))
    else:
        field.add_(resample_aligned(bg_mid, mid, fine))
    del bg_mid
    chi_acq = None
    if kind == "qsm":
        chi_acq = _reduce_chunked(
            lambda sl, c=chi: [c[sl].to(torch.complex64)],
            tuple(chi.shape),
            1,
            grids,
            two_d,
            skip=chi,
        )[0].real.contiguous()
    if debug is not None:
        debug.update(
            grids=grids,
            field_c=field_c,
            chi_f=chi.numpy().copy(),
            field_f=field.numpy().copy(),
            amp_f=amp.numpy().copy(),
            r2s_f=r2s.numpy().copy(),
        )
    del chi
    timings["field"] = time.perf_counter() - t

    t = time.perf_counter()
    tes = proto.echo_times_s
    sim_tes = [tes[len(tes) // 2]] if kind == "qsm" else tes
    signals = _signals_acquired(amp, r2s, field, sim_tes, grids, two_d)
    timings["signal"] = time.perf_counter() - t

    if debug is not None:
        debug["signals"] = [x.numpy().copy() for x in signals]
    acq = grids.acquired
    brain_a = resample_aligned(torch.from_numpy(maps_m["brain"]), mid, acq).numpy() >= 0.5
    dist_a = resample_aligned(torch.from_numpy(maps_m["dist"]), mid, acq).numpy()
    del maps_m

    # 6. reference masks (noise-free)
    t = time.perf_counter()
    # homodyne low-pass: a Hann window of w samples keeps scales above 2·FOV/w (mm)
    swi_window = tuple(max(4, int(round(2 * f / proto.swi_window_mm))) for f in acq.fov[:2])
    ctx = ReferenceContext(
        fine=fine,
        acquired=acq,
        two_d=two_d,
        n_pitch=grids.n_pitch,
        n_sub=grids.n_sub,
        b0_fine=b0_f,
        b0_acq=b0_direction(acq),
        echo_times=sim_tes,
        amp=amp,
        r2s=r2s,
        field=field,
        signals=signals,
        kind=kind,
        swi_power=proto.swi_power,
        qsm_threshold=proto.qsm_threshold,
        qsm_shrink=proto.qsm_shrink,
    )
    qsm_mask = None
    if kind == "qsm":
        erode = max(1, int(round(proto.qsm_erode_mm / float(np.mean(acq.spacing[:2])))))
        qsm_mask = ndi.binary_erosion(brain_a, iterations=erode)
        ctx.qsm_mask = qsm_mask
    if kind == "swi":
        ctx.swi_phase_hp = homodyne_phase(signals[0], swi_window)
    valid = [s for s in cmb_stamps if s is not None]
    owner, stats = microbleed_masks(ctx, valid)
    del ctx, amp, r2s
    timings["reference"] = time.perf_counter() - t

    # 7. bias, noise, outputs
    t = time.perf_counter()
    rn = rng["noise"]
    bias = np.exp(smooth_separable_field(acq.shape, rn, proto.bias_amplitude)).astype(np.float32)
    phase0 = smooth_separable_field(acq.shape, rn, float(rn.uniform(0.5, 2.0) * np.pi))
    coil = torch.polar(torch.from_numpy(bias), torch.from_numpy(phase0))
    ref_level = float(np.median(signals[0].abs().numpy()[brain_a])) if brain_a.any() else 1.0
    sigma = ref_level / proto.snr
    arrays: dict[str, np.ndarray] = {}
    if kind == "qsm":
        arrays["Chimap"] = _qsm_map(
            chi_acq, signals[0], field_c, grids, proto, qsm_mask, sigma, rng["recon"], tes
        )
    else:
        noisy = []
        for s in signals:
            n = torch.complex(
                torch.from_numpy(rn.standard_normal(acq.shape, dtype=np.float32)),
                torch.from_numpy(rn.standard_normal(acq.shape, dtype=np.float32)),
            )
            noisy.append(s * coil + sigma * n)
        if kind == "swi":
            arrays["swi"] = swi_from_complex(noisy[0], swi_window, proto.swi_power).numpy()
            arrays["part-phase_swi"] = torch.angle(noisy[0]).numpy()
        elif kind == "t2starw":
            arrays["T2starw"] = noisy[0].abs().numpy()
        else:
            for e, s in enumerate(noisy, start=1):
                arrays[f"echo-{e}_part-mag_MEGRE"] = s.abs().numpy()
                arrays[f"echo-{e}_part-phase_MEGRE"] = torch.angle(s).numpy()
    if not proto.skull and kind != "qsm":
        strip = (dist_a <= proto.strip_margin_mm) | brain_a
        for key in arrays:
            arrays[key] = np.where(strip, arrays[key], 0.0).astype(np.float32)
    timings["outputs"] = time.perf_counter() - t

    # 8. storage, tables, sidecars
    t = time.perf_counter()
    order, flips, pmat = storage_transform(proto, acq.shape)
    affine = acq.affine @ pmat
    images = {
        key: _encode(to_storage(arr, order, flips), affine, key, proto, rn)
        for key, arr in arrays.items()
    }
    ref_mask = to_storage((owner > 0).astype(np.uint8), order, flips)
    brain_mask = to_storage(brain_a.astype(np.uint8), order, flips)
    lesions = _lesion_table(cmbs, cmb_stamps, valid, stats, tr, acq, affine)
    mimic_rows = _mimic_table(
        mimics, stamps[len(cmbs) :], veins, tr, acq, affine, params, proto, field_c, grids, brain_c
    )
    sidecars = {key: _sidecar(key, proto, acq) for key in images}
    timings["storage"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return SimulatedSubject(
        seed=int(seed),
        kind=kind,
        size=size,
        skull=proto.skull,
        images=images,
        sidecars=sidecars,
        reference_mask=_mask_image(ref_mask, affine),
        brain_mask=_mask_image(brain_mask, affine),
        lesions=lesions,
        mimics=mimic_rows,
        acquisition=proto.to_dict(),
        echo_times=list(tes),
        timings=timings,
    )


def _draw_source(
    src: Source,
    tr: SubjectTransform,
    fine: Grid,
    acq: Grid,
    params: TissueParams,
    proto: Protocol,
    amp: torch.Tensor,
    r2s: torch.Tensor,
    chi: torch.Tensor,
) -> LesionStamp | None:
    """Draw one microbleed or mimic on the fine grid (in place); return its stamp."""
    centre_s = tr.to_scanner(src.centre_t[None])[0]
    src.extra["centre_s"] = centre_s
    cf = fine.to_voxel(centre_s[None])[0]
    if src.axis_t is not None:
        axis_s = tr.forward_linear @ src.axis_t
        axis_g = fine.rotation.T @ (axis_s / np.linalg.norm(axis_s))
        got = stamp_cylinder(
            fine.shape, fine.spacing, cf, axis_g, src.diameter_mm / 2, src.length_mm
        )
    else:
        got = stamp_sphere(fine.shape, fine.spacing, cf, src.diameter_mm / 2)
    if got is None:
        return None
    sl, occ = got
    occ_t = torch.from_numpy(occ)
    a_t = params.amplitude(src.tissue, proto.repetition_time_s, proto.flip_angle_deg)
    r_t = params.r2s(src.tissue)
    amp_before = amp[sl].numpy().copy()
    r2s_before = r2s[sl].numpy().copy()
    amp[sl] = amp[sl] * (1 - occ_t) + occ_t * a_t
    r2s[sl] = r2s[sl] * (1 - occ_t) + occ_t * r_t
    if src.tissue == "flow_void":
        chi[sl] = chi[sl] * (1 - occ_t)
    else:
        chi[sl] = chi[sl] + occ_t * src.chi_ppm
    return LesionStamp(
        slices=sl,
        occupancy=occ,
        chi_ppm=src.chi_ppm,
        amp_before=amp_before,
        r2s_before=r2s_before,
        centre_fine=cf,
        centre_acq=acq.to_voxel(centre_s[None])[0],
    )


def _qsm_map(chi_acq, signal, field_c, grids, proto, mask, sigma, rng, tes) -> np.ndarray:
    """The reconstructed χ map (ppm) on the acquired grid (see :mod:`physics`)."""
    acq = grids.acquired
    b0 = b0_direction(acq)
    pad = padded_shape(acq.shape, 20.0, acq.spacing)
    inv, filt = tkd_inverse(pad, acq.spacing, b0, proto.qsm_threshold)
    chi_rec = apply_rfft_filter(chi_acq, filt, pad) * proto.qsm_shrink
    # field noise (ppm): phase noise σ/|S|, combined over echoes
    mag = signal.abs().numpy()
    ref = float(np.median(mag[mask])) if mask.any() else 1.0
    te_rss = float(np.sqrt(np.sum(np.square(tes))))
    noise_f = rng.standard_normal(acq.shape, dtype=np.float32) * (
        sigma / np.maximum(mag, 0.2 * ref) / (OMEGA_PER_PPM * te_rss)
    ).astype(np.float32)
    bg = resample_aligned(torch.from_numpy(field_c), grids.coarse, acq).numpy()
    resid = proto.qsm_background_fraction * bg + smooth_separable_field(acq.shape, rng, 0.003)
    err = apply_rfft_filter(torch.from_numpy((noise_f + resid) * mask), inv, pad).numpy()
    out = chi_rec.numpy() + err
    out = np.where(mask, out - float(out[mask].mean()) if mask.any() else out, 0.0)
    return out.astype(np.float32)


def _encode(
    data: np.ndarray, affine: np.ndarray, key: str, proto: Protocol, rng
) -> nib.Nifti1Image:
    """float32 or int16 with scl_slope, as drawn in the protocol."""
    is_phase = "part-phase" in key
    dtype = proto.phase_dtype if is_phase else proto.dtype
    data = np.asarray(data, np.float32)
    if dtype == "int16":
        if is_phase:
            slope = np.pi / 4096.0
        else:
            peak = float(np.abs(data).max()) or 1.0
            slope = peak / float(rng.integers(4000, 30000))
        ints = np.clip(np.rint(data / slope), -32768, 32767).astype(np.int16)
        img = nib.Nifti1Image(ints, affine)
        img.header.set_slope_inter(slope, 0.0)
        _set_header(img, affine)
        # as if read from disk: get_fdata() and dataobj apply scl_slope like for a file
        return nib.Nifti1Image.from_bytes(img.to_bytes())
    else:
        if not is_phase and key != "Chimap":
            data = data * np.float32(1000.0 / max(float(np.percentile(np.abs(data), 99)), 1e-12))
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.float32)
    _set_header(img, affine)
    return img


def _set_header(img: nib.Nifti1Image, affine: np.ndarray) -> None:
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)


def _mask_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    _set_header(img, affine)
    return img


def _voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return np.rint(np.asarray(xyz) @ inv[:3, :3].T + inv[:3, 3]).astype(int)


LESION_COLUMNS = [
    "lesion_id",
    "x",
    "y",
    "z",
    "i",
    "j",
    "k",
    "true_diameter_mm",
    "chi_ppm",
    "apparent_diameter_mm",
    "volume_mm3",
    "visible",
    "mars_class",
    "region",
    "hemisphere",
]
MIMIC_COLUMNS = ["mimic_id", "type", "location", "x", "y", "z", "i", "j", "k", "size_mm", "chi_ppm"]


def _lesion_table(cmbs, cmb_stamps, valid, stats, tr, acq, affine) -> pd.DataFrame:
    voxvol = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    vi = 0
    for li, (src, st) in enumerate(zip(cmbs, cmb_stamps)):
        if st is not None:
            n_vox = stats[vi]["n_voxels"]
            vi += 1
        else:
            n_vox = 0
        xyz = src.extra["centre_s"]
        ijk = _voxel(affine, xyz)
        vol = n_vox * voxvol
        rows.append(
            {
                "lesion_id": li + 1,
                "x": round(float(xyz[0]), 3),
                "y": round(float(xyz[1]), 3),
                "z": round(float(xyz[2]), 3),
                "i": int(ijk[0]),
                "j": int(ijk[1]),
                "k": int(ijk[2]),
                "true_diameter_mm": round(src.diameter_mm, 3),
                "chi_ppm": round(src.chi_ppm, 4),
                "apparent_diameter_mm": round(float((6 * vol / np.pi) ** (1 / 3)), 3),
                "volume_mm3": round(vol, 3),
                "visible": int(n_vox > 0),
                "mars_class": src.mars_class,
                "region": src.mars_region,
                "hemisphere": src.hemisphere,
            }
        )
    return pd.DataFrame(rows, columns=LESION_COLUMNS)


def _mimic_table(
    mimics, stamps, veins, tr, acq, affine, params, proto, field_c, grids, brain_c
) -> pd.DataFrame:
    rows = []
    for src, st in zip(mimics, stamps):
        if st is None:
            continue
        rows.append((src.kind, src.location, src.extra["centre_s"], src.diameter_mm, src.chi_ppm))
    rows += _vein_crossings(veins, tr, acq, params)
    rows += _artefact_zones(field_c, grids, brain_c, proto)
    out = []
    for n, (typ, loc, xyz, size, chi) in enumerate(rows, start=1):
        ijk = _voxel(affine, xyz)
        out.append(
            {
                "mimic_id": n,
                "type": typ,
                "location": loc,
                "x": round(float(xyz[0]), 3),
                "y": round(float(xyz[1]), 3),
                "z": round(float(xyz[2]), 3),
                "i": int(ijk[0]),
                "j": int(ijk[1]),
                "k": int(ijk[2]),
                "size_mm": round(float(size), 3),
                "chi_ppm": round(float(chi), 4),
            }
        )
    return pd.DataFrame(out, columns=MIMIC_COLUMNS)


def _vein_crossings(veins, tr, acq, params, max_rows: int = 6, spacing_mm: float = 10.0):
    """Points where a medullary or cortical vein runs through the slice (within 30°)."""
    kinds = np.array(veins.kinds)[veins.vessel]
    sel = np.isin(kinds, ["medullary", "cortical"])
    if not sel.any():
        return []
    pts_s = tr.to_scanner(veins.points[sel])
    tan_s = veins.tangent[sel] @ tr.forward_linear.T
    tan_g = tan_s @ acq.rotation
    tan_g /= np.maximum(np.linalg.norm(tan_g, axis=1, keepdims=True), 1e-9)
    through = np.abs(tan_g[:, 2]) > np.cos(np.deg2rad(30))
    vox = acq.to_voxel(pts_s)
    inside = np.all((vox >= 0) & (vox < np.asarray(acq.shape)), axis=1)
    cand = np.nonzero(through & inside)[0]
    rows, chosen = [], []
    for i in cand[:: max(1, len(cand) // 400)]:
        if all(np.linalg.norm(pts_s[i] - c) >= spacing_mm for c in chosen):
            chosen.append(pts_s[i])
            rows.append(
                (
                    "vein_crossing",
                    str(kinds[sel][i]),
                    pts_s[i],
                    2 * veins.radius[sel][i],
                    params.vein_chi,
                )
            )
            if len(rows) >= max_rows:
                break
    return rows


def _artefact_zones(field_c, grids, brain_c, proto, max_rows: int = 4):
    """Brain regions where the shimmed air/bone field removes over half of the signal."""
    coarse, acq = grids.coarse, grids.acquired
    te = max(proto.echo_times_s)
    vox = np.asarray(proto.voxel_mm, float)
    grads = np.gradient(field_c, *coarse.spacing)
    att = np.ones_like(field_c)
    for a in range(3):
        att *= np.abs(np.sinc(OMEGA_PER_PPM * te * grads[a] * vox[a] / (2 * np.pi)))
    zone = brain_c & (att < 0.5)
    lab, n = ndi.label(zone)
    if n == 0:
        return []
    sizes = ndi.sum(zone, lab, index=np.arange(1, n + 1)) * float(np.prod(coarse.spacing))
    order = np.argsort(sizes)[::-1]
    rows = []
    for idx in order[:max_rows]:
        if sizes[idx] < 100.0:
            break
        com = np.array(ndi.center_of_mass(zone, lab, idx + 1))
        xyz = coarse.to_world(com[None])[0]
        v = acq.to_voxel(xyz[None])[0]
        if np.any(v < 0) or np.any(v > np.asarray(acq.shape) - 1):
            continue
        rows.append(
            (
                "air_tissue_artefact",
                "skull_base",
                xyz,
                (6 * sizes[idx] / np.pi) ** (1 / 3),
                AIR_CHI_PPM,
            )
        )
    return rows


def _sidecar(key: str, proto: Protocol, acq: Grid) -> dict:
    tes = proto.echo_times_s
    meta: dict = {
        "MagneticFieldStrength": 3,
        "Manufacturer": "cmb-bidsapp-synth",
        "ManufacturersModelName": f"simulated {proto.kind} ({proto.size})",
        "StationName": "cmb-bidsapp-synth",
        "SoftwareVersions": __version__,
        "InstitutionName": "none (simulated data)",
        "PulseSequenceType": "spoiled gradient echo (simulated)",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "SequenceName": f"synth_{proto.kind}_{proto.mr_acquisition_type.lower()}",
        "MRAcquisitionType": proto.mr_acquisition_type,
        "RepetitionTime": round(proto.repetition_time_s, 6),
        "FlipAngle": round(proto.flip_angle_deg, 3),
        "SliceThickness": round(float(proto.voxel_mm[2]), 4),
    }
    if key.startswith("echo-"):
        n = int(key.split("_")[0].split("-")[1])
        meta["EchoTime"] = round(tes[n - 1], 6)
    elif key == "Chimap":
        meta["EchoTime"] = [round(t, 6) for t in tes]
        meta["Units"] = "ppm"
        meta["Description"] = (
            "Simulated QSM: TKD dipole inversion of the local field, referenced to the mean "
            "over the eroded brain mask"
        )
    else:
        meta["EchoTime"] = round(tes[0], 6)
    if "part-phase" in key:
        meta["Units"] = "rad"
    if key in ("swi", "part-phase_swi") or "MEGRE" in key:
        meta["PhaseConvention"] = PHASE_CONVENTION
    if proto.mr_acquisition_type == "2D":
        meta["SpacingBetweenSlices"] = round(float(acq.spacing[2]), 4)
    return meta
