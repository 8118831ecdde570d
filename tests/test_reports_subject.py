"""Per-image QC records and `sub-XX.html`: content, offline loading, --reports-only, failures."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_reports_factory import FAILURE, make_cohort

from cmb_bidsapp.bids import DerivativesWriter
from cmb_bidsapp.config import Config
from cmb_bidsapp.reports.subject import (
    build_image_qc,
    markdown_to_html,
    qc_path,
    read_json,
    write_reports,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture
def copy(cohort, tmp_path):
    """A private copy of the cohort's outputs, for tests that change them."""
    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    return {**cohort, "output_dir": out, "writer": DerivativesWriter(out, cohort["bids_dir"])}


def _attrs(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', page)


def test_qc_record_of_an_image(cohort):
    writer, im1 = cohort["writer"], cohort["inputs"]["im1"]
    qc = read_json(qc_path(writer, im1))
    assert qc["status"] == "ok" and qc["input_kind"] == "t2starw"
    assert qc["counts"]["total"] == 3
    assert {c: qc["counts"][c] for c in ("lobar", "deep", "infratentorial")} == {
        "lobar": 1,
        "deep": 1,
        "infratentorial": 1,
    }
    assert set(qc["figures"]) == {"brainmask", "bias", "registration", "regions"}
    assert set(qc["lesion_figures"]) == {"1", "2", "3"}
    # strongest rejected first: scores 0.44, 0.31, 0.12, 0.05, 0.02 are rows 4, 2, 0, 1, 3
    assert [r["row"] for r in qc["rejected_figures"]] == [4, 2, 0, 1, 3]
    out = cohort["output_dir"]
    paths = [*qc["figures"].values(), *qc["lesion_figures"].values()]
    paths += [r["figure"] for r in qc["rejected_figures"]]
    for rel in paths:
        assert (out / rel).stat().st_size > 1000
        assert rel.startswith("sub-01/figures/sub-01_ses-1_desc-") and rel.endswith("_T2starw.png")
    assert qc["threshold"] == 0.5
    assert qc["model"]["ModelName"] == "test model"
    assert qc["registration"]["Flag"] is False
    assert qc["n_rejected"] == 5
    assert qc["warnings"] == []
    assert qc["run"]["command"].endswith("participant")


def test_subject_page_is_offline_and_shows_every_lesion(cohort):
    out = cohort["output_dir"]
    page = (out / "sub-01.html").read_text()
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"url\(", page)
    for target in _attrs(page):
        assert not target.startswith(("http:", "https:", "//")), target
        if not target.startswith("#"):
            assert (out / target.split("#")[0]).exists(), target
    lesions = pd.read_csv(
        out / "sub-01/ses-1/anat/sub-01_ses-1_desc-CMB_lesions.tsv", sep="\t", na_values="n/a"
    )
    rows = re.findall(r'<tr class="lesion gallery-entry"[^>]*data-lesion-id="(\d+)">(.*?)</tr>', page, re.S)  # fmt: skip
    assert [int(i) for i, _ in rows] == list(lesions["lesion_id"])
    for (lid, body), region in zip(rows, lesions["region"], strict=True):
        assert f"desc-lesion{lid}_T2starw.png" in body  # the crop beside its own row
        assert region.replace("_", " ") in body
    assert page.count('class="rejected-entry"') == 5
    assert "vessel (tubularity)" in page
    assert "Microbleeds were detected with <em>cmb-bidsapp</em> (test)." in page  # methods
    assert "cmb-bidsapp " in page and "participant</code>" in page  # provenance: the command
    assert "ModelSHA256" in page
    assert re.search(r"nipype \d+\.\d+", page) and re.search(r"numpy \d+\.\d+", page)


def test_failed_image_has_a_report_saying_why(cohort):
    out = cohort["output_dir"]
    page = (out / "sub-01.html").read_text()
    section = page.split('id="sub-01_ses-2_T2starw"')[1].split("</section>")[0]
    assert "This image failed" in section
    assert FAILURE.split(":")[1].strip() in section
    assert "What to do" in section
    assert "Detected lesions" not in section  # no made-up results
    qc = read_json(qc_path(cohort["writer"], cohort["inputs"]["im1b"]))
    assert qc["status"] == "failed" and qc["error"] == FAILURE


