"""Speed and memory of model inference (`cmb_bidsapp.models.infer.detect`) on one simulated image.

Usage::

    python benchmarks/bench_models.py [--bundle DIR] [--kind swi] [--seed 7] [--repeats 3]
                                      [--threads 2] [--device cpu] [--json OUT.json]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--kind", default="swi", choices=("swi", "t2starw", "megre", "qsm"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from cmb_bidsapp.models.data import preprocess, raw_from_simulated
    from cmb_bidsapp.synth.subject import simulate_subject

    t0 = time.perf_counter()
    sim = simulate_subject(args.seed, args.kind, size="full")
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
