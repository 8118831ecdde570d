"""Speed and memory of model inference (`cmb_bidsapp.models.infer.detect`) on one simulated image.

Usage::

    python benchmarks/bench_models.py [--bundle DIR] [--kind swi] [--seed 7] [--voxel-mm 0.8]
                                      [--repeats 3]
                                      [--threads 2] [--device cpu] [--json OUT.json]
    python benchmarks/bench_models.py --real-megre ../shared/data/real-megre [--bundle DIR]

``--real-megre DIR``: run the models on the real 3-echo GRE crop (``Mag.nii``, 4D, echo times
4, 8, 12 ms; no microbleeds are known in it) through the app's reading (echo combination), brain
mask (``--skull-strip auto``: a crop is taken as brain-extracted), N4, normalisation and FRST,
and report every detection and the candidates the student rejected (candidate false positives).

A full-size subject of ``--kind`` is simulated, preprocessed with the app's functions
(``read_input``, the true brain mask, N4, ``lesion_bright``, ``frst``), and saved; a FRESH Python
process then loads the bundle and runs :func:`~cmb_bidsapp.models.infer.detect` ``--repeats``
times. Reported: the median seconds per stage and in total, and the peak resident memory of that
process (``ru_maxrss``), also minus the memory held before the first detection (arrays loaded,
bundle loaded). Timings on a shared machine are noisy: quote medians and say under what load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from cmb_bidsapp.models.bundle import load_bundle
from cmb_bidsapp.models.infer import detect
d = np.load(sys.argv[1])
bundle = load_bundle(None if sys.argv[2] == "default" else sys.argv[2], sys.argv[5])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
runs = []
for _ in range(int(sys.argv[4])):
    res = detect(d["lb"], d["frst"], d["brain"], d["affine"], bundle)
    runs.append(res.seconds)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
print(json.dumps({"runs": runs, "median_s": med, "peak_rss_mb": peak / 1024,
                  "before_mb": base / 1024, "n_lesions": res.n_lesions,
                  "n_candidates": int(len(res.candidate_scores)), "device": res.device}))
"""


def real_megre(folder: Path, bundle: str) -> dict:
    """Detections of the models on the real MEGRE crop (module docstring)."""
    import nibabel as nib

    from cmb_bidsapp.models.bundle import load_bundle
    from cmb_bidsapp.models.data import preprocess
    from cmb_bidsapp.models.infer import detect
    from cmb_bidsapp.preproc.steps import brain_mask, read_input

    img = nib.load(str(folder / "Mag.nii"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    with tempfile.TemporaryDirectory() as td:
        files = []
        for e in range(data.shape[3]):
            f = Path(td) / f"echo-{e + 1}.nii"
            nib.save(nib.Nifti1Image(data[..., e], img.affine), str(f))
            files.append(str(f))
        inp = read_input(files, kind="megre", echo_times=[0.004, 0.008, 0.012])
    mask, report = brain_mask(inp.image, inp.affine, kind="megre", mode="auto")
    lb, fr = preprocess(inp.image, inp.affine, mask, "megre")
    b = load_bundle(None if bundle == "default" else bundle, "cpu")
    res = detect(lb, fr, mask, inp.affine, b)
    kept = []
    aff = inp.affine
    from scipy import ndimage as ndi

    for i in range(1, res.n_lesions + 1):
        c = np.asarray(ndi.center_of_mass(res.labels == i))
        kept.append(
            {
                "lesion_id": i,
                "ijk": [round(float(v), 1) for v in c],
                "xyz": [round(float(v), 1) for v in c @ aff[:3, :3].T + aff[:3, 3]],
                "score": round(float(res.scores[i - 1]), 3),
                "volume_mm3": round(
                    float((res.labels == i).sum() * abs(np.linalg.det(aff[:3, :3]))), 2
                ),
            }
        )
    return {
        "input": str(folder),
        "shape": list(inp.image.shape),
        "brain_mask": report.get("method"),
        "brain_voxels": int(mask.sum()),
        "t_det": res.t_det,
        "threshold": res.threshold,
        "candidates": int(len(res.candidate_scores)),
        "detections": res.n_lesions,
        "detected": kept,
        "rejected": res.rejected,
        "seconds": res.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-megre", type=Path, help="run on the real MEGRE crop folder instead")
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--kind", default="swi", choices=("swi", "t2starw", "megre", "qsm"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--voxel-mm", type=float, default=None, help="isotropic voxel of the simulated image (mm)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.real_megre:
        out = real_megre(args.real_megre, args.bundle)
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return

    from cmb_bidsapp.models.data import preprocess, raw_from_simulated
    from cmb_bidsapp.synth.subject import simulate_subject

    t0 = time.perf_counter()
    over = {"voxel_mm": (args.voxel_mm,) * 3} if args.voxel_mm else {}
    sim = simulate_subject(args.seed, args.kind, size="full", **over)
    raw = raw_from_simulated(sim, "sub-bench", "bench", mask_seed=args.seed)
    lb, fr = preprocess(raw.image, raw.affine, raw.brain, raw.kind)
    prep_s = time.perf_counter() - t0
    vs = np.sqrt((raw.affine[:3, :3] ** 2).sum(0))
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "inputs.npz"
        np.savez(f, lb=lb, frst=fr, brain=raw.brain.astype(np.uint8), affine=raw.affine)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(f),
                args.bundle,
                str(args.threads),
                str(args.repeats),
                args.device,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(
        kind=args.kind,
        shape=list(lb.shape),
        voxel_mm=[round(float(v), 3) for v in vs],
        reference_lesions=int(len(sim.lesions)),
        simulate_and_preprocess_s=round(prep_s, 1),
        threads=args.threads,
        load_average=os.getloadavg(),
    )
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
