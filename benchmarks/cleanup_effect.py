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


def write_subject(i: int, seed: int, kind: str, size: str, out: Path) -> dict:
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
    sim = simulate_subject(seed, kind, size=size)
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
    atomic_write_text(
        ref / f"sub-{sub}_desc-CMB_lesions.tsv", table.to_csv(sep="\t", index=False)
    )
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
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sims, rows, t_sim, t_prep = simulate_and_prepare(args)
    print(f"simulation {t_sim / 60:.1f} min, preparation {t_prep / 60:.1f} min")
    if args.prepare_only:
        return


if __name__ == "__main__":
    main()
