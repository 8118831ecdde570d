"""Entry point of `cmb-bidsapp-synth`: write a simulated BIDS cohort with reference masks.

Usage::

    cmb-bidsapp-synth OUT_DIR --n-subjects N --seed S [--kinds mix|swi,t2starw,megre,qsm]
                      [--size small|full] [--skull-fraction F] [--preview] [--jobs J]
                      [--overwrite] [-v]

Writes a raw BIDS dataset in OUT_DIR and the reference (microbleed masks, lesion and mimic
tables, true brain masks) in OUT_DIR/derivatives/reference; see
:mod:`cmb_bidsapp.synth.bids_writer`. The same arguments give byte-identical files.

Exit codes: 0 written, 1 a subject failed, 64 bad usage (including a non-empty OUT_DIR that
is not a previous cmb-bidsapp-synth output, unless --overwrite).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from .. import __version__
from ..errors import EXIT_FAILED_IMAGES, EXIT_OK, EXIT_USAGE, CMBError, UsageError

PROG = "cmb-bidsapp-synth"


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's exit code 64 for bad usage (instead of 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _kinds(text: str) -> list[str]:
    from ..synth.cohort import parse_kinds

    try:
        return parse_kinds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Write a simulated BIDS dataset (SWI, T2*-GRE, multi-echo GRE, QSM) with "
        "cerebral microbleeds, mimics and reference masks in derivatives/reference.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output folder (raw BIDS root)")
    p.add_argument(
        "--n-subjects", "--n_subjects", type=_positive_int, required=True, help="number of subjects"
    )
    p.add_argument("--seed", type=_seed, required=True, help="random seed (integer >= 0)")
    p.add_argument(
        "--kinds",
        type=_kinds,
        default=_kinds("mix"),
        help="mix (the four kinds, balanced) or a comma-separated list of swi, t2starw, megre, "
        "qsm (default: mix)",
    )
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="full",
        help="small: coarse grids for tests and the demo (about 3 s a subject); full: "
        "realistic grids (about 30 s a subject). Default: full",
    )
    p.add_argument(
        "--skull-fraction",
        "--skull_fraction",
        type=_fraction,
        default=0.5,
        help="share of subjects with scalp and skull (the others skull-stripped); default 0.5",
    )
    p.add_argument(
        "--preview",
        action="store_true",
        help="write one PNG per subject in derivatives/reference/figures/",
    )
    p.add_argument("--jobs", type=_positive_int, default=1, help="subjects simulated in parallel")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR that is not a previous cmb-bidsapp-synth output",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    from ..synth.bids_writer import is_synth_output

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError("is a file, not a folder", path=out_dir, fix="Give a folder for OUT_DIR.")
    if (
        out_dir.is_dir()
        and any(out_dir.iterdir())
        and not overwrite
        and not is_synth_output(out_dir)
    ):
        raise UsageError(
            "is not empty and is not a previous cmb-bidsapp-synth output",
            path=out_dir,
            fix="Choose an empty or new folder, or pass --overwrite to write into it anyway.",
        )


def main(argv: list[str] | None = None) -> int:
    """Console script: returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _check_out_dir(args.out_dir, args.overwrite)
        from ..synth.cohort import write_cohort

        start = time.perf_counter()

        def progress(done: int, total: int, row: dict) -> None:
            print(
                f"[{done}/{total}] {row['participant_id']} {row['input_kind']} "
                f"({row['n_microbleeds']} microbleeds, {row['_seconds']:.1f} s; "
                f"elapsed {time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

        write_cohort(
            args.out_dir,
            args.n_subjects,
            args.seed,
            kinds=args.kinds,
            size=args.size,
            skull_fraction=args.skull_fraction,
            preview=args.preview,
            jobs=args.jobs,
            progress=progress,
        )
    except CMBError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {err.format()}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if args.verbose:
            traceback.print_exc()
        print(
            f"{PROG}: error: {err.filename or args.out_dir}: {err.strerror or err}. "
            "Check the folder is writable and the disk is not full.",
            file=sys.stderr,
        )
        return EXIT_FAILED_IMAGES
    except Exception as err:
        traceback.print_exc() if args.verbose else None
        print(
            f"{PROG}: error: simulation failed ({type(err).__name__}: {err}). "
            "Re-run with -v for the traceback and report it.",
            file=sys.stderr,
        )
        return EXIT_FAILED_IMAGES
    print(f"{PROG}: wrote {args.n_subjects} subjects to {args.out_dir}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
