"""The CleanUp Nipype interface: files in, kept labels, rejected table and report out."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_cleanup_rules import BLEED, VEIN, balls, phantom

from cmb_bidsapp.interfaces.cleanup import CleanUp


def _save(data, affine, path, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return str(path)


def test_cleanup_interface(tmp_path, monkeypatch):
    p = phantom(
        [
            dict(VEIN, centre=(0.0, 0.0, 0.0), axis=(0.0, 0.3, 1.0)),
            dict(BLEED, centre=(6.0, 0.0, 0.0)),
        ]
    )
    aff = p["affine"]
    lab = balls(p["mag"].shape, aff, [(0.0, 0.0, 0.0), (6.0, 0.0, 0.0)])
    prob = np.where(lab == 1, 0.7, np.where(lab == 2, 0.9, 0.0))
    monkeypatch.chdir(tmp_path)
    node = CleanUp(
        in_labels=_save(lab, aff, tmp_path / "labels.nii.gz", np.int16),
        in_preproc=_save(p["mag"], aff, tmp_path / "preproc.nii.gz"),
        in_mask=_save(p["mask"], aff, tmp_path / "mask.nii.gz", np.uint8),
        in_probseg=_save(prob, aff, tmp_path / "prob.nii.gz"),
        in_phase=_save(p["phase"], aff, tmp_path / "phase.nii.gz"),
        kind="megre",
        params={"continuity_strong_mm": 5.0},
    )
    res = node.run()
    out = res.outputs
    kept = np.asarray(nib.load(out.out_labels).dataobj)
    assert set(np.unique(kept)) == {0, 2}
    rej = pd.read_csv(out.out_rejected, sep="\t")
    assert list(rej["lesion_id"]) == [1] and rej["rule"][0].startswith("vessel: ")
    assert rej["probability"][0] == pytest.approx(0.7)
    report = json.loads(Path(out.out_report).read_text())
    assert report["RuleCounts"] == {"vessel": 1} and report["Kept"] == 1
    assert report["PhaseHandedness"]["handedness"] == 1
    assert report["Parameters"]["continuity_strong_mm"] == 5.0
    assert out.n_kept == 1 and out.n_rejected == 1
    feats = pd.read_csv(out.out_features, sep="\t")
    assert list(feats["lesion_id"]) == [1, 2]


def test_cleanup_merges_discriminator_rejections(tmp_path, monkeypatch):
    """The workflow's rejected table: the discriminator's rejections and the clean-up's, each
    clean-up rejection numbered as the detector's candidate under it."""
    p = phantom(
        [
            dict(VEIN, centre=(0.0, 0.0, 0.0), axis=(0.0, 0.3, 1.0)),
            dict(BLEED, centre=(6.0, 0.0, 0.0)),
        ]
    )
    aff = p["affine"]
    lab = balls(p["mag"].shape, aff, [(0.0, 0.0, 0.0), (6.0, 0.0, 0.0)])
    # detector candidates: 1 = a low-scoring blob elsewhere, 2 = the vein, 3 = the bleed
    cand = np.where(lab == 1, 2, np.where(lab == 2, 3, 0))
    cand[balls(p["mag"].shape, aff, [(-6.0, 0.0, 0.0)]) > 0] = 1
    student = pd.DataFrame(
        [{"candidate_id": 1, "x": -6.0, "y": 0.0, "z": 0.0, "probability": 0.1,
          "rule": "student score 0.10 < 0.50"}]
    )  # fmt: skip
    student.to_csv(tmp_path / "student.tsv", sep="\t", index=False)
    prob = np.where(lab == 1, 0.7, np.where(lab == 2, 0.9, 0.0))
    monkeypatch.chdir(tmp_path)
    res = CleanUp(
        in_labels=_save(lab, aff, tmp_path / "labels.nii.gz", np.int16),
        in_preproc=_save(p["mag"], aff, tmp_path / "preproc.nii.gz"),
        in_mask=_save(p["mask"], aff, tmp_path / "mask.nii.gz", np.uint8),
        in_probseg=_save(prob, aff, tmp_path / "prob.nii.gz"),
        in_phase=_save(p["phase"], aff, tmp_path / "phase.nii.gz"),
        in_candidates=_save(cand, aff, tmp_path / "cand.nii.gz", np.int16),
        in_rejected=str(tmp_path / "student.tsv"),
        kind="megre",
        params={"continuity_strong_mm": 5.0},
    ).run()
    rej = pd.read_csv(res.outputs.out_rejected, sep="\t", na_values=["n/a"])
    assert list(rej["candidate_id"]) == [1, 2]
    assert rej["rule"][0].startswith("student score") and pd.isna(rej["lesion_id"][0])
    assert rej["rule"][1].startswith("vessel: ") and rej["lesion_id"][1] == 1
    assert list(rej.columns[:2]) == ["candidate_id", "lesion_id"]