def test_image_without_record_is_rebuilt_from_derivatives(cohort):
    """sub-02 had no QC record: write_reports drew its figures from OUTPUT_DIR alone."""
    qc = read_json(qc_path(cohort["writer"], cohort["inputs"]["im2"]))
    assert qc["origin"] == "derivatives"
    assert qc["counts"]["total"] == 0
    assert set(qc["figures"]) == {"brainmask"}  # no bias or registration without the work dir
    assert qc["brain_extraction"]["method"] == "deepbet"
    assert qc["input_info"]["orientation"] == "LPS"
    page = (cohort["output_dir"] / "sub-02.html").read_text()
    assert "No lesion was detected" in page
    assert "No table of rejected candidates" in page


def test_reports_only_reuses_figures_without_work_dir(copy):
    out, writer = copy["output_dir"], copy["writer"]
    im1, im2 = copy["inputs"]["im1"], copy["inputs"]["im2"]
    shutil.rmtree(copy["bids_dir"].parent / "work")  # the work dir is gone
    before = {p: p.stat().st_mtime_ns for p in (out / "sub-01" / "figures").glob("*.png")}
    (out / "sub-01.html").unlink()
    # sub-02: an older version's outputs: no QC record and no figure at all
    shutil.rmtree(out / "sub-02" / "figures")
    config = Config(
        bids_dir=copy["bids_dir"],
        output_dir=out,
        analysis_level="participant",
        reports_only=True,
        command=["cmb-bidsapp", "b", "o", "participant", "--reports-only"],
    )
    written = write_reports(config, [im1, copy["inputs"]["im1b"], im2], failures={})
    assert sorted(p.name for p in written) == ["sub-01.html", "sub-02.html"]
    after = {p: p.stat().st_mtime_ns for p in (out / "sub-01" / "figures").glob("*.png")}
    assert after == before  # nothing recomputed
    page = (out / "sub-01.html").read_text()
    assert page.count('class="lesion gallery-entry"') == 3
    assert "Report regenerated by" in page and "--reports-only" in page
    assert "This image failed" in page  # the earlier failure is still reported
    qc2 = read_json(qc_path(writer, im2))
    assert qc2["origin"] == "derivatives" and (out / qc2["figures"]["brainmask"]).exists()


def test_rerun_with_fewer_lesions_removes_old_crops(copy):
    out, writer, im1 = copy["output_dir"], copy["writer"], copy["inputs"]["im1"]
    lesions_tsv = out / "sub-01/ses-1/anat/sub-01_ses-1_desc-CMB_lesions.tsv"
    table = pd.read_csv(lesions_tsv, sep="\t")
    table.iloc[:1].to_csv(lesions_tsv, sep="\t", index=False)
    (out / "sub-01/ses-1/anat/sub-01_ses-1_desc-CMBrejected_lesions.tsv").unlink()
    build_image_qc(
        writer,
        im1,
        preproc=out / "sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T2starw.nii.gz",
        brain_mask=out / "sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz",
        origin="derivatives",
    )
    names = sorted(p.name for p in (out / "sub-01" / "figures").glob("*lesion*.png"))
    assert names == ["sub-01_ses-1_desc-lesion1_T2starw.png"]
    assert not list((out / "sub-01" / "figures").glob("*rejected*.png"))
    assert (out / "sub-01/figures/sub-01_ses-1_desc-bias_T2starw.png").exists()  # kept


def test_failure_after_success_keeps_results_marked(copy):
    out, im1 = copy["output_dir"], copy["inputs"]["im1"]
    config = Config(bids_dir=copy["bids_dir"], output_dir=out, analysis_level="participant")
    write_reports(config, [im1], failures={im1.image_id: "N4 failed. Re-run."})
    qc = read_json(qc_path(copy["writer"], im1))
    assert qc["status"] == "failed" and qc["earlier_results"] is True
    page = (out / "sub-01.html").read_text()
    section = page.split('id="sub-01_ses-1_T2starw"')[1].split("</section>")[0]
    assert "N4 failed. Re-run." in section and "earlier successful run" in section
    assert section.count('class="lesion gallery-entry"') == 3


