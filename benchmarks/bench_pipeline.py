"""Benchmark of the participant run: wall time per stage and peak memory, on simulated subjects.

Each case is one simulated subject (``cmb_bidsapp.synth.simulate_subject`` with a fixed seed,
a fixed voxel size, storage as acquired (orientation "RAS") and a skull, so that brain
extraction runs), written as a raw BIDS dataset. The benchmark runs the real command line,
``cmb-bidsapp BIDS OUT participant --nprocs N -w WORK``, in a fresh output and work folder each
time, as a child process, and records:

* the wall time of the whole command (seconds), start to exit, and the CPU seconds (user +
  system) of its whole process tree;
* three phases: ``setup`` (start-up, BIDS validation, indexing, pre-flight reads, building the
  graph: until the app prints "processing N image(s)"), ``workflow`` (Nipype's run: the
  ``(run) workflow`` row of the run's ``timings.tsv``) and ``finish`` (the HTML reports, exit);
* the time of each stage (Nipype node), from the run's own ``logs/<run>/timings.tsv``; with
  ``--nprocs 2`` nodes may overlap, so stages can add up to more than the workflow phase;
* peak memory: the largest sum of the resident set sizes (RSS) of the command's process tree,
  polled every 0.05 s with psutil (forked MultiProc workers share pages with their parent, so
  this sum overstates what the machine needs), and the largest RSS of any one process
  (``ru_maxrss`` of the children, from the kernel, which misses nothing between polls).

Cases (``--cases``):

============ ========= ======================== ===========================================
case         kind      voxel (mm)               notes
============ ========= ======================== ===========================================
t2s_2d       t2starw   0.9 × 0.9 × 4 (2D)       multi-slice, no gap
swi_08       swi       0.8 × 0.8 × 1.6 (3D)     the reference case of the targets
swi_05       swi       0.5 × 0.5 × 1.0 (3D)
megre        megre     0.8 × 0.8 × 1.6 (3D)     3 echoes, magnitude and phase
qsm          qsm       0.8 × 0.8 × 1.6 (3D)     χ map of a 3-echo acquisition (ppm)
swi_12       swi       1.2 × 1.2 × 2.4 (3D)     third grid of the voxel-count series
swi_08_c0    swi       0.8 × 0.8 × 1.6          no microbleed, no mimic (candidate series)
swi_08_c40   swi       0.8 × 0.8 × 1.6          40 microbleeds, mimic rate × 3 (candidate series)
============ ========= ======================== ===========================================

Series reported from these: growth with voxel count (swi_12, swi_08, swi_05: seconds per
million voxels), growth with the number of candidates (swi_08_c0, swi_08, swi_08_c40: the
candidate count read from the run's outputs), ``--nprocs 1`` against ``--nprocs 2`` (every
case runs with both unless ``--nprocs`` says otherwise), and the group level over 1,000
subjects (``benchmarks/bench_group.py``, called, not duplicated).

Usage::

    python benchmarks/bench_pipeline.py [--repeats 3] [--repeats-05 N] [--cases ...]
        [--nprocs 1 2] [--series-nprocs 2] [--series-repeats N] [--quick] [--data DIR]
        [--group-subjects 1000] [--ab-baseline DIR] [--json benchmarks/results/pipeline.json]

``--ab-baseline DIR`` compares two versions in one session: DIR holds another copy of the
``cmb_bidsapp`` package (e.g. ``git archive <commit> cmb_bidsapp | tar -x -C DIR``), each run
of the current code is paired with a run of that copy (put first on ``PYTHONPATH``), in
alternation, and the ratios baseline/current of the medians are reported (wall, CPU, stages).

``--quick`` runs the small simulator grids (``--size small``) once each: a check that the
script works, not a measurement. Times depend on the machine and its load: the script records
the CPU model, the core count and the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "pipeline.json"
SEED = 20261122


@dataclass(frozen=True)
class Case:
    """One simulated acquisition (voxel sizes in mm)."""

    name: str
    kind: str
    voxel_mm: tuple[float, float, float]
    description: str
    overrides: dict = field(default_factory=dict)


_TES_3 = [0.005, 0.0115, 0.018]  # s
CASES = {
    c.name: c
    for c in [
        Case("t2s_2d", "t2starw", (0.9, 0.9, 4.0), "2D T2*-GRE 0.9×0.9×4 mm", {"slice_gap_mm": 0.0}),
        Case("swi_08", "swi", (0.8, 0.8, 1.6), "3D SWI 0.8×0.8×1.6 mm"),
        Case("swi_05", "swi", (0.5, 0.5, 1.0), "3D SWI 0.5×0.5×1 mm"),
        Case("megre", "megre", (0.8, 0.8, 1.6), "MEGRE 3 echoes + phase, 0.8×0.8×1.6 mm",
             {"echo_times_s": _TES_3, "repetition_time_s": 0.026}),
        Case("qsm", "qsm", (0.8, 0.8, 1.6), "QSM (3 echoes), 0.8×0.8×1.6 mm",
             {"echo_times_s": _TES_3, "repetition_time_s": 0.026}),
        Case("swi_12", "swi", (1.2, 1.2, 2.4), "3D SWI 1.2×1.2×2.4 mm"),
        Case("swi_08_c0", "swi", (0.8, 0.8, 1.6), "3D SWI 0.8 mm, no lesion, no mimic",
             {"n_microbleeds": 0, "mimic_rate": 0.0}),
        Case("swi_08_c40", "swi", (0.8, 0.8, 1.6), "3D SWI 0.8 mm, 40 lesions, mimic rate ×3",
             {"n_microbleeds": 40, "mimic_rate": 3.0}),
    ]
}  # fmt: skip
MAIN_CASES = ("t2s_2d", "swi_08", "swi_05", "megre", "qsm")
VOXEL_SERIES = ("swi_12", "swi_08", "swi_05")
CANDIDATE_SERIES = ("swi_08_c0", "swi_08", "swi_08_c40")
TARGETS_S = {"swi_08": 60.0, "t2s_2d": 30.0, "swi_05": 120.0}
TARGET_MEM_GB = 4.0
TARGET_GROUP_S = 30.0


def make_dataset(case: Case, root: Path, size: str = "full") -> dict:
    """Simulate the case's subject into the raw BIDS dataset `root`; return its description."""
    import pandas as pd

    from cmb_bidsapp.synth.bids_writer import write_dataset_files, write_subject
    from cmb_bidsapp.synth.subject import simulate_subject

    t0 = time.perf_counter()
    over = dict(case.overrides)
    if size == "full":
        over["voxel_mm"] = list(case.voxel_mm)
    sub = simulate_subject(
        SEED, case.kind, size, True, orientation="RAS", swap_inplane=False, **over
    )
    root.mkdir(parents=True, exist_ok=True)
    write_subject(root, "01", sub)
    settings = {"generator": "cmb-bidsapp-synth", "seed": SEED, "kinds": [case.kind], "size": size}
    row = {
        "participant_id": "sub-01",
        "input_kind": case.kind,
        "with_skull": 1,
        "size": size,
        "n_microbleeds": len(sub.lesions),
        "n_visible": int(sub.lesions["visible"].sum()) if len(sub.lesions) else 0,
        "subject_seed": SEED,
    }
    write_dataset_files(root, settings, pd.DataFrame([row]))
    main = sub.main_image
    info = {
        "shape": [int(n) for n in main.shape[:3]],
        "voxels": int(np.prod(main.shape[:3])),
        "voxel_mm": [round(float(z), 3) for z in main.header.get_zooms()[:3]],
        "n_microbleeds": int(len(sub.lesions)),
        "n_mimics": int(len(sub.mimics)),
        "files": len(sub.images),
        "simulate_s": round(time.perf_counter() - t0, 1),
    }
    root.with_suffix(".json").write_text(json.dumps(info))  # beside, not inside, the dataset
    return info


