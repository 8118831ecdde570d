"""Entry point of `cmb-bidsapp`: validate, find inputs, build and run the workflow, report, exit code.

Stopping and resuming: SIGTERM (exit 143) and Ctrl-C/SIGINT (exit 130) stop the run with one
line; the MultiProc pool workers are stopped first (`stop_workers`), so none is left computing.
Workers are forked with PR_SET_PDEATHSIG (`_install_fork_hook`), so that even kill -9 of the app
takes them along. Outputs are published atomically per image by the derivatives writer, so a
stopped or killed run leaves no incomplete visible file; its hidden `.part` files are removed by
the next run (`io.remove_stale_parts`), which resumes from the work directory.
"""

from __future__ import annotations

import contextlib
import errno
import gc
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

_run_start: float | None = None
"""When ``main`` was called: the start of the setup row of ``timings.tsv`` (this module and what
it imports take about 0.05 s; the heavy imports come later, inside the run)."""

LOGGER = logging.getLogger("cmb_bidsapp")
_CMB_ERROR_RE = re.compile(r"CMB-ERROR\[(\d+)\] (.+)")
_NODE_RE = re.compile(r"^Node: (.+)$", re.MULTILINE)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_DISK_RE = re.compile(r"\[Errno (?:28|122|27|30)\] ([^\n:']+)")


@dataclass
class Failure:
    """One image that failed, with the message the user sees."""

    label: str
    message: str
    crashfile: str | None = None


def main(argv: list[str] | None = None) -> int:
    """Console script: returns the exit code of the contract."""
    global _run_start
    _run_start = time.monotonic()
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
        # No second signal while cleaning up; the pool workers go first (or the interpreter
        # would wait for their nodes to finish before exiting).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopped = stop_workers()
        what = "terminated (SIGTERM)" if isinstance(err, _Terminated) else "interrupted (SIGINT)"
        print(
            f"cmb-bidsapp: {what}"
            + (f"; {stopped} worker process(es) stopped" if stopped else "")
            + ". Outputs already written are complete; re-run the same command with the same "
            "-w/--work-dir to resume.",
            file=sys.stderr,
        )
        code = 143 if isinstance(err, _Terminated) else 130
        if stopped:
            # The interpreter would otherwise wait seconds at exit for the broken pool's threads.
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(code)
        return code
    except OSError as err:
        if err.errno not in _DISK_ERRNOS and err.errno not in (errno.EACCES, errno.EPERM):
            return _internal_error(err, verbose)
        if verbose:
            traceback.print_exc()
        fix = (
            "Fix the permissions (or run as a user who may write there)"
            if err.errno in (errno.EACCES, errno.EPERM)
            else "Free disk space (or raise the quota)"
        )
        target = err.filename2 or err.filename or "a file"  # a copy's destination, not source
        print(
            f"cmb-bidsapp: error: {target}: {err.strerror}. {fix} and re-run "
            "the same command with the same -w/--work-dir to resume; no partial output was left.",
            file=sys.stderr,
        )
        return EXIT_FAILED_IMAGES
    except Exception as err:
        return _internal_error(err, verbose)


def _internal_error(err: BaseException, verbose: int) -> int:
    """A bug: say so in one line, with the traceback under -v."""
    if verbose:
        traceback.print_exc()
    detail = str(err).splitlines()[0] if str(err) else ""
    print(
        f"cmb-bidsapp: internal error: {type(err).__name__}: {detail}. Re-run with -v for the "
        "traceback and report it at https://github.com/cmb-bidsapp/cmb-bidsapp/issues.",
        file=sys.stderr,
    )
    return EXIT_FAILED_IMAGES


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


_FORKING_PID = 0


def _before_fork() -> None:
    global _FORKING_PID
    _FORKING_PID = os.getpid()


