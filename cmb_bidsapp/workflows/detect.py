"""Detection workflow: normalisation, radial symmetry, candidate probability, lesions and regions."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import InputImage
from ..config import Config

PROVISIONAL_THRESHOLD = 0.5
"""Threshold of the provisional radial-symmetry scoring (replaced by the model card's)."""


def init_detect_wf(image: InputImage, config: Config) -> pe.Workflow:
    """From the preprocessed image and brain mask to the probability map, lesions and table."""
    from ..interfaces.anatomy import RegisterTemplate
    from ..interfaces.detect import CandidateProbability, LabelLesions, LesionTable, RadialSymmetry
    from ..interfaces.preproc import Normalise

    nthreads = config.omp_nthreads
    wf = pe.Workflow(name="detect_wf")
    wf.threshold = config.threshold if config.threshold is not None else PROVISIONAL_THRESHOLD
    wf.model_meta = {"ModelName": "provisional radial-symmetry scoring", "ModelVersion": "0"}
    wf.__desc__ = (
        "Intensities were normalised within the brain mask so that microbleeds are bright "
        "(1 − I/I₉₉ for magnitude images; a fixed ppm scale for QSM). A fast radial symmetry "
        "transform (Loy and Zelinsky, 2003) with radii given in millimetres, computed in 3D or per "
        "slice for thick-slice acquisitions, and the local contrast gave a voxel-wise microbleed "
        f"probability, thresholded at {wf.threshold:g}. Lesions are 26-connected components within "
        "size bounds given in mm³. The image was registered to the MNI152NLin2009cAsym template "
        "with SimpleITK (rigid then affine, Mattes mutual information), and each lesion was "
        "assigned the Microbleed Anatomical Rating Scale (MARS; Gregoire et al., 2009) region "
        "holding most of its volume."
    )

    inputnode = pe.Node(
        niu.IdentityInterface(fields=["preproc", "brain_mask", "phase"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["norm", "frst", "probseg", "labels", "lesions", "regions", "registration"]
        ),
        name="outputnode",
    )
    norm = pe.Node(Normalise(kind=image.kind), name="normalise", mem_gb=0.5)
    frst = pe.Node(
        RadialSymmetry(num_threads=nthreads), name="radial_symmetry", n_procs=nthreads, mem_gb=1.5
    )
    cand = pe.Node(CandidateProbability(), name="candidates", mem_gb=1.0)
    label = pe.Node(LabelLesions(threshold=wf.threshold), name="label_lesions", mem_gb=0.5)
    reg = pe.Node(
        RegisterTemplate(num_threads=nthreads),
        name="register_template",
        n_procs=nthreads,
        mem_gb=1.5,
    )
    if image.t1w is not None:
        reg.inputs.t1w = str(image.t1w)
    table = pe.Node(LesionTable(), name="lesion_table", mem_gb=0.3)
    # fmt: off
    wf.connect([
        (inputnode, norm, [("preproc", "in_file"), ("brain_mask", "in_mask")]),
        (inputnode, frst, [("brain_mask", "in_mask")]),
        (norm, frst, [("out_file", "in_file")]),
        (norm, cand, [("out_file", "in_norm")]),
        (frst, cand, [("out_file", "in_frst")]),
        (inputnode, cand, [("brain_mask", "in_mask")]),
        (cand, label, [("out_probseg", "in_probseg")]),
        (inputnode, reg, [("preproc", "in_file"), ("brain_mask", "in_mask")]),
        (label, table, [("out_labels", "in_labels")]),
        (cand, table, [("out_probseg", "in_probseg")]),
        (reg, table, [
            ("out_regions", "in_regions"),
            ("out_transform", "in_transform"),
            ("out_inverse", "in_inverse"),
            ("out_report", "in_registration"),
        ]),
        (norm, outputnode, [("out_file", "norm")]),
        (frst, outputnode, [("out_file", "frst")]),
        (cand, outputnode, [("out_probseg", "probseg")]),
        (label, outputnode, [("out_labels", "labels")]),
        (table, outputnode, [("out_table", "lesions")]),
        (reg, outputnode, [("out_regions", "regions"), ("out_report", "registration")]),
    ])
    # fmt: on
    return wf
