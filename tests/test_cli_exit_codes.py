"""Exit codes and one-line messages of the command line (64, 16, 18), without running a workflow."""

from __future__ import annotations

import json

import pytest
from bidsfactory import GRE, make_dataset

from cmb_bidsapp.cli.run import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T2starw.nii.gz": GRE})


def test_usage_errors_exit_64(tmp_path, dataset, capsys):
    code, err = run([], capsys)
    assert code == 64 and "required" in err and "Traceback" not in err
    code, err = run([dataset, tmp_path / "out", "everything"], capsys)
    assert code == 64 and "invalid choice" in err
    code, err = run([tmp_path / "nope", tmp_path / "out", "participant"], capsys)
    assert code == 64 and "does not exist" in err and "nope" in err
    code, err = run([dataset, dataset, "participant"], capsys)
    assert code == 64 and "never writes into the raw dataset" in err
    code, err = run([dataset, dataset / "sub-01" / "out", "participant"], capsys)
    assert code == 64 and "derivatives" in err
    code, err = run([dataset, tmp_path / "out", "participant", "--nprocs", "0"], capsys)
    assert code == 64 and "positive integer" in err
    code, err = run([dataset, tmp_path / "out", "participant", "--threshold", "2"], capsys)
    assert code == 64 and "between 0 and 1" in err
    code, err = run(
        [dataset, tmp_path / "out", "participant", "-w", tmp_path / "out" / "work"], capsys
    )
    assert code == 64 and "work directory" in err


def test_version_and_help_exit_0(capsys):
    assert main(["--version"]) == 0
    assert "cmb-bidsapp" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--participant-label" in out and "--skull-strip" in out


def test_invalid_dataset_exits_16(tmp_path, capsys):
    not_bids = tmp_path / "notbids"
    not_bids.mkdir()
    code, err = run([not_bids, tmp_path / "out", "participant", "-w", tmp_path / "w"], capsys)
    assert code == 16 and "dataset_description.json" in err
    (not_bids / "dataset_description.json").write_text("{oops")
    code, err = run([not_bids, tmp_path / "out", "participant", "-w", tmp_path / "w"], capsys)
    assert code == 16 and "not valid JSON" in err


def test_validator_errors_exit_16(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T2starw.nii.gz": GRE})
    (ds / "sub-01" / "anat" / "sub-01_bogus-x_T2starw.nii.gz").write_bytes(b"")
    code, err = run([ds, tmp_path / "out", "participant", "-w", tmp_path / "w"], capsys)
    assert code == 16 and "not a valid BIDS dataset" in err and "--skip-bids-validation" in err


def test_no_match_exits_18(tmp_path, dataset, capsys):
    args = [
        dataset,
        tmp_path / "out",
        "participant",
        "-w",
        tmp_path / "w",
        "--skip-bids-validation",
    ]
    code, err = run([*args, "--participant-label", "sub-99"], capsys)
    assert code == 18 and "sub-99" in err
    code, err = run([*args, "--input-kind", "qsm"], capsys)
    assert code == 18 and "qsm" in err
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t2starw": {"acquisition": "nothere"}}))
    code, err = run([*args, "--bids-filter-file", filt], capsys)
    assert code == 18 and "filter file" in err


def test_boilerplate_only(tmp_path, dataset, capsys):
    code, err = run(
        [dataset, tmp_path / "out", "participant", "-w", tmp_path / "w", "--boilerplate-only"],
        capsys,
    )
    assert code == 0, err
    text = (tmp_path / "out" / "logs" / "CITATION.md").read_text()
    assert "N4" in text and "## References" in text and "Tustison" in text
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "cmb-bidsapp"


def test_one_image_runs_in_process_with_all_threads(tmp_path, dataset):
    """--nprocs 2 on one image: Linear with 2 threads per step (a pool would only add process
    start-ups); several images keep MultiProc; a plugin named by --use-plugin is never swapped."""
    from cmb_bidsapp.cli.parser import parse_args
    from cmb_bidsapp.cli.run import _plugin_for

    config = parse_args([str(dataset), str(tmp_path / "out"), "participant", "--nprocs", "2"])
    assert (config.plugin, config.omp_nthreads) == ("MultiProc", 2)
    assert _plugin_for(config, 1) == ("Linear", {})
    assert _plugin_for(config, 2)[0] == "MultiProc"
    plugin_file = tmp_path / "plugin.yml"
    plugin_file.write_text("plugin: MultiProc\nplugin_args: {n_procs: 2}\n")
    chosen = parse_args(
        [str(dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin_file)]
    )
    assert _plugin_for(chosen, 1) == ("MultiProc", {"n_procs": 2})
