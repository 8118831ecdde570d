"""Effect of the clean-up rules (step 3) on a fresh simulated cohort with mimics, scored with `cmb-bidsapp-eval`.

Usage::

    python benchmarks/cleanup_effect.py OUT_DIR [--n 24] [--seed 7331] [--kinds swi,t2starw,megre,qsm]
                                        [--size full] [--jobs 2] [--detector {provisional,bundle}]
                                        [--bundle DIR]

1. Simulates ``--n`` subjects (:func:`cmb_bidsapp.synth.subject.simulate_subject`, the kinds in
   turn, realistic defaults: lesion counts, mimics, skull in about half). The subject seeds are
   ``SeedSequence([--seed, i])``: with ``--seed 7331`` none is a seed of the training cohorts
   (``cmb-bidsapp-train`` uses ``SeedSequence([--sim-seed, i])`` with ``--sim-seed`` 0 by default,
   the accuracy benchmark 9001). Writes ``OUT_DIR/bids`` (raw, with the phase images) and
   ``OUT_DIR/reference`` (reference masks, lesion tables with MARS classes, mimics tables).
2. Per image, the app's steps (:func:`prepare_image`): ``read_input`` (high-pass phase where a
   phase image exists), ``brain_mask``, N4, ``lesion_bright``, FRST, then the detector: the
   provisional candidate probability thresholded at 0.5 (``--detector provisional``) or the
   networks of a bundle (``--detector bundle``); registration to MNI152NLin2009cAsym, the MARS
   map and the template's tissue priors in the native grid. Cached in ``OUT_DIR/cache``.
3. Clean-up (:func:`cmb_bidsapp.detect.cleanup.clean_up`) of every image; masks before and after
   in ``OUT_DIR/pred_<detector>_before`` / ``_after``, with the lesion tables (MARS class from
   the registration) and the rejected tables.
4. ``cmb-bidsapp-eval`` on both; prints the table: FP per subject before and after, FP removed
   and true microbleeds lost per rule, sensitivity lost, MARS-class agreement of the detected
   lesions with the reference, and what the published 8-voxel edge deletion would have cost.
   Everything is also written to ``OUT_DIR/cleanup_<detector>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

PROVISIONAL_THRESHOLD = 0.5
FRST_RADII_MM = (1.0, 1.5, 2.0, 2.5)


def _sub_label(i: int) -> str:
    return f"{i + 1:03d}"


def subject_seed(seed: int, i: int) -> int:
    """The seed of subject ``i`` of a cohort (the same rule as ``cmb-bidsapp-train``)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def write_subject(
    i: int, seed: int, kind: str, size: str, out: Path, n_microbleeds: int | None = None
) -> dict:
    """Simulate one subject; write its raw BIDS files and its reference derivatives."""
    import nibabel as nib

    from cmb_bidsapp.io import atomic_save_nifti, atomic_write_json, atomic_write_text
    from cmb_bidsapp.synth.subject import simulate_subject

    sub = _sub_label(i)
    anat = out / "bids" / f"sub-{sub}" / "anat"
    ref = out / "reference" / f"sub-{sub}" / "anat"
    if (ref / f"sub-{sub}_desc-mimics_lesions.tsv").exists():
        return {"subject": sub, "kind": kind, "cached": True}
    t0 = time.perf_counter()
    over = {} if n_microbleeds is None else {"n_microbleeds": int(n_microbleeds)}
    sim = simulate_subject(seed, kind, size=size, **over)
    sources = []
    for key, img in sim.images.items():
        name = f"sub-{sub}_{key}.nii.gz"
        atomic_save_nifti(img, anat / name)
        atomic_write_json(anat / name.replace(".nii.gz", ".json"), sim.sidecars[key])
        if "phase" not in key:
            sources.append(f"bids:raw:sub-{sub}/anat/{name}")
    mask = nib.Nifti1Image(
        np.asarray(sim.reference_mask.dataobj, dtype=np.uint8), sim.reference_mask.affine
    )
    atomic_save_nifti(mask, ref / f"sub-{sub}_label-CMB_mask.nii.gz")
    atomic_write_json(
        ref / f"sub-{sub}_label-CMB_mask.json",
        {"Type": "Lesion", "Sources": sources, "Description": "simulated reference"},
    )
    brain = nib.Nifti1Image(
        np.asarray(sim.brain_mask.dataobj, dtype=np.uint8), sim.brain_mask.affine
    )
    atomic_save_nifti(brain, ref / f"sub-{sub}_desc-truebrain_mask.nii.gz")
    cols = ["lesion_id", "x", "y", "z", "i", "j", "k", "mars_class", "region", "visible"]
    table = sim.lesions[[c for c in cols if c in sim.lesions.columns]]
    atomic_write_text(ref / f"sub-{sub}_desc-CMB_lesions.tsv", table.to_csv(sep="\t", index=False))
    atomic_write_text(
        ref / f"sub-{sub}_desc-mimics_lesions.tsv", sim.mimics.to_csv(sep="\t", index=False)
    )
    return {
        "subject": sub,
        "kind": kind,
        "seed": int(seed),
        "lesions": int(len(sim.lesions)),
        "mimics": int(len(sim.mimics)),
        "skull": bool(sim.skull),
        "seconds": round(time.perf_counter() - t0, 1),
    }


