"""End to end: the participant run writes figures and sub-XX.html; --reports-only and group reuse them.

On the real MEGRE crop (shared data, skipped when absent) and, once the simulator's command
exists, on a small simulated cohort. The pages are then checked in headless Chromium when it is
installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from cmb_bidsapp.cli.run import main

GRE = {"MagneticFieldStrength": 3, "RepetitionTime": 0.03, "FlipAngle": 15}


def _real_bids(shared_data: Path, root: Path) -> Path:
    """The real 3-echo crop as BIDS MEGRE (magnitude and phase rescaled to ±π)."""
    bids = root / "bids"
    anat = bids / "sub-real" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "real megre", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    mag = nib.load(shared_data / "real-megre" / "Mag.nii")
    phase = nib.load(shared_data / "real-megre" / "Phase.nii")
    m = np.asarray(mag.dataobj, dtype=np.float32)
    p = np.asarray(phase.dataobj, dtype=np.float32) / 0.003674 * np.pi
    for e in range(3):
        for part, data in (("mag", m[..., e]), ("phase", p[..., e])):
            name = f"sub-real_echo-{e + 1}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(data, mag.affine), str(anat / f"{name}.nii.gz"))
            side = {**GRE, "EchoTime": 0.004 * (e + 1)}
            if part == "phase":
                side["Units"] = "rad"
            (anat / f"{name}.json").write_text(json.dumps(side))
    return bids


def _check_pages(out: Path) -> None:
    """Every subject page: one gallery row per lesion, relative figures that exist."""
    pages = sorted(out.glob("sub-*.html"))
    assert pages
    for page in pages:
        text = page.read_text()
        assert "<script" not in text
        sub = page.stem
        for tsv in sorted(out.glob(f"{sub}/**/anat/*_desc-CMB_lesions.tsv")):
            n = len(pd.read_csv(tsv, sep="\t"))
            source = tsv.name.removesuffix("_desc-CMB_lesions.tsv")
            section = text.split(f'id="{source}_', 1)[1].split("</section>")[0]
            assert section.count('class="lesion gallery-entry"') == n
        for qc_file in (out / sub / "figures").glob("*_desc-qc_*.json"):
            qc = json.loads(qc_file.read_text())
            for rel in [*qc["figures"].values(), *qc["lesion_figures"].values()]:
                assert (out / rel).exists() and rel in text


def _browser_check(tmp_path: Path, out: Path) -> None:
    from test_reports_browser import CHROMIUM, Browser, problems

    if shutil.which(CHROMIUM) is None:
        return
    browser = Browser(tmp_path / "profile")
    try:
        for page in [*sorted(out.glob("sub-*.html")), out / "group.html"]:
            events = browser.open(page.as_uri())
            assert problems(events) == [], page
            broken = browser.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
            )
            assert broken == 0, page
            browser.screenshot(tmp_path / f"{page.stem}.png")
    finally:
        browser.close()


def test_real_megre_participant_reports_only_and_group(shared_data, tmp_path):
    bids = _real_bids(shared_data, tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1"]) == 0
    qc = json.loads((out / "sub-real/figures/sub-real_desc-qc_T2starw.json").read_text())
    assert qc["status"] == "ok" and qc["input_kind"] == "megre"
    assert qc["input_info"]["n_echoes"] == 3
    assert set(qc["figures"]) >= {"brainmask", "bias", "registration", "regions"}
    lesions = pd.read_csv(out / "sub-real/anat/sub-real_desc-CMB_lesions.tsv", sep="\t")
    assert len(qc["lesion_figures"]) == len(lesions)
    assert qc["counts"]["total"] == len(lesions)
    assert qc["run"]["command"]
    _check_pages(out)
    page = (out / "sub-real.html").read_text()
    assert "Registration" in page and ("flagged" in page)

    # --reports-only with the work dir gone: nothing recomputed, page rewritten
    shutil.rmtree(work)
    figs = {p: p.stat().st_mtime_ns for p in (out / "sub-real" / "figures").glob("*.png")}
    (out / "sub-real.html").unlink()
    assert main([str(bids), str(out), "participant", "--reports-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "sub-real" / "figures").glob("*.png")} == figs
    assert "--reports-only" in (out / "sub-real.html").read_text()
    _check_pages(out)

    assert main([str(bids), str(out), "group"]) == 0
    counts = pd.read_csv(out / "group_desc-CMB_counts.tsv", sep="\t")
    assert counts["participant_id"].tolist() == ["sub-real"]
    assert counts["total"].tolist() == [len(lesions)]
    _browser_check(tmp_path, out)


def test_simulated_subject_reports(tmp_path):
    """One small simulated SWI subject (with its phase) through participant, group and browser."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "cmb_bidsapp.cli.synth",
        str(bids),
        "--n-subjects",
        "1",
        "--seed",
        "3",
        "--size",
        "small",
    ]
    done = subprocess.run([*cmd, "--kinds", "swi"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    work = tmp_path / "work"
    assert main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1"]) == 0
    assert main([str(bids), str(out), "group"]) == 0
    _check_pages(out)
    (qc_file,) = out.glob("sub-*/figures/*_desc-qc_*.json")
    qc = json.loads(qc_file.read_text())
    assert qc["input_kind"] == "swi" and qc["status"] == "ok"
    assert set(qc["figures"]) >= {"brainmask", "bias", "registration", "regions"}
    counts = pd.read_csv(out / "group_desc-CMB_counts.tsv", sep="\t", na_values="n/a")
    assert counts["total"].tolist() == [qc["counts"]["total"]]
    _browser_check(tmp_path, out)