def test_report_node_never_fails_the_image(cohort, tmp_path):
    from nipype.pipeline import engine as pe

    from cmb_bidsapp.interfaces.derivatives import image_to_json
    from cmb_bidsapp.interfaces.reports import ReportFigures

    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    broken = tmp_path / "not_a_nifti.nii.gz"
    broken.write_bytes(b"garbage")
    node = pe.Node(
        ReportFigures(
            image_json=image_to_json(cohort["inputs"]["im1"]),
            output_dir=str(out),
            bids_dir=str(cohort["bids_dir"]),
            preproc=str(broken),
            brain_mask=str(broken),
        ),
        name="report_figures",
        base_dir=str(tmp_path / "work"),
    )
    result = node.run()
    qc = json.loads(Path(result.outputs.out_qc).read_text())
    assert result.outputs.n_figures == 0
    assert any("could not be made" in w for w in qc["warnings"])


def test_report_node_writes_figures(cohort, tmp_path):
    from nipype.pipeline import engine as pe

    from cmb_bidsapp.interfaces.derivatives import image_to_json
    from cmb_bidsapp.interfaces.reports import ReportFigures

    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    shutil.rmtree(out / "sub-01" / "figures")
    anat = out / "sub-01/ses-1/anat"
    node = pe.Node(
        ReportFigures(
            image_json=image_to_json(cohort["inputs"]["im1"]),
            output_dir=str(out),
            bids_dir=str(cohort["bids_dir"]),
            preproc=str(anat / "sub-01_ses-1_desc-preproc_T2starw.nii.gz"),
            brain_mask=str(anat / "sub-01_ses-1_desc-brain_mask.nii.gz"),
            threshold=0.5,
        ),
        name="report_figures",
        base_dir=str(tmp_path / "work"),
    )
    result = node.run()
    assert result.outputs.n_figures == 1 + 3 + 5  # brain mask, 3 lesions, 5 rejected
    qc = json.loads(Path(result.outputs.out_qc).read_text())
    assert qc["status"] == "ok" and qc["threshold"] == 0.5


def test_outputs_stay_a_valid_derivative_dataset(cohort):
    pytest.importorskip("bids_validator_deno")
    from cmb_bidsapp.validation import validate

    result = validate(cohort["output_dir"])
    assert result.valid, result.summary()


def test_markdown_subset():
    html = markdown_to_html("# Title\n\nSome *italic* and **bold** `x<y`.\n\n- one\n- two\n")
    assert "<h3>Title</h3>" in html
    assert "<em>italic</em>" in html and "<strong>bold</strong>" in html
    assert "<code>x&lt;y</code>" in html
    assert html.count("<li>") == 2 and "</ul>" in html


def test_brain_volume_and_flag_warnings():
    from cmb_bidsapp.reports.subject import _warnings

    qc = {
        "registration": {"Flag": True, "Reason": "brain-mask Dice 0.3 < 0.8"},
        "brain_extraction": {"volume_cm3": 0.0, "warnings": ["skull left in the mask"]},
    }
    lesions = pd.DataFrame({"region": ["unknown", "frontal"] + ["frontal"] * 60})
    text = " | ".join(_warnings(qc, lesions))
    assert "Dice 0.3" in text and "skull left" in text and "empty" in text
    assert "1 lesion(s) lie outside" in text and "Unusually many lesions (62)" in text
    assert _warnings({"brain_extraction": {"volume_cm3": 1200.0}}, lesions.iloc[1:3]) == []


def test_no_stray_temporary_files(cohort):
    leftovers = [p for p in Path(cohort["output_dir"]).rglob("*") if p.name.endswith(".part")]
    assert leftovers == []
    assert os.access(cohort["output_dir"] / "sub-01.html", os.R_OK)
    assert np.isfinite(1.0)