_BUNDLE = None


def prepare_image(image, out: Path, detector: str, bundle_path: str | None) -> dict:
    """The app's preprocessing, detection, registration and anatomy for one input (cached)."""
    global _BUNDLE
    import nibabel as nib
    import torch

    torch.set_num_threads(1)
    from cmb_bidsapp.anatomy.registration import (
        mars_in_native,
        register_to_template,
        resample_to_native,
        save_transforms,
    )
    from cmb_bidsapp.anatomy.templates import tissue_priors
    from cmb_bidsapp.detect.candidates import candidate_probability, label_candidates
    from cmb_bidsapp.detect.frst import frst
    from cmb_bidsapp.io import voxel_sizes
    from cmb_bidsapp.preproc.bias import n4_correct
    from cmb_bidsapp.preproc.normalise import lesion_bright
    from cmb_bidsapp.preproc.steps import brain_mask, read_input

    key = image.source_name
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / f"{key}_base.npz"
    det_path = cache / f"{key}_{detector}.npz"
    t0 = time.perf_counter()
    row = {"key": key, "kind": image.kind}
    if not base.exists():
        inp = read_input(
            [str(f) for f in image.files],
            kind=image.kind,
            phase_files=[str(f) for f in image.phase_files] or None,
            echo_times=list(image.echo_times) or None,
            units=str(image.metadata.get("Units", "")),
        )
        mask, report = brain_mask(inp.image, inp.affine, kind=image.kind, mode="auto")
        mask = np.asarray(mask) > 0
        data = inp.image
        if image.kind != "qsm":
            data, _ = n4_correct(data, mask, inp.affine)
        lb = lesion_bright(data, mask, image.kind)
        vs = tuple(voxel_sizes(nib.Nifti1Image(lb, inp.affine)))
        fr = frst(lb, vs, radii_mm=FRST_RADII_MM, bright=True, mask=mask)
        img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), inp.affine)
        reg = register_to_template(img, nib.Nifti1Image(mask.astype(np.uint8), inp.affine))
        regions = mars_in_native(reg, img)
        priors = tissue_priors()
        tissue = {
            k: np.clip(resample_to_native(v, reg, img, order=1), 0, 1).astype(np.float16)
            for k, v in priors.items()
        }
        save_transforms(reg, cache, prefix=f"{key}_")
        np.savez_compressed(
            base,
            image=np.asarray(data, dtype=np.float32),
            affine=inp.affine,
            phase=inp.phase if inp.phase is not None else np.zeros(0, np.float32),
            mask=mask.astype(np.uint8),
            lesion_bright=lb.astype(np.float32),
            frst=np.asarray(fr, dtype=np.float32),
            regions=regions.astype(np.int16),
            csf=tissue["CSF"],
            gm=tissue["GM"],
            wm=tissue["WM"],
            reg_flag=np.array(bool(reg.flag)),
            reg_report=np.array(json.dumps(reg.report())),
            brain_method=np.array(str(report.get("method"))),
        )
        row["prepare_s"] = round(time.perf_counter() - t0, 1)
    if not det_path.exists():
        z = np.load(base)
        lb, fr, mask, affine = z["lesion_bright"], z["frst"], z["mask"] > 0, z["affine"]
        vs = tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        t1 = time.perf_counter()
        if detector == "provisional":
            prob = candidate_probability(lb, fr, mask, vs)
            labels, n = label_candidates(prob, PROVISIONAL_THRESHOLD, vs)
            from scipy import ndimage as ndi

            ids = np.arange(1, n + 1)
            scores = (
                np.asarray(ndi.maximum(prob, labels, ids), dtype=np.float32)
                if n
                else np.zeros(0, np.float32)
            )
        else:
            from cmb_bidsapp.models.bundle import load_bundle
            from cmb_bidsapp.models.infer import detect

            if _BUNDLE is None:
                _BUNDLE = load_bundle(bundle_path, "cpu")
            res = detect(lb, fr, mask, affine, _BUNDLE)
            prob, labels, scores = res.probseg, res.labels, res.scores
        np.savez_compressed(
            det_path,
            probseg=np.asarray(prob, dtype=np.float32),
            labels=np.asarray(labels, dtype=np.int32),
            scores=np.asarray(scores, dtype=np.float32),
            seconds=np.array(time.perf_counter() - t1),
        )
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _dataset_descriptions(out: Path, folders: list[str]) -> None:
    from cmb_bidsapp.io import atomic_write_json

    atomic_write_json(
        out / "bids" / "dataset_description.json",
        {"Name": "cmb-bidsapp clean-up cohort (simulated)", "BIDSVersion": "1.10.0"},
    )
    for d in folders:
        atomic_write_json(
            out / d / "dataset_description.json",
            {
                "Name": d,
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "benchmarks/cleanup_effect.py"}],
                "SourceDatasets": [{"URL": str(out / "bids")}],
            },
        )


