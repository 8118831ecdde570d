"""The writer under crashes and full disks, fast: a killed transaction publishes nothing, its hidden
`.part` files are recognised as stale (and only they), and a full disk names the output file."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cmb_bidsapp.bids import DerivativesWriter, InputImage
from cmb_bidsapp.io import atomic_write_bytes, part_file, remove_stale_parts

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from cmb_bidsapp.bids import DerivativesWriter, InputImage
    out = sys.argv[1]
    image = InputImage("01", None, "t2starw", [], entities={"subject": "01"}, suffix="T2starw")
    writer = DerivativesWriter(out)
    with writer.transaction():
        writer.write_nifti(image, np.ones((4, 4, 4)), np.eye(4), "mask", desc="brain",
                           dtype=np.uint8)
        print("staged", flush=True)
        if sys.argv[2] == "hang":
            time.sleep(600)
    print("published", flush=True)
    """
)


def _writer(out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), mode], stdout=subprocess.PIPE, text=True
    )


def _visible(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def test_killed_transaction_publishes_nothing_and_its_parts_are_stale(tmp_path):
    out = tmp_path / "out"
    proc = _writer(out, "hang")
    assert proc.stdout.readline().strip() == "staged"
    parts = sorted(out.rglob(".*.part"))
    assert len(parts) == 2  # the image and its sidecar, hidden, not yet in place
    assert _visible(out) == []
    assert remove_stale_parts(out) == []  # the writer is alive: its files are in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _visible(out) == []  # killed before publishing: nothing that looks finished
    assert sorted(remove_stale_parts(out)) == parts
    assert not list(out.rglob("*.part"))
    proc = _writer(out, "finish")
    assert proc.communicate()[0].split() == ["staged", "published"]
    names = _visible(out)
    assert names == [
        "sub-01/anat/sub-01_desc-brain_mask.json",
        "sub-01/anat/sub-01_desc-brain_mask.nii.gz",
    ]


def test_parts_of_other_hosts_are_kept_until_old(tmp_path):
    fd, part = part_file(tmp_path / "x.tsv")
    other = tmp_path / ".y.tsv.elsewhere@4026531836@1.abcd.part"
    other.write_text("x")
    assert remove_stale_parts(tmp_path) == []  # ours (alive) and another machine's (fresh)
    old = time.time() - 7200
    os.close(fd)
    os.utime(other, (old, old))
    assert remove_stale_parts(tmp_path) == [other]
    assert part.exists()


def _fsize_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_full_disk_in_a_transaction_names_the_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from cmb_bidsapp.bids import DerivativesWriter, InputImage
        image = InputImage("01", None, "t2starw", [], entities={"subject": "01"},
                           suffix="T2starw")
        writer = DerivativesWriter(sys.argv[1])
        rng = np.random.default_rng(0)
        try:
            with writer.transaction():
                writer.write_nifti(image, np.ones((4, 4, 4)), np.eye(4), "mask", desc="brain",
                                   dtype=np.uint8)
                writer.write_nifti(image, rng.random((64, 64, 64)), np.eye(4), "T2starw",
                                   desc="preproc")
        except OSError as err:
            print(err.errno, err.filename)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_fsize_limit(64 * 1024),
    )
    errno_, filename = proc.stdout.split()
    assert int(errno_) == 27 and filename.endswith("sub-01_desc-preproc_T2starw.nii.gz")
    assert _visible(out) == [] and not list(out.rglob("*.part"))


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path):
    path = tmp_path / "table.tsv"
    atomic_write_bytes(path, b"a\tb\n1\t2\n")
    script = (
        "import sys; from cmb_bidsapp.io import atomic_write_bytes\n"
        "try: atomic_write_bytes(sys.argv[1], b'x' * 100000)\n"
        "except OSError as err: print(err.filename)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        preexec_fn=_fsize_limit(4096),
    )
    assert proc.stdout.strip() == str(path)
    assert path.read_bytes() == b"a\tb\n1\t2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]


def test_concurrent_init_dataset_is_consistent(tmp_path):
    """Eight writers create the same derivative dataset at once: one valid description."""
    out = tmp_path / "out"
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    script = (
        "import sys; from cmb_bidsapp.bids import DerivativesWriter\n"
        "for _ in range(20): DerivativesWriter(sys.argv[1], sys.argv[2]).init_dataset()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(out), str(bids)]) for _ in range(8)
    ]
    assert all(p.wait() == 0 for p in procs)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["SourceDatasets"][0]["Name"] == "x"
    assert "*_desc-CMB_counts.tsv" in (out / ".bidsignore").read_text().splitlines()
    assert not list(out.rglob("*.part"))


@pytest.mark.parametrize("n", [3])
def test_writer_output_bytes_are_reproducible(tmp_path, n):
    image = InputImage("01", None, "t2starw", [], entities={"subject": "01"}, suffix="T2starw")
    blobs = set()
    for i in range(n):
        writer = DerivativesWriter(tmp_path / f"o{i}")
        with writer.transaction():
            path = writer.write_nifti(image, np.arange(64.0).reshape(4, 4, 4), np.eye(4), "x")
        blobs.add(Path(path).read_bytes())
    assert len(blobs) == 1
