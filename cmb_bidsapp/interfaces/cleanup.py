"""Thin interface over detect/cleanup.py: the mimic-aware clean-up rules after detection."""

from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .base import load, save_like, write_json


class _CleanUpIn(BaseInterfaceInputSpec):
    in_labels = File(exists=True, mandatory=True, desc="lesion/candidate label map (source grid)")
    in_preproc = File(
        exists=True, mandatory=True, desc="preprocessed image: magnitude, or χ in ppm for QSM"
    )
    in_mask = File(exists=True, mandatory=True, desc="brain mask (source grid)")
    kind = traits.Enum("swi", "t2starw", "megre", "qsm", mandatory=True, desc="input kind")
    in_probseg = File(exists=True, desc="probability map; a lesion's score is its maximum")
    in_phase = File(exists=True, desc="high-pass phase (radians), when a phase image exists")
    in_regions = File(exists=True, desc="MARS region map (1..13) in the source grid")
    in_transform = File(exists=True, desc="native→template point transform (SimpleITK)")
    in_inverse = File(exists=True, desc="template→native point transform (SimpleITK)")
    in_registration = File(
        exists=True, desc="registration report JSON; a flagged registration disables anatomy"
    )
    in_candidates = File(
        exists=True, desc="every candidate of the detector (numbers of the rejected table)"
    )
    in_rejected = File(
        exists=True, desc="TSV of the candidates the discriminator rejected, merged into the output"
    )
    params = traits.Dict(desc="overrides of CleanupParams fields (mm, mm³, ppm)")


class _CleanUpOut(TraitedSpec):
    out_labels = File(exists=True, desc="kept lesions, same ids (int16)")
    out_rejected = File(
        exists=True,
        desc="rejected candidates with the rule and why (TSV): the clean-up's, plus the "
        "discriminator's when in_rejected is given",
    )
    out_features = File(exists=True, desc="every candidate's measurements (TSV)")
    out_report = File(exists=True, desc="JSON: counts per rule, phase handedness, parameters")
    n_kept = traits.Int()
    n_rejected = traits.Int()


class CleanUp(SimpleInterface):
    """Remove the detector's false positives by the rules of `detect/cleanup.py`.

    Anatomy (MARS map, tissue priors, MNI positions) is used only when the registration was not
    flagged; without it the tissue-aware CSF test and the MNI pallidum test are skipped (the
    brain-edge test then relies on the mask alone).
    """

    input_spec = _CleanUpIn
    output_spec = _CleanUpOut

    def _run_interface(self, runtime):
        from ..detect.cleanup import (
            CleanupParams,
            candidate_ids_of,
            clean_up,
            merge_rejected,
            params_to_dict,
            tissue_in_native,
        )

        labels, affine = load(self.inputs.in_labels)
        labels = np.asarray(labels)
        image, _ = load(self.inputs.in_preproc)
        mask, _ = load(self.inputs.in_mask)
        scores = None
        if isdefined(self.inputs.in_probseg):
            from ..labelstats import LabelStats

            prob, _ = load(self.inputs.in_probseg)
            lab = np.rint(labels).astype(np.int32)
            ids = np.unique(lab[lab > 0])
            if ids.size:
                vals = LabelStats(lab, ids).maximum(np.asarray(prob, dtype=np.float32))
                scores = {int(i): float(v) for i, v in zip(ids, np.atleast_1d(vals))}
        phase = None
        if isdefined(self.inputs.in_phase):
            phase = np.asarray(load(self.inputs.in_phase)[0], dtype=np.float32)
        flagged = False
        if isdefined(self.inputs.in_registration):
            with open(self.inputs.in_registration) as fh:
                flagged = bool(json.load(fh).get("Flag"))
        regions = tissue = to_mni = None
        if not flagged and isdefined(self.inputs.in_regions):
            regions = np.asarray(load(self.inputs.in_regions)[0])
        if (
            not flagged
            and isdefined(self.inputs.in_transform)
            and isdefined(self.inputs.in_inverse)
        ):
            import nibabel as nib

            from ..anatomy.registration import RegistrationResult, load_transform, native_to_mni

            result = RegistrationResult(
                template_to_native=load_transform(self.inputs.in_inverse),
                native_to_template=load_transform(self.inputs.in_transform),
            )
            tissue = tissue_in_native(
                result, nib.Nifti1Image(np.zeros(labels.shape, np.uint8), affine)
            )

            def to_mni(points):
                return native_to_mni(np.asarray(points, dtype=float), result)

        params = (
            CleanupParams(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in (self.inputs.params or {}).items()
                }
            )
            if isdefined(self.inputs.params)
            else CleanupParams()
        )
        res = clean_up(
            labels,
            scores,
            np.asarray(image, dtype=np.float32),
            np.asarray(mask) > 0,
            affine,
            kind=self.inputs.kind,
            phase=phase,
            regions=regions,
            tissue=tissue,
            to_mni=to_mni,
            params=params,
        )
        self._results["out_labels"] = save_like(
            res.labels, affine, "lesion_labels_clean.nii.gz", dtype=np.int16
        )
        rejected = res.rejected
        if isdefined(self.inputs.in_rejected) or isdefined(self.inputs.in_candidates):
            import pandas as pd

            student = None
            if isdefined(self.inputs.in_rejected):
                student = pd.read_csv(
                    self.inputs.in_rejected, sep="\t", na_values=["n/a"], keep_default_na=False
                )
            mapping = None
            if isdefined(self.inputs.in_candidates):
                mapping = candidate_ids_of(labels, np.asarray(load(self.inputs.in_candidates)[0]))
            rejected = merge_rejected(student, res.rejected, mapping)
        path = os.path.abspath("rejected.tsv")
        rejected.to_csv(path, sep="\t", index=False, na_rep="n/a")
        self._results["out_rejected"] = path
        path = os.path.abspath("cleanup_features.tsv")
        res.features.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.4g")
        self._results["out_features"] = path
        self._results["out_report"] = write_json(
            {
                "RuleCounts": res.rule_counts(),
                "Kept": len(res.kept_ids),
                "Rejected": int(len(res.rejected)),
                "PhaseHandedness": res.handedness,
                "AnatomyUsed": not flagged and regions is not None,
                "Parameters": params_to_dict(params),
                "Seconds": res.seconds,
            },
            "cleanup.json",
        )
        self._results["n_kept"] = len(res.kept_ids)
        self._results["n_rejected"] = int(len(res.rejected))
        return runtime
