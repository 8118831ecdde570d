"""Accuracy of a model bundle on a FRESH simulated cohort, scored with `cmb-bidsapp-eval`.

Usage::

    python benchmarks/accuracy.py OUT_DIR [--n 32] [--seed 9001] [--kinds swi,t2starw,megre,qsm]
                                  [--bundle DIR] [--jobs 2] [--no-kd-ablation]

1. Simulates ``--n`` subjects with ``cmb-bidsapp-synth OUT_DIR/bids --n-subjects N --seed S
   --kinds ... --size full`` (pick a seed no training run used): the simulator's REALISTIC
   defaults (lesion counts, mimics, skull in part of the cohort), no override. The reference
   masks and lesion tables (with MARS classes) are in ``OUT_DIR/bids/derivatives/reference``.
2. Runs detection the way the app does, per image found by :func:`cmb_bidsapp.bids.collect_inputs`:
   ``read_input`` → ``brain_mask`` (deepbet when a skull is detected) → ``n4_correct`` →
   ``lesion_bright`` → ``frst`` → :func:`cmb_bidsapp.models.infer.detect` with the bundle and its
   default threshold; writes ``<source>_label-CMB_mask.nii.gz`` into ``OUT_DIR/pred`` (and, for
   the KD ablation, the no-KD student's masks at its own validation threshold into
   ``OUT_DIR/pred_nokd``), and every candidate of the detector at ``t_det`` (before the student)
   into ``OUT_DIR/pred_candidates`` (the candidate recall: what the student can reach at best).
   ``--prepare-only`` stops after simulation and preprocessing (cached in ``OUT_DIR/cache``);
   a later run with a bundle reuses the cache (preprocessing does not depend on the bundle).
3. Scores with ``cmb-bidsapp-eval OUT_DIR/pred OUT_DIR/bids/derivatives/reference`` and prints the table:
   lesion-wise sensitivity, FP per subject, precision, F1, count difference, per MARS class and
   per kind, and the KD gain. Everything is also written to ``OUT_DIR/accuracy.json``.
4. ``--write-card DIR`` stores the result in that bundle's model card: ``fresh_cohort`` in
   ``model_card.json`` and the section "Accuracy on a fresh simulated cohort" in
   ``model_card.md`` (replacing an earlier one). Only use it with the bundle that was scored.
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

_BUNDLE = None


def detect_image(image, bundle_path: str | None, out: Path, threads: int) -> dict:
    """The app's preprocessing and detection for one input; writes the predicted mask(s).

    The preprocessing (brain mask, lesion-bright, FRST) is cached in ``OUT_DIR/cache`` so that
    several bundles can be scored on the same cohort; ``bundle_path == "none"`` only prepares.
    """
    global _BUNDLE
    import nibabel as nib
    import torch

    torch.set_num_threads(threads)
    from cmb_bidsapp.bids import DerivativesWriter
    from cmb_bidsapp.io import atomic_save_nifti
    from cmb_bidsapp.models.bundle import load_bundle
    from cmb_bidsapp.models.data import preprocess
    from cmb_bidsapp.models.infer import detect, rescore
    from cmb_bidsapp.preproc.steps import brain_mask, read_input

    cache = out / "cache" / f"{image.source_name}.npz"
    t0 = time.perf_counter()
    if cache.exists():
        z = np.load(cache)
        lb, fr, mask, affine = z["lb"], z["fr"], z["mask"] > 0, z["affine"]
        method, prep_s = str(z["method"]), float(z["preprocess_s"])
    else:
        inp = read_input(
            [str(f) for f in image.files],
            kind=image.kind,
            echo_times=list(image.echo_times) or None,
            units=str(image.metadata.get("Units", "")),
        )
        mask, report = brain_mask(
            inp.image, inp.affine, kind=image.kind, mode="auto", threads=threads
        )
        lb, fr = preprocess(inp.image, inp.affine, mask, image.kind)
        affine, method = inp.affine, str(report.get("method"))
        prep_s = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".part.npz")
        np.savez(
            tmp,
            lb=np.asarray(lb, np.float32),
            fr=np.asarray(fr, np.float32),
            mask=np.asarray(mask, np.uint8),
            affine=affine,
            method=method,
            preprocess_s=prep_s,
        )
        tmp.replace(cache)
    if bundle_path == "none":  # --prepare-only
        return {"key": image.source_name, "kind": image.kind, "preprocess_s": round(prep_s, 1)}
    if _BUNDLE is None:
        _BUNDLE = load_bundle(bundle_path, "cpu", load_ablation=True)
    b = _BUNDLE
    res = detect(lb, fr, mask, affine, b, keep_p_det=True)
    out_row = {
        "key": image.source_name,
        "kind": image.kind,
        "brain_mask": method,
        "preprocess_s": round(prep_s, 1),
        "detect_s": res.seconds.get("total"),
        "candidates": int(len(res.candidate_scores)),
        "detections": res.n_lesions,
    }
    for folder, labels in (("pred", res.labels), ("pred_candidates", res.candidate_labels)):
        path = DerivativesWriter(out / folder).path_for(image, "mask", label="CMB")
        atomic_save_nifti(nib.Nifti1Image((labels > 0).astype(np.uint8), affine), path)
    if b.student_nokd is not None:
        thr = float(b.meta.get("ablation", {}).get("student_nokd_threshold", b.default_threshold))
        res2 = rescore(
            res,
            lb,
            fr,
            mask,
            affine,
            b.student_nokd,
            thr,
            patch_size=b.patch_size,
            frst_grid=b.frst_grid,
            radii_mm=b.frst_radii_mm,
            tta=b.student_tta,
        )
        path = DerivativesWriter(out / "pred_nokd").path_for(image, "mask", label="CMB")
        atomic_save_nifti(nib.Nifti1Image((res2.labels > 0).astype(np.uint8), affine), path)
        out_row["detections_nokd"] = res2.n_lesions
    return out_row


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


def _row(name: str, d: dict) -> str:
    def f(v, nd=3):
        return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    return (
        f"| {name} | {f(d.get('sensitivity'))} | {f(d.get('fp_per_subject', d.get('fp_per_image')), 2)} "
        f"| {f(d.get('precision'))} | {f(d.get('f1'))} | {d.get('tp', 'n/a')} | {d.get('fp', 'n/a')} "
        f"| {d.get('fn', 'n/a')} |"
    )


def card_record(result: dict, threshold: float, nokd_threshold: float | None) -> dict:
    """The ``fresh_cohort`` record of the model card (from ``accuracy.json``)."""
    keep = ("sensitivity", "fp_per_subject", "precision", "f1", "tp", "fp", "fn")

    def pick(d: dict) -> dict:
        return {k: d.get(k) for k in keep if k in d}

    ev, cand = result["eval"], result["eval_candidates"]
    tot = ev["totals"]
    rec = {
        "what": (
            f"FRESH simulated cohort never used in training, validation or threshold calibration: "
            f"cmb-bidsapp-synth --n-subjects {result['n_subjects']} --seed {result['seed']} "
            "--kinds swi,t2starw,megre,qsm --size full (the simulator's realistic prevalence, "
            "mimics present, skull in part); the app's preprocessing (deepbet when a skull is "
            f"found); default threshold {threshold:.2f}; networks only (no clean-up step); scored "
            "with cmb-bidsapp-eval (lesion-wise, 3 mm or overlap)."
        ),
        "command": result["command"],
        "seed": result["seed"],
        "n_images": tot.get("n_images"),
        "n_reference": tot.get("n_ref"),
        "threshold": threshold,
        "kd_student": pick(tot)
        | {
            k: tot.get(k)
            for k in ("mean_abs_count_difference", "subject_accuracy", "subject_sensitivity")
            if k in tot
        },
        "detector_candidates_at_t_det": pick(cand["totals"]),
        "per_kind": {k: pick(d) for k, d in ev.get("per_kind", {}).items()},
        "candidates_per_kind": {k: pick(d) for k, d in cand.get("per_kind", {}).items()},
        "sensitivity_per_class": {
            k: d.get("sensitivity") for k, d in ev.get("per_class", {}).items()
        },
    }
    if nokd_threshold is not None and result.get("eval_nokd"):
        rec[f"nokd_student_at_its_validation_threshold_{nokd_threshold:.2f}"] = pick(
            result["eval_nokd"]["totals"]
        )
    return rec


def card_markdown(rec: dict) -> str:
    def f(v, nd=3):
        return "n/a" if v is None else f"{v:.{nd}f}"

    lines = [
        f"## Accuracy on a fresh simulated cohort ({rec['n_images']} images, seed {rec['seed']})",
        "",
        rec["what"],
        "",
        f"`{rec['command']}`",
        "",
        "| set | sensitivity | FP/subject | precision | F1 | TP | FP | FN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"KD student (default, threshold {rec['threshold']:.2f})", rec["kd_student"])]
    rows += [
        (f"no-KD student (threshold {k.rsplit('_', 1)[1]})", v)
        for k, v in rec.items()
        if k.startswith("nokd_student")
    ]
    rows.append(("detector candidates (before the student)", rec["detector_candidates_at_t_det"]))
    rows += [(f"KD student, {k}", v) for k, v in rec["per_kind"].items()]
    for name, d in rows:
        lines.append(
            f"| {name} | {f(d.get('sensitivity'))} | {f(d.get('fp_per_subject'), 2)} | "
            f"{f(d.get('precision'))} | {f(d.get('f1'))} | {d.get('tp')} | {d.get('fp')} | "
            f"{d.get('fn')} |"
        )
    lines += [
        "",
        "Sensitivity per MARS class: "
        + ", ".join(f"{k} {f(v)}" for k, v in rec["sensitivity_per_class"].items())
        + ". Candidate sensitivity per kind: "
        + ", ".join(f"{k} {f(v.get('sensitivity'))}" for k, v in rec["candidates_per_kind"].items())
        + f". Mean absolute count difference {f(rec['kd_student'].get('mean_abs_count_difference'), 2)}.",
        "",
    ]
    kd = rec["kd_student"]
    met = (kd.get("sensitivity") or 0) >= 0.90 and (kd.get("fp_per_subject") or 99) <= 1.0
    lines.append(
        ("**Targets met" if met else "**Below the targets")
        + " (lesion-wise sensitivity >= 0.90 with <= 1 FP/subject)** on this simulated cohort: "
        + f"sensitivity {f(kd.get('sensitivity'))}, {f(kd.get('fp_per_subject'), 2)} FP/subject."
    )
    return "\n".join(lines) + "\n"


def write_card(bundle_dir: Path, rec: dict) -> None:
    """Store ``rec`` in the bundle's model card (JSON key ``fresh_cohort`` and its Markdown section)."""
    from cmb_bidsapp.io import atomic_write_json, atomic_write_text
    from cmb_bidsapp.models.card import replace_markdown_section

    card_path = bundle_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["fresh_cohort"] = rec
    atomic_write_json(card_path, card)
    md_path = bundle_dir / "model_card.md"
    text = replace_markdown_section(
        md_path.read_text(),
        "Accuracy on a fresh simulated cohort",
        card_markdown(rec),
        before="Versions",
    )
    atomic_write_text(md_path, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--kinds", default="swi,t2starw,megre,qsm")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--prepare-only",
        action="store_true",
        help="simulate and preprocess (cached in OUT_DIR/cache) without a bundle, then stop",
    )
    ap.add_argument(
        "--write-card",
        type=Path,
        default=None,
        metavar="DIR",
        help="store the result in this bundle's model card (the bundle scored)",
    )
    args = ap.parse_args()
    if args.prepare_only:
        args.bundle = "none"
    out = args.out.resolve()
    kinds = args.kinds.split(",")
    from cmb_bidsapp.io import atomic_write_json

    t0 = time.perf_counter()
    ref_dir = out / "bids" / "derivatives" / "reference"
    if not (ref_dir / "dataset_description.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cmb_bidsapp.cli.synth",
                str(out / "bids"),
                "--n-subjects",
                str(args.n),
                "--seed",
                str(args.seed),
                "--kinds",
                ",".join(kinds),
                "--size",
                "full",
                "--jobs",
                str(args.jobs),
            ],
            check=True,
        )
    for d in ("pred", "pred_nokd", "pred_candidates"):
        atomic_write_json(
            out / d / "dataset_description.json",
            {
                "Name": d,
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "benchmarks/accuracy.py"}],
                "SourceDatasets": [{"URL": str(out / "bids")}],
            },
        )
    t_sim = time.perf_counter() - t0
    from cmb_bidsapp.bids import collect_inputs

    images, _ = collect_inputs(out / "bids")
    t1 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as ex:
        rows = list(
            ex.map(
                detect_image,
                images,
                [args.bundle] * len(images),
                [out] * len(images),
                [1] * len(images),
            )
        )
    t_det = time.perf_counter() - t1
    if args.prepare_only:
        print(f"prepared {len(rows)} images in {t_det / 60:.1f} min (simulation {t_sim / 60:.1f})")
        return
    scores = _eval(out / "pred", ref_dir, out / "eval" / "cmb_eval")
    scores_nokd = _eval(out / "pred_nokd", ref_dir, out / "eval" / "cmb_eval_nokd")
    scores_cand = _eval(out / "pred_candidates", ref_dir, out / "eval" / "cmb_eval_candidates")
    result = {
        "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]),
        "n_subjects": args.n,
        "seed": args.seed,
        "images": rows,
        "simulate_s": round(t_sim, 1),
        "detect_s": round(t_det, 1),
        "eval": scores,
        "eval_nokd": scores_nokd,
        "eval_candidates": scores_cand,
    }
    atomic_write_json(out / "accuracy.json", result)
    tot = scores["totals"]
    print("| set | sensitivity | FP/subject | precision | F1 | TP | FP | FN |")
    print("|---|---|---|---|---|---|---|---|")
    print(_row("all (KD student)", tot))
    print(_row("all (no-KD student)", scores_nokd["totals"]))
    print(_row("all candidates (detector at t_det)", scores_cand["totals"]))
    for k, d in scores_cand.get("per_kind", {}).items():
        print(_row(f"candidates, kind {k}", d))
    for k, d in scores.get("per_class", {}).items():
        print(_row(f"class {k}", d))
    for k, d in scores.get("per_kind", {}).items():
        print(_row(f"kind {k}", d))
    print(f"\ncount difference (mean |n_pred - n_ref|): {tot.get('mean_abs_count_difference')}")
    print(json.dumps({k: tot.get(k) for k in tot if "subject" in k or "auc" in k}, indent=1))
    print(f"simulation {t_sim / 60:.1f} min, detection {t_det / 60:.1f} min")
    if args.write_card is not None:
        from cmb_bidsapp.models.bundle import load_bundle

        b = load_bundle(args.bundle, "cpu")
        nokd = b.meta.get("ablation", {}).get("student_nokd_threshold")
        write_card(args.write_card, card_record(result, b.default_threshold, nokd))
        print(f"model card of {args.write_card} updated")


if __name__ == "__main__":
    main()
