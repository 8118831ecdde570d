"""The derivatives sink: every output of one image goes through `bids.DerivativesWriter` here.

The counts TSV is written last: its presence marks an image whose outputs are complete.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bids import DerivativesWriter, InputImage
from ..errors import CMBError
from ..outputs import COUNT_COLUMNS, LESION_COLUMNS, REJECTED_COLUMNS, counts_row
from .base import load, user_error


def image_to_json(image: InputImage) -> str:
    """Serialise an InputImage for a Nipype input (a stable string, so caching works)."""
    d = {
        "subject": image.subject,
        "session": image.session,
        "kind": image.kind,
        "files": [str(f) for f in image.files],
        "phase_files": [str(f) for f in image.phase_files],
        "echo_times": image.echo_times,
        "entities": image.entities,
        "suffix": image.suffix,
        "t1w": str(image.t1w) if image.t1w else None,
    }
    return json.dumps(d, sort_keys=True)


def image_from_json(text: str) -> InputImage:
    from pathlib import Path

    d = json.loads(text)
    return InputImage(
        subject=d["subject"],
        session=d["session"],
        kind=d["kind"],
        files=[Path(f) for f in d["files"]],
        phase_files=[Path(f) for f in d["phase_files"]],
        echo_times=d["echo_times"],
        entities=d["entities"],
        suffix=d["suffix"],
        t1w=Path(d["t1w"]) if d.get("t1w") else None,
    )


class _SinkIn(BaseInterfaceInputSpec):
    image_json = traits.Str(mandatory=True, desc="the InputImage, serialised")
    output_dir = Directory(mandatory=True)
    bids_dir = Directory(mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    brain_report = File(exists=True, desc="JSON from brain extraction")
    preproc = File(exists=True, mandatory=True)
    probseg = File(exists=True, mandatory=True)
    labels = File(exists=True, mandatory=True)
    lesions = File(exists=True, mandatory=True)
    rejected = File(exists=True, desc="TSV of rejected candidates, with the rule that removed each")
    threshold = traits.Float(mandatory=True)
    provenance = traits.Str("{}", usedefault=True, desc="JSON: model bundle, settings")


class _SinkOut(TraitedSpec):
    out_files = traits.List(File(exists=True))


class WriteDerivatives(SimpleInterface):
    """Write the image's derivatives (names from the source entities, atomic, with sidecars)."""

    input_spec = _SinkIn
    output_spec = _SinkOut

    def _run_interface(self, runtime):
        image = image_from_json(self.inputs.image_json)
        writer = DerivativesWriter(self.inputs.output_dir, self.inputs.bids_dir)
        provenance = json.loads(self.inputs.provenance)
        threshold = float(self.inputs.threshold)
        try:
            writer.init_dataset()
            with writer.transaction():
                out = self._write_all(writer, image, provenance, threshold)
        except OSError as err:
            raise user_error(
                CMBError(
                    f"could not write the outputs ({err.strerror or err})",
                    path=err.filename or self.inputs.output_dir,
                    fix="Free disk space or fix the permissions of OUTPUT_DIR, then re-run with the same -w to resume; no partial output was left.",
                )
            ) from None
        self._results["out_files"] = [str(p) for p in out]
        return runtime

    def _write_all(self, writer, image, provenance, threshold):
        out = []

        mask, affine = load(self.inputs.brain_mask)
        brain_meta = {"Type": "Brain"}
        if isdefined(self.inputs.brain_report):
            report = json.loads(open(self.inputs.brain_report).read())
            brain_meta["Method"] = report.get("method")
            brain_meta["SkullDetected"] = report.get("skull_detected")
        out.append(
            writer.write_nifti(
                image,
                np.asarray(mask) > 0,
                affine,
                "mask",
                desc="brain",
                dtype=np.uint8,
                meta=brain_meta,
            )
        )

        preproc, _ = load(self.inputs.preproc)
        out.append(
            writer.write_nifti(
                image,
                preproc,
                affine,
                image.output_suffix,
                desc="preproc",
                meta={
                    "Description": provenance.get(
                        "preproc_description", "Bias-corrected input image."
                    ),
                    "SkullStripped": False,
                },
            )
        )

        prob, _ = load(self.inputs.probseg)
        out.append(
            writer.write_nifti(
                image,
                np.clip(prob, 0, 1),
                affine,
                "probseg",
                label="CMB",
                meta={
                    "Description": "Voxel-wise probability of cerebral microbleed.",
                    **provenance.get("model", {}),
                },
            )
        )

        labels, _ = load(self.inputs.labels)
        mask_meta = {
            "Type": "Lesion",
            "Description": "Cerebral microbleeds: final binary mask.",
            "Threshold": threshold,
            **provenance.get("model", {}),
        }
        out.append(
            writer.write_nifti(
                image,
                np.asarray(labels) > 0,
                affine,
                "mask",
                label="CMB",
                dtype=np.uint8,
                meta=mask_meta,
            )
        )

        lesions = pd.read_csv(
            self.inputs.lesions, sep="\t", na_values=["n/a"], keep_default_na=False
        )
        columns = [c for c in LESION_COLUMNS if c in lesions.columns] + [
            c for c in lesions.columns if c not in LESION_COLUMNS
        ]
        lesions = lesions[columns]
        dictionary = {c: LESION_COLUMNS.get(c, {"Description": c}) for c in columns}
        out.append(
            writer.write_tsv(image, lesions, desc="CMB", suffix="lesions", dictionary=dictionary)
        )
        if isdefined(self.inputs.rejected):
            rejected = pd.read_csv(
                self.inputs.rejected, sep="\t", na_values=["n/a"], keep_default_na=False
            )
            rej_dict = {
                c: REJECTED_COLUMNS.get(c, LESION_COLUMNS.get(c, {"Description": c}))
                for c in rejected.columns
            }
            out.append(
                writer.write_tsv(
                    image, rejected, desc="CMBrejected", suffix="lesions", dictionary=rej_dict
                )
            )
        # Written last: its presence marks this image's outputs as complete.
        out.append(
            writer.write_tsv(
                image,
                counts_row(lesions, threshold),
                desc="CMB",
                suffix="counts",
                dictionary=COUNT_COLUMNS,
            )
        )
        return out
