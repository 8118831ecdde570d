"""A small fabricated cohort of participant outputs for the report and group tests (no pipeline run).

`make_cohort(root)` writes, through the app's own derivatives writer:

- sub-01 ses-1 (T2starw): a brain made from the MNI template on a 1 x 1 x 3 mm grid (thick
  slices, RAS, identical to MNI space so an identity transform is the true registration),
  3 dark lesions at known MNI positions, 5 rejected candidates with their rule, a bias field,
  the MARS map, MNI columns;
- sub-01 ses-2: failed (a message and no output);
- sub-02 (MEGRE, LPS-oriented copy): no lesion, no rejected table, no registration record, QC
  built from the published derivatives only (as `--reports-only` after the work dir is gone);
- sub-03: counts and lesion tables only (older outputs, no QC record, no figures);
- sub-04: in BIDS_DIR, no output at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from cmb_bidsapp.bids import DerivativesWriter, InputImage
from cmb_bidsapp.config import Config
from cmb_bidsapp.detect.lesions import lesion_table
from cmb_bidsapp.outputs import COUNT_COLUMNS, LESION_COLUMNS, counts_row

LESIONS_MNI = np.array([[-30.0, 24.0, 36.0], [22.0, -8.0, 3.0], [6.0, -44.0, -30.0]])
"""Lesion centres (MNI mm): left frontal (lobar), right basal ganglia (deep), cerebellum."""
REJECTED_MNI = np.array(
    [[40.0, 10.0, 30.0], [-20.0, -60.0, 20.0], [10.0, 40.0, 10.0], [-40.0, -20.0, 0.0], [0, 0, 45]]
)
FAILURE = "sub-01/ses-2/anat/sub-01_ses-2_T2starw.nii.gz: the image is empty (all zeros). Check the conversion from DICOM."
Z_STEP = 3


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image, brain mask, MARS map, affine): the template subsampled to 1 x 1 x 3 mm."""
    from cmb_bidsapp.anatomy import templates
    from cmb_bidsapp.anatomy.mars import mars_map_mni

    t1 = templates.load_template()
    mask = np.asanyarray(templates.template_mask().dataobj)[:, :, ::Z_STEP] > 0
    mars = np.asanyarray(mars_map_mni().dataobj)[:, :, ::Z_STEP].astype(np.int16)
    data = np.asanyarray(t1.dataobj, dtype=np.float32)[:, :, ::Z_STEP].copy()
    affine = t1.affine.copy()
    affine[:3, 2] *= Z_STEP
    rng = np.random.default_rng(0)
    data = (data / max(float(data.max()), 1e-6) * 800 + 100) * mask
    data += rng.normal(0, 15, data.shape).astype(np.float32) * mask
    return data.astype(np.float32), mask, mars, affine


def _paint(data, affine, centres_mm, radius_mm, value):
    """Darken spheres; returns the label map (1..n) of the painted voxels."""
    labels = np.zeros(data.shape, np.int32)
    grid = np.indices(data.shape).reshape(3, -1).T
    inv = np.linalg.inv(affine)
    for n, c in enumerate(centres_mm, start=1):
        v = inv[:3, :3] @ c + inv[:3, 3]
        lo = np.maximum(np.floor(v - 4).astype(int), 0)
        hi = np.minimum(np.ceil(v + 5).astype(int), data.shape)
        sub = np.indices(hi - lo).reshape(3, -1).T + lo
        mm = sub @ affine[:3, :3].T + affine[:3, 3]
        inside = np.linalg.norm(mm - c, axis=1) <= radius_mm
        idx = tuple(sub[inside].T)
        data[idx] = value
        labels[idx] = n
    del grid
    return labels


