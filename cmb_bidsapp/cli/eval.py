"""Entry point of `cmb-bidsapp-eval`: lesion-wise scores of a derivatives dataset against references.

Usage::

    cmb-bidsapp-eval DERIV_DIR REFERENCE_DIR [--match-mm 3] [--match {both,distance,overlap}]
                     [--participant-label L ...] [--session-label S ...]
                     [--threshold P] [--out-prefix PATH] [-v]

Writes `<prefix>.tsv` (one row per scored image, then a `total` row), `<prefix>.json` (totals,
per-MARS-class and per-input-kind figures, settings, missing predictions, failures, per-image
matches) and `<prefix>_lesions.tsv` (one row per reference and predicted lesion, with its match),
and prints a table. The default prefix is `DERIV_DIR/eval/cmb_eval`; when it lies inside a
derivatives dataset, its folder is added to that dataset's `.bidsignore`.

Exit codes: 0 scored (missing predictions count as empty and are listed), 1 some predictions
could not be scored (listed; the others are still written), 18 no reference mask selected,
64 bad usage. The scoring rules are in :mod:`cmb_bidsapp.evaluation`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_FAILED_IMAGES, EXIT_OK, EXIT_USAGE, CMBError, UsageError
from ..evaluation import MATCH_MODES, Scores, score_dirs
from ..io import atomic_write_json, atomic_write_text

PROG = "cmb-bidsapp-eval"


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's exit code 64 for bad usage (instead of 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Score predicted microbleed masks lesion-wise against reference masks "
        "(26-connected components, one-to-one matching by centre distance and/or overlap).",
    )
    p.add_argument("deriv_dir", type=Path, metavar="DERIV_DIR", help="the app's output dataset")
    p.add_argument(
        "reference_dir",
        type=Path,
        metavar="REFERENCE_DIR",
        help="derivatives dataset with reference <source>_label-CMB_mask.nii.gz files",
    )
    p.add_argument(
        "--match-mm",
        "--match_mm",
        type=_positive_float,
        default=3.0,
        help="largest distance between lesion centres of mass for a match, in mm (default 3)",
    )
    p.add_argument(
        "--match",
        choices=MATCH_MODES,
        default="both",
        help="what makes a candidate match: 'distance' (centres within --match-mm), "
        "'overlap' (a shared voxel) or 'both' (either; default)",
    )
    p.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="subjects to score, with or without 'sub-' (default all)",
    )
    p.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        help="sessions to score, with or without 'ses-' (default all)",
    )
    p.add_argument(
        "--threshold",
        type=_probability,
        default=None,
        metavar="P",
        help="score <source>_label-CMB_probseg >= P instead of the binary mask",
    )
    p.add_argument(
        "--out-prefix",
        "--out_prefix",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write PATH.tsv, PATH.json, PATH_lesions.tsv (default DERIV_DIR/eval/cmb_eval)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def to_tsv(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a BIDS-style TSV (`n/a` for undefined, booleans as 1/0)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["\t".join(cols)]
    lines += ["\t".join(_cell(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, width: int) -> str:
    text = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    return text.rjust(width)


def format_table(scores: Scores) -> str:
    """The printed summary: one line per image, the total, then per class, kind and subject."""
    cols = [
        ("participant_id", 15),
        ("session_id", 11),
        ("kind", 8),
        ("prediction", 11),
        ("n_ref", 6),
        ("n_pred", 7),
        ("tp", 5),
        ("fp", 5),
        ("fn", 5),
        ("sensitivity", 12),
        ("precision", 10),
        ("f1", 7),
    ]
    out = ["".join(name.rjust(w) for name, w in cols)]
    rows = scores.rows()
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            out.append("-" * sum(w for _, w in cols))
        out.append("".join(_fmt(row.get(name), w) for name, w in cols))
    t = scores.totals()
    out.append("")
    out.append(
        f"FP per subject {_fmt(t['fp_per_subject'], 0)}   mean |count difference| "
        f"{_fmt(t['mean_abs_count_difference'], 0)}   subject present/absent: accuracy "
        f"{_fmt(t['subject_accuracy'], 0)}, balanced accuracy "
        f"{_fmt(t['subject_balanced_accuracy'], 0)}, AUC {_fmt(t['subject_auc'], 0)}"
    )
    out.append(
        "sensitivity per MARS class: "
        + ", ".join(
            f"{c} {_fmt(v['sensitivity'], 0)} ({v['tp']}/{v['n_ref']})"
            for c, v in scores.per_class().items()
        )
    )
    out.append(
        "per input kind: "
        + ", ".join(
            f"{k} sensitivity {_fmt(v['sensitivity'], 0)} ({v['tp']}/{v['tp'] + v['fn']}), "
            f"FP/subject {_fmt(v['fp_per_subject'], 0)}"
            for k, v in scores.per_kind().items()
        )
    )
    if scores.missing_predictions:
        out.append(
            f"{len(scores.missing_predictions)} missing prediction(s), scored as empty: "
            + ", ".join(scores.missing_predictions)
        )
    for f in scores.failed:
        out.append(f"FAILED {f['reference']}: {f['error']}")
    return "\n".join(out)


def _ignore_in_dataset(deriv_dir: Path, out_prefix: Path) -> None:
    """Add the evaluation outputs' folder to DERIV_DIR/.bidsignore, if inside a BIDS dataset."""
    if not (deriv_dir / "dataset_description.json").is_file():
        return
    try:
        rel = out_prefix.resolve().relative_to(deriv_dir.resolve())
    except ValueError:
        return
    # a bare folder name: with "NAME/" the validator still reports the folder itself
    pattern = rel.parts[0] if len(rel.parts) > 1 else f"{rel.name}*"
    ignore = deriv_dir / ".bidsignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.is_file() else []
    if pattern not in lines:
        atomic_write_text(ignore, "\n".join([*lines, pattern]) + "\n")


def write_outputs(scores: Scores, out_prefix: Path) -> list[Path]:
    """Write `<prefix>.tsv`, `<prefix>.json` and `<prefix>_lesions.tsv` atomically."""
    tsv = out_prefix.with_name(out_prefix.name + ".tsv")
    js = out_prefix.with_name(out_prefix.name + ".json")
    les = out_prefix.with_name(out_prefix.name + "_lesions.tsv")
    atomic_write_text(tsv, to_tsv(scores.rows()))
    data = scores.to_dict()
    data["settings"]["version"] = __version__
    atomic_write_json(js, data)
    lesion_rows = scores.lesion_rows()
    atomic_write_text(les, to_tsv(lesion_rows) if lesion_rows else "origin\n")
    return [tsv, js, les]


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `cmb-bidsapp-eval`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        scores = score_dirs(
            args.deriv_dir,
            args.reference_dir,
            match_mm=args.match_mm,
            match=args.match,
            participant_label=args.participant_label,
            session_label=args.session_label,
            threshold=args.threshold,
        )
        out_prefix = args.out_prefix or args.deriv_dir / "eval" / "cmb_eval"
        if out_prefix.is_dir():
            raise UsageError("--out-prefix is a folder", path=out_prefix, fix="Give PATH/name.")
        paths = write_outputs(scores, out_prefix)
        _ignore_in_dataset(args.deriv_dir, out_prefix)
    except CMBError as err:
        if args.verbose:
            traceback.print_exc()
        where = f"{err.path}: " if err.path else ""
        sys.stderr.write(f"{PROG}: {where}{err.message}.\n")
        if err.fix:
            sys.stderr.write(f"{PROG}: {err.fix}\n")
        return err.exit_code
    print(format_table(scores))
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_FAILED_IMAGES if scores.failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