def simulate_and_prepare(args) -> tuple[list, list, float, float]:
    out = args.out
    kinds = args.kinds.split(",")
    _dataset_descriptions(out, ["reference"])
    seeds = [subject_seed(args.seed, i) for i in range(args.n)]
    ctx = get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as ex:
        sims = list(
            ex.map(
                write_subject,
                range(args.n),
                seeds,
                [kinds[i % len(kinds)] for i in range(args.n)],
                [args.size] * args.n,
                [out] * args.n,
                [args.n_microbleeds] * args.n,
            )
        )
    t_sim = time.perf_counter() - t0
    from cmb_bidsapp.bids import collect_inputs

    images, _ = collect_inputs(out / "bids")
    t1 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as ex:
        rows = list(
            ex.map(
                prepare_image,
                images,
                [out] * len(images),
                [args.detector] * len(images),
                [args.bundle] * len(images),
            )
        )
    return sims, rows, t_sim, time.perf_counter() - t1


def _flagged(z) -> bool:
    """The registration flag judged again from the cached quality figures with the current rules
    (the cache may hold flags from older bounds); a centre-of-mass fallback stays flagged."""
    from cmb_bidsapp.anatomy.registration import _judge

    report = json.loads(str(z["reg_report"]))
    if report.get("Stage") == "center-of-mass" or not report.get("Quality"):
        return bool(z["reg_flag"])
    return bool(_judge(report["Quality"]))


def _registration(cache: Path, key: str, z, ignore_flag: bool = False):
    from cmb_bidsapp.anatomy.registration import RegistrationResult, load_transform

    if _flagged(z) and not ignore_flag:
        return None
    return RegistrationResult(
        template_to_native=load_transform(
            cache / f"{key}_from-native_to-MNI152NLin2009cAsym_mode-image_xfm.h5"
        ),
        native_to_template=load_transform(
            cache / f"{key}_from-MNI152NLin2009cAsym_to-native_mode-image_xfm.h5"
        ),
    )


