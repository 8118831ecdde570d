"""Scoring whole datasets: missing files, MARS classes, input kinds, the CLI and its outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb_bidsapp.cli.eval import main
from cmb_bidsapp.errors import NoMatchError
from cmb_bidsapp.evaluation import infer_kind, kind_from_name, score_dirs

SHAPE = (40, 40, 24)
AFF = np.array(
    [[-0.5, 0.0, 0.0, 10.0], [0.0, 0.5, 0.0, -20.0], [0.0, 0.0, 2.0, -30.0], [0, 0, 0, 1.0]]
)


def mm(ijk) -> list[float]:
    return list(AFF[:3, :3] @ np.asarray(ijk, dtype=float) + AFF[:3, 3])


def cube(mask: np.ndarray, c, r: int = 1) -> None:
    mask[c[0] - r : c[0] + r + 1, c[1] - r : c[1] + r + 1, c[2] - r : c[2] + r + 1] = 1


def save(path: Path, data: np.ndarray, aff: np.ndarray = AFF, sidecar: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return path


def lesions_tsv(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0]) if rows else ["x", "y", "z", "mars_class"]
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def make_dataset(root: Path) -> tuple[Path, Path]:
    """A raw dataset, its reference derivatives and a prediction dataset (hand-made, 4 images).

    sub-01 (swi, kind from the reference Sources): lobar, deep, infratentorial; lobar and
        infratentorial found.
    sub-02 (megre, kind from the raw dataset's echo files; classes from `region`): two lobar, one
        without a table row (unknown); one lobar found, plus one false positive.
    sub-03 ses-1 (qsm, from the raw dataset): no lesion; the prediction file is missing.
    sub-04 run-1 (t2starw, from the prediction's Sources): one lesion without table, found.
    """
    raw = root / "raw"
    ref_dir = raw / "derivatives" / "reference"
    out = root / "out"
    (raw).mkdir(parents=True)
    (raw / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    (ref_dir).mkdir(parents=True)
    (ref_dir / "dataset_description.json").write_text(
        '{"Name": "ref", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}'
    )
    out.mkdir()
    (out / "dataset_description.json").write_text(
        '{"Name": "cmb", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}'
    )
    tiny = np.zeros((2, 2, 2), dtype=np.uint8)

    # sub-01: swi
    a = raw / "sub-01" / "anat"
    ref = np.zeros(SHAPE, np.uint8)
    for c in [(10, 10, 10), (30, 30, 10), (10, 30, 18)]:
        cube(ref, c)
    save(
        ref_dir / "sub-01/anat/sub-01_acq-swi_label-CMB_mask.nii.gz",
        ref,
        sidecar={"Sources": ["bids:raw:sub-01/anat/sub-01_acq-swi_swi.nii.gz"], "Type": "Lesion"},
    )
    lesions_tsv(
        ref_dir / "sub-01/anat/sub-01_acq-swi_desc-CMB_lesions.tsv",
        [
            # inside its lesion but off-centre (the true source, not the bloomed centre)
            dict(zip("xyz", mm((11, 9, 10)), strict=True), mars_class="lobar", region="frontal"),
            dict(zip("xyz", mm((30, 30, 10)), strict=True), mars_class="deep", region="thalamus"),
            dict(
                zip("xyz", mm((10, 30, 18)), strict=True),
                mars_class="infratentorial",
                region="cerebellum",
            ),
        ],
    )
    pred = np.zeros(SHAPE, np.uint8)
    cube(pred, (11, 10, 10))
    cube(pred, (10, 31, 18))
    save(out / "sub-01/anat/sub-01_acq-swi_label-CMB_mask.nii.gz", pred)
    save(a / "sub-01_acq-swi_swi.nii.gz", tiny)

    # sub-02: megre (raw echo files), classes from `region` only, one lesion without a row
    a = raw / "sub-02" / "anat"
    for e in (1, 2):
        save(a / f"sub-02_echo-{e}_part-mag_MEGRE.nii.gz", tiny)
    save(a / "sub-02_acq-other_T2w.nii.gz", tiny)  # not the same <source>: must not count
    ref = np.zeros(SHAPE, np.uint8)
    for c in [(8, 20, 6), (20, 8, 6), (32, 20, 14)]:
        cube(ref, c)
    save(ref_dir / "sub-02/anat/sub-02_label-CMB_mask.nii.gz", ref)
    lesions_tsv(
        ref_dir / "sub-02/anat/sub-02_desc-CMB_lesions.tsv",
        [
            dict(zip("xyz", mm((8, 20, 6)), strict=True), region="parietal"),
            dict(zip("xyz", mm((20, 8, 6)), strict=True), region="occipital"),
        ],
    )
    pred = np.zeros(SHAPE, np.uint8)
    cube(pred, (8, 20, 6))
    cube(pred, (30, 5, 20))  # false positive
    save(out / "sub-02/anat/sub-02_label-CMB_mask.nii.gz", pred)

    # sub-03 ses-1: qsm, no lesions, no prediction file
    save(raw / "sub-03/ses-1/anat/sub-03_ses-1_Chimap.nii.gz", tiny)
    save(
        ref_dir / "sub-03/ses-1/anat/sub-03_ses-1_label-CMB_mask.nii.gz",
        np.zeros(SHAPE, np.uint8),
    )

    # sub-04: t2starw known only from the prediction's sidecar
    ref = np.zeros(SHAPE, np.uint8)
    cube(ref, (20, 20, 12))
    save(ref_dir / "sub-04/anat/sub-04_run-1_label-CMB_mask.nii.gz", ref)
    save(
        out / "sub-04/anat/sub-04_run-1_label-CMB_mask.nii.gz",
        ref,
        sidecar={"Sources": ["bids:raw:sub-04/anat/sub-04_run-1_T2starw.nii.gz"]},
    )
    return out, ref_dir


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    return make_dataset(tmp_path)


def test_reference_scored_against_itself(dataset):
    _, ref_dir = dataset
    s = score_dirs(ref_dir, ref_dir)
    t = s.totals()
    assert t["n_images"] == 4 and t["n_ref"] == 7
    assert t["sensitivity"] == 1.0 and t["fp"] == 0 and t["precision"] == 1.0
    assert t["mean_abs_count_difference"] == 0.0
    assert t["subject_accuracy"] == 1.0


def test_totals_classes_and_kinds(dataset):
    out, ref_dir = dataset
    s = score_dirs(out, ref_dir)
    t = s.totals()
    assert (t["tp"], t["fp"], t["fn"]) == (4, 1, 3)
    assert t["sensitivity"] == pytest.approx(4 / 7)
    assert t["precision"] == pytest.approx(4 / 5)
    assert t["f1"] == pytest.approx(8 / 12)
    assert t["fp_per_subject"] == pytest.approx(0.25)
    assert t["mean_abs_count_difference"] == pytest.approx(0.5)  # |2-3|, |2-3|, 0, 0
    assert t["n_missing_predictions"] == 1
    assert s.missing_predictions == ["sub-03/ses-1/anat/sub-03_ses-1_label-CMB_mask.nii.gz"]
    assert t["subject_accuracy"] == 1.0 and t["subject_balanced_accuracy"] == 1.0

    kinds = {i.source: i.kind for i in s.images}
    assert kinds == {
        "sub-01_acq-swi": "swi",
        "sub-02": "megre",
        "sub-03_ses-1": "qsm",
        "sub-04_run-1": "t2starw",
    }
    c = s.per_class()
    assert (c["lobar"]["tp"], c["lobar"]["n_ref"]) == (2, 3)
    assert (c["deep"]["tp"], c["deep"]["n_ref"]) == (0, 1)
    assert c["deep"]["sensitivity"] == 0.0
    assert (c["infratentorial"]["tp"], c["infratentorial"]["n_ref"]) == (1, 1)
    assert (c["unknown"]["tp"], c["unknown"]["n_ref"]) == (1, 2)

    k = s.per_kind()
    assert k["swi"]["sensitivity"] == pytest.approx(2 / 3) and k["swi"]["fp"] == 0
    assert k["megre"]["sensitivity"] == pytest.approx(1 / 3)
    assert k["megre"]["fp_per_subject"] == 1.0
    assert k["qsm"]["n_ref"] == 0 and k["qsm"]["sensitivity"] is None
    assert k["qsm"]["fp_per_subject"] == 0.0
    assert k["t2starw"]["sensitivity"] == 1.0


def test_missing_prediction_counts_as_empty(tmp_path):
    out, ref_dir = make_dataset(tmp_path)
    (out / "sub-01/anat/sub-01_acq-swi_label-CMB_mask.nii.gz").unlink()
    s = score_dirs(out, ref_dir, participant_label=["sub-01"])
    assert len(s.images) == 1 and s.images[0].missing
    assert s.totals()["sensitivity"] == 0.0 and s.totals()["fn"] == 3
    assert s.images[0].row()["prediction"] == "missing"


def test_participant_and_session_selection(dataset):
    out, ref_dir = dataset
    s = score_dirs(out, ref_dir, participant_label=["02", "sub-04"])
    assert sorted(i.subject for i in s.images) == ["02", "04"]
    s = score_dirs(out, ref_dir, session_label=["1"])
    assert [i.subject for i in s.images] == ["03"]
    with pytest.raises(NoMatchError):
        score_dirs(out, ref_dir, participant_label=["99"])


def test_threshold_reads_probseg(dataset):
    out, ref_dir = dataset
    prob = np.zeros(SHAPE, np.float32)
    cube(prob, (10, 10, 10))
    prob[prob > 0] = 0.9
    cube(prob, (30, 30, 10), r=0)
    prob[30, 30, 10] = 0.3
    save(out / "sub-01/anat/sub-01_acq-swi_label-CMB_probseg.nii.gz", prob)
    hi = score_dirs(out, ref_dir, participant_label=["01"], threshold=0.5).images[0]
    lo = score_dirs(out, ref_dir, participant_label=["01"], threshold=0.2).images[0]
    assert (hi.pair.tp, hi.pair.fn) == (1, 2) and hi.score == pytest.approx(0.9)
    assert (lo.pair.tp, lo.pair.fn) == (2, 1)


def test_prediction_in_another_grid_fails_clearly(dataset):
    out, ref_dir = dataset
    shifted = AFF.copy()
    shifted[0, 3] += 1.0
    save(out / "sub-04/anat/sub-04_run-1_label-CMB_mask.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    s = score_dirs(out, ref_dir)
    assert len(s.images) == 3 and len(s.failed) == 1
    assert "sub-04_run-1_label-CMB_mask" in s.failed[0]["error"]
    assert "grid" in s.failed[0]["error"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sub-01_acq-swi_swi.nii.gz", "swi"),
        ("sub-01_acq-swiMag_T2starw.nii.gz", "swi"),
        ("sub-01_part-mag_T2starw.nii", "t2starw"),
        ("bids:raw:sub-01/anat/sub-01_echo-3_part-phase_MEGRE.nii.gz", "megre"),
        ("sub-01_ses-2_Chimap.nii.gz", "qsm"),
        ("sub-01_T1w.nii.gz", "unknown"),
    ],
)
def test_kind_from_name(name, kind):
    assert kind_from_name(name) == kind


def test_kind_from_entities_when_nothing_else(tmp_path):
    mask = save(tmp_path / "sub-05_acq-qsm_label-CMB_mask.nii.gz", np.zeros((2, 2, 2), np.uint8))
    assert infer_kind(mask) == ("qsm", "entities")
    mask = save(tmp_path / "sub-05_label-CMB_mask.nii.gz", np.zeros((2, 2, 2), np.uint8))
    assert infer_kind(mask)[0] == "unknown"


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_cli_writes_tsv_and_json(dataset, capsys):
    out, ref_dir = dataset
    assert main([str(out), str(ref_dir)]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "missing" in printed and "lobar" in printed
    rows = _read_tsv(out / "eval" / "cmb_eval.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02", "sub-03", "sub-04", "total"]
    assert rows[2]["session_id"] == "ses-1"
    assert rows[2]["prediction"] == "missing" and rows[2]["sensitivity"] == "n/a"
    assert (rows[-1]["tp"], rows[-1]["fp"], rows[-1]["fn"]) == ("4", "1", "3")
    data = json.loads((out / "eval" / "cmb_eval.json").read_text())
    assert data["totals"]["sensitivity"] == pytest.approx(4 / 7)
    assert data["per_class"]["infratentorial"]["sensitivity"] == 1.0
    assert data["per_kind"]["megre"]["fp"] == 1
    assert data["missing_predictions"] == ["sub-03/ses-1/anat/sub-03_ses-1_label-CMB_mask.nii.gz"]
    lesions = _read_tsv(out / "eval" / "cmb_eval_lesions.tsv")
    assert len(lesions) == 7 + 5  # reference lesions + predicted lesions
    assert "eval" in (out / ".bidsignore").read_text().splitlines()


def test_cli_options_and_out_prefix(dataset, tmp_path):
    out, ref_dir = dataset
    prefix = tmp_path / "scores" / "run1"
    rc = main(
        [str(out), str(ref_dir), "--match", "distance", "--match-mm", "0.4", "--out-prefix",
         str(prefix), "--participant_label", "01"]
    )  # fmt: skip
    assert rc == 0
    rows = _read_tsv(prefix.with_name("run1.tsv"))
    # Both found lesions are 0.5 mm off (one voxel of 0.5 mm): no match within 0.4 mm by distance.
    assert [r["participant_id"] for r in rows] == ["sub-01", "total"]
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == ("0", "2", "3")
    assert not (out / "eval").exists()


def test_cli_exit_18_without_masks(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "out"), str(tmp_path / "ref")]) == 18
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no reference masks" in err[0] and "sub-XX" in err[1]


def test_cli_exit_64_on_bad_usage(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path), "--match", "nearest"])
    assert exc.value.code == 64
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path), "--match-mm", "-2"])
    assert exc.value.code == 64
    assert main([str(tmp_path), str(tmp_path / "absent")]) == 64


def test_cli_exit_1_when_a_prediction_fails(dataset, capsys):
    out, ref_dir = dataset
    save(out / "sub-04/anat/sub-04_run-1_label-CMB_mask.nii.gz", np.zeros((8, 8, 8), np.uint8))
    assert main([str(out), str(ref_dir)]) == 1
    assert "FAILED" in capsys.readouterr().out
    data = json.loads((out / "eval" / "cmb_eval.json").read_text())
    assert data["totals"]["n_failed"] == 1 and data["totals"]["n_images"] == 3


def test_nested_prediction_dataset_is_not_taken_as_reference(dataset):
    out, ref_dir = dataset
    nested = ref_dir / "pred"
    save(nested / "sub-04/anat/sub-04_run-1_label-CMB_mask.nii", np.zeros(SHAPE, np.uint8))
    save(
        ref_dir / "derivatives/x/sub-09/anat/sub-09_label-CMB_mask.nii.gz", np.ones(SHAPE, np.uint8)
    )
    s = score_dirs(nested, ref_dir)
    assert sorted(i.subject for i in s.images) == ["01", "02", "03", "04"]
    # The uncompressed `.nii` prediction is found, and it is empty: one FN.
    sub4 = next(i for i in s.images if i.subject == "04")
    assert sub4.prediction == "sub-04/anat/sub-04_run-1_label-CMB_mask.nii"
    assert (sub4.pair.tp, sub4.pair.fn) == (0, 1)
