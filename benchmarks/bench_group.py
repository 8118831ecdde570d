"""Benchmark of the group level: fabricate N subjects' participant outputs and time `run_group`.

The fabricated outputs have what the participant level writes and the group level reads: per
image the counts and lesion TSVs with their dictionaries, the mask sidecar, the QC record
(`sub-XX/figures/…_desc-qc_….json`) and a subject page. Counts follow the published cohort
figures (method.md): 35 % of scans without microbleed; among the others P(1) ≈ 0.55, a long
tail to 80; 74 % lobar, 16 % deep, 11 % infratentorial. 2 % of images failed (no tables),
3 % have a registration flag (no MNI coordinates).

Usage::

    python benchmarks/bench_group.py [--subjects 1000] [--repeats 5] [--keep DIR]

Prints a table of the median, min and max time of `run_group` (seconds) for each size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmb_bidsapp.anatomy.regions import MARS_REGIONS, REGION_CLASS
from cmb_bidsapp.outputs import COUNT_COLUMNS, LESION_COLUMNS

_CLASS_P = {"lobar": 0.74, "deep": 0.16, "infratentorial": 0.11}
_BOXES = {  # rough MNI boxes (mm) per class, for the glass brain
    "lobar": ((-65, 65), (-100, 65), (-30, 75)),
    "deep": ((-30, 30), (-30, 20), (-10, 25)),
    "infratentorial": ((-45, 45), (-85, -25), (-60, -20)),
}


def draw_count(rng: np.random.Generator) -> int:
    """Microbleeds in one scan (module docstring)."""
    if rng.random() < 0.35:
        return 0
    if rng.random() < 0.55:
        return 1
    return int(min(80, 1 + np.ceil(np.exp(rng.normal(1.0, 1.0)))))


def fabricate(root: Path, n_subjects: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write BIDS_DIR (empty subject folders) and OUTPUT_DIR; return them and the lesion count."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    out.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"})
    )
    (out / "dataset_description.json").write_text(
        json.dumps({"Name": "cmb", "BIDSVersion": "1.10.0", "DatasetType": "derivative"})
    )
    regions_by_class: dict[str, list[str]] = {}
    for name in MARS_REGIONS.values():
        regions_by_class.setdefault(REGION_CLASS[name], []).append(name)
    classes = list(_CLASS_P)
    p = np.array(list(_CLASS_P.values()))
    p /= p.sum()
    columns = list(LESION_COLUMNS) + [
        c for c in ("x_mni", "y_mni", "z_mni") if c not in LESION_COLUMNS
    ]
    lesion_header = "\t".join(columns)
    counts_dict = json.dumps(COUNT_COLUMNS)
    lesions_dict = json.dumps(LESION_COLUMNS)
    n_lesions = 0
    for s in range(1, n_subjects + 1):
        sub = f"sub-{s:04d}"
        (bids / sub / "anat").mkdir(parents=True)
        anat = out / sub / "anat"
        figs = out / sub / "figures"
        anat.mkdir(parents=True)
        figs.mkdir()
        source = sub
        failed = rng.random() < 0.02
        flagged = rng.random() < 0.03
        qc = {
            "format": 1,
            "status": "failed" if failed else "ok",
            "error": "the image is empty (all zeros). Check the conversion." if failed else None,
            "participant_id": sub,
            "session_id": None,
            "source": source,
            "suffix": "swi",
            "output_suffix": "swi",
            "input_kind": "swi",
            "input_files": [f"{sub}/anat/{sub}_swi.nii.gz"],
            "brain_extraction": {"method": "deepbet", "volume_cm3": 1100.0, "warnings": []},
            "registration": {
                "Flag": flagged,
                "Reason": "brain-mask Dice 0.6 < 0.8" if flagged else "",
                "Quality": {"mask_dice": 0.6 if flagged else 0.93},
            },
            "warnings": [],
            "n_rejected": int(rng.integers(0, 30)),
            "tables": {},
        }
        (figs / f"{source}_desc-qc_swi.json").write_text(json.dumps(qc))
        (out / f"{sub}.html").write_text("<html></html>")
        if failed:
            continue
        n = draw_count(rng)
        n_lesions += n
        cls = rng.choice(classes, size=n, p=p)
        rows = []
        counts = dict.fromkeys(COUNT_COLUMNS, 0)
        counts["total"] = n
        for lid, c in enumerate(cls, start=1):
            region = regions_by_class[c][int(rng.integers(len(regions_by_class[c])))]
            counts[c] += 1
            counts[region] += 1
            mni = [rng.uniform(*b) for b in _BOXES[c]]
            xyz = np.round(np.array(mni) + rng.normal(0, 5, 3), 2)
            ijk = rng.integers(0, 256, 3)
            vol = float(np.round(rng.lognormal(1.5, 0.6), 2))
            diam = (6 * vol / np.pi) ** (1 / 3)
            side = "left" if mni[0] < 0 else "right"
            mni_txt = ["n/a"] * 3 if flagged else [f"{v:.2f}" for v in mni]
            values = {
                "lesion_id": str(lid),
                **{k: str(v) for k, v in zip("xyz", xyz, strict=True)},
                **{k: str(v) for k, v in zip("ijk", ijk, strict=True)},
                "volume_mm3": f"{vol:g}",
                "diameter_mm": f"{diam:.3f}",
                "probability": f"{rng.uniform(0.5, 1):.4f}",
                "mars_class": c,
                "region": region,
                "hemisphere": side,
                **dict(zip(("x_mni", "y_mni", "z_mni"), mni_txt, strict=True)),
            }
            rows.append("\t".join(values.get(col, "n/a") for col in columns))
        counts["definite_threshold"] = 0.5
        (anat / f"{source}_desc-CMB_lesions.tsv").write_text(
            "\n".join([lesion_header, *rows]) + "\n"
        )
        (anat / f"{source}_desc-CMB_lesions.json").write_text(lesions_dict)
        (anat / f"{source}_desc-CMB_counts.tsv").write_text(
            "\t".join(counts) + "\n" + "\t".join(str(v) for v in counts.values()) + "\n"
        )
        (anat / f"{source}_desc-CMB_counts.json").write_text(counts_dict)
        (anat / f"{source}_label-CMB_mask.json").write_text(
            json.dumps({"Type": "Lesion", "Sources": [f"bids:raw:{sub}/anat/{sub}_swi.nii.gz"]})
        )
    return bids, out, n_lesions


def time_group(bids: Path, out: Path, repeats: int) -> list[float]:
    """Wall-clock seconds of `run_group` (in this process), `repeats` times."""
    import contextlib
    import io

    from cmb_bidsapp.config import Config
    from cmb_bidsapp.workflows.group import run_group

    config = Config(bids_dir=bids, output_dir=out, analysis_level="group")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            code = run_group(config)
        times.append(time.perf_counter() - t0)
        assert code == 0
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="keep the fabricated outputs in this folder")
    args = parser.parse_args(argv)
    rows = []
    for n in args.subjects:
        tmp = Path(tempfile.mkdtemp(prefix="bench-group-", dir=args.keep))
        try:
            t0 = time.perf_counter()
            bids, out, n_lesions = fabricate(tmp, n)
            made = time.perf_counter() - t0
            times = time_group(bids, out, args.repeats)
            rows.append((n, n_lesions, made, times))
        finally:
            if args.keep is None:
                shutil.rmtree(tmp, ignore_errors=True)
    print("| subjects | lesions | fabricate (s) | run_group median (s) | min | max | runs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, n_lesions, made, times in rows:
        print(
            f"| {n} | {n_lesions} | {made:.1f} | {statistics.median(times):.2f} | "
            f"{min(times):.2f} | {max(times):.2f} | {len(times)} |"
        )
    worst = max(statistics.median(t) for *_, t in rows)
    print(f"\nslowest median: {worst:.2f} s (budget 30 s for 1,000 subjects)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
