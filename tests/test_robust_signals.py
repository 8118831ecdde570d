"""Worker processes never outlive the app, fast: a process pool like Nipype's MultiProc under
kill -9 of its parent (with and without the app's fork hook), and `stop_workers`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from corpus import running

POOL = textwrap.dedent(
    """
    import sys, time
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from cmb_bidsapp.cli import run
    if sys.argv[1] == "hook":
        run._install_fork_hook()
    def work(x):
        time.sleep(60)
    pool = ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
    futures = [pool.submit(work, i) for i in range(2)]
    time.sleep(1.0)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    if sys.argv[2] == "stop":
        print(run.stop_workers(), flush=True)
    time.sleep(120)
    """
)


def _pool(hook: str, then: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL, hook, then], stdout=subprocess.PIPE, text=True
    )
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(running(w) for w in workers)
    return proc, workers


def _gone(workers, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(running(w) for w in workers):
            return True
        time.sleep(0.05)
    return False


def test_kill_9_of_the_app_takes_its_workers():
    proc, workers = _pool("hook", "wait")
    proc.kill()
    proc.wait()
    assert _gone(workers), "workers outlived the app"


def test_without_the_hook_workers_would_be_orphans():
    """The reason for the hook: a plain pool's workers keep running after kill -9."""
    proc, workers = _pool("plain", "wait")
    proc.kill()
    proc.wait()
    try:
        assert not _gone(workers, seconds=1.5)
    finally:
        for w in workers:
            subprocess.run(["kill", "-9", str(w)], capture_output=True)


def test_stop_workers_stops_the_pool():
    proc, workers = _pool("hook", "stop")
    try:
        assert proc.stdout.readline().strip() == "2"
        assert _gone(workers, seconds=1.0)
    finally:
        proc.kill()
        proc.wait()
