"""Preprocessing workflow: read the input (MEGRE echoes combined), brain mask, N4 bias correction."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import InputImage

_KIND_TEXT = {
    "swi": "The susceptibility-weighted image (SWI)",
    "t2starw": "The T2*-weighted gradient-echo image",
    "megre": "The echoes of the multi-echo gradient-echo acquisition were combined into one magnitude "
    "image by a T2*-weighted average (see the documentation), and the combined image",
    "qsm": "The quantitative susceptibility map (QSM, ppm)",
}


def init_preproc_wf(
    image: InputImage, *, omp_nthreads: int = 1, skull_strip: str = "auto"
) -> pe.Workflow:
    """Read, brain-extract and bias-correct one image, in its own grid (no resampling)."""
    from ..interfaces.preproc import BiasCorrection, BrainExtraction, LoadInput

    wf = pe.Workflow(name="preproc_wf")
    bias_text = (
        "was not bias-corrected (a susceptibility map has no receive bias)"
        if image.kind == "qsm"
        else "was corrected for intensity non-uniformity with N4 (Tustison et al., 2010) as "
        "implemented in SimpleITK"
    )
    skull_text = {
        "auto": "A brain mask was computed with deepbet (Fisch et al., 2024), or from the image's "
        "non-zero support when the input was detected as already brain-extracted",
        "force": "A brain mask was computed with deepbet (Fisch et al., 2024)",
        "skip": "Brain extraction was skipped; the mask is the image's non-zero support",
    }[skull_strip]
    wf.__desc__ = (
        f"{_KIND_TEXT[image.kind]} {bias_text}. {skull_text}, with a morphological fallback when "
        "deepbet failed. All processing took place in the image's native grid."
    )
    wf.preproc_description = f"{_KIND_TEXT[image.kind]} {bias_text}."

    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["preproc", "brain_mask", "brain_report", "phase", "bias", "info"]
        ),
        name="outputnode",
    )
    load = pe.Node(
        LoadInput(
            in_files=[str(f) for f in image.files],
            kind=image.kind,
            units=str(image.metadata.get("Units", "")),
            num_threads=omp_nthreads,
        ),
        name="load_input",
        n_procs=omp_nthreads,
        mem_gb=1.0,
    )
    if image.phase_files:
        load.inputs.phase_files = [str(f) for f in image.phase_files]
    if image.echo_times:
        load.inputs.echo_times = list(image.echo_times)
    brain = pe.Node(
        BrainExtraction(kind=image.kind, mode=skull_strip, num_threads=omp_nthreads),
        name="brain_extraction",
        n_procs=omp_nthreads,
        mem_gb=1.5,
    )
    bias = pe.Node(
        BiasCorrection(kind=image.kind, num_threads=omp_nthreads),
        name="bias_correction",
        n_procs=omp_nthreads,
        mem_gb=1.0,
    )
    # fmt: off
    wf.connect([
        (load, brain, [("out_file", "in_file")]),
        (load, bias, [("out_file", "in_file")]),
        (brain, bias, [("out_mask", "in_mask")]),
        (bias, outputnode, [("out_file", "preproc"), ("out_bias", "bias")]),
        (brain, outputnode, [("out_mask", "brain_mask"), ("out_report", "brain_report")]),
        (load, outputnode, [("out_phase", "phase"), ("out_info", "info")]),
    ])
    # fmt: on
    return wf
