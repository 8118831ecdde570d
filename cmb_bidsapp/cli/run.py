"""Entry point of `cmb-bidsapp`: validate, find inputs, build and run the workflow, report, exit code."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ET", "1")  # Nipype's telemetry check would reach the network
os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")

from ..errors import EXIT_FAILED_IMAGES, EXIT_OK, CMBError, InvalidDatasetError

LOGGER = logging.getLogger("cmb_bidsapp")
_CMB_ERROR_RE = re.compile(r"CMB-ERROR\[(\d+)\] (.+)")
_NODE_RE = re.compile(r"^Node: (.+)$", re.MULTILINE)


@dataclass
class Failure:
    """One image that failed, with the message the user sees."""

    label: str
    message: str
    crashfile: str | None = None


def main(argv: list[str] | None = None) -> int:
    """Console script: returns the exit code of the contract."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a.count("v") for a in argv if re.fullmatch(r"-v+", a)) + argv.count("--verbose")
    _setup_logging(verbose)
    _install_signal_handlers()
    try:
        from .parser import parse_args

        try:
            config = parse_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if config.analysis_level == "group":
            from ..workflows.group import run_group

            return run_group(config)
        return run_participant(config)
    except CMBError as err:
        if verbose:
            traceback.print_exc()
        print(f"cmb-bidsapp: error: {err.format()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, _Terminated) else "interrupted"
        print(
            f"cmb-bidsapp: {what}. Outputs already written are complete; "
            "re-run the same command with the same -w/--work-dir to resume.",
            file=sys.stderr,
        )
        return 143 if isinstance(err, _Terminated) else 130
    except Exception as err:  # a bug: say so in one line, traceback with -v
        if verbose:
            traceback.print_exc()
        print(
            f"cmb-bidsapp: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "Re-run with -v for the traceback and report it at https://github.com/cmb-bidsapp/cmb-bidsapp/issues.",
            file=sys.stderr,
        )
        return EXIT_FAILED_IMAGES


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    LOGGER.setLevel(logging.INFO if verbose == 0 else level)
    for noisy in ("nipype.workflow", "nipype.interface", "nipype.utils", "bids", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    if verbose == 0:
        import warnings

        warnings.filterwarnings("ignore")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_participant(config) -> int:
    """The participant level: every selected image through its workflow; exit 0, 1, 16 or 18."""
    from ..bids import DerivativesWriter, check_dataset, collect_inputs

    t0 = time.monotonic()
    check_dataset(config.bids_dir)
    if not config.skip_bids_validation and not config.reports_only:
        _validate(config)
    inputs, notes = collect_inputs(
        config.bids_dir,
        participant_labels=config.participant_label,
        session_labels=config.session_label,
        input_kind=config.input_kind,
        filters=config.bids_filters,
    )
    for note in notes:
        _say(f"cmb-bidsapp: note: {note}")
    if any(i.kind == "swi" and i.suffix == "swi" for i in inputs):
        _say(
            "cmb-bidsapp: warning: _swi files are not yet in the BIDS specification; they are read anyway."
        )

    writer = DerivativesWriter(config.output_dir, config.bids_dir)
    writer.init_dataset()
    config.log_dir.mkdir(parents=True, exist_ok=True)
    config.save()

    if config.reports_only:
        from ..reports.subject import write_reports

        write_reports(config, inputs, failures={})
        _say(f"cmb-bidsapp: reports regenerated in {config.output_dir}")
        return EXIT_OK

    failures: dict[str, Failure] = {}
    runnable = []
    for image in inputs:
        problem = image.error or _preflight(image)
        if problem is not None:
            failures[image.image_id] = Failure(_label(image), problem)
            _say(f"cmb-bidsapp: error: {_label(image)}: {problem}")
            if config.stop_on_first_crash:
                return _finish(config, inputs, failures, t0)
        else:
            runnable.append(image)

    from ..workflows.base import collect_methods, init_cmb_wf

    # Nipype copies its configuration into every node when the node is created: configure first.
    _configure_nipype(config)
    wf = init_cmb_wf(config, runnable or inputs)
    _write_citation(config, collect_methods(wf))
    if config.boilerplate_only:
        _say(f"cmb-bidsapp: methods text written to {config.output_dir / 'logs' / 'CITATION.md'}")
        return EXIT_OK
    if runnable:
        failures.update(_run_workflow(config, wf, runnable))
    return _finish(config, inputs, failures, t0)


def _label(image) -> str:
    return image.source_name + f" ({image.kind})"


def _validate(config) -> None:
    from ..validation import validate

    result = validate(config.bids_dir)
    if not result.valid:
        raise InvalidDatasetError(
            f"is not a valid BIDS dataset: {result.summary()}",
            path=config.bids_dir,
            fix="Fix these (run bids-validator-deno for details) or pass --skip-bids-validation.",
        )


def _preflight(image) -> str | None:
    """Read every input file now, so that broken files fail before hours of compute."""
    from ..errors import InputError
    from ..preproc.steps import check_input

    try:
        check_input(image)
    except InputError as err:
        return err.format()
    return None


def _write_citation(config, methods: str) -> None:
    from ..io import atomic_write_text
    from ..reports.citation import citation_markdown

    atomic_write_text(config.output_dir / "logs" / "CITATION.md", citation_markdown(methods))


def _configure_nipype(config) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.update_config(
        {
            "execution": {
                "crashdump_dir": str(config.log_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": config.stop_on_first_crash,
                "remove_unnecessary_outputs": False,
                "check_version": False,
                "poll_sleep_duration": 0.1,
                "get_linked_libs": False,
                "hash_method": "timestamp",
            },
            "monitoring": {"enabled": False},
            "logging": {
                "workflow_level": "WARNING" if config.verbose < 2 else "INFO",
                "interface_level": "WARNING",
            },
        }
    )
    nlogging.update_logging(ncfg)


def _run_workflow(config, wf, images) -> dict[str, Failure]:
    from .progress import Progress

    labels = {i.image_id: _label(i) for i in images}
    progress = Progress(config.log_dir, list(labels), labels)
    plugin_args = dict(config.plugin_args)
    plugin_args.setdefault("status_callback", progress)
    if config.plugin == "MultiProc":
        plugin_args.setdefault("n_procs", config.nprocs)
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
        if config.mem_gb:
            plugin_args.setdefault("memory_gb", config.mem_gb)
    if config.plugin.startswith("SLURM"):
        os.environ.setdefault("LOGNAME", os.environ.get("USER", "cmb"))
    _say(
        f"cmb-bidsapp: processing {len(images)} image(s) with the {config.plugin} plugin; work dir {config.work_dir}"
    )
    try:
        wf.run(plugin=config.plugin, plugin_args=plugin_args)
    except RuntimeError:
        # Nipype raises after running everything it could; the failed images are found below
        # from the progress record and the crash files.
        pass
    finally:
        progress.write_timings()
        progress.write_status(final=True)
    failures = {}
    crash_messages = _read_crashfiles(config.log_dir)
    for image in images:
        if image.image_id in progress.done and image.image_id not in progress.failed:
            continue
        message, crashfile = crash_messages.get(image.image_id, (None, None))
        if message is None:
            message = "did not complete (a node crashed or was not run); see the log folder"
        failures[image.image_id] = Failure(_label(image), message, crashfile)
    return failures


def _read_crashfiles(log_dir: Path) -> dict[str, tuple[str, str]]:
    """Map image id → (one-line message, crash file) from Nipype's crash files of this run."""
    from .progress import _IMAGE_RE

    out: dict[str, tuple[str, str]] = {}
    for crash in sorted(Path(log_dir).glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = _NODE_RE.search(text)
        where = node.group(1) if node else ""
        m = _IMAGE_RE.search(where)
        if not m:
            continue
        stage = where.rsplit(".", 1)[-1]
        user = _CMB_ERROR_RE.search(text)
        if user:
            message = user.group(2).strip()
        else:
            last = [
                ln.strip()
                for ln in text.strip().splitlines()
                if re.match(r"^\s*[A-Za-z_.]+(Error|Exception)\b", ln)
                and not ln.strip().startswith(("nipype.", "RuntimeError"))
            ]
            detail = last[-1][:200] if last else "unknown error"
            message = f"failed at stage '{stage}' ({detail}). This looks like a bug: re-run with -v and report it with the crash file."
        out.setdefault(m.group(1), (message, str(crash)))
    return out


def _finish(config, inputs, failures: dict[str, Failure], t0: float) -> int:
    try:
        from ..reports.subject import write_reports

        write_reports(config, inputs, failures={k: f.message for k, f in failures.items()})
    except Exception as err:
        LOGGER.warning("could not write the HTML reports: %s", err)
        if config.verbose:
            traceback.print_exc()
    n = len(inputs)
    elapsed = time.monotonic() - t0
    if failures:
        _say(
            f"cmb-bidsapp: {n - len(failures)} of {n} image(s) processed, {len(failures)} failed ({elapsed:.0f} s):"
        )
        for f in failures.values():
            _say(
                f"  FAILED {f.label}: {f.message}"
                + (f" [crash file: {f.crashfile}]" if f.crashfile and config.verbose else "")
            )
        return EXIT_FAILED_IMAGES
    _say(f"cmb-bidsapp: {n} image(s) processed in {elapsed:.0f} s. Outputs: {config.output_dir}")
    return EXIT_OK