def _in_forked_worker() -> None:
    """In a process forked by the app (a MultiProc worker): die with the process that forked it.

    PR_SET_PDEATHSIG makes a kill -9 of the app take its workers with it, instead of leaving
    them computing (and writing into the work directory) as orphans. Workers leave SIGTERM and
    SIGINT to the main process, which stops them (see `stop_workers`).
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != _FORKING_PID:  # the parent died before prctl
        os._exit(1)


_FORK_HOOK_INSTALLED = False


def _install_fork_hook() -> None:
    global _FORK_HOOK_INSTALLED
    if not _FORK_HOOK_INSTALLED:
        os.register_at_fork(before=_before_fork, after_in_child=_in_forked_worker)
        _FORK_HOOK_INSTALLED = True


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc; elsewhere the multiprocessing children)."""
    proc = Path("/proc")
    if not proc.is_dir():
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children() if p.pid]
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_workers(timeout: float = 5.0) -> int:
    """Stop every process the app started (MultiProc pool workers): SIGTERM, then SIGKILL.

    Returns how many there were. Called when the app is interrupted, so that no orphan keeps
    computing after the app has said it stopped.
    """
    # The pool reports its dead workers through this logger, with a traceback: not for users.
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)
    pids = _descendants(os.getpid())
    count = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.02)
        if not pids:
            break
    return count


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie child is reaped and counts as stopped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (a grandchild): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
    from ..io import remove_stale_parts

    t0 = _run_start if _run_start is not None else time.monotonic()
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
    # Leftovers of killed runs: at the top, in logs/ (with the run folders, where a killed run
    # may leave its status file half-written) and in the selected subjects' folders only (a
    # cluster array of jobs must not each walk the whole derivatives tree).
    stale = remove_stale_parts(config.output_dir, recursive=False)
    stale += remove_stale_parts(config.output_dir / "logs")
    for subject in sorted({i.subject for i in inputs}):
        stale += remove_stale_parts(config.output_dir / f"sub-{subject}")
    if stale:
        LOGGER.info("removed %d partial file(s) left by a killed run", len(stale))
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
        problem, warnings = (image.error, []) if image.error else _preflight(image)
        for warning in warnings:
            _say(f"cmb-bidsapp: warning: {warning}")
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
    phases = {"setup": time.monotonic() - t0}
    if runnable:
        t_wf = time.monotonic()
        failures.update(_run_workflow(config, wf, runnable))
        phases["workflow"] = time.monotonic() - t_wf
    return _finish(config, inputs, failures, t0, phases)


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


def _preflight(image) -> tuple[str | None, list[str]]:
    """Read every input file now, so that broken files fail before hours of compute.

    Returns (why the image cannot be processed or None, warnings about an image processed anyway).
    """
    from ..errors import InputError
    from ..preproc.steps import check_input

    try:
        return None, check_input(image)
    except InputError as err:
        return err.format(), []


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
                # Without -v the app reports failed nodes itself, in one line each: Nipype's
                # crash reports (with their tracebacks) stay in the crash files.
                "workflow_level": ("CRITICAL", "WARNING")[min(config.verbose, 1)]
                if config.verbose < 2
                else "INFO",
                "interface_level": "WARNING",
            },
        }
    )
    nlogging.update_logging(ncfg)


def _plugin_for(config, n_images: int) -> tuple[str, dict]:
    """The Nipype plugin and its arguments for this run.

    One image is a chain of steps: MultiProc would only add a fresh worker process per step
    (torch and the networks imported again each time) and run nothing in parallel, so unless
    ``--use-plugin`` named a plugin the steps run in this process (``Linear``), each with
    ``--omp-nthreads`` threads. Measured on the 2D T2* benchmark subject on an idle 2-core
    machine: 25.2 s against 30.1 s with one thread (``docs/performance.md``).
    """
    if config.plugin == "MultiProc" and n_images <= 1 and not config.plugin_chosen:
        return "Linear", {}
    return config.plugin, dict(config.plugin_args)