class TreeMonitor:
    """Poll the RSS of a process and its descendants; keep the peak of their sum (bytes)."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_sum = 0
        self.peak_one = 0
        self.cpu: dict[int, float] = {}  # pid -> user + system CPU seconds, last seen
        self.app_pid: int | None = None  # the app's main process (the wrapper's child)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                direct = self.proc.children()
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            if direct and self.app_pid is None:
                self.app_pid = direct[0].pid
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    total += rss
                    self.peak_one = max(self.peak_one, rss)
                    times = p.cpu_times()
                    self.cpu[p.pid] = times.user + times.system
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.interval)

    def cpu_split(self) -> dict[str, float]:
        """CPU seconds of the app's main process and of its workers (as last polled)."""
        main = self.cpu.get(self.app_pid, 0.0) if self.app_pid else 0.0
        others = sum(v for k, v in self.cpu.items() if k not in (self.app_pid, self.proc.pid))
        return {"cpu_main_s": round(main, 2), "cpu_workers_s": round(others, 2)}


def run_participant(
    bids: Path, scratch: Path, nprocs: int, extra: list[str] = (), code: Path | None = None
) -> dict:
    """One `cmb-bidsapp participant` run in fresh folders; wall time, stages, memory.

    `code`: a folder holding another copy of the `cmb_bidsapp` package to run instead (put
    first on PYTHONPATH), to compare two versions in one session (``--ab-baseline``).
    """
    out, work = scratch / "out", scratch / "work"
    for p in (out, work):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).with_name("cmb-bidsapp")), str(bids), str(out), "participant",
        "--nprocs", str(nprocs), "-w", str(work), *extra,
    ]  # fmt: skip
    # A fresh interpreter per run (via a tiny wrapper) so ru_maxrss is this run's only.
    wrapper = (
        "import resource, subprocess, sys;"
        "rc = subprocess.call(sys.argv[1:]);"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print('BENCH-RUSAGE', u.ru_maxrss, u.ru_utime + u.ru_stime, rc, file=sys.stderr)"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    t0, t0_epoch = time.perf_counter(), time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[tuple[float, str]] = []  # (seconds since start, stderr line)
    with TreeMonitor(proc.pid) as mon:
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        proc.wait()
    wall = time.perf_counter() - t0
    maxrss_one, cpu_s, rc = 0, None, proc.returncode
    for _, line in lines:
        if line.startswith("BENCH-RUSAGE"):
            _, kib, cpu, rc_s = line.split()
            maxrss_one, cpu_s, rc = int(kib) * 1024, round(float(cpu), 2), int(rc_s)
    stderr = "\n".join(line for _, line in lines)
    # Before the workflow (start-up, validation, indexing, pre-flight reads, graph) and after
    # its last node (the HTML reports): not in timings.tsv, so timed from the app's own lines.
    t_start = next((t for t, line in lines if "processing " in line and " image(s)" in line), None)
    stages, t_wf_end = read_timings(out)
    run_rows = {k[len("(run) ") :]: v for k, v in stages.items() if k.startswith("(run) ")}
    stages = {k: v for k, v in stages.items() if not k.startswith("(run) ")}
    phases = {}
    if t_start is not None and "workflow" in run_rows:
        # the app's own workflow row (logs/<run>/timings.tsv, rewritten after the reports)
        phases = {
            "setup": round(t_start, 2),
            "workflow": run_rows["workflow"],
            "finish": round(wall - t_start - run_rows["workflow"], 2),
        }
    elif t_start is not None and t_wf_end is not None:
        t_wf_end -= t0_epoch
        phases = {
            "setup": round(t_start, 2),  # imports, validation, indexing, pre-flight, graph
            "workflow": round(t_wf_end - t_start, 2),  # Nipype's run, every node
            "finish": round(wall - t_wf_end, 2),  # HTML reports, exit
        }
    result = {
        "rc": rc,
        "wall_s": round(wall, 2),
        "cpu_s": cpu_s,  # user + system CPU seconds of the whole process tree
        **mon.cpu_split(),
        "peak_rss_tree_gb": round(mon.peak_sum / 1e9, 3),
        "peak_rss_process_gb": round(max(maxrss_one, mon.peak_one) / 1e9, 3),
        "phases": phases,
        "stages": stages,
        "candidates": count_candidates(out),
    }
    if rc != 0:
        result["stderr_tail"] = stderr[-2000:]
    return result


def read_timings(out: Path) -> tuple[dict[str, float], float | None]:
    """Seconds per stage from the run's `logs/<run>/timings.tsv` (summed over images), and the
    time the file was written (epoch seconds: the end of the workflow)."""
    files = sorted((out / "logs").glob("*/timings.tsv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}, None
    stages: dict[str, float] = {}
    with files[-1].open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            key = f"(run) {row['stage']}" if row["image"] == "(run)" else row["stage"]
            stages[key] = stages.get(key, 0.0) + float(row["seconds"])
    return {k: round(v, 2) for k, v in stages.items()}, files[-1].stat().st_mtime


def count_candidates(out: Path) -> dict:
    """Lesions kept and candidates rejected, from the image's QC record (None if not written).

    `candidates` = kept + rejected: every candidate the detection stage examined.
    """
    for q in sorted(out.glob("sub-*/**/figures/*_desc-qc_*.json")):
        with contextlib.suppress(ValueError, OSError, TypeError):
            qc = json.loads(q.read_text())
            kept = int(qc["counts"]["total"])
            rejected = int(qc.get("n_rejected") or 0)
            return {"lesions": kept, "rejected": rejected, "candidates": kept + rejected}
    return {"lesions": None, "rejected": None, "candidates": None}


def machine() -> dict:
    """The machine and its load (the other users of a shared machine change the times)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1e6
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def median_run(runs: list[dict]) -> dict:
    """Medians (and min, max) of the runs that succeeded."""
    ok = [r for r in runs if r["rc"] == 0] or runs
    stage_names = list(dict.fromkeys(s for r in ok for s in r["stages"]))
    wall = [r["wall_s"] for r in ok]
    return {
        "n_runs": len(runs),
        "n_ok": sum(r["rc"] == 0 for r in runs),
        "wall_s": round(statistics.median(wall), 2),
        "wall_min_s": min(wall),
        "wall_max_s": max(wall),
        "cpu_s": round(statistics.median(r["cpu_s"] or 0.0 for r in ok), 2),
        "cpu_main_s": round(statistics.median(r.get("cpu_main_s", 0.0) for r in ok), 2),
        "cpu_workers_s": round(statistics.median(r.get("cpu_workers_s", 0.0) for r in ok), 2),
        "peak_rss_tree_gb": max(r["peak_rss_tree_gb"] for r in ok),
        "peak_rss_process_gb": max(r["peak_rss_process_gb"] for r in ok),
        "phases": {
            s: round(statistics.median(r["phases"].get(s, 0.0) for r in ok), 2)
            for s in ("setup", "workflow", "finish")
            if any(s in r["phases"] for r in ok)
        },
        "stages": {
            s: round(statistics.median(r["stages"].get(s, 0.0) for r in ok), 2) for s in stage_names
        },
        "candidates": ok[-1]["candidates"],
    }


def group_benchmark(subjects: int, repeats: int) -> dict:
    """The group level over `subjects` fabricated outputs, through bench_group's own functions."""
    sys.path.insert(0, str(HERE))
    import bench_group

    with tempfile.TemporaryDirectory(prefix="cmb-bench-group-") as tmp:
        bids, out, n_lesions = bench_group.fabricate(Path(tmp), subjects)
        times = bench_group.time_group(bids, out, repeats)
    return {
        "subjects": subjects,
        "lesions": int(n_lesions),
        "median_s": round(statistics.median(times), 2),
        "min_s": round(min(times), 2),
        "max_s": round(max(times), 2),
        "repeats": repeats,
    }


def print_table(results: dict) -> None:
    """The table of the README/docs: seconds per stage, total, peak memory, per case."""
    rows = results["cases"]
    stage_names = list(
        dict.fromkeys(s for r in rows.values() for m in r["runs"].values() for s in m["stages"])
    )
    phase_names = ["setup", "workflow", "finish"]
    header = ["case", "nprocs", "voxels", "total s", "cpu s", "peak GB", *phase_names, *stage_names]
    print("\t".join(header))
    for name, r in rows.items():
        for nprocs, m in r["runs"].items():
            cells = [
                name,
                str(nprocs),
                f"{r['dataset']['voxels'] / 1e6:.2f}M",
                f"{m['wall_s']:.1f}",
                f"{m['cpu_s']:.1f}",
                f"{m['peak_rss_tree_gb']:.2f}",
                *(f"{m['phases'].get(s, 0.0):.1f}" for s in phase_names),
                *(f"{m['stages'].get(s, 0.0):.1f}" for s in stage_names),
            ]
            print("\t".join(cells))
    for name, r in rows.items():
        for nprocs, ratio in r.get("ratio_baseline_over_current", {}).items():
            print(f"before/after {name} nprocs={nprocs}: {json.dumps(ratio)}")
    for key in (
        "voxel_series", "voxel_fit", "candidate_series", "candidate_fit", "nprocs", "group", "targets"
    ):  # fmt: skip
        if key in results:
            print(f"{key}: {json.dumps(results[key])}")


def _series(results: dict, names: tuple[str, ...], x_key) -> list[dict]:
    out = []
    for name in names:
        r = results["cases"].get(name)
        if not r:
            continue
        for nprocs, m in r["runs"].items():
            out.append({"case": name, "nprocs": nprocs, "x": x_key(r, m), "wall_s": m["wall_s"]})
    return out


def summarise(results: dict) -> None:
    """Series, nprocs ratio and targets, from the per-case medians."""
    results["voxel_series"] = _series(results, VOXEL_SERIES, lambda r, m: r["dataset"]["voxels"])
    results["candidate_series"] = _series(
        results,
        CANDIDATE_SERIES,
        lambda r, m: m["candidates"].get("candidates"),
    )
    for key in ("voxel_series", "candidate_series"):
        fits = {}
        for nprocs in sorted({p["nprocs"] for p in results[key]}):
            pts = [(p["x"], p["wall_s"]) for p in results[key] if p["nprocs"] == nprocs and p["x"]]
            if len(pts) >= 2 and len({x for x, _ in pts}) >= 2:
                x, y = np.array(pts, dtype=float).T
                slope, icpt = np.polyfit(x, y, 1)
                fit = {"seconds_per_unit": float(f"{slope:.4g}"), "intercept_s": round(icpt, 1)}
                if key == "voxel_series":  # exponent of t ~ N^e (1: linear)
                    fit["loglog_exponent"] = round(float(np.polyfit(np.log(x), np.log(y), 1)[0]), 2)
                fits[nprocs] = fit
        results[key.replace("series", "fit")] = fits
    ratios = {}
    for name, r in results["cases"].items():
        runs = r["runs"]
        if "1" in runs and "2" in runs:
            ratios[name] = round(runs["1"]["wall_s"] / runs["2"]["wall_s"], 2)
    results["nprocs"] = {"speedup_2_over_1": ratios}
    targets = {}
    for name, limit in TARGETS_S.items():
        r = results["cases"].get(name)
        if r:
            best = min(m["wall_s"] for m in r["runs"].values())
            targets[name] = {"target_s": limit, "best_median_s": best, "met": best <= limit}
    peak = max(
        (m["peak_rss_tree_gb"] for r in results["cases"].values() for m in r["runs"].values()),
        default=0.0,
    )
    targets["memory"] = {"target_gb": TARGET_MEM_GB, "peak_gb": peak, "met": peak <= TARGET_MEM_GB}
    if "group" in results:
        g = results["group"]["median_s"]
        targets["group"] = {"target_s": TARGET_GROUP_S, "median_s": g, "met": g <= TARGET_GROUP_S}
    results["targets"] = targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3, help="runs per case and nprocs (median)")
    ap.add_argument(
        "--repeats-05", type=int, help="runs for swi_05 (default: --repeats); it is the slowest"
    )
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--series-nprocs",
        type=int,
        nargs="+",
        default=[2],
        help="nprocs of the cases only in the growth series (swi_12, swi_08_c0, swi_08_c40)",
    )
    ap.add_argument("--series-repeats", type=int, help="runs of those cases (default: --repeats)")
    ap.add_argument("--quick", action="store_true", help="small grids, one run: a smoke check")
    ap.add_argument("--data", type=Path, help="keep/reuse the simulated datasets in this folder")
    ap.add_argument("--group-subjects", type=int, default=1000, help="0: skip the group level")
    ap.add_argument("--group-repeats", type=int, default=3)
    ap.add_argument(
        "--ab-baseline",
        type=Path,
        help="a folder holding an older copy of the cmb_bidsapp package: each case and nprocs "
        "then runs the baseline and the current code alternately (--repeats times each) and "
        "reports their ratio (before/after of a fix, measured in one session)",
    )
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more app options")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only merge these result JSONs (cases, group; later files win) into --json",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.quick:
        args.repeats, args.repeats_05, args.series_repeats = 1, 1, 1

    from cmb_bidsapp import __version__

    size = "small" if args.quick else "full"
    data = args.data or Path(tempfile.mkdtemp(prefix="cmb-bench-data-"))
    scratch = Path(tempfile.mkdtemp(prefix="cmb-bench-run-"))
    bundle = Path(__file__).resolve().parents[1] / "cmb_bidsapp/data/models/default/bundle.json"
    results: dict = {
        "version": __version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size": size,
        "model_bundle": bundle.is_file(),
        "machine_before": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "cases": {},
    }
    try:
        for name in args.cases:
            case = CASES[name]
            bids = data / f"{name}-{size}"
            info_path = bids.with_suffix(".json")
            if info_path.is_file():
                info = json.loads(info_path.read_text())
            else:
                shutil.rmtree(bids, ignore_errors=True)
                print(f"[bench] simulating {name} ({case.description})", file=sys.stderr)
                info = make_dataset(case, bids, size)
            entry = {"description": case.description, "kind": case.kind, "dataset": info}
            entry["runs"] = {}
            repeats = args.repeats_05 if name == "swi_05" and args.repeats_05 else args.repeats
            nprocs_list = args.nprocs
            if name not in MAIN_CASES:
                nprocs_list = args.series_nprocs
                repeats = args.series_repeats or repeats
            for nprocs in nprocs_list:
                versions = {"current": None}
                if args.ab_baseline:
                    versions = {"baseline": args.ab_baseline.resolve(), "current": None}
                runs: dict[str, list[dict]] = {v: [] for v in versions}
                for i in range(repeats):
                    for version, code in versions.items():  # alternate: same load for both
                        r = run_participant(bids, scratch / name, nprocs, args.extra, code)
                        print(
                            f"[bench] {name} nprocs={nprocs} {version} run {i + 1}/{repeats}: "
                            f"rc={r['rc']} {r['wall_s']:.1f} s (cpu {r['cpu_s']} s), "
                            f"{r['peak_rss_tree_gb']:.2f} GB",
                            file=sys.stderr,
                        )
                        if r["rc"] != 0:
                            print(r.get("stderr_tail", ""), file=sys.stderr)
                        runs[version].append(r)
                entry["runs"][str(nprocs)] = median_run(runs["current"])
                entry["runs"][str(nprocs)]["all_wall_s"] = [r["wall_s"] for r in runs["current"]]
                if args.ab_baseline:
                    base = median_run(runs["baseline"])
                    cur = entry["runs"][str(nprocs)]
                    base["all_wall_s"] = [r["wall_s"] for r in runs["baseline"]]
                    entry.setdefault("baseline", {})[str(nprocs)] = base
                    entry.setdefault("ratio_baseline_over_current", {})[str(nprocs)] = {
                        "wall": round(base["wall_s"] / cur["wall_s"], 3),
                        "cpu": round(base["cpu_s"] / max(cur["cpu_s"], 1e-9), 3),
                        "stages": {
                            s: round(base["stages"][s] / cur["stages"][s], 3)
                            for s in cur["stages"]
                            if base["stages"].get(s) and cur["stages"][s] > 0
                        },
                    }
            results["cases"][name] = entry
            _write(results, args.json)  # after each case: a stopped benchmark keeps its results
        if args.group_subjects:
            print(f"[bench] group level over {args.group_subjects} subjects", file=sys.stderr)
            results["group"] = group_benchmark(args.group_subjects, args.group_repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    results["machine_after"] = machine()
    _write(results, args.json)
    print_table(results)
    print(f"[bench] wrote {args.json}", file=sys.stderr)
    return 0


def merge(paths: list[Path], out: Path) -> int:
    """Combine the cases (and group level) of several result files, e.g. sessions with
    different repeats; each case keeps the machine record of its own session."""
    results: dict = {"merged_from": [], "cases": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for key in ("version", "size", "model_bundle", "machine_before", "command", "date_utc"):
            results.setdefault(key, part.get(key))
        results["merged_from"].append(
            {
                "file": Path(path).name,
                "command": part.get("command"),
                "date_utc": part.get("date_utc"),
                "machine_before": part.get("machine_before"),
                "machine_after": part.get("machine_after"),
                "cases": list(part.get("cases", {})),
            }
        )
        for name, case in part.get("cases", {}).items():
            case["session"] = Path(path).name
            results["cases"][name] = case
        if "group" in part:
            results["group"] = part["group"]
        results["machine_after"] = part.get("machine_after")
    _write(results, out)
    print_table(results)
    return 0


def _write(results: dict, path: Path) -> None:
    summarise(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
