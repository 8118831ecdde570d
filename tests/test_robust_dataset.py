"""Dataset-level hostile inputs, fast (no workflow runs): each gives the contract's exit code, one
line naming the folder or file and the fix, no traceback, and nothing written in OUTPUT_DIR."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from bidsfactory import GRE, make_dataset
from corpus import run_app, unprivileged_prefix

from cmb_bidsapp.cli.run import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T2starw.nii.gz": GRE,
            "sub-02/anat/sub-02_T2starw.nii.gz": GRE,
        },
    )


def _one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("cmb-bidsapp: error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, err)


def _only_description(root):
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "e", "BIDSVersion": "1.10.0"}')
    return root


CASES = {
    # name: (make the dataset (tmp_path, dataset) -> BIDS_DIR, extra args, exit code, words)
    "not BIDS (no description, only images)": (
        lambda t, d: (d / "dataset_description.json").unlink() or d,
        [],
        16,
        ("no dataset_description.json", "root of a BIDS dataset"),
    ),
    "description is not JSON": (
        lambda t, d: (d / "dataset_description.json").write_text("{oops") and d,
        [],
        16,
        ("dataset_description.json", "not valid JSON", "Fix its JSON syntax"),
    ),
    "description is a JSON list": (
        lambda t, d: (d / "dataset_description.json").write_text("[1, 2]") and d,
        [],
        16,
        ("lacks the required keys", "BIDSVersion"),
    ),
    "description without BIDSVersion": (
        lambda t, d: (d / "dataset_description.json").write_text('{"Name": "x"}') and d,
        [],
        16,
        ("lacks the required keys Name and BIDSVersion",),
    ),
    "description is a folder": (
        lambda t, d: (
            (d / "dataset_description.json").unlink()
            or (d / "dataset_description.json").mkdir()
            or d
        ),
        [],
        16,
        ("dataset_description.json", "IsADirectoryError"),
    ),
    "empty dataset": (
        lambda t, d: _only_description(t / "empty"),
        [],
        18,
        ("contains no subject folder",),
    ),
    "subjects without any usable image": (
        lambda t, d: make_dataset(t / "t1", {"sub-01/anat/sub-01_T1w.nii.gz": None}),
        ["--skip-bids-validation"],
        18,
        ("contains no input image", "_T2starw"),
    ),
    "participant label not there": (
        lambda t, d: d,
        ["--participant-label", "sub-99", "03"],
        18,
        ("has no participant(s) sub-99, sub-03", "Available: sub-01, sub-02"),
    ),
    "session label not there": (
        lambda t, d: d,
        ["--session-label", "pre"],
        18,
        ("sessions pre",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dataset_level_case(case, tmp_path, dataset, capsys):
    make, extra, code, words = CASES[case]
    bids = make(tmp_path, dataset)
    out = tmp_path / "out"
    got, err = run([bids, out, "participant", "-w", tmp_path / "w", *extra], capsys)
    assert got == code, err
    _one_line_error(err, *words)
    assert not out.exists()  # nothing written at all


def test_output_inside_the_input_dataset(tmp_path, dataset, capsys):
    for out, words in (
        (dataset, ("OUTPUT_DIR is BIDS_DIR",)),
        (dataset / "sub-01" / "out", ("inside BIDS_DIR", "derivatives/")),
        (dataset / "out", ("inside BIDS_DIR", "derivatives/")),
    ):
        code, err = run([dataset, out, "participant", "-w", tmp_path / "w"], capsys)
        assert code == 64, err
        _one_line_error(err, *words)
    assert not (dataset / "out").exists() and not (dataset / "sub-01" / "out").exists()
    code, err = run(
        [dataset, tmp_path / "o", "participant", "-w", dataset / "derivatives" / "w"], capsys
    )
    assert code == 64 and "work directory is inside BIDS_DIR" in err


def test_output_is_a_file(tmp_path, dataset, capsys):
    target = tmp_path / "out"
    target.write_text("not a folder")
    code, err = run([dataset, target / "x", "participant", "-w", tmp_path / "w"], capsys)
    assert code == 64, err
    _one_line_error(err, "OUTPUT_DIR is not a folder")


def test_output_not_writable(tmp_path, dataset):
    """A read-only parent folder; as root the check is made real by dropping the capabilities."""
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run the app without root's file permissions here")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = run_app(dataset, locked / "out", "participant", "-w", tmp_path / "w", prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 64, proc.stderr
    _one_line_error(proc.stderr, "OUTPUT_DIR is not writable", str(locked), "bind it read-write")
    assert not (locked / "out").exists()
    locked.chmod(0o555)
    try:
        proc = run_app(dataset, tmp_path / "o", "participant", "-w", locked / "w", prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 64, proc.stderr
    _one_line_error(proc.stderr, "the work directory is not writable", str(locked))
    assert not (tmp_path / "o").exists()


def test_every_image_broken_exits_1_and_lists_them(tmp_path, dataset, capsys):
    for sub in ("01", "02"):
        (dataset / f"sub-{sub}" / "anat" / f"sub-{sub}_T2starw.nii.gz").write_bytes(b"\x1f\x8b")
    out = tmp_path / "out"
    args = [dataset, out, "participant", "-w", tmp_path / "w", "--skip-bids-validation"]
    code, err = run(args, capsys)
    assert code == 1, err
    assert "0 of 2 image(s) processed, 2 failed" in err and "Traceback" not in err
    failed = [ln for ln in err.splitlines() if ln.startswith("  FAILED ")]
    assert len(failed) == 2 and all("truncated" in ln or "gzip" in ln for ln in failed)
    assert not list(out.rglob("*.nii.gz")) and not list(out.rglob("*_counts.tsv"))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


def test_stop_on_first_crash_stops_at_the_first_broken_image(tmp_path, dataset, capsys):
    (dataset / "sub-01" / "anat" / "sub-01_T2starw.nii.gz").write_bytes(b"")
    args = [dataset, tmp_path / "out", "participant", "-w", tmp_path / "w"]
    code, err = run([*args, "--skip-bids-validation", "--stop-on-first-crash"], capsys)
    assert code == 1 and "is empty (0 bytes)" in err
    assert "sub-02" not in err.split("FAILED", 1)[-1]


def test_unreadable_description(tmp_path, dataset):
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run the app without root's file permissions here")
    (dataset / "dataset_description.json").chmod(0)
    proc = run_app(dataset, tmp_path / "out", "participant", "-w", tmp_path / "w", prefix=prefix)
    assert proc.returncode == 16, proc.stderr
    _one_line_error(proc.stderr, "dataset_description.json", "PermissionError")


def test_unprivileged_prefix_really_drops_read_rights(tmp_path):
    prefix = unprivileged_prefix()
    if not prefix:
        pytest.skip("not root, or no setpriv")
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    assert subprocess.run([*prefix, "cat", str(secret)], capture_output=True).returncode != 0
    assert os.access(secret, os.R_OK)  # while this (root) process still could


def test_unreadable_folder(tmp_path, dataset):
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run the app without root's file permissions here")
    folder = dataset / "sub-02" / "anat"
    folder.chmod(0)
    try:
        proc = run_app(
            dataset, tmp_path / "out", "participant", "-w", tmp_path / "w", prefix=prefix
        )
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 16, proc.stderr
    _one_line_error(proc.stderr, str(folder), "permission denied", "chmod -R a+rX")
