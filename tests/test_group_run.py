"""Group level: tables and report from participant outputs only, failures listed, exit codes, speed."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from test_reports_factory import FAILURE, make_cohort

from cmb_bidsapp.config import Config
from cmb_bidsapp.errors import EXIT_NO_MATCH
from cmb_bidsapp.workflows.group import run_group

ROOT = Path(__file__).resolve().parents[1]


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("group-cohort"))


def _config(bids: Path, out: Path, **kw) -> Config:
    return Config(bids_dir=bids, output_dir=out, analysis_level="group", **kw)


def test_group_tables_from_a_cohort(cohort):
    out = cohort["output_dir"]
    counts = _read(out / "group_desc-CMB_counts.tsv")
    assert list(counts["source"]) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03"]
    assert list(counts["participant_id"]) == ["sub-01", "sub-01", "sub-02", "sub-03"]
    assert list(counts["session_id"].fillna("")) == ["ses-1", "ses-2", "", ""]
    assert list(counts["input_kind"]) == ["t2starw", "t2starw", "megre", "swi"]
    assert list(counts["status"]) == ["ok", "failed", "ok", "ok"]
    assert list(counts["failed"]) == [False, True, False, False]
    assert counts.loc[1, "error"] == FAILURE
    assert counts["total"].tolist()[0] == 3 and pd.isna(counts["total"][1])
    assert counts.loc[0, ["lobar", "deep", "infratentorial"]].tolist() == [1, 1, 1]
    assert counts.loc[0, "n_rejected"] == 5
    assert str(counts.loc[0, "registration_flag"]) == "False"
    assert counts.loc[0, "report"] == "sub-01.html#sub-01_ses-1_T2starw"
    assert pd.isna(counts.loc[3, "report"])  # sub-03 has no subject page
    dictionary = json.loads((out / "group_desc-CMB_counts.json").read_text())
    assert set(counts.columns) <= set(dictionary)
    assert all("Description" in v for v in dictionary.values())

    lesions = _read(out / "group_desc-CMB_lesions.tsv")
    assert len(lesions) == 3 + 2
    assert list(lesions.columns[:4]) == ["participant_id", "session_id", "source", "input_kind"]
    mine = lesions[lesions["source"] == "sub-01_ses-1"]
    assert mine["region"].tolist() == cohort["lesions"]["region"].tolist()
    assert mine["x_mni"].notna().all()
    assert lesions[lesions["source"] == "sub-03"]["x_mni"].isna().all()  # no MNI columns there
    ldict = json.loads((out / "group_desc-CMB_lesions.json").read_text())
    assert set(lesions.columns) <= set(ldict)


def test_group_page_lists_failures_and_missing(cohort):
    page = (cohort["output_dir"] / "group.html").read_text()
    assert "sub-04" in page  # in BIDS_DIR, no output
    assert FAILURE in page
    assert '<table class="sortable" id="cohort">' in page
    assert page.count("<tr class=") >= 4
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert links and not [u for u in links if re.match(r"(https?:)?//", u)]
    assert "<metadata>" not in page
    assert "<svg" in page and "data:image/png;base64," in page  # histogram, prevalence, glass


def test_group_reads_no_image(cohort, tmp_path, monkeypatch):
    import nibabel
    import SimpleITK

    def forbidden(*args, **kwargs):
        raise AssertionError("the group level must not read images")

    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    monkeypatch.setattr(nibabel, "load", forbidden)
    monkeypatch.setattr(nibabel.loadsave, "load", forbidden)
    monkeypatch.setattr(SimpleITK, "ReadImage", forbidden)
    (out / "group_desc-CMB_counts.tsv").unlink()
    assert run_group(_config(cohort["bids_dir"], out)) == 0
    assert (out / "group_desc-CMB_counts.tsv").exists()


def test_group_tolerates_broken_and_partial_outputs(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    (out / "sub-02/anat/sub-02_desc-CMB_lesions.tsv").write_bytes(b"\xff\xfe\x00garbage")
    (out / "sub-05" / "anat").mkdir(parents=True)  # a subject folder without outputs
    (out / "sub-01/figures/sub-01_ses-1_desc-qc_T2starw.json").write_text("{broken")
    assert run_group(_config(cohort["bids_dir"], out)) == 0
    err = capsys.readouterr().err
    assert "unreadable" in err
    counts = _read(out / "group_desc-CMB_counts.tsv")
    assert "sub-05" not in set(counts["participant_id"])
    # without its QC record sub-01 ses-1 is still counted from its tables
    assert counts.loc[counts["source"] == "sub-01_ses-1", "total"].item() == 3


def test_no_participant_output_exits_18(tmp_path, capsys, cohort):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "dataset_description.json").write_text("{}")
    assert run_group(_config(cohort["bids_dir"], out)) == EXIT_NO_MATCH
    assert "holds no participant outputs" in capsys.readouterr().err
    assert run_group(_config(cohort["bids_dir"], tmp_path / "absent")) == EXIT_NO_MATCH
    assert not (out / "group.html").exists()


def test_cli_group_level(cohort, tmp_path):
    from cmb_bidsapp.cli.run import main

    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    (out / "group.html").unlink()
    assert main([str(cohort["bids_dir"]), str(out), "group"]) == 0
    assert (out / "group.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(cohort["bids_dir"]), str(empty), "group"]) == EXIT_NO_MATCH


def test_participant_label_selects_subjects(cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cohort["output_dir"], out)
    assert run_group(_config(cohort["bids_dir"], out, participant_label=["02"])) == 0
    counts = _read(out / "group_desc-CMB_counts.tsv")
    assert set(counts["participant_id"]) == {"sub-02"}


def test_outlier_counts_are_flagged(tmp_path, benchmark_script):
    bench = benchmark_script("bench_group")
    bids, out, _ = bench.fabricate(tmp_path, 60, seed=1)
    counts_tsv = next(out.glob("sub-0007/anat/*_desc-CMB_counts.tsv"))
    table = _read(counts_tsv)
    table.loc[0, "total"] = 150
    table.to_csv(counts_tsv, sep="\t", index=False, na_rep="n/a")
    assert run_group(_config(bids, out)) == 0
    counts = _read(out / "group_desc-CMB_counts.tsv")
    flagged = counts.loc[counts["outlier_count"] == True, "participant_id"]  # noqa: E712
    assert "sub-0007" in set(flagged)
    ok = counts[counts["status"] == "ok"]
    assert (ok.loc[ok["total"] <= 20, "outlier_count"] == False).all()  # noqa: E712
    assert "sub-0007" in (out / "group.html").read_text().split("Outlier counts")[1]


def test_group_of_300_subjects_is_fast(tmp_path, benchmark_script):
    """Measured under load on a shared 2-core machine (the full benchmark: bench_group.py)."""
    bench = benchmark_script("bench_group")
    bids, out, n_lesions = bench.fabricate(tmp_path, 300, seed=2)
    t0 = time.perf_counter()
    assert run_group(_config(bids, out)) == 0
    elapsed = time.perf_counter() - t0
    counts = _read(out / "group_desc-CMB_counts.tsv")
    assert len(counts) == 300
    assert len(_read(out / "group_desc-CMB_lesions.tsv")) == n_lesions
    assert elapsed < 15.0, f"{elapsed:.1f} s for 300 subjects"
