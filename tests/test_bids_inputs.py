"""Input discovery with pybids: kinds, preference order, sessions, MEGRE echoes, filters, errors."""

from __future__ import annotations

import pytest
from bidsfactory import GRE, make_dataset, write_json

from cmb_bidsapp.bids import DerivativesWriter, build_name, collect_inputs, load_filters
from cmb_bidsapp.errors import NoMatchError, UsageError


def test_preference_order_and_notes(tmp_path):
    root = make_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_swi.nii.gz": GRE,
            "sub-01/anat/sub-01_part-phase_swi.nii.gz": GRE,
            "sub-01/anat/sub-01_T2starw.nii.gz": GRE,
            "sub-02/anat/sub-02_Chimap.nii.gz": {"Units": "ppm"},
            "sub-03/anat/sub-03_acq-swi_T2starw.nii.gz": GRE,
        },
    )
    inputs, notes = collect_inputs(root)
    kinds = {i.subject: i.kind for i in inputs}
    assert kinds == {"01": "swi", "02": "qsm", "03": "swi"}
    sub1 = next(i for i in inputs if i.subject == "01")
    assert sub1.files[0].name == "sub-01_swi.nii.gz"
    assert [p.name for p in sub1.phase_files] == ["sub-01_part-phase_swi.nii.gz"]
    assert sub1.echo_times == [0.02]
    assert any("also present: t2starw" in n for n in notes)
    # --input-kind overrides the preference
    inputs, _ = collect_inputs(root, input_kind="t2starw")
    assert [(i.subject, i.kind) for i in inputs] == [("01", "t2starw")]


def test_megre_echoes_sessions_runs(tmp_path):
    files = {}
    for ses in ("1", "2"):
        for echo, te in ((1, 0.005), (2, 0.010), (3, 0.015)):
            base = f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_echo-{echo}"
            files[f"{base}_part-mag_MEGRE.nii.gz"] = {**GRE, "EchoTime": te}
            files[f"{base}_part-phase_MEGRE.nii.gz"] = {**GRE, "EchoTime": te}
    files["sub-01/ses-1/anat/sub-01_ses-1_run-1_T2starw.nii.gz"] = GRE
    files["sub-01/ses-1/anat/sub-01_ses-1_run-2_T2starw.nii.gz"] = GRE
    root = make_dataset(tmp_path / "ds", files)
    inputs, notes = collect_inputs(root, input_kind="megre")
    assert [(i.session, i.kind, len(i.files), len(i.phase_files)) for i in inputs] == [
        ("1", "megre", 3, 3),
        ("2", "megre", 3, 3),
    ]
    assert inputs[0].echo_times == [0.005, 0.010, 0.015]
    assert inputs[0].source_name == "sub-01_ses-1"
    assert inputs[0].output_suffix == "T2starw"
    # two runs of T2starw: the last run is used, and the choice is reported
    inputs, notes = collect_inputs(root, input_kind="t2starw", session_labels=["ses-1"])
    assert inputs[0].files[0].name == "sub-01_ses-1_run-2_T2starw.nii.gz"
    assert inputs[0].source_name == "sub-01_ses-1_run-2"
    assert any("skipping sub-01_ses-1_run-1_T2starw.nii.gz" in n for n in notes)


def test_filters_and_labels(tmp_path):
    root = make_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_acq-lowres_T2starw.nii.gz": GRE,
            "sub-01/anat/sub-01_acq-highres_T2starw.nii.gz": GRE,
            "sub-02/anat/sub-02_T2starw.nii.gz": GRE,
        },
    )
    inputs, _ = collect_inputs(root, filters={"t2starw": {"acquisition": "lowres"}})
    assert [i.files[0].name for i in inputs] == ["sub-01_acq-lowres_T2starw.nii.gz"]
    inputs, _ = collect_inputs(root, participant_labels=["sub-02"])
    assert [i.subject for i in inputs] == ["02"]
    with pytest.raises(NoMatchError, match="sub-07"):
        collect_inputs(root, participant_labels=["07"])
    with pytest.raises(NoMatchError, match="qsm"):
        collect_inputs(root, input_kind="qsm")


def test_megre_without_echotime_is_an_input_error(tmp_path):
    root = make_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_echo-1_MEGRE.nii.gz": {"RepetitionTime": 0.03},
            "sub-01/anat/sub-01_echo-2_MEGRE.nii.gz": {"RepetitionTime": 0.03},
        },
    )
    inputs, _ = collect_inputs(root)
    assert inputs[0].error is not None and "EchoTime" in inputs[0].error
    assert "sub-01_echo-1_MEGRE.nii.gz" in inputs[0].error


def test_malformed_sidecar_names_the_file(tmp_path):
    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T2starw.nii.gz": None})
    (root / "sub-01/anat/sub-01_T2starw.json").write_text("{not json")
    inputs, _ = collect_inputs(root)
    assert "sub-01_T2starw.json" in inputs[0].error and "JSON" in inputs[0].error


def test_sidecar_inheritance(tmp_path):
    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T2starw.nii.gz": {"FlipAngle": 20}})
    write_json(root / "T2starw.json", {"EchoTime": 0.025, "FlipAngle": 10})
    inputs, _ = collect_inputs(root)
    assert inputs[0].metadata["EchoTime"] == 0.025
    assert inputs[0].metadata["FlipAngle"] == 20  # the nearer sidecar wins


def test_filter_file_errors(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError):
        load_filters(bad)
    bad.write_text('{"bold": {}}')
    with pytest.raises(UsageError, match="unknown keys"):
        load_filters(bad)
    bad.write_text('{"swi": {"acquisition": "x"}}')
    assert load_filters(bad) == {"swi": {"acquisition": "x"}}


def test_output_names(tmp_path):
    root = make_dataset(
        tmp_path / "ds",
        {"sub-01/ses-a/anat/sub-01_ses-a_acq-fast_run-2_echo-1_part-mag_MEGRE.nii.gz": GRE},
    )
    inputs, _ = collect_inputs(root)
    writer = DerivativesWriter(tmp_path / "out", root)
    path = writer.path_for(inputs[0], "mask", label="CMB")
    assert (
        path.relative_to(tmp_path / "out").as_posix()
        == "sub-01/ses-a/anat/sub-01_ses-a_acq-fast_run-2_label-CMB_mask.nii.gz"
    )
    assert (
        build_name({"subject": "01", "desc": "preproc"}, "swi", ".nii.gz")
        == "sub-01_desc-preproc_swi.nii.gz"
    )


def test_transaction_publishes_all_or_nothing(tmp_path):
    import pandas as pd

    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T2starw.nii.gz": GRE})
    inputs, _ = collect_inputs(root)
    writer = DerivativesWriter(tmp_path / "out", root)
    table = pd.DataFrame({"a": [1]})
    with pytest.raises(RuntimeError), writer.transaction():
        writer.write_tsv(inputs[0], table, desc="CMB", suffix="lesions", dictionary={})
        raise RuntimeError("disk full")
    assert not list((tmp_path / "out").rglob("*.tsv"))
    assert not list((tmp_path / "out").rglob("*.part"))
    with writer.transaction():
        writer.write_tsv(inputs[0], table, desc="CMB", suffix="lesions", dictionary={})
    assert len(list((tmp_path / "out").rglob("*_desc-CMB_lesions.tsv"))) == 1
