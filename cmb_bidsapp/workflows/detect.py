"""Detection workflow: normalisation, radial symmetry, the networks (or the provisional scoring),
registration to the template, lesion labels and the lesion table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import InputImage
from ..config import Config

PROVISIONAL_THRESHOLD = 0.5
"""Threshold of the provisional radial-symmetry scoring, used only when no model bundle exists."""

DEFAULT_FRST_RADII_MM = (1.0, 1.5, 2.0, 2.5)


def bundle_meta(models_dir: Path | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The bundle folder and its `bundle.json` (read only: weights are loaded in the node)."""
    from ..errors import UsageError
    from ..models.bundle import default_bundle_path

    folder = Path(models_dir) if models_dir else default_bundle_path()
    meta_path = folder / "bundle.json"
    if not meta_path.is_file():
        if models_dir:
            raise UsageError(
                "is not a model bundle (no bundle.json)",
                path=folder,
                fix="Point --models-dir at a folder written by cmb-bidsapp-train.",
            )
        return None, None
    try:
        return folder, json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(
            f"is not valid JSON ({err.msg})", path=meta_path, fix="Re-write the bundle."
        ) from None


def init_detect_wf(image: InputImage, config: Config) -> pe.Workflow:
    """From the preprocessed image and brain mask to the probability map, lesions and table.

    With a model bundle (the default one shipped in the package, or `--models-dir`): the U-Net
    candidate detector and the distilled student (`models/infer.py`). Without one (a development
    tree without weights): the provisional radial-symmetry scoring (`detect/candidates.py`).
    """
    from ..interfaces.anatomy import RegisterTemplate
    from ..interfaces.cleanup import CleanUp
    from ..interfaces.detect import (
        CandidateProbability,
        DetectNetworks,
        LabelLesions,
        LesionTable,
        RadialSymmetry,
    )
    from ..interfaces.preproc import Normalise

    nthreads = config.omp_nthreads
    folder, meta = bundle_meta(config.models_dir)
    wf = pe.Workflow(name="detect_wf")
    radii = (
        tuple(meta["preprocessing"].get("frst_radii_mm", DEFAULT_FRST_RADII_MM))
        if meta
        else DEFAULT_FRST_RADII_MM
    )
    if meta:
        wf.threshold = (
            config.threshold if config.threshold is not None else float(meta["default_threshold"])
        )
        wf.model_meta = {
            "ModelName": str(meta.get("name", folder.name)),
            "ModelVersion": str(meta.get("version", "0")),
            "ModelSHA256": _sha256(folder / "bundle.json"),
            "ModelDefault": config.models_dir is None,
        }
        step = (
            "A 3D U-Net on the normalised image and the radial symmetry map, run on a 0.8 mm "
            "isotropic working grid and mapped back to the native grid, proposed candidates "
            f"(detector probability ≥ {float(meta['t_det']):g}); a student classifier distilled from a "
            "multi-task teacher (Sundaresan et al., 2023; Hinton et al., 2015) scored each candidate, "
            f"and candidates scoring ≥ {wf.threshold:g} were kept. The networks were trained on "
            "simulated data only (see the model card)."
        )
    else:
        wf.threshold = config.threshold if config.threshold is not None else PROVISIONAL_THRESHOLD
        wf.model_meta = {"ModelName": "provisional radial-symmetry scoring", "ModelVersion": "0"}
        step = (
            "The radial symmetry map and the local contrast gave a provisional voxel-wise "
            f"microbleed probability, thresholded at {wf.threshold:g}."
        )
    wf.__desc__ = (
        "Intensities were normalised within the brain mask so that microbleeds are bright "
        "(1 − I/I₉₉ for magnitude images; a fixed ppm scale for QSM). A fast radial symmetry "
        f"transform (Loy and Zelinsky, 2003) with radii of {', '.join(f'{r:g}' for r in radii)} mm, "
        "computed in 3D or per slice for thick-slice acquisitions, highlighted round lesions. "
        f"{step} Lesions are 26-connected components within size bounds given in mm³. The image "
        "was registered to the MNI152NLin2009cAsym template (Fonov et al., 2011) with SimpleITK "
        "(Lowekamp et al., 2013; rigid then affine, Mattes mutual information), and each lesion was "
        "assigned the Microbleed Anatomical Rating Scale (MARS; Gregoire et al., 2009) region "
        "holding most of its volume. "
        "Mimic-aware clean-up rules then removed detections outside the size bounds of a "
        "microbleed (1.5–10 mm), vessels (continuity across slices and Hessian tubularity), "
        "diamagnetic calcifications (dipole pattern of the high-pass phase, or negative χ on QSM, "
        "when available), bilateral symmetric pallidal mineralisation, air–tissue artefact zones, "
        "and tissue-aware sulcal CSF and brain–air boundary detections that keep juxtacortical "
        "microbleeds; every removed candidate is listed with the rule that removed it."
    )

    inputnode = pe.Node(
        niu.IdentityInterface(fields=["preproc", "brain_mask", "phase"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "norm",
                "frst",
                "probseg",
                "labels",
                "candidates",
                "rejected",
                "detection",
                "lesions",
                "regions",
                "registration",
            ]
        ),
        name="outputnode",
    )
    norm = pe.Node(Normalise(kind=image.kind), name="normalise", mem_gb=0.5)
    frst = pe.Node(
        RadialSymmetry(num_threads=nthreads, radii_mm=list(radii)),
        name="radial_symmetry",
        n_procs=nthreads,
        mem_gb=1.5,
    )
    reg = pe.Node(
        RegisterTemplate(num_threads=nthreads),
        name="register_template",
        n_procs=nthreads,
        mem_gb=1.5,
    )
    if image.t1w is not None:
        reg.inputs.t1w = str(image.t1w)
    table = pe.Node(LesionTable(), name="lesion_table", mem_gb=0.3)
    clean = pe.Node(CleanUp(kind=image.kind), name="cleanup", mem_gb=1.0)
    # fmt: off
    wf.connect([
        (inputnode, norm, [("preproc", "in_file"), ("brain_mask", "in_mask")]),
        (inputnode, frst, [("brain_mask", "in_mask")]),
        (norm, frst, [("out_file", "in_file")]),
        (inputnode, reg, [("preproc", "in_file"), ("brain_mask", "in_mask")]),
        (inputnode, clean, [
            ("preproc", "in_preproc"),
            ("brain_mask", "in_mask"),
            ("phase", "in_phase"),
        ]),
        (reg, clean, [
            ("out_regions", "in_regions"),
            ("out_transform", "in_transform"),
            ("out_inverse", "in_inverse"),
            ("out_report", "in_registration"),
        ]),
        (clean, table, [("out_labels", "in_labels")]),
        (clean, outputnode, [("out_labels", "labels"), ("out_rejected", "rejected")]),
        (reg, table, [
            ("out_regions", "in_regions"),
            ("out_transform", "in_transform"),
            ("out_inverse", "in_inverse"),
            ("out_report", "in_registration"),
        ]),
        (norm, outputnode, [("out_file", "norm")]),
        (frst, outputnode, [("out_file", "frst")]),
        (table, outputnode, [("out_table", "lesions")]),
        (reg, outputnode, [("out_regions", "regions"), ("out_report", "registration")]),
    ])
    # fmt: on

    if meta:
        net = pe.Node(
            DetectNetworks(
                models_dir=str(folder) if config.models_dir else "",
                device=config.device,
                threshold=wf.threshold,
                num_threads=nthreads,
            ),
            name="detect_networks",
            n_procs=nthreads,
            mem_gb=2.0,
        )
        # fmt: off
        wf.connect([
            (norm, net, [("out_file", "in_norm")]),
            (frst, net, [("out_file", "in_frst")]),
            (inputnode, net, [("brain_mask", "in_mask")]),
            (net, clean, [
                ("out_labels", "in_labels"),
                ("out_probseg", "in_probseg"),
                ("out_candidates", "in_candidates"),
                ("out_rejected", "in_rejected"),
            ]),
            (net, table, [("out_probseg", "in_probseg")]),
            (net, outputnode, [
                ("out_probseg", "probseg"),
                ("out_candidates", "candidates"),
                ("out_meta", "detection"),
            ]),
        ])
        # fmt: on
    else:
        cand = pe.Node(CandidateProbability(), name="candidates", mem_gb=1.0)
        label = pe.Node(LabelLesions(threshold=wf.threshold), name="label_lesions", mem_gb=0.5)
        # fmt: off
        wf.connect([
            (norm, cand, [("out_file", "in_norm")]),
            (frst, cand, [("out_file", "in_frst")]),
            (inputnode, cand, [("brain_mask", "in_mask")]),
            (cand, label, [("out_probseg", "in_probseg")]),
            (label, clean, [("out_labels", "in_labels")]),
            (cand, clean, [("out_probseg", "in_probseg")]),
            (cand, table, [("out_probseg", "in_probseg")]),
            (cand, outputnode, [("out_probseg", "probseg")]),
        ])
        # fmt: on
    return wf


def _sha256(path: Path) -> str:
    from ..models.bundle import sha256_file

    return sha256_file(path)
