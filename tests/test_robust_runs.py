"""Runs that go wrong: four concurrent jobs into one OUTPUT_DIR, and SIGTERM, Ctrl-C and SIGKILL
in the middle of a run followed by resumes. OUTPUT_DIR never holds an incomplete visible file,
no worker outlives the app, and the final outputs equal an uninterrupted run byte for byte."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from corpus import (
    app_command,
    build_good_dataset,
    descendants,
    digests,
    incomplete_files,
    part_files,
    run_app,
    running,
    simulated_base,
)

from cmb_bidsapp import io
from cmb_bidsapp.bids import BIDSIGNORE_LINES, dataset_description
from cmb_bidsapp.validation import validate

pytestmark = pytest.mark.slow

SUBJECTS = ["a", "b", "c", "d"]  # T2starw, MEGRE, mirrored T2starw, int16 with scl_slope
CONTRACT = (
    "_desc-brain_mask.nii.gz",
    "_desc-brain_mask.json",
    "_label-CMB_probseg.nii.gz",
    "_label-CMB_mask.nii.gz",
    "_label-CMB_mask.json",
    "_desc-CMB_lesions.tsv",
    "_desc-CMB_counts.tsv",
    "_desc-CMB_counts.json",
)


class Watcher:
    """Polls OUTPUT_DIR while a run goes on: every visible file must be complete at all times."""

    def __init__(self, out: Path):
        self.out = out
        self.looks = 0
        self.problems: list[str] = []

    def look(self) -> None:
        if self.out.exists():
            self.looks += 1
            self.problems += incomplete_files(self.out)


def _start(bids: Path, out: Path, work: Path, *extra, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            app_command(bids, out, "participant", "-w", work, "--skip-bids-validation", *extra),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _status(out: Path, pid: int) -> dict | None:
    """This run's status file (its log folder name ends with the app's pid)."""
    for path in out.glob(f"logs/*_{pid}/status.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


LAST_STAGES = {"cleanup", "lesion_table", "ds_outputs", "report_figures", "done"}
"""Stages too close to the end of a run to be sure a signal lands before it exits."""


def _wait(proc, out, watcher, *, stages_seen: set[str], count: int, timeout=400) -> set[str]:
    """Wait until the run has shown `count` stages in progress that no earlier run stopped in."""
    deadline = time.monotonic() + timeout
    fresh: set[str] = set()
    while time.monotonic() < deadline:
        watcher.look()
        assert proc.poll() is None, "the run finished before it could be interrupted"
        status = _status(out, proc.pid) or {}
        # the last stages can end before the signal lands (the run then exits 0): not counted
        stages = set(status.get("current_stage", {}).values()) - LAST_STAGES
        fresh |= stages - stages_seen
        if len(fresh) >= count:
            return fresh
        time.sleep(0.2)
    raise AssertionError("no stage in progress within the time limit")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base, meta = simulated_base(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("runs")
    return root, build_good_dataset(root / "bids", base, meta, SUBJECTS)


@pytest.fixture(scope="module")
def concurrent(dataset):
    """Four `participant` jobs, one subject each, started together: one OUTPUT_DIR, one work dir."""
    root, bids = dataset
    out, work = root / "out", root / "work"
    watcher = Watcher(out)
    procs = [
        _start(bids, out, work, "--participant-label", s, "--nprocs", "1", log=root / f"{s}.log")
        for s in SUBJECTS
    ]
    while any(p.poll() is None for p in procs):
        watcher.look()
        time.sleep(0.3)
    logs = {s: (root / f"{s}.log").read_text() for s in SUBJECTS}
    return {"out": out, "work": work, "procs": procs, "logs": logs, "watcher": watcher}


def test_four_concurrent_jobs_complete(concurrent):
    out, logs = concurrent["out"], concurrent["logs"]
    for sub, proc in zip(SUBJECTS, concurrent["procs"]):
        assert proc.returncode == 0, logs[sub][-3000:]
        assert "Traceback" not in logs[sub]
        names = {p.name for p in (out / f"sub-{sub}" / "anat").iterdir()}
        for suffix in CONTRACT:
            assert any(n.endswith(suffix) for n in names), (sub, suffix)
    assert concurrent["watcher"].looks > 10 and not concurrent["watcher"].problems
    assert not part_files(out) and not incomplete_files(out)
    statuses = [json.loads(p.read_text()) for p in out.glob("logs/*/status.json")]
    assert len(statuses) == 4
    assert all(s["finished"] and s["images_done"] == 1 for s in statuses)


def test_concurrent_dataset_files_are_consistent(concurrent, dataset):
    out = concurrent["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc == json.loads(json.dumps(dataset_description(dataset[1])))
    assert (out / ".bidsignore").read_text() == "\n".join(BIDSIGNORE_LINES) + "\n"
    assert (out / "logs" / "CITATION.md").read_text().startswith("# Methods")
    result = validate(out)
    assert result.valid, result.summary()


def test_concurrent_outputs_equal_a_single_job(concurrent, dataset, tmp_path):
    """One job over the four subjects with the same work dir writes the same bytes."""
    out = tmp_path / "out"
    proc = run_app(
        dataset[1], out, "participant", "-w", concurrent["work"], "--skip-bids-validation"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(out) == digests(concurrent["out"])


def test_sigterm_sigint_sigkill_then_resume(concurrent, dataset, tmp_path):
    """Subjects a and b, fresh work dir: stopped by SIGTERM, then Ctrl-C, then kill -9, each in a
    stage no earlier run reached; each stop leaves no worker and no incomplete file; the last
    run completes, leaves no .part file, and equals the uninterrupted concurrent run."""
    bids = dataset[1]
    out, work = tmp_path / "out", tmp_path / "work"
    watcher = Watcher(out)
    seen: set[str] = set()
    # Two pool workers, one thread each, as the concurrent jobs (--nprocs 1): the thread count
    # changes the last bits of the probabilities (about 1e-5), so it is part of "same options".
    args = ("--participant-label", "a", "b", "--nprocs", "2", "--omp-nthreads", "1")
    for n, (sig, code, words) in enumerate(
        (
            (signal.SIGTERM, 143, "terminated (SIGTERM)"),
            (signal.SIGINT, 130, "interrupted (SIGINT)"),
            (signal.SIGKILL, -9, None),
        )
    ):
        log = tmp_path / f"run{n}.log"
        proc = _start(bids, out, work, *args, log=log)
        seen |= _wait(proc, out, watcher, stages_seen=seen, count=n + 1)  # later and later
        workers = descendants(proc.pid)
        assert workers, "no worker processes to check"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        deadline = time.monotonic() + 10
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if running(w)], f"orphan workers after {sig.name}"
        err = log.read_text()
        assert "Traceback" not in err, err[-3000:]
        if words:
            assert words in err and "same -w/--work-dir to resume" in err
            status = _status(out, proc.pid)
            assert status is not None and status["finished"] is False
        watcher.look()
    assert not watcher.problems
    print(f"stopped in stages: {sorted(seen)}; OUTPUT_DIR checked {watcher.looks} times")

    # what a kill -9 inside the writer's transaction leaves: a hidden .part of a dead writer
    owner = f"{io._host()}@{io._pid_namespace()}@{proc.pid}"
    planted = out / "sub-a" / "anat" / f".sub-a_desc-brain_mask.nii.gz.{owner}.x1.part"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"\x1f\x8b half")
    proc = run_app(bids, out, "participant", "-w", work, "--skip-bids-validation", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not part_files(out) and not incomplete_files(out)
    reference = {
        k: v for k, v in digests(concurrent["out"]).items() if k.split("/")[0] in ("sub-a", "sub-b")
    }
    assert digests(out) == reference