def _lesion_table(labels, affine, prob, reg, regions):
    from cmb_bidsapp.anatomy.assign import assign_regions
    from cmb_bidsapp.anatomy.registration import native_to_mni
    from cmb_bidsapp.detect.lesions import lesion_table

    if reg is None:
        return lesion_table(labels, affine, prob)
    return lesion_table(
        labels,
        affine,
        prob,
        to_mni=lambda p: native_to_mni(np.asarray(p, dtype=float), reg),
        assign=lambda lab, aff: assign_regions(lab, aff, regions),
    )


def cleanup_inputs(cache: Path, key: str, z) -> tuple:
    """``(registration or None, kwargs)``: the optional inputs of
    :func:`~cmb_bidsapp.detect.cleanup.clean_up` for one cached image, as the app gives them:
    the high-pass phase where there is one, and, when the registration is usable, the MARS map,
    the tissue priors and the MNI mapping."""
    from cmb_bidsapp.anatomy.registration import native_to_mni

    reg = _registration(cache, key, z)
    return reg, {
        "phase": z["phase"] if z["phase"].size else None,
        "regions": z["regions"] if reg is not None else None,
        "tissue": (
            {k.upper(): z[k].astype(np.float32) for k in ("csf", "gm", "wm")}
            if reg is not None
            else None
        ),
        "to_mni": (lambda p: native_to_mni(np.asarray(p, dtype=float), reg)) if reg else None,
    }


