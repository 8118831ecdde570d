"""Thin interface over reports/: the QC figures and QC record of one image, after the sink.

`ReportFigures` runs after `ds_outputs` (it takes the sink's `out_files`, so it starts only
once the derivatives are published) and writes through `bids.DerivativesWriter` into
`OUTPUT_DIR/sub-XX/figures/`. It never fails the image: a figure that cannot be drawn, or any
error, becomes a warning in the QC record (`desc-qc` JSON).
"""

from __future__ import annotations

import json
import traceback

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .base import set_threads


class _ReportIn(BaseInterfaceInputSpec):
    image_json = traits.Str(mandatory=True, desc="the InputImage, serialised")
    output_dir = Directory(mandatory=True)
    bids_dir = Directory(mandatory=True)
    out_files = traits.List(File(), desc="the sink's outputs (ordering: run after the sink)")
    preproc = File(exists=True, mandatory=True, desc="preprocessed image (source grid)")
    brain_mask = File(exists=True, mandatory=True)
    labels = File(exists=True, desc="lesion label map (lesion_id values)")
    candidates = File(
        exists=True, desc="every candidate, numbered as the rejected table's candidate_id"
    )
    bias = File(exists=True, desc="multiplicative bias field")
    regions = File(exists=True, desc="MARS map in the source grid")
    transform = File(exists=True, desc="native → template transform (SimpleITK)")
    registration = File(exists=True, desc="registration report JSON")
    brain_report = File(exists=True, desc="brain-extraction report JSON")
    input_info = File(exists=True, desc="input_info.json of load_input")
    threshold = traits.Float(desc="threshold of the final mask")
    num_threads = traits.Int(1, usedefault=True)


class _ReportOut(TraitedSpec):
    out_qc = File(desc="the image's QC record (JSON) in OUTPUT_DIR")
    n_figures = traits.Int(desc="figures written")


def _opt(value):
    return value if isdefined(value) else None


def _json(path):
    if not isdefined(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


class ReportFigures(SimpleInterface):
    """Figures (overlays, lesion and rejected-candidate crops) and the QC JSON of one image."""

    input_spec = _ReportIn
    output_spec = _ReportOut

    def _run_interface(self, runtime):
        from ..bids import DerivativesWriter
        from ..reports.subject import build_image_qc, failed_qc, qc_path
        from .derivatives import image_from_json

        set_threads(self.inputs.num_threads)
        image = image_from_json(self.inputs.image_json)
        writer = DerivativesWriter(self.inputs.output_dir, self.inputs.bids_dir)
        try:
            qc = build_image_qc(
                writer,
                image,
                preproc=self.inputs.preproc,
                brain_mask=self.inputs.brain_mask,
                labels=_opt(self.inputs.labels),
                candidates=_opt(self.inputs.candidates),
                bias=_opt(self.inputs.bias),
                regions=_opt(self.inputs.regions),
                transform=_opt(self.inputs.transform),
                registration=_json(self.inputs.registration),
                brain_report=_json(self.inputs.brain_report),
                input_info=_json(self.inputs.input_info),
                threshold=_opt(self.inputs.threshold),
            )
            n = len(qc["figures"]) + len(qc["lesion_figures"]) + len(qc["rejected_figures"])
        except Exception as err:  # the report must never fail an image whose outputs exist
            qc = failed_qc(writer, image, "", None)
            qc.update(
                {
                    "status": "ok",
                    "error": None,
                    "warnings": [f"the QC figures could not be made ({type(err).__name__}: {err})"],
                    "traceback": traceback.format_exc(limit=5),
                }
            )
            try:
                writer.write_json(qc_path(writer, image), qc)
            except OSError:
                pass
            n = 0
        self._results["out_qc"] = str(qc_path(writer, image))
        self._results["n_figures"] = n
        return runtime
