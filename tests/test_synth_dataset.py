"""Simulated cohorts on disk: BIDS validity, names, reproducibility, reference masks, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cmb_bidsapp.cli.synth import main as synth_main
from cmb_bidsapp.errors import EXIT_USAGE
from cmb_bidsapp.synth import simulate_subject, write_cohort
from cmb_bidsapp.synth.bids_writer import write_subject
from cmb_bidsapp.synth.cohort import assign, parse_kinds
from cmb_bidsapp.synth.preview import write_preview
from cmb_bidsapp.validation import validate

SEED = 11


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "bids"
    write_cohort(out, 4, SEED, kinds="mix", size="small", skull_fraction=0.5, preview=True)
    return out


def test_raw_and_reference_pass_the_validator(cohort):
    raw = validate(cohort)
    assert raw.valid, raw.summary()
    ref = validate(cohort / "derivatives" / "reference")
    assert ref.valid, ref.summary()


def test_layout_names_and_sidecars(cohort):
    part = pd.read_csv(cohort / "participants.tsv", sep="\t")
    assert sorted(part.input_kind) == ["megre", "qsm", "swi", "t2starw"]
    assert part.participant_id.tolist() == ["sub-001", "sub-002", "sub-003", "sub-004"]
    assert part.with_skull.sum() == 2
    desc = json.loads((cohort / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "cmb-bidsapp-synth"
    rdesc = json.loads((cohort / "derivatives/reference/dataset_description.json").read_text())
    assert rdesc["DatasetType"] == "derivative" and rdesc["SourceDatasets"]
    for _, row in part.iterrows():
        sub = row.participant_id
        anat = cohort / sub / "anat"
        names = sorted(p.name for p in anat.glob("*.nii.gz"))
        expected = {
            "swi": [f"{sub}_part-phase_swi.nii.gz", f"{sub}_swi.nii.gz"],
            "t2starw": [f"{sub}_T2starw.nii.gz"],
            "qsm": [f"{sub}_Chimap.nii.gz"],
        }.get(row.input_kind)
        if row.input_kind == "megre":
            echoes = {n.split("_")[1] for n in names}
            assert 3 <= len(echoes) <= 5
            assert len(names) == 2 * len(echoes)
            assert all(
                ("part-mag" in n or "part-phase" in n) and n.endswith("_MEGRE.nii.gz")
                for n in names
            )
        else:
            assert names == expected
        for nii in anat.glob("*.nii.gz"):
            meta = json.loads(nii.with_name(nii.name.replace(".nii.gz", ".json")).read_text())
            assert meta["MagneticFieldStrength"] == 3
            assert meta["MRAcquisitionType"] in ("2D", "3D")
            te = meta["EchoTime"]
            assert all(0.001 < t < 0.05 for t in np.atleast_1d(te))
            assert 0.01 < meta["RepetitionTime"] < 1.0 and 5 < meta["FlipAngle"] < 30
            if row.input_kind == "qsm":
                assert meta["Units"] == "ppm"
            if "part-phase" in nii.name:
                assert meta["Units"] == "rad"
        ref = cohort / "derivatives" / "reference" / sub / "anat"
        for name in (
            "label-CMB_mask.nii.gz",
            "desc-brain_mask.nii.gz",
            "desc-CMB_lesions.tsv",
            "desc-CMB_lesions.json",
            "desc-mimics_lesions.tsv",
            "desc-mimics_lesions.json",
        ):
            assert (ref / f"{sub}_{name}").is_file(), name
        assert (
            cohort / "derivatives/reference/figures" / f"{sub}_preview.png"
        ).stat().st_size > 10_000


def test_reference_masks_are_in_the_raw_grid_and_hold_each_visible_lesion(cohort):
    n_visible = 0
    for anat in sorted(cohort.glob("sub-*/anat")):
        sub = anat.parent.name
        raw = nib.load(sorted(anat.glob("*.nii.gz"))[-1])
        ref = cohort / "derivatives" / "reference" / sub / "anat"
        mask_img = nib.load(ref / f"{sub}_label-CMB_mask.nii.gz")
        brain_img = nib.load(ref / f"{sub}_desc-brain_mask.nii.gz")
        for img in (mask_img, brain_img):
            assert img.shape == raw.shape
            assert np.allclose(img.affine, raw.affine, atol=1e-4)
            assert img.get_data_dtype() == np.uint8
        mask = np.asarray(mask_img.dataobj)
        assert set(np.unique(mask)) <= {0, 1}
        table = pd.read_csv(ref / f"{sub}_desc-CMB_lesions.tsv", sep="\t")
        inv = np.linalg.inv(raw.affine)
        for _, row in table.iterrows():
            v = inv[:3, :3] @ [row.x, row.y, row.z] + inv[:3, 3]
            assert np.array_equal(np.rint(v).astype(int), [row.i, row.j, row.k])
            if not row.visible:
                assert row.apparent_diameter_mm == 0
                continue
            n_visible += 1
            lo = np.maximum(np.rint(v).astype(int) - 1, 0)
            assert mask[lo[0] : lo[0] + 3, lo[1] : lo[1] + 3, lo[2] : lo[2] + 3].any(), (
                sub,
                row.lesion_id,
            )
            assert row.apparent_diameter_mm > 0 and row.volume_mm3 > 0
            assert row.mars_class in ("lobar", "deep", "infratentorial")
            assert row.hemisphere in ("left", "right")
    assert n_visible >= 1


def test_same_seed_same_bytes_whatever_the_thread_count(cohort, tmp_path):
    """Two subjects re-simulated with one torch thread (what --jobs changes) give the same bytes."""
    part = pd.read_csv(cohort / "participants.tsv", sep="\t")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resimulate(part, tmp_path)
    finally:
        torch.set_num_threads(threads)
    again = _digest(tmp_path)
    first = _digest(cohort)
    assert len(again) >= 12
    for name, digest in again.items():
        assert first[name] == digest, name


def _resimulate(part: pd.DataFrame, tmp_path: Path) -> None:
    for _, row in part.head(2).iterrows():
        label = row.participant_id.removeprefix("sub-")
        sub = simulate_subject(int(row.subject_seed), row.input_kind, "small", bool(row.with_skull))
        write_subject(tmp_path, label, sub)
        write_preview(
            sub, tmp_path / "derivatives/reference/figures" / f"sub-{label}_preview.png", label
        )


def test_assignment_is_balanced_and_seeded():
    kinds, skull = assign(8, 3, parse_kinds("mix"), 0.25)
    assert sorted(kinds) == sorted(["swi", "t2starw", "megre", "qsm"] * 2)
    assert sum(skull) == 2
    assert assign(8, 3, parse_kinds("mix"), 0.25) == (kinds, skull)
    assert assign(8, 4, parse_kinds("mix"), 0.25) != (kinds, skull)
    assert parse_kinds("swi, qsm") == ["swi", "qsm"]
    with pytest.raises(ValueError):
        parse_kinds("flair")


@pytest.mark.parametrize(
    "args",
    [
        ["--n-subjects", "0", "--seed", "1"],
        ["--n-subjects", "2", "--seed", "-1"],
        ["--n-subjects", "2", "--seed", "1", "--kinds", "dwi"],
        ["--n-subjects", "2", "--seed", "1", "--skull-fraction", "1.5"],
        ["--n-subjects", "2", "--seed", "1", "--size", "huge"],
        ["--n-subjects", "2"],
    ],
)
def test_cli_bad_arguments_exit_64(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as done:
        synth_main([str(tmp_path / "out"), *args])
    assert done.value.code == EXIT_USAGE
    assert "error" in capsys.readouterr().err


def test_cli_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = synth_main([str(out), "--n-subjects", "1", "--seed", "1", "--size", "small"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_rewrites_a_previous_synth_output(tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(out), "--n-subjects", "1", "--seed", "3", "--size", "small", "--kinds", "t2starw"]
    assert synth_main(args) == 0
    stale = out / "sub-099" / "anat"
    stale.mkdir(parents=True)
    (stale / "sub-099_T2starw.nii.gz").write_bytes(b"old")
    assert synth_main(args) == 0  # a previous synth output: no --overwrite needed
    assert not (out / "sub-099").exists()
    assert (out / "sub-001" / "anat" / "sub-001_T2starw.nii.gz").is_file()
    assert "wrote 1 subjects" in capsys.readouterr().err
