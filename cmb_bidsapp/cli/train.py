"""Entry point of `cmb-bidsapp-train`: train the detector, teacher and student; write a model bundle.

Usage::

    cmb-bidsapp-train BIDS_DIR REFERENCE_DIR OUT_BUNDLE [options]     # your own labels
    cmb-bidsapp-train OUT_BUNDLE --simulate N [--kinds ...] [options]  # simulated cohort

With ``BIDS_DIR REFERENCE_DIR``, the inputs are found as the app finds them
(:func:`cmb_bidsapp.bids.collect_inputs`, same ``--participant-label`` and ``--input-kind``), and
each image's reference is ``REFERENCE_DIR/sub-*/[ses-*/]anat/<source>_label-CMB_mask.nii[.gz]``,
the name the app writes, so corrected app outputs can be fed back. Images without a reference
are skipped (listed). The brain mask is the ``<source>_desc-brain_mask`` beside the reference when
present (what the app wrote), otherwise the app's brain extraction.

With ``--simulate N``, N subjects are simulated (:func:`cmb_bidsapp.synth.subject.simulate_subject`)
in turn with the kinds of ``--kinds`` and cached under ``WORK_DIR/data``.

The split is by subject (``--val-fraction``), the stages and their rules are in
:mod:`cmb_bidsapp.models.train`. ``--resume`` continues an interrupted run in the same
``-w WORK_DIR`` (cached data, per-epoch checkpoints). ``--init-from BUNDLE`` starts from a bundle's
weights (e.g. the default models: ``--init-from default``) to fine-tune them on your labels.

Exit codes: 0 bundle written, 1 training failed, 18 no usable image, 64 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_OK, EXIT_USAGE, CMBError, NoMatchError, UsageError

PROG = "cmb-bidsapp-train"
KINDS = ("swi", "t2starw", "megre", "qsm")


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's exit code 64 for bad usage (instead of 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.replace(" ", ",").split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown input kind(s) {bad}; choose from {KINDS}")
    return kinds


def _stages(text: str) -> list[str]:
    stages = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in stages if k not in ("detector", "teacher", "student")]
    if bad or not stages:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {bad}; choose from detector, teacher, student"
        )
    return stages


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train the microbleed detector, teacher and student and write a model bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="BIDS_DIR REFERENCE_DIR OUT_BUNDLE, or only OUT_BUNDLE with --simulate",
    )
    g = p.add_argument_group("data")
    g.add_argument("--simulate", type=int, metavar="N", help="train on N simulated subjects")
    g.add_argument("--kinds", type=_kinds, default=list(KINDS), help="kinds to simulate, in turn")
    g.add_argument("--size", choices=("full", "small"), default="full", help="simulated size")
    g.add_argument(
        "--sim-seed", type=int, default=None, help="seed of the simulated cohort (default: --seed)"
    )
    g.add_argument(
        "--no-enrich",
        action="store_true",
        help="simulate with the realistic lesion and mimic prevalence (default: enriched)",
    )
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=None)
    g.add_argument("--input-kind", "--input_kind", choices=("auto", *KINDS), default="auto")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of subjects validated")
    g.add_argument("--toy", action="store_true", help=argparse.SUPPRESS)
    t = p.add_argument_group("training")
    t.add_argument(
        "--stages", type=_stages, default=["detector", "teacher", "student"], help="stages to run"
    )
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs of every stage")
    for stage in ("detector", "teacher", "student"):
        t.add_argument(
            f"--{stage}-epochs",
            type=int,
            default=None,
            help=f"maximum epochs ({stage}; overrides --epochs)",
        )
    t.add_argument("--iters", type=int, default=None, help="optimiser steps per epoch")
    t.add_argument(
        "--detector-iters",
        type=int,
        default=None,
        help="detector steps per epoch (overrides --iters)",
    )
    t.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs)")
    t.add_argument(
        "--detector-patience", type=int, default=None, help="detector patience (default --patience)"
    )
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (teacher, students)")
    t.add_argument("--detector-lr", type=float, default=2e-3, help="Adam learning rate (detector)")
    t.add_argument(
        "--student-widths",
        type=lambda x: tuple(int(v) for v in x.split(",")),
        default=None,
        help="student widths, e.g. 16,32,64 (default 8,16,32)",
    )
    t.add_argument(
        "--student-init",
        choices=("random", "teacher"),
        default="random",
        help="start both students from random weights or from the teacher's Tf + Tc",
    )
    t.add_argument("--student-lr", type=float, default=None, help="student learning rate")
    t.add_argument(
        "--frst-grid",
        choices=("source", "working"),
        default="source",
        help="resample the source grid's radial-symmetry map to the working grid (the default "
        "bundle's way), or compute the map on the working grid (keeps one-voxel peaks; see "
        "docs/training.md for what it gave)",
    )
    t.add_argument(
        "--student-tta",
        choices=("none", "flip8"),
        default="flip8",
        help="the student's test-time augmentation, recorded in the bundle and used by the app "
        "and by the validation threshold table: flip8 averages the patch and its 7 mirror "
        "images (see docs/training.md for what it gave), none scores the patch alone",
    )
    t.add_argument("--kd-temperature", type=float, default=4.0)
    t.add_argument("--kd-alpha", type=float, default=0.3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--init-from", metavar="BUNDLE", help="start from a bundle ('default': shipped)")
    t.add_argument("--name", default="cmb-bidsapp-models", help="model name in the bundle")
    r = p.add_argument_group("resources")
    r.add_argument("-w", "--work-dir", type=Path, default=Path("work-train"))
    r.add_argument("--resume", action="store_true", help="continue in the same work dir")
    r.add_argument(
        "--prepare-only",
        action="store_true",
        help="simulate/prepare the data into WORK_DIR and stop (train later with --resume)",
    )
    r.add_argument("--jobs", type=int, default=1, help="data-preparation processes")
    r.add_argument("--nthreads", type=int, default=None, help="torch threads for training")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _seed_of(sim_seed: int, i: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([sim_seed, i]).generate_state(1)[0])


def _simulated_items(args, work: Path) -> list[dict[str, Any]]:
    sim_seed = args.seed if args.sim_seed is None else args.sim_seed
    tag = f"{'toy' if args.toy else 'sim'}-{args.size}-{sim_seed}-{'n' if args.no_enrich else 'e'}"
    items = []
    for i in range(args.simulate):
        kind = args.kinds[i % len(args.kinds)] if not args.toy else "swi"
        key = f"sub-{i + 1:03d}"
        items.append(
            {
                "key": key,
                "subject": key[4:],
                "kind": kind,
                "folder": str(work / "data" / tag / key),
                "seed": _seed_of(sim_seed, i),
                "source": "toy" if args.toy else "sim",
            }
        )
    return items


def _bids_items(args, work: Path, bids_dir: Path, ref_dir: Path, log) -> list[dict[str, Any]]:
    from ..bids import DerivativesWriter, collect_inputs

    images, notes = collect_inputs(
        bids_dir, participant_labels=args.participant_label, input_kind=args.input_kind
    )
    for n in notes:
        log(f"note: {n}")
    writer = DerivativesWriter(ref_dir)
    tag = "bids-" + hashlib.sha256(str(bids_dir.resolve()).encode()).hexdigest()[:10]
    items, missing = [], []
    for img in images:
        if img.error:
            log(f"skipped (input error): {img.error}")
            continue
        ref = writer.path_for(img, "mask", label="CMB")
        if not ref.exists() and ref.with_suffix("").exists():  # .nii
            ref = ref.with_suffix("")
        if not ref.exists():
            missing.append(str(ref))
            continue
        brain = writer.path_for(img, "mask", desc="brain")
        if not brain.exists() and brain.with_suffix("").exists():
            brain = brain.with_suffix("")
        items.append(
            {
                "key": img.source_name,
                "subject": img.subject,
                "kind": img.kind,
                "folder": str(work / "data" / tag / img.source_name),
                "image": img,
                "reference": str(ref),
                "brain": str(brain) if brain.exists() else None,
                "source": "bids",
            }
        )
    for m in missing:
        log(f"skipped (no reference mask): {m}")
    if len(items) < 2:
        raise NoMatchError(
            f"has {len(items)} image(s) with a reference mask; at least two subjects are needed",
            path=ref_dir,
            fix="Reference masks are <source>_label-CMB_mask.nii.gz under sub-*/[ses-*/]anat/.",
        )
    return items


def _prepare_one(item: dict[str, Any], keep_source: bool, enrich: bool, threads: int) -> dict:
    from ..models import data

    if item["source"] == "bids":
        return data.bids_prepare(
            item["image"],
            item["reference"],
            item["folder"],
            brain_mask_file=item["brain"],
            keep_source=keep_source,
            threads=threads,
        )
    if item["source"] == "toy":
        if data.is_prepared(item["folder"]):
            return {"key": item["key"], "cached": True, "seconds": 0.0}
        t0 = time.perf_counter()
        raw = data.raw_from_toy(item["seed"] % 100_000)
        raw.key, raw.subject = item["key"], item["subject"]
        data.save_prepared(data.prepare(raw, keep_source=keep_source), item["folder"])
        return {"key": item["key"], "cached": False, "seconds": time.perf_counter() - t0}
    return data.simulate_and_prepare(
        item["seed"],
        item["kind"],
        item["size"],
        item["key"],
        item["folder"],
        keep_source=keep_source,
        enrich=enrich,
        threads=threads,
    )


def prepare_all(
    items: list[dict[str, Any]], val_keys: set[str], jobs: int, enrich: bool, log, progress: bool
) -> list[dict[str, Any]]:
    """Prepare (or reuse) every item; validation items keep their source-grid maps."""
    from ..models.data import is_prepared, load_prepared

    todo = []
    for it in items:
        keep = it["key"] in val_keys
        if is_prepared(it["folder"]):
            has_src = load_prepared(it["folder"]).source is not None
            if keep and not has_src:
                import shutil

                shutil.rmtree(it["folder"])  # validated now: needs its source-grid maps
            else:
                continue
        todo.append((it, keep))
    summaries = []
    if not todo:
        return summaries
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="prepare data", file=sys.stderr, dynamic_ncols=True)
    if jobs <= 1:
        for it, keep in todo:
            summaries.append(_prepare_one(it, keep, enrich, 2))
            if bar:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as ex:
            futures = [ex.submit(_prepare_one, it, keep, enrich, 1) for it, keep in todo]
            for f in futures:
                summaries.append(f.result())
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    for s in summaries:
        log(f"prepared {json.dumps(s)}")
    return summaries


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    if args.simulate is not None:
        if len(args.paths) != 1:
            raise UsageError("with --simulate give only OUT_BUNDLE")
        if args.simulate < 2:
            raise UsageError("--simulate needs at least 2 subjects (one is validated)")
        out = Path(args.paths[0])
    else:
        if len(args.paths) != 3:
            raise UsageError("give BIDS_DIR REFERENCE_DIR OUT_BUNDLE, or OUT_BUNDLE --simulate N")
        bids_dir, ref_dir, out = (Path(p) for p in args.paths)
        for d in (bids_dir, ref_dir):
            if not d.is_dir():
                raise UsageError(f"{d} is not a folder")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError("--val-fraction must be between 0 and 1")

    import torch

    from ..models.bundle import load_bundle, resolve_device
    from ..models.card import write_trained_bundle
    from ..models.data import load_prepared, split_by_subject
    from ..models.train import Context, TrainSettings, train_all

    if args.nthreads:
        torch.set_num_threads(args.nthreads)
    device = resolve_device(args.device)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.simulate is not None:
        items = _simulated_items(args, work)
        for it in items:
            it["size"] = args.size
    else:
        items = _bids_items(args, work, bids_dir, ref_dir, log)
    train_keys, val_keys = split_by_subject(items, args.val_fraction, args.seed)
    log(f"{len(items)} images: {len(train_keys)} for training, {len(val_keys)} for validation")
    t0 = time.perf_counter()
    summaries = prepare_all(
        items, set(val_keys), args.jobs, not args.no_enrich, log, not args.no_progress
    )
    data_s = time.perf_counter() - t0
    if args.prepare_only:
        (work / "data_summary.json").write_text(json.dumps(summaries, indent=1))
        log(
            f"data prepared in {data_s / 60:.1f} min under {work / 'data'}; stopping (--prepare-only)"
        )
        return EXIT_OK
    by_key = {it["key"]: it for it in items}
    if args.frst_grid == "working":
        from ..models.data import ensure_working_frst

        t1 = time.perf_counter()
        for it in items:
            ensure_working_frst(it["folder"])
        log(f"working-grid FRST of {len(items)} images ready in {time.perf_counter() - t1:.0f} s")
    train = [
        load_prepared(by_key[k]["folder"], source=False, frst_grid=args.frst_grid)
        for k in train_keys
    ]
    val = [load_prepared(by_key[k]["folder"], frst_grid=args.frst_grid) for k in val_keys]

    s = TrainSettings(
        seed=args.seed,
        device=str(device),
        stages=tuple(args.stages),
        patience=args.patience,
        detector_patience=args.detector_patience,
        student_init=args.student_init,
        student_lr=args.student_lr,
        lr=args.lr,
        detector_lr=args.detector_lr,
        kd_temperature=args.kd_temperature,
        kd_alpha=args.kd_alpha,
        frst_grid=args.frst_grid,
        student_tta=args.student_tta,
        val_fraction=args.val_fraction,
        progress=not args.no_progress,
    )
    if args.epochs is not None:
        s.detector_epochs = s.teacher_epochs = s.student_epochs = args.epochs
    if args.student_widths is not None:
        s.student_widths = tuple(args.student_widths)
    if args.student_init == "teacher" and tuple(s.student_widths) != tuple(s.teacher_widths):
        raise UsageError("--student-init teacher needs --student-widths equal to the teacher's")
    for stage in ("detector", "teacher", "student"):
        if getattr(args, f"{stage}_epochs") is not None:
            setattr(s, f"{stage}_epochs", getattr(args, f"{stage}_epochs"))
    if args.iters is not None:
        s.detector_iters = s.disc_iters = args.iters
    if args.detector_iters is not None:
        s.detector_iters = args.detector_iters
    if args.toy:  # smoke runs: small validation and batches
        s.detector_val_patches, s.detector_batch, s.disc_batch = 8, 4, 8
    init = None
    if args.init_from:
        init = load_bundle(
            None if args.init_from == "default" else args.init_from,
            device,
            load_teacher=True,
            fuse=False,
        )
        s.detector_widths = tuple(init.meta["networks"]["detector"]["widths"])
        s.teacher_widths = tuple(init.meta["networks"]["teacher"]["widths"])
        s.student_widths = tuple(init.meta["networks"]["student"]["widths"])
    ctx = Context(s, work, device, resume=args.resume, log=log)
    ctx.timings["data_s"] = data_s
    result = train_all(ctx, train, val, init_from=init)
    ctx.timings["total_s"] = time.perf_counter() - t_start
    kinds = sorted({it["kind"] for it in items})
    n_lesions_train = int(sum(p.n_lesions for p in train))
    n_lesions_val = int(sum(p.n_lesions for p in val))
    if args.simulate is not None:
        data_info = {
            "source": "SIMULATED (cmb_bidsapp.synth.simulate_subject)"
            if not args.toy
            else "hand-made toy phantoms (tests only)",
            "subjects": len(items),
            "kinds": kinds,
            "size": args.size,
            "cohort_seed": args.seed if args.sim_seed is None else args.sim_seed,
            "enriched": (
                "no"
                if args.no_enrich
                else "15 % of subjects without microbleeds, others 1-12; mimics x1.5"
            ),
            "brain_mask": (
                "images without skull and QSM: non-zero support (as the app); with skull: the "
                "simulator's true brain mask eroded or dilated by up to 2 mm instead of deepbet"
            ),
        }
    else:
        data_info = {
            "source": f"BIDS dataset {bids_dir} with references {ref_dir}",
            "images": len(items),
            "kinds": kinds,
        }
    data_info.update(
        {
            "training_images": len(train),
            "validation_images": len(val),
            "training_lesions": n_lesions_train,
            "validation_lesions": n_lesions_val,
            "split": f"by subject, {args.val_fraction:g} validated, stratified by kind, seed {args.seed}",
        }
    )
    command = " ".join([PROG, *(shlex.quote(a) for a in argv_list)])
    write_trained_bundle(out, result, s, data_info, command, ctx.timings, name=args.name)
    log(f"bundle written to {out} in {ctx.timings['total_s'] / 60:.1f} min")
    if summaries:
        (work / "data_summary.json").write_text(json.dumps(summaries, indent=1))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except CMBError as err:
        print(f"{PROG}: {err.format()}", file=sys.stderr)
        if "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv):
            traceback.print_exc()
        code = err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run with --resume to continue", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