def _run_workflow(config, wf, images) -> dict[str, Failure]:
    from .progress import Progress

    labels = {i.image_id: _label(i) for i in images}
    progress = Progress(config.log_dir, list(labels), labels)
    plugin, plugin_args = _plugin_for(config, len(images))
    plugin_args.setdefault("status_callback", _TolerantCallback(progress))
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", config.nprocs)
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
        if config.mem_gb:
            plugin_args.setdefault("memory_gb", config.mem_gb)
    if plugin.startswith("SLURM"):
        os.environ.setdefault("LOGNAME", os.environ.get("USER", "cmb"))
    _say(
        f"cmb-bidsapp: processing {len(images)} image(s) with the {plugin} plugin"
        f" ({config.omp_nthreads} thread(s) per step); work dir {config.work_dir}"
    )
    _install_fork_hook()
    # Nipype's MultiProc calls gc.collect() at every poll (0.1 s) while a job waits for a free
    # processor; with torch and the graph loaded that took 0.15 s each time, most of a core
    # (--nprocs 2 ran 1.5 times slower). Frozen objects are skipped by the collector.
    gc.collect()
    gc.freeze()
    interrupted = False
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except RuntimeError:
        # Nipype raises after running everything it could; the failed images are found below
        # from the progress record and the crash files.
        pass
    finally:
        with contextlib.suppress(OSError):
            progress.write_timings()
            progress.write_status(final=not interrupted)
    failures = {}
    crash_messages = _read_crashfiles(config.log_dir)
    for image in images:
        if image.image_id in progress.done and image.image_id not in progress.failed:
            continue
        message, crashfile = crash_messages.get(image.image_id, (None, None))
        if message is None:
            message = "did not complete (a node crashed or was not run); see the log folder"
        source = str(image.files[0])
        if Path(source).name not in message and not message.startswith("/"):
            message = f"{source}: {message}"  # name the file, as every message should
        failures[image.image_id] = Failure(_label(image), message, crashfile)
    return failures


class _TolerantCallback:
    """The progress callback, which must never stop the run (a full disk for the status file)."""

    def __init__(self, progress):
        self.progress = progress
        self.warned = False
        self.crashed: set[int] = set()

    def __call__(self, node, status: str) -> None:
        # Nipype reports a node run in the main process (the sink) as 'exception' and then 'end':
        # the 'end' of a crashed node must not count its image as done.
        if status == "exception":
            self.crashed.add(id(node))
        elif status == "end" and id(node) in self.crashed:
            return
        try:
            self.progress(node, status)
        except OSError as err:
            if not self.warned:
                self.warned = True
                LOGGER.warning("could not update the status file: %s", err)


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
        disk = _DISK_RE.search(text)
        if user:
            message = user.group(2).strip()
        elif disk:
            message = (
                f"ran out of disk space at stage '{stage}' ({disk.group(1).strip()}). Free space "
                "in the work directory and OUTPUT_DIR (or raise the quota), then re-run with the "
                "same -w to resume"
            )
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


def _add_run_timings(path: Path, phases: dict[str, float]) -> None:
    """Append the run's phases to ``timings.tsv`` as rows of the image ``(run)``.

    ``setup``: start-up, validation, indexing, pre-flight reads and the graph; ``workflow``: every
    stage of every image; ``reports``: the HTML reports; ``total``: all of it.
    """
    from ..io import atomic_write_text

    text = path.read_text() if path.is_file() else "image\tstage\tseconds\n"
    rows = "".join(f"(run)\t{stage}\t{seconds:.2f}\n" for stage, seconds in phases.items())
    atomic_write_text(path, text + rows)


def _finish(
    config, inputs, failures: dict[str, Failure], t0: float, phases: dict[str, float] | None = None
) -> int:
    t_reports = time.monotonic()
    try:
        from ..reports.subject import write_reports

        write_reports(config, inputs, failures={k: f.message for k, f in failures.items()})
    except Exception as err:
        LOGGER.warning("could not write the HTML reports: %s", err)
        if config.verbose:
            traceback.print_exc()
    if phases is not None:
        phases["reports"] = time.monotonic() - t_reports
        phases["total"] = time.monotonic() - t0
        with contextlib.suppress(OSError):
            _add_run_timings(config.log_dir / "timings.tsv", phases)
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