def clean_image(image, out: Path, detector: str, params_json: str) -> dict:
    """Clean-up of one cached image; writes the masks before/after, lesion and rejected tables."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from cmb_bidsapp.bids import DerivativesWriter
    from cmb_bidsapp.detect.cleanup import CleanupParams, clean_up
    from cmb_bidsapp.evaluation import score_pair
    from cmb_bidsapp.io import atomic_save_nifti

    key = image.source_name
    cache = out / "cache"
    z = np.load(cache / f"{key}_base.npz")
    d = np.load(cache / f"{key}_{detector}.npz")
    affine = z["affine"]
    mask = z["mask"] > 0
    labels = d["labels"]
    ids = np.unique(labels[labels > 0])
    scores = {int(i): float(s) for i, s in zip(ids, d["scores"])} if ids.size else {}
    if ids.size and len(d["scores"]) != ids.size:  # provisional: max probability per lesion
        scores = {
            int(i): float(v)
            for i, v in zip(ids, np.atleast_1d(ndi.maximum(d["probseg"], labels, ids)))
        }
    reg, inputs = cleanup_inputs(cache, key, z)
    regions = inputs["regions"]
    params = CleanupParams(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(params_json).items()}
    )
    res = clean_up(
        labels,
        scores,
        z["image"],
        mask,
        affine,
        kind=image.kind,
        params=params,
        **inputs,
    )
    ref_path = (
        out
        / "reference"
        / Path(
            DerivativesWriter(out / "reference").path_for(image, "mask", label="CMB")
        ).relative_to(out / "reference")
    )
    ref = np.asarray(nib.load(str(ref_path)).dataobj) > 0
    tables = {}
    for stage, lab in (("before", labels), ("after", res.labels)):
        folder = out / f"pred_{detector}_{stage}"
        path = DerivativesWriter(folder).path_for(image, "mask", label="CMB")
        atomic_save_nifti(nib.Nifti1Image((lab > 0).astype(np.uint8), affine), path)
        tables[stage] = _lesion_table(lab, affine, d["probseg"], reg, regions)
    # per candidate: matched to a reference lesion before clean-up? (the scorer's own rules)
    pair = score_pair(labels > 0, ref, affine)
    feats = res.features.copy()
    if len(feats):
        centres = feats[["x", "y", "z"]].to_numpy()
        dist = np.linalg.norm(centres[:, None] - pair.pred_centres_mm[None], axis=2)
        comp = dist.argmin(axis=1) if pair.n_pred else np.zeros(len(feats), int)
        feats["tp_before"] = pair.pred_matched[comp] if pair.n_pred else False
        # the published rule: deleted when a voxel lies within 8 voxels of the mask edge
        edt = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
        mind = np.asarray(ndi.minimum(edt, labels, feats["lesion_id"].to_numpy()))
        feats["published_edge_deleted"] = np.atleast_1d(mind) <= 8
    feats.insert(0, "key", key)
    feats.insert(1, "kind", image.kind)
    # MARS class agreement of the detected lesions (after clean-up) with the reference
    pair_after = score_pair(res.labels > 0, ref, affine)
    ref_table = pd.read_csv(
        str(ref_path).replace("_label-CMB_mask.nii.gz", "_desc-CMB_lesions.tsv"), sep="\t"
    )
    agree = []
    ta = tables["after"]
    # the same lesions classified through the registration even when it was flagged (the app
    # writes 'unknown' then): measures the region assignment itself
    reg_any = _registration(cache, key, z, ignore_flag=True)
    tu = (
        _lesion_table(res.labels, affine, d["probseg"], reg_any, z["regions"])
        if reg is None
        else ta
    )
    for p_id, r_id, _, _ in pair_after.matches:
        pc = pair_after.pred_centres_mm[p_id - 1]
        rc = pair_after.ref_centres_mm[r_id - 1]
        if len(ref_table) == 0 or len(ta) == 0:
            continue
        rrow = ref_table.iloc[
            int(np.argmin(np.linalg.norm(ref_table[["x", "y", "z"]].to_numpy() - rc, axis=1)))
        ]
        near = int(np.argmin(np.linalg.norm(ta[["x", "y", "z"]].to_numpy() - pc, axis=1)))
        prow = ta.iloc[near]
        agree.append(
            {
                "key": key,
                "ref_class": rrow["mars_class"],
                "pred_class": prow["mars_class"],
                "ref_region": rrow.get("region"),
                "pred_region": prow["region"],
                "pred_class_unflagged": tu.iloc[near]["mars_class"],
                "registration_flag": _flagged(z),
            }
        )
    rej = res.rejected.copy()
    rej.insert(0, "key", key)
    return {
        "key": key,
        "kind": image.kind,
        "features": feats,
        "rejected": rej,
        "agreement": agree,
        "handedness": res.handedness,
        "seconds": res.seconds,
        "n_ref": int(pair.n_ref),
        "registration_flag": _flagged(z),
    }


def _eval(pred: Path, ref: Path, prefix: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "cmb_bidsapp.cli.eval",
        str(pred),
        str(ref),
        "--out-prefix",
        str(prefix),
    ]
    subprocess.run(cmd, check=False, capture_output=True, text=True)
    return json.loads(prefix.with_suffix(".json").read_text())


def summarise(rows: list[dict], ev_before: dict, ev_after: dict, detector: str) -> dict:
    """The figures of the report (see the module docstring)."""
    from cmb_bidsapp.detect.cleanup import RULE_ORDER

    feats = pd.concat([r["features"] for r in rows], ignore_index=True)
    n_img = len(rows)
    tb, ta = ev_before["totals"], ev_after["totals"]
    out = {
        "detector": detector,
        "images": n_img,
        "reference_lesions": int(tb.get("tp", 0) + tb.get("fn", 0)),
        "before": {
            k: tb.get(k)
            for k in (
                "sensitivity",
                "fp_per_subject",
                "precision",
                "f1",
                "tp",
                "fp",
                "fn",
                "mean_abs_count_difference",
            )
        },
        "after": {
            k: ta.get(k)
            for k in (
                "sensitivity",
                "fp_per_subject",
                "precision",
                "f1",
                "tp",
                "fp",
                "fn",
                "mean_abs_count_difference",
            )
        },
    }
    out["sensitivity_lost_points"] = (
        None
        if tb.get("sensitivity") is None
        else round(100 * (tb["sensitivity"] - ta["sensitivity"]), 2)
    )
    per_rule = {}
    rejected_by = feats["rejected_by"].fillna("") if len(feats) else pd.Series([], dtype=str)
    first = rejected_by.str.split(",").str[0]
    for rule in RULE_ORDER:
        any_ = rejected_by.str.split(",").apply(lambda x, r=rule: r in x) if len(feats) else []
        sel_first = first == rule
        per_rule[rule] = {
            "fp_removed_first": int((sel_first & ~feats["tp_before"]).sum()) if len(feats) else 0,
            "tp_removed_first": int((sel_first & feats["tp_before"]).sum()) if len(feats) else 0,
            "fp_removed_any": int((any_ & ~feats["tp_before"]).sum()) if len(feats) else 0,
            "tp_removed_any": int((any_ & feats["tp_before"]).sum()) if len(feats) else 0,
        }
    out["per_rule"] = per_rule
    if len(feats):
        pub = feats["published_edge_deleted"]
        out["published_8_voxel_edge"] = {
            "fp_removed": int((pub & ~feats["tp_before"]).sum()),
            "tp_removed": int((pub & feats["tp_before"]).sum()),
            "tp_before": int(feats["tp_before"].sum()),
        }
        ours = rejected_by.str.contains("brain_edge|csf")
        out["ours_edge_csf"] = {
            "fp_removed": int((ours & ~feats["tp_before"]).sum()),
            "tp_removed": int((ours & feats["tp_before"]).sum()),
        }
    agree = [a for r in rows for a in r["agreement"]]
    if agree:
        ag = pd.DataFrame(agree)
        known = ag[ag["pred_class"] != "unknown"]
        out["mars_class_agreement"] = {
            "matched_lesions": int(len(ag)),
            "agree": int((ag["ref_class"] == ag["pred_class"]).sum()),
            "fraction": round(float((ag["ref_class"] == ag["pred_class"]).mean()), 4),
            "unknown_predicted": int((ag["pred_class"] == "unknown").sum()),
            "fraction_of_known": round(float((known["ref_class"] == known["pred_class"]).mean()), 4)
            if len(known)
            else None,
            "region_agreement": round(float((ag["ref_region"] == ag["pred_region"]).mean()), 4),
            "fraction_if_flag_ignored": round(
                float((ag["ref_class"] == ag["pred_class_unflagged"]).mean()), 4
            ),
            "lesions_in_flagged_images": int(ag["registration_flag"].sum()),
        }
    out["handedness"] = {r["key"]: r["handedness"] for r in rows if r["handedness"]}
    secs = [r["seconds"] for r in rows]
    out["cleanup_seconds"] = {"median": float(np.median(secs)), "max": float(np.max(secs))}
    out["per_kind"] = {}
    for kind in sorted({r["kind"] for r in rows}):
        pk_b = ev_before.get("per_kind", {}).get(kind, {})
        pk_a = ev_after.get("per_kind", {}).get(kind, {})
        out["per_kind"][kind] = {
            "sensitivity_before": pk_b.get("sensitivity"),
            "sensitivity_after": pk_a.get("sensitivity"),
            "fp_per_subject_before": pk_b.get("fp_per_subject", pk_b.get("fp_per_image")),
            "fp_per_subject_after": pk_a.get("fp_per_subject", pk_a.get("fp_per_image")),
        }
    return out


def print_table(s: dict) -> None:
    def f(v, nd=3):
        return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    b, a = s["before"], s["after"]
    print(
        f"detector: {s['detector']}, {s['images']} images, {s['reference_lesions']} reference lesions"
    )
    print("| | sensitivity | FP/subject | precision | F1 | TP | FP | FN |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d in (("before clean-up", b), ("after clean-up", a)):
        print(
            f"| {name} | {f(d['sensitivity'])} | {f(d['fp_per_subject'], 2)} | {f(d['precision'])} "
            f"| {f(d['f1'])} | {d['tp']} | {d['fp']} | {d['fn']} |"
        )
    print(f"\nsensitivity lost by clean-up: {s['sensitivity_lost_points']} points (target <= 2)")
    print(
        "\n| rule | FP removed (first rule) | true lesions removed (first rule) | FP flagged (any) | true flagged (any) |"
    )
    print("|---|---|---|---|---|")
    for rule, d in s["per_rule"].items():
        print(
            f"| {rule} | {d['fp_removed_first']} | {d['tp_removed_first']} | {d['fp_removed_any']} | {d['tp_removed_any']} |"
        )
    if "published_8_voxel_edge" in s:
        p, o = s["published_8_voxel_edge"], s["ours_edge_csf"]
        print(
            f"\npublished 8-voxel edge deletion: removes {p['fp_removed']} FP and "
            f"{p['tp_removed']} of {p['tp_before']} true detections; our brain_edge+csf rules: "
            f"{o['fp_removed']} FP and {o['tp_removed']} true detections"
        )
    if "mars_class_agreement" in s:
        m = s["mars_class_agreement"]
        print(
            f"MARS class agreement of detected lesions with the reference: {m['agree']}/"
            f"{m['matched_lesions']} = {100 * m['fraction']:.1f} % (target >= 90 %); "
            f"{m['unknown_predicted']} predicted 'unknown'; region agreement "
            f"{100 * m['region_agreement']:.1f} %; of the lesions with a class "
            f"{100 * (m['fraction_of_known'] or 0):.1f} %; {m['lesions_in_flagged_images']} lesions lie in "
            f"images whose registration was flagged, and with the flag ignored the agreement is "
            f"{100 * m['fraction_if_flag_ignored']:.1f} %"
        )
    print("\n| kind | sensitivity before | after | FP/subject before | after |")
    print("|---|---|---|---|---|")
    for k, d in s["per_kind"].items():
        print(
            f"| {k} | {f(d['sensitivity_before'])} | {f(d['sensitivity_after'])} | "
            f"{f(d['fp_per_subject_before'], 2)} | {f(d['fp_per_subject_after'], 2)} |"
        )
    print(
        f"\nclean-up time per image: median {s['cleanup_seconds']['median']:.2f} s, max {s['cleanup_seconds']['max']:.2f} s"
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=7331)
    ap.add_argument("--kinds", default="swi,t2starw,megre,qsm")
    ap.add_argument("--size", default="full", choices=["small", "full"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--detector", default="provisional", choices=["provisional", "bundle"])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument(
        "--n-microbleeds",
        type=int,
        default=None,
        help="microbleeds per subject (default: the simulator's realistic counts); a lesion-rich "
        "cohort measures the sensitivity lost to the clean-up more precisely",
    )
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--params", default="{}", help="JSON overrides of CleanupParams")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sims, rows, t_sim, t_prep = simulate_and_prepare(args)
    print(f"simulation {t_sim / 60:.1f} min, preparation {t_prep / 60:.1f} min")
    if args.prepare_only:
        return
    from cmb_bidsapp.bids import collect_inputs
    from cmb_bidsapp.io import atomic_write_json

    out = args.out
    det = args.detector
    _dataset_descriptions(out, [f"pred_{det}_before", f"pred_{det}_after"])
    images, _ = collect_inputs(out / "bids")
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as ex:
        rows = list(
            ex.map(
                clean_image,
                images,
                [out] * len(images),
                [det] * len(images),
                [args.params] * len(images),
            )
        )
    ev_b = _eval(out / f"pred_{det}_before", out / "reference", out / "eval" / f"{det}_before")
    ev_a = _eval(out / f"pred_{det}_after", out / "reference", out / "eval" / f"{det}_after")
    summary = summarise(rows, ev_b, ev_a, det)
    summary["command"] = " ".join(["python", "benchmarks/cleanup_effect.py", *sys.argv[1:]])
    summary["seed"] = args.seed
    summary["simulation"] = sims
    summary["params"] = json.loads(args.params)
    feats = pd.concat([r["features"] for r in rows], ignore_index=True)
    feats.to_csv(out / f"cleanup_{det}_features.tsv", sep="\t", index=False, float_format="%.4g")
    pd.concat([r["rejected"] for r in rows], ignore_index=True).to_csv(
        out / f"cleanup_{det}_rejected.tsv", sep="\t", index=False
    )
    atomic_write_json(out / f"cleanup_{det}.json", summary)
    print_table(summary)


if __name__ == "__main__":
    main()
