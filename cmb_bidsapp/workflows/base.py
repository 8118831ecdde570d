"""Top-level workflow builders: one Nipype graph per input image, gathered into one run."""

from __future__ import annotations

import json
import re

from nipype.pipeline import engine as pe

from .. import __version__
from ..bids import InputImage
from ..config import Config
from .detect import init_detect_wf
from .preproc import init_preproc_wf

DEFAULT_THRESHOLD = 0.5


def workflow_name() -> str:
    """Stable across runs of one minor version, so that a work dir can be resumed."""
    major_minor = "_".join(__version__.split(".")[:2])
    return re.sub(r"[^A-Za-z0-9_]", "_", f"cmb_bidsapp_{major_minor}_wf")


def init_cmb_wf(config: Config, inputs: list[InputImage]) -> pe.Workflow:
    """The whole participant run: one independent sub-workflow per image."""
    wf = pe.Workflow(name=workflow_name(), base_dir=str(config.work_dir))
    wf.__desc__ = _intro(inputs)
    for image in inputs:
        wf.add_nodes([init_single_image_wf(image, config)])
    return wf


def init_single_image_wf(image: InputImage, config: Config) -> pe.Workflow:
    """Preprocessing, detection, anatomy and the derivatives sink for one image."""
    from ..interfaces.derivatives import WriteDerivatives, image_to_json

    name = f"image_{image.image_id}_wf"
    wf = pe.Workflow(name=name)
    preproc_wf = init_preproc_wf(
        image, omp_nthreads=config.omp_nthreads, skull_strip=config.skull_strip
    )
    detect_wf = init_detect_wf(image, config)

    threshold = detect_wf.threshold
    provenance = {
        "model": detect_wf.model_meta,
        "preproc_description": preproc_wf.preproc_description,
    }
    sink = pe.Node(
        WriteDerivatives(
            image_json=image_to_json(image),
            output_dir=str(config.output_dir),
            bids_dir=str(config.bids_dir),
            threshold=threshold,
            provenance=json.dumps(provenance, sort_keys=True),
        ),
        name="ds_outputs",
        overwrite=True,
        run_without_submitting=True,
    )
    # fmt: off
    wf.connect([
        (preproc_wf, detect_wf, [
            ("outputnode.preproc", "inputnode.preproc"),
            ("outputnode.brain_mask", "inputnode.brain_mask"),
            ("outputnode.phase", "inputnode.phase"),
        ]),
        (preproc_wf, sink, [
            ("outputnode.preproc", "preproc"),
            ("outputnode.brain_mask", "brain_mask"),
            ("outputnode.brain_report", "brain_report"),
        ]),
        (detect_wf, sink, [
            ("outputnode.probseg", "probseg"),
            ("outputnode.labels", "labels"),
            ("outputnode.lesions", "lesions"),
            ("outputnode.rejected", "rejected"),
        ]),
    ])
    # fmt: on
    _add_report_node(wf, image, config, preproc_wf, detect_wf, sink, threshold)
    return wf


def _add_report_node(wf, image, config, preproc_wf, detect_wf, sink, threshold) -> None:
    """QC figures and record of the image, after the sink (see interfaces/reports.py)."""
    from ..interfaces.derivatives import image_to_json
    from ..interfaces.reports import ReportFigures

    report = pe.Node(
        ReportFigures(
            image_json=image_to_json(image),
            output_dir=str(config.output_dir),
            bids_dir=str(config.bids_dir),
            threshold=threshold,
        ),
        name="report_figures",
        overwrite=True,
        mem_gb=1.0,
    )
    # fmt: off
    wf.connect([
        (sink, report, [("out_files", "out_files")]),
        (preproc_wf, report, [
            ("outputnode.preproc", "preproc"),
            ("outputnode.brain_mask", "brain_mask"),
            ("outputnode.brain_report", "brain_report"),
            ("outputnode.bias", "bias"),
            ("outputnode.info", "input_info"),
        ]),
        (detect_wf, report, [
            ("outputnode.labels", "labels"),
            ("outputnode.candidates", "candidates"),
            ("outputnode.regions", "regions"),
            ("outputnode.registration", "registration"),
        ]),
    ])
    # fmt: on
    if detect_wf.get_node("register_template") is not None:
        wf.connect(detect_wf, "register_template.out_transform", report, "transform")


def _intro(inputs: list[InputImage]) -> str:
    kinds = sorted({i.kind for i in inputs})
    names = {"swi": "SWI", "t2starw": "T2*-weighted GRE", "megre": "multi-echo GRE", "qsm": "QSM"}
    return (
        f"Cerebral microbleeds were detected with *cmb-bidsapp* {__version__}, "
        f"which is based on Nipype (Gorgolewski et al., 2011) and reads BIDS with pybids "
        f"(Yarkoni et al., 2019). {len(inputs)} image(s) were processed "
        f"({', '.join(names[k] for k in kinds)})."
    )


def collect_methods(wf: pe.Workflow) -> str:
    """Gather the `__desc__` paragraphs of the workflow and its sub-workflows, without repeats."""
    seen: list[str] = []

    def visit(w: pe.Workflow) -> None:
        desc = getattr(w, "__desc__", None)
        if desc and desc not in seen:
            seen.append(desc)
        for node in w._graph.nodes():
            if isinstance(node, pe.Workflow):
                visit(node)

    visit(wf)
    return "\n\n".join(seen)
