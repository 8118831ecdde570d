"""Speed and memory of the simulator: wall time and peak RSS per subject, per size and kind.

Usage::

    python benchmarks/bench_synth.py [--sizes small,full] [--kinds swi,t2starw,megre,qsm]
                                     [--repeats 3] [--threads 2] [--json out.json]

Each measurement runs in a fresh Python process (so that the peak resident memory is that of
one subject): the process imports the package and loads the template maps (reported apart as
``setup``), then simulates one subject and writes its files into a temporary folder. Reported
per size and kind, medians over `--repeats` seeds: ``simulate`` (s, wall), ``write`` (s),
``cpu`` (process CPU seconds of the simulation, all threads), ``peak_MB`` (maximum RSS of the
process). Times depend on the load of the machine: say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, tempfile, time
import torch
torch.set_num_threads(int(sys.argv[4]))
t0 = time.perf_counter()
from cmb_bidsapp.synth.anatomy import load_template_anatomy
from cmb_bidsapp.synth.vessels import vein_pool
vein_pool(load_template_anatomy())
from cmb_bidsapp.synth.subject import simulate_subject
from cmb_bidsapp.synth.bids_writer import write_subject
setup = time.perf_counter() - t0
c0 = time.process_time(); t1 = time.perf_counter()
sub = simulate_subject(int(sys.argv[3]), sys.argv[1], sys.argv[2])
sim = time.perf_counter() - t1; cpu = time.process_time() - c0
t2 = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    write_subject(tmp, "001", sub)
write = time.perf_counter() - t2
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"setup": setup, "simulate": sim, "write": write, "cpu": cpu, "peak_MB": peak,
                  "timings": sub.timings}))
"""


def measure(kind: str, size: str, seed: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, size, str(seed), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,full")
    p.add_argument("--kinds", default="swi,t2starw,megre,qsm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    args = p.parse_args(argv)
    rows = []
    print(
        f"{'size':6} {'kind':8} {'n':>2} {'setup s':>8} {'simulate s':>11} {'write s':>8} {'cpu s':>7} {'peak MB':>8}"
    )
    for size in args.sizes.split(","):
        for kind in args.kinds.split(","):
            runs = [measure(kind, size, 1000 + r, args.threads) for r in range(args.repeats)]
            med = {
                k: statistics.median(r[k] for r in runs)
                for k in ("setup", "simulate", "write", "cpu", "peak_MB")
            }
            rows.append({"size": size, "kind": kind, "runs": runs, "median": med})
            print(
                f"{size:6} {kind:8} {len(runs):>2} {med['setup']:8.2f} {med['simulate']:11.2f} "
                f"{med['write']:8.2f} {med['cpu']:7.2f} {med['peak_MB']:8.0f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
