"""Command line of `cmb-bidsapp`: argv to a `Config`; bad usage exits 64 with a one-line message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..bids import INPUT_KINDS, load_filters, strip_label
from ..config import Config
from ..errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise `UsageError` (exit 64) instead of exiting with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message[0].upper() + message[1:], fix=f"See `{self.prog} --help`.")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = (
            float(value.lower().rstrip("gb").rstrip("g"))
            if isinstance(value, str)
            else float(value)
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {value!r}")
    return number


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already says its default or
    there is nothing to say (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs through sphinx-argparse)."""
    parser = _Parser(
        prog="cmb-bidsapp",
        description=(
            "Detect cerebral microbleeds on SWI, T2*-weighted GRE, multi-echo GRE or QSM images of "
            "a BIDS dataset, and write BIDS-Derivatives: probability map, lesion mask, lesion table "
            "with MARS regions, counts and an HTML QC report per subject."
        ),
        formatter_class=_DefaultsFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("bids_dir", type=Path, help="the root of the raw BIDS dataset (read only)")
    parser.add_argument(
        "output_dir",
        type=Path,
        help="the root of the derivatives dataset to write (created if absent)",
    )
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: process subjects; group: summarise what participant wrote",
    )

    g = parser.add_argument_group("Selecting inputs")
    g.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        default=[],
        help="subjects to process, with or without the 'sub-' prefix (default: all)",
    )
    g.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        default=[],
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    g.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        type=Path,
        metavar="FILE",
        help='JSON of pybids filters per input kind, e.g. {"swi": {"acquisition": "highres"}}',
    )
    g.add_argument(
        "--input-kind",
        "--input_kind",
        choices=["auto", *INPUT_KINDS],
        default="auto",
        help="which image to detect on; 'auto' picks one per session in the order "
        + ", ".join(INPUT_KINDS),
    )

    g = parser.add_argument_group("Resources and execution")
    g.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        type=Path,
        metavar="DIR",
        help="Nipype working directory; re-running with the same one resumes "
        "(default: a 'work' folder in the current directory)",
    )
    g.add_argument(
        "--nprocs",
        "--n-cpus",
        "--n_cpus",
        type=_positive_int,
        metavar="N",
        help="processes to run at once (default: all available CPUs); a single image runs its "
        "steps one after another in the app's own process, each with --omp-nthreads threads",
    )
    g.add_argument(
        "--omp-nthreads",
        "--omp_nthreads",
        type=_positive_int,
        metavar="N",
        help="threads per process for torch, SimpleITK and FFTs (default: min(nprocs, 8))",
    )
    g.add_argument(
        "--mem",
        "--mem-gb",
        "--mem_gb",
        type=_positive_float,
        metavar="GB",
        help="memory available to the run, in GB",
    )
    g.add_argument(
        "--use-plugin",
        "--use_plugin",
        type=Path,
        metavar="FILE",
        help="Nipype plugin settings (YAML), e.g. 'plugin: SLURM' with 'plugin_args'",
    )
    g.add_argument(
        "--stop-on-first-crash",
        "--stop_on_first_crash",
        action="store_true",
        help="stop at the first image that fails instead of processing the others",
    )

    g = parser.add_argument_group("Processing")
    g.add_argument(
        "--skull-strip",
        "--skull_strip",
        choices=["auto", "force", "skip"],
        default="auto",
        help="brain extraction: 'auto' detects inputs that are already brain-extracted",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the networks run ('auto': CUDA when available)",
    )
    g.add_argument(
        "--models-dir",
        "--models_dir",
        type=Path,
        metavar="DIR",
        help="a model bundle written by cmb-bidsapp-train, instead of the default weights",
    )
    g.add_argument(
        "--threshold",
        type=_probability,
        metavar="P",
        help="probability threshold of the final mask (default: the model card's operating point)",
    )

    g = parser.add_argument_group("Other")
    g.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not validate BIDS_DIR with the BIDS validator",
    )
    g.add_argument(
        "--reports-only",
        "--reports_only",
        action="store_true",
        help="only regenerate the HTML reports from existing derivatives",
    )
    g.add_argument(
        "--boilerplate-only",
        "--boilerplate_only",
        action="store_true",
        help="only write the methods text (logs/CITATION.md) and exit",
    )
    g.add_argument("--version", action="version", version=f"cmb-bidsapp {__version__}")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output; -v also shows tracebacks",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse argv into a checked `Config`, or raise `UsageError` (exit 64)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)

    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise UsageError(
            "BIDS_DIR does not exist",
            path=bids_dir,
            fix="Check the path (and the bind mounts in a container).",
        )
    if not bids_dir.is_dir():
        raise UsageError(
            "BIDS_DIR is not a folder", path=bids_dir, fix="Give the dataset's root folder."
        )
    if output_dir == bids_dir:
        raise UsageError(
            "OUTPUT_DIR is BIDS_DIR: the app never writes into the raw dataset",
            path=output_dir,
            fix="Choose another OUTPUT_DIR, e.g. <BIDS_DIR>/derivatives/cmb-bidsapp.",
        )
    if bids_dir in output_dir.parents and (bids_dir / "derivatives") not in [
        output_dir,
        *output_dir.parents,
    ]:
        raise UsageError(
            "OUTPUT_DIR is inside BIDS_DIR but not under its derivatives/ folder",
            path=output_dir,
            fix="Write outside the raw dataset or under <BIDS_DIR>/derivatives/.",
        )
    _check_writable(output_dir)

    work_dir = (opts.work_dir or Path.cwd() / "work").expanduser().resolve()
    if work_dir == output_dir or output_dir in work_dir.parents:
        raise UsageError(
            "the work directory is inside OUTPUT_DIR, which would pollute the derivatives",
            path=work_dir,
            fix="Choose a work directory outside OUTPUT_DIR with -w.",
        )
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(
            "the work directory is inside BIDS_DIR: the app never writes into the raw dataset",
            path=work_dir,
            fix="Choose a work directory outside BIDS_DIR with -w.",
        )
    if opts.analysis_level == "participant" and not opts.reports_only:
        _check_writable(work_dir, "the work directory")

    ncpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    nprocs = opts.nprocs or ncpus
    omp = opts.omp_nthreads or min(nprocs, 8)

    plugin, plugin_args = ("MultiProc" if nprocs > 1 else "Linear"), {}
    if opts.use_plugin is not None:
        plugin, plugin_args = _read_plugin(opts.use_plugin)

    filters = load_filters(opts.bids_filter_file) if opts.bids_filter_file else {}
    if opts.models_dir is not None and not opts.models_dir.is_dir():
        raise UsageError(
            "the models directory does not exist",
            path=opts.models_dir,
            fix="Give the folder written by cmb-bidsapp-train.",
        )

    return Config(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        participant_label=[strip_label(p, "sub") for p in opts.participant_label],
        session_label=[strip_label(s, "ses") for s in opts.session_label],
        bids_filters=filters,
        bids_filter_file=opts.bids_filter_file.resolve() if opts.bids_filter_file else None,
        input_kind=opts.input_kind,
        work_dir=work_dir,
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_gb=opts.mem,
        plugin=plugin,
        plugin_args=plugin_args,
        plugin_chosen=opts.use_plugin is not None,
        skull_strip=opts.skull_strip,
        device=opts.device,
        models_dir=opts.models_dir.resolve() if opts.models_dir else None,
        threshold=opts.threshold,
        skip_bids_validation=opts.skip_bids_validation,
        reports_only=opts.reports_only,
        boilerplate_only=opts.boilerplate_only,
        stop_on_first_crash=opts.stop_on_first_crash,
        verbose=opts.verbose,
        command=["cmb-bidsapp", *argv],
    )