def _write_outputs(writer, image, data, affine, mask, labels, lesions, rejected, threshold):
    writer.write_nifti(image, mask, affine, "mask", desc="brain", dtype=np.uint8,
                       meta={"Type": "Brain", "Method": "deepbet", "SkullDetected": True})  # fmt: skip
    writer.write_nifti(image, data, affine, image.output_suffix, desc="preproc",
                       meta={"SkullStripped": False})  # fmt: skip
    writer.write_nifti(
        image,
        labels > 0,
        affine,
        "mask",
        label="CMB",
        dtype=np.uint8,
        meta={"Type": "Lesion", "Threshold": threshold, "ModelName": "test model",
              "ModelVersion": "1.2", "ModelSHA256": "ab" * 32},
    )  # fmt: skip
    cols = [c for c in LESION_COLUMNS if c in lesions.columns]
    cols += [c for c in lesions.columns if c not in cols]
    writer.write_tsv(image, lesions[cols], desc="CMB", suffix="lesions",
                     dictionary={c: LESION_COLUMNS.get(c, {"Description": c}) for c in cols})  # fmt: skip
    if rejected is not None:
        writer.write_tsv(image, rejected, desc="CMBrejected", suffix="lesions",
                         dictionary={c: {"Description": c} for c in rejected.columns})  # fmt: skip
    writer.write_tsv(image, counts_row(lesions, threshold), desc="CMB", suffix="counts",
                     dictionary=COUNT_COLUMNS)  # fmt: skip


def _table(labels, affine, data, mars, mni: bool) -> pd.DataFrame:
    prob = np.where(labels > 0, 0.9, 0.0).astype(np.float32)
    prob[labels == 2] = 0.7
    table = lesion_table(labels, affine, prob, region_map=mars)
    if mni:
        table["x_mni"], table["y_mni"], table["z_mni"] = table["x"], table["y"], table["z"]
    return table


