"""A simulated cohort on disk: :func:`write_cohort` (what ``cmb-bidsapp-synth`` runs).

Writing into a previous ``cmb-bidsapp-synth`` output first removes its subject folders and
previews, so that no subject of the old cohort is left behind.

Determinism: subject *i* (0-based) gets the seed ``SeedSequence([seed, i])``; input kinds
(``mix`` = the four kinds repeated to N, balanced) and the subjects with skull (exactly
``round(skull_fraction · N)``) are assigned by permutations drawn from ``seed``. A subject's
files depend only on its own seed, kind and skull flag, so ``--jobs`` changes the speed, never
the bytes. Subjects run in separate processes when ``jobs > 1`` (each with
``max(1, cpu_count // jobs)`` torch threads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .acquisition import KINDS, SIZES
from .bids_writer import (
    REFERENCE_NAME,
    is_synth_output,
    subject_label,
    write_dataset_files,
    write_subject,
)


def parse_kinds(kinds: str | Sequence[str]) -> list[str]:
    """``"mix"`` or a comma-separated list (or sequence) of swi, t2starw, megre, qsm."""
    if isinstance(kinds, str):
        items = [k.strip().lower() for k in kinds.split(",") if k.strip()]
    else:
        items = [str(k).strip().lower() for k in kinds]
    if items == ["mix"]:
        return list(KINDS)
    bad = [k for k in items if k not in KINDS]
    if bad or not items:
        raise ValueError(
            f"unknown input kind(s) {', '.join(bad) or '(none)'}: use mix or a comma-separated "
            f"list of {', '.join(KINDS)}"
        )
    return list(dict.fromkeys(items))


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject `index` (0-based) of a cohort drawn with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def assign(
    n_subjects: int, seed: int, kinds: list[str], skull_fraction: float
) -> tuple[list[str], list[bool]]:
    """(kind per subject, with-skull flag per subject), balanced and drawn from `seed`."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    seq = [kinds[i % len(kinds)] for i in range(n_subjects)]
    order = rng.permutation(n_subjects)
    kind_of = [seq[i] for i in order]
    n_skull = int(round(skull_fraction * n_subjects))
    skull = np.zeros(n_subjects, bool)
    skull[rng.permutation(n_subjects)[:n_skull]] = True
    return kind_of, [bool(v) for v in skull]


def clear_previous(out_dir: Path) -> None:
    """Remove the subject folders and previews of a previous cmb-bidsapp-synth output (only)."""
    import shutil

    ref = out_dir / "derivatives" / REFERENCE_NAME
    for root in (out_dir, ref):
        for sub in sorted(root.glob("sub-*")):
            if sub.is_dir():
                shutil.rmtree(sub)
    if (ref / "figures").is_dir():
        shutil.rmtree(ref / "figures")


def _run_one(job: dict) -> dict:
    """Simulate and write one subject (runs in a worker process when jobs > 1)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from .subject import simulate_subject

    t0 = time.perf_counter()
    sub = simulate_subject(job["subject_seed"], job["kind"], job["size"], job["skull"])
    out_dir = Path(job["out_dir"])
    write_subject(out_dir, job["label"], sub)
    if job["preview"]:
        from .preview import write_preview

        fig = (
            out_dir / "derivatives" / REFERENCE_NAME / "figures" / f"sub-{job['label']}_preview.png"
        )
        write_preview(sub, fig, job["label"])
    return {
        "participant_id": f"sub-{job['label']}",
        "input_kind": job["kind"],
        "with_skull": int(sub.skull),
        "size": job["size"],
        "n_microbleeds": int(len(sub.lesions)),
        "n_visible": int(sub.lesions["visible"].sum()) if len(sub.lesions) else 0,
        "subject_seed": int(job["subject_seed"]),
        "_seconds": time.perf_counter() - t0,
    }


def write_cohort(
    out_dir: str | Path,
    n_subjects: int,
    seed: int,
    kinds: str | Sequence[str] = "mix",
    size: str = "full",
    skull_fraction: float = 0.5,
    preview: bool = False,
    jobs: int = 1,
    progress: Callable[[int, int, dict], None] | None = None,
) -> pd.DataFrame:
    """Simulate `n_subjects` and write the raw dataset and ``derivatives/reference``.

    Returns the participants table (one row per subject, with the seconds each took).
    `progress(done, total, row)` is called after each subject.
    """
    kind_list = parse_kinds(kinds)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: use small or full")
    if n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    if not 0.0 <= float(skull_fraction) <= 1.0:
        raise ValueError("skull_fraction must be between 0 and 1")
    out_dir = Path(out_dir)
    if is_synth_output(out_dir):
        clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind_of, skull_of = assign(n_subjects, seed, kind_list, float(skull_fraction))
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 2) // jobs)
    tasks = [
        {
            "out_dir": str(out_dir),
            "label": subject_label(i, n_subjects),
            "subject_seed": subject_seed(seed, i),
            "kind": kind_of[i],
            "size": size,
            "skull": skull_of[i],
            "preview": bool(preview),
            "threads": threads if jobs > 1 else None,
        }
        for i in range(n_subjects)
    ]
    rows: list[dict] = []
    if jobs == 1:
        for task in tasks:
            rows.append(_run_one(task))
            if progress:
                progress(len(rows), n_subjects, rows[-1])
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for row in pool.map(_run_one, tasks):
                rows.append(row)
                if progress:
                    progress(len(rows), n_subjects, row)
    table = pd.DataFrame(rows)
    settings = {
        "generator": "cmb-bidsapp-synth",
        "version": __version__,
        "n_subjects": int(n_subjects),
        "seed": int(seed),
        "kinds": kind_list,
        "size": size,
        "skull_fraction": float(skull_fraction),
    }
    write_dataset_files(out_dir, settings, table.drop(columns="_seconds"))
    return table