def _check_writable(folder: Path, what: str = "OUTPUT_DIR") -> None:
    """Refuse (exit 64) a folder that is not one, or that the user cannot create or write."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} is not a folder", path=probe, fix="Choose a folder path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what} is not writable",
            path=probe,
            fix="Choose a folder you can write to (in a container, bind it read-write).",
        )


def _read_plugin(path: Path) -> tuple[str, dict]:
    import yaml

    try:
        settings = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            "the plugin settings file does not exist", path=path, fix="Check the path."
        ) from None
    except yaml.YAMLError as err:
        raise UsageError(
            f"is not valid YAML ({str(err).splitlines()[0]})", path=path, fix="Fix its syntax."
        ) from None
    if not isinstance(settings, dict) or "plugin" not in settings:
        raise UsageError(
            "must be a YAML mapping with a 'plugin' key",
            path=path,
            fix="For example:\n  plugin: SLURM\n  plugin_args: {sbatch_args: '-t 30 --mem=4G'}",
        )
    import nipype.pipeline.plugins as plugins

    name = str(settings["plugin"])
    if not hasattr(plugins, f"{name}Plugin"):
        known = sorted(
            k[: -len("Plugin")] for k in dir(plugins) if k.endswith("Plugin") and k != "Plugin"
        )
        raise UsageError(
            f"names an unknown Nipype plugin {name!r}",
            path=path,
            fix=f"Use one of {', '.join(known)}.",
        )
    args = settings.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError("'plugin_args' must be a mapping", path=path, fix="Fix the YAML.")
    return name, args