def make_cohort(root: Path) -> dict:
    """Write the cohort (module docstring); return what the tests need to check against."""
    import SimpleITK as sitk

    from cmb_bidsapp.reports.subject import build_image_qc, write_reports
    from cmb_bidsapp.workflows.group import run_group

    root = Path(root)
    bids = root / "bids"
    out = root / "out"
    work = root / "work"
    work.mkdir(parents=True)
    bids.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "reports test", "BIDSVersion": "1.10.0"})
    )
    for sub in ("sub-01", "sub-02", "sub-03", "sub-04"):
        (bids / sub / "anat").mkdir(parents=True)
    writer = DerivativesWriter(out, bids)
    writer.init_dataset()
    (out / "logs").mkdir()
    (out / "logs" / "CITATION.md").write_text(
        "# Methods\n\nMicrobleeds were detected with *cmb-bidsapp* (test).\n\n## References\n\n- A ref.\n"
    )
    data, mask, mars, affine = phantom()

    # sub-01 ses-1: lesions, rejected candidates, every figure
    im1 = InputImage("01", "1", "t2starw", [bids / "sub-01/ses-1/anat/sub-01_ses-1_T2starw.nii.gz"],
                     entities={"subject": "01", "session": "1"}, suffix="T2starw")  # fmt: skip
    d1 = data.copy()
    labels = _paint(d1, affine, LESIONS_MNI, 1.6, 60.0)
    _paint(d1, affine, REJECTED_MNI, 1.2, 300.0)
    lesions = _table(labels, affine, d1, mars, mni=True)
    inv = np.linalg.inv(affine)
    rvox = np.rint(REJECTED_MNI @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    rules = ["student score 0.12 < 0.5", "vessel (tubularity)", "student score 0.31 < 0.5",
             "outside the brain (CSF)", "student score 0.44 < 0.5"]  # fmt: skip
    rejected = pd.DataFrame(
        {
            "lesion_id": np.arange(1, 6),
            "x": REJECTED_MNI[:, 0], "y": REJECTED_MNI[:, 1], "z": REJECTED_MNI[:, 2],
            "i": rvox[:, 0], "j": rvox[:, 1], "k": rvox[:, 2],
            "volume_mm3": [6.0, 9.0, 3.0, 6.0, 3.0],
            "probability": [0.12, 0.05, 0.31, 0.02, 0.44],
            "region": ["frontal"] * 5,
            "rule": rules,
        }
    )  # fmt: skip
    _write_outputs(writer, im1, d1, affine, mask, labels, lesions, rejected, 0.5)
    files = {}
    for name, arr, dtype in (("preproc", d1, np.float32), ("mask", mask, np.uint8),
                             ("labels", labels, np.int16), ("mars", mars, np.int16),
                             ("bias", 1 + 0.1 * np.indices(mask.shape)[0] / mask.shape[0], np.float32)):  # fmt: skip
        files[name] = work / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(arr).astype(dtype), affine), str(files[name]))
    tfm = work / "native_to_template.tfm"
    sitk.WriteTransform(sitk.AffineTransform(3), str(tfm))
    registration = {"Template": "MNI152NLin2009cAsym", "Stage": "affine", "Flag": False,
                    "Reason": "", "Quality": {"nmi": 1.2, "mask_dice": 0.97}}  # fmt: skip
    build_image_qc(
        writer, im1, preproc=files["preproc"], brain_mask=files["mask"], labels=files["labels"],
        bias=files["bias"], regions=files["mars"], transform=tfm, registration=registration,
        brain_report={"method": "deepbet", "skull_detected": True, "warnings": []},
        input_info={"shape": list(mask.shape), "voxel_sizes_mm": [1.0, 1.0, 3.0],
                    "orientation": "RAS", "thick_slices": True},
        threshold=0.5,
    )  # fmt: skip

    # sub-01 ses-2: failed
    im1b = InputImage("01", "2", "t2starw", [bids / "sub-01/ses-2/anat/sub-01_ses-2_T2starw.nii.gz"],
                      entities={"subject": "01", "session": "2"}, suffix="T2starw")  # fmt: skip

    # sub-02: MEGRE, LPS copy, no lesion, registration flagged; QC from the derivatives only
    im2 = InputImage("02", None, "megre",
                     [bids / f"sub-02/anat/sub-02_echo-{e}_part-mag_MEGRE.nii.gz" for e in (1, 2)],
                     entities={"subject": "02"}, suffix="MEGRE")  # fmt: skip
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = mask.shape[0] - 1, mask.shape[1] - 1
    aff2 = affine @ flip
    d2 = data[::-1, ::-1].copy()
    empty = np.zeros(mask.shape, np.int32)
    _write_outputs(writer, im2, d2, aff2, mask[::-1, ::-1], empty,
                   _table(empty, aff2, d2, mars, mni=True), None, 0.5)  # fmt: skip

    # sub-03: tables only, no QC record (an older version's outputs)
    im3 = InputImage("03", None, "swi", [bids / "sub-03/anat/sub-03_swi.nii.gz"],
                     entities={"subject": "03"}, suffix="swi")  # fmt: skip
    l3 = _paint(data.copy(), affine, LESIONS_MNI[:2], 1.6, 60.0)
    t3 = _table(l3, affine, data, mars, mni=False)
    p3 = writer.path_for(im3, "lesions", extension=".tsv", desc="CMB")
    p3.parent.mkdir(parents=True, exist_ok=True)
    writer.write_tsv(im3, t3, desc="CMB", suffix="lesions", dictionary={})
    writer.write_tsv(
        im3, counts_row(t3, 0.5), desc="CMB", suffix="counts", dictionary=COUNT_COLUMNS
    )
    writer.write_nifti(im3, l3 > 0, affine, "mask", label="CMB", dtype=np.uint8,
                       meta={"Type": "Lesion"})  # fmt: skip

    config = Config(bids_dir=bids, output_dir=out, analysis_level="participant",
                    command=["cmb-bidsapp", str(bids), str(out), "participant"])  # fmt: skip
    write_reports(config, [im1, im1b, im2], failures={im1b.image_id: FAILURE})
    gconfig = Config(bids_dir=bids, output_dir=out, analysis_level="group",
                     command=["cmb-bidsapp", str(bids), str(out), "group"])  # fmt: skip
    assert run_group(gconfig) == 0

    def info(image, status, n_lesions, n_rej):
        tsv = writer.path_for(image, "lesions", extension=".tsv", desc="CMB")
        return {"source": image.source_name, "status": status, "n_lesions": n_lesions,
                "lesions_tsv": tsv if tsv.exists() else None, "n_rejected_shown": n_rej}  # fmt: skip

    return {
        "output_dir": out,
        "bids_dir": bids,
        "writer": writer,
        "inputs": {"im1": im1, "im1b": im1b, "im2": im2, "im3": im3},
        "images": {
            "sub-01": [info(im1, "ok", 3, 5), info(im1b, "failed", 0, 0)],
            "sub-02": [info(im2, "ok", 0, 0)],
        },
        "failure_message": FAILURE,
        "n_images": 4,
        "totals": [3, 0, 2],
        "lesions": lesions,
        "affine": affine,
        "config": config,
    }
