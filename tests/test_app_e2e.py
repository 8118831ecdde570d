"""End to end: a small simulated cohort through `cmb-bidsapp participant`, resume, concurrency,
failure handling, and the real MEGRE crop."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cmb_bidsapp.evaluation import score_dirs
from cmb_bidsapp.validation import validate

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CONTRACT_SUFFIXES = (
    "_desc-brain_mask.nii.gz",
    "_desc-brain_mask.json",
    "_label-CMB_probseg.nii.gz",
    "_label-CMB_probseg.json",
    "_label-CMB_mask.nii.gz",
    "_label-CMB_mask.json",
    "_desc-CMB_lesions.tsv",
    "_desc-CMB_lesions.json",
    "_desc-CMB_counts.tsv",
    "_desc-CMB_counts.json",
)
# A small cohort (coarse 1.3-1.6 mm grids: fast, but outside the 0.45-1 mm the default networks
# were trained for) for the contract, the validator, resume, concurrency and failures.
SMALL_COHORT = [
    "--n-subjects", "3", "--seed", "7", "--size", "small",
    "--kinds", "swi,t2starw,megre", "--skull-fraction", "0.34",
]  # fmt: skip


def app(*args, check=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "cmb-bidsapp"), *map(str, args)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def digests(root: Path) -> dict[str, str]:
    """sha256 of every image and table under sub-*/ (logs, reports and figures excluded)."""
    out = {}
    for path in sorted(root.glob("sub-*/**/*")):
        if (
            path.is_file()
            and "figures" not in path.parts
            and path.suffix in (".gz", ".tsv", ".json")
        ):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids = root / "bids"
    subprocess.run(
        [str(BIN / "cmb-bidsapp-synth"), str(bids), *SMALL_COHORT],
        check=True,
        capture_output=True,
    )
    out, work = root / "out", root / "work"
    t0 = time.monotonic()
    proc = app(bids, out, "participant", "-w", work, "--nprocs", "2", check=0)
    first = time.monotonic() - t0
    return {"root": root, "bids": bids, "out": out, "work": work, "first_s": first, "proc": proc}


def test_contract_outputs_and_validity(cohort):
    out, bids = cohort["out"], cohort["bids"]
    raw = sorted(p for p in bids.glob("sub-*/anat/*.nii.gz") if "part-phase" not in p.name)
    sources = {
        p.name.split("_echo-")[0] if "_echo-" in p.name else p.name.rsplit("_", 1)[0] for p in raw
    }
    assert len(sources) == 3
    for source in sources:
        sub = source.split("_")[0]
        files = {p.name for p in (out / sub / "anat").iterdir()}
        for suffix in CONTRACT_SUFFIXES:
            assert source + suffix in files, f"missing {source}{suffix}"
        assert any(f.startswith(source + "_desc-preproc_") for f in files)
        assert (out / f"{sub}.html").exists()
        # every output image is in the source grid
        src = next(p for p in raw if p.name.startswith(source))
        mask = nib.load(out / sub / "anat" / f"{source}_label-CMB_mask.nii.gz")
        assert mask.shape == nib.load(src).shape
        assert np.allclose(mask.affine, nib.load(src).affine, atol=1e-4)
        sidecar = json.loads((out / sub / "anat" / f"{source}_label-CMB_mask.json").read_text())
        assert sidecar["Type"] == "Lesion" and sidecar["Sources"] and "Threshold" in sidecar
        lesions = pd.read_csv(out / sub / "anat" / f"{source}_desc-CMB_lesions.tsv", sep="\t")
        for col in (
            "lesion_id",
            "x",
            "y",
            "z",
            "i",
            "j",
            "k",
            "volume_mm3",
            "diameter_mm",
            "probability",
            "mars_class",
            "region",
            "hemisphere",
        ):
            assert col in lesions.columns
    assert (out / "logs" / "CITATION.md").read_text().startswith("# Methods")
    # the run's timings: every stage of every image, then the run's own phases
    (timings,) = (out / "logs").glob("*/timings.tsv")
    rows = pd.read_csv(timings, sep="\t")
    assert list(rows.columns) == ["image", "stage", "seconds"]
    per_image = rows[rows["image"] != "(run)"]
    assert per_image["image"].nunique() == 3 and "detect_networks" in set(per_image["stage"])
    run = dict(
        zip(rows.loc[rows["image"] == "(run)", "stage"], rows["seconds"][rows["image"] == "(run)"])
    )
    assert list(run) == ["setup", "workflow", "reports", "total"]
    assert run["total"] >= run["setup"] + run["workflow"] + run["reports"] - 0.05
    result = validate(out)
    assert result.valid, result.summary()


def test_scoring_runs_on_the_outputs(cohort):
    """The outputs score against the simulator's reference (the small grids are outside the
    networks' range: accuracy is measured on full-size subjects, see docs/model-card.md)."""
    scores = score_dirs(cohort["out"], cohort["bids"] / "derivatives" / "reference")
    totals = scores.totals()
    print(json.dumps(totals, indent=1, default=str))
    assert totals["n_images"] == 3 and totals["n_missing_predictions"] == 0
    assert totals["n_ref"] >= 1
    # as after `make demo` and the eval command it prints: the scores land in OUTPUT_DIR/eval,
    # and OUTPUT_DIR stays a valid derivatives dataset
    ref = cohort["bids"] / "derivatives" / "reference"
    proc = subprocess.run(
        [str(BIN / "cmb-bidsapp-eval"), str(cohort["out"]), str(ref)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (cohort["out"] / "eval" / "cmb_eval.tsv").is_file()
    result = validate(cohort["out"])
    assert result.valid, result.summary()


def test_resume_is_fast_and_identical(cohort):
    before = digests(cohort["out"])
    t0 = time.monotonic()
    app(
        cohort["bids"], cohort["out"], "participant", "-w", cohort["work"], "--nprocs", "2", check=0
    )
    second = time.monotonic() - t0
    assert digests(cohort["out"]) == before
    assert second < 0.5 * cohort["first_s"], (second, cohort["first_s"])


def test_concurrent_participants_into_one_output(cohort, tmp_path):
    out = tmp_path / "out"
    subjects = sorted(p.name for p in cohort["bids"].glob("sub-*"))
    procs = [
        subprocess.Popen(
            [
                str(BIN / "cmb-bidsapp"),
                str(cohort["bids"]),
                str(out),
                "participant",
                "--participant-label",
                sub,
                "-w",
                str(cohort["work"]),
                "--nprocs",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sub in subjects[:2]
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert not list(out.rglob("*.part"))
    # both subjects complete and identical to the single run
    ref = digests(cohort["out"])
    got = digests(out)
    assert got and all(ref[k] == v for k, v in got.items())
    assert {k.split("/")[0] for k in got} == set(subjects[:2])


def test_one_broken_image_gives_exit_1_and_the_others_complete(cohort, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(cohort["bids"], bids, ignore=shutil.ignore_patterns("derivatives"))
    victim = sorted(bids.glob("sub-*/anat/*_T2starw.nii.gz"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated gzip
    out = tmp_path / "out"
    proc = app(
        bids,
        out,
        "participant",
        "-w",
        cohort["work"],
        "--nprocs",
        "2",
        "--skip-bids-validation",
        check=1,
    )
    assert victim.name in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    victim_sub = victim.name.split("_")[0]
    done = {p.name.split("_")[0] for p in out.rglob("*_desc-CMB_counts.tsv")}
    assert done == {p.name for p in bids.glob("sub-*")} - {victim_sub}
    assert not list((out / victim_sub).rglob("*.nii.gz")) if (out / victim_sub).exists() else True
    assert (out / f"{victim_sub}.html").exists()  # the report says why it failed


def test_real_megre_crop(shared_data, tmp_path):
    """The real 3-echo GRE crop (no known microbleeds) runs through the workflow."""
    mag = nib.load(shared_data / "real-megre" / "Mag.nii")
    phase = nib.load(shared_data / "real-megre" / "Phase.nii")
    bids = tmp_path / "bids"
    anat = bids / "sub-real" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "real", "BIDSVersion": "1.10.0"})
    )
    for e, te in enumerate((0.004, 0.008, 0.012), 1):
        for part, img in (("mag", mag), ("phase", phase)):
            stem = anat / f"sub-real_echo-{e}_part-{part}_MEGRE"
            nib.save(
                nib.Nifti1Image(np.asarray(img.dataobj)[..., e - 1].astype(np.float32), img.affine),
                f"{stem}.nii.gz",
            )
            meta = {
                "EchoTime": te,
                "MagneticFieldStrength": 3,
                "RepetitionTime": 0.03,
                "FlipAngle": 15,
            }
            if part == "phase":
                meta["Units"] = "arbitrary"
            Path(f"{stem}.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    app(bids, out, "participant", "-w", tmp_path / "work", check=0)
    counts = pd.read_csv(out / "sub-real" / "anat" / "sub-real_desc-CMB_counts.tsv", sep="\t")
    assert len(counts) == 1 and counts["total"].iloc[0] >= 0
    prep = nib.load(out / "sub-real" / "anat" / "sub-real_desc-preproc_T2starw.nii.gz")
    assert prep.shape == mag.shape[:3]
    sidecar = json.loads(
        (out / "sub-real" / "anat" / "sub-real_desc-preproc_T2starw.json").read_text()
    )
    assert len(sidecar["Sources"]) == 6  # three magnitudes and three phases
