"""Thin interfaces over detect/: radial symmetry, candidate probability, lesion labels, lesion table."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io import voxel_sizes
from .base import load, save_like, set_threads


class _FRSTIn(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="lesion-bright image")
    in_mask = File(exists=True, mandatory=True)
    radii_mm = traits.List(traits.Float, [1.0, 1.5, 2.0, 2.5], usedefault=True)
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _FRSTOut(TraitedSpec):
    out_file = File(exists=True, desc="radial symmetry map in [0, 1]")


class RadialSymmetry(SimpleInterface):
    """Fast radial symmetry transform, radii in mm, 3D or per slice for thick slices."""

    input_spec = _FRSTIn
    output_spec = _FRSTOut

    def _run_interface(self, runtime):
        import nibabel as nib

        from ..detect.frst import frst

        set_threads(self.inputs.num_threads)
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask, _ = load(self.inputs.in_mask)
        out = frst(
            data,
            tuple(voxel_sizes(img)),
            radii_mm=tuple(self.inputs.radii_mm),
            bright=True,
            mask=np.asarray(mask) > 0,
        )
        self._results["out_file"] = save_like(out, img.affine, "frst.nii.gz")
        return runtime


class _CandIn(BaseInterfaceInputSpec):
    in_norm = File(exists=True, mandatory=True, desc="lesion-bright image")
    in_frst = File(exists=True, mandatory=True, desc="radial symmetry map")
    in_mask = File(exists=True, mandatory=True)


class _CandOut(TraitedSpec):
    out_probseg = File(exists=True, desc="voxel-wise probability in [0, 1]")


class CandidateProbability(SimpleInterface):
    """Provisional voxel-wise probability from radial symmetry and local contrast."""

    input_spec = _CandIn
    output_spec = _CandOut

    def _run_interface(self, runtime):
        import nibabel as nib

        from ..detect.candidates import candidate_probability

        img = nib.load(self.inputs.in_norm)
        norm = np.asarray(img.dataobj, dtype=np.float32)
        frst_map, _ = load(self.inputs.in_frst)
        mask, _ = load(self.inputs.in_mask)
        prob = candidate_probability(
            norm,
            np.asarray(frst_map, dtype=np.float32),
            np.asarray(mask) > 0,
            tuple(voxel_sizes(img)),
        )
        self._results["out_probseg"] = save_like(prob, img.affine, "probseg.nii.gz")
        return runtime


class _LabelIn(BaseInterfaceInputSpec):
    in_probseg = File(exists=True, mandatory=True)
    threshold = traits.Float(mandatory=True)
    min_volume_mm3 = traits.Float(desc="smallest lesion kept (mm³)")
    max_volume_mm3 = traits.Float(desc="largest lesion kept (mm³)")


class _LabelOut(TraitedSpec):
    out_labels = File(exists=True, desc="lesion label map (int16), 1..n")
    n_lesions = traits.Int()


class LabelLesions(SimpleInterface):
    """Threshold, 26-connected components, size bounds in mm³, deterministic numbering."""

    input_spec = _LabelIn
    output_spec = _LabelOut

    def _run_interface(self, runtime):
        import nibabel as nib

        from ..detect.candidates import label_candidates

        img = nib.load(self.inputs.in_probseg)
        prob = np.asarray(img.dataobj, dtype=np.float32)
        kwargs = {}
        if isdefined(self.inputs.min_volume_mm3):
            kwargs["min_volume_mm3"] = self.inputs.min_volume_mm3
        if isdefined(self.inputs.max_volume_mm3):
            kwargs["max_volume_mm3"] = self.inputs.max_volume_mm3
        labels, n = label_candidates(prob, self.inputs.threshold, tuple(voxel_sizes(img)), **kwargs)
        self._results["out_labels"] = save_like(
            labels, img.affine, "lesion_labels.nii.gz", dtype=np.int16
        )
        self._results["n_lesions"] = int(n)
        return runtime


class _TableIn(BaseInterfaceInputSpec):
    in_labels = File(exists=True, mandatory=True)
    in_probseg = File(exists=True, mandatory=True)
    in_regions = File(exists=True, desc="MARS region map in the source grid (labels 1..13)")
    in_transform = File(exists=True, desc="native→template point transform (SimpleITK)")
    in_inverse = File(exists=True, desc="template→native point transform (SimpleITK)")
    in_registration = File(exists=True, desc="registration report JSON (Flag, Reason)")


class _TableOut(TraitedSpec):
    out_table = File(exists=True, desc="lesion table (TSV)")


class LesionTable(SimpleInterface):
    """One row per lesion: position (native and MNI), size, probability, MARS region, hemisphere.

    When the registration was flagged as failed, regions, classes and MNI positions are not
    trusted: they are written as `unknown`/`n/a` (the report says why).
    """

    input_spec = _TableIn
    output_spec = _TableOut

    def _run_interface(self, runtime):
        import json
        import os

        from ..detect.lesions import lesion_table

        labels, affine = load(self.inputs.in_labels)
        labels = np.asarray(labels)
        prob, _ = load(self.inputs.in_probseg)
        flagged = False
        if isdefined(self.inputs.in_registration):
            flagged = bool(json.loads(open(self.inputs.in_registration).read()).get("Flag"))
        assign = to_mni = None
        if (
            not flagged
            and isdefined(self.inputs.in_regions)
            and isdefined(self.inputs.in_transform)
        ):
            from ..anatomy.assign import assign_regions
            from ..anatomy.registration import RegistrationResult, load_transform, native_to_mni

            regions, _ = load(self.inputs.in_regions)
            regions = np.asarray(regions)
            result = RegistrationResult(
                template_to_native=load_transform(self.inputs.in_inverse),
                native_to_template=load_transform(self.inputs.in_transform),
            )

            def assign(lab, aff):
                return assign_regions(lab, aff, regions)

            def to_mni(points):
                return native_to_mni(np.asarray(points, dtype=float), result)

        table = lesion_table(
            labels, affine, np.asarray(prob, dtype=np.float32), to_mni=to_mni, assign=assign
        )
        if to_mni is not None and len(table):
            mni = to_mni(table[["x", "y", "z"]].to_numpy())
            table["x_mni"], table["y_mni"], table["z_mni"] = mni[:, 0], mni[:, 1], mni[:, 2]
        else:
            table["x_mni"] = table["y_mni"] = table["z_mni"] = np.nan
        path = os.path.abspath("lesions.tsv")
        table.to_csv(path, sep="\t", index=False, na_rep="n/a")
        self._results["out_table"] = path
        return runtime


class _NetIn(BaseInterfaceInputSpec):
    in_norm = File(exists=True, mandatory=True, desc="lesion-bright image (source grid)")
    in_frst = File(exists=True, mandatory=True, desc="radial symmetry map (source grid)")
    in_mask = File(exists=True, mandatory=True, desc="brain mask (source grid)")
    models_dir = traits.Str(
        "", usedefault=True, desc="model bundle folder ('' = the default bundle)"
    )
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, nohash=True)
    threshold = traits.Float(mandatory=True, desc="student-score operating point")
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _NetOut(TraitedSpec):
    out_probseg = File(exists=True, desc="learned voxel-wise probability, source grid")
    out_labels = File(exists=True, desc="kept lesions, numbered 1..n (int16)")
    out_candidates = File(exists=True, desc="every candidate, numbered 1..m (int16)")
    out_rejected = File(exists=True, desc="TSV of the candidates the student rejected")
    out_meta = File(exists=True, desc="JSON: bundle, thresholds, timings")


class DetectNetworks(SimpleInterface):
    """Step 1 (U-Net candidate detector) and step 2 (distilled student) on one image."""

    input_spec = _NetIn
    output_spec = _NetOut

    def _run_interface(self, runtime):
        import json
        import os

        import nibabel as nib
        import pandas as pd

        from ..errors import CMBError
        from ..models.bundle import load_bundle
        from ..models.infer import detect
        from .base import user_error

        set_threads(self.inputs.num_threads)
        img = nib.load(self.inputs.in_norm)
        norm = np.asarray(img.dataobj, dtype=np.float32)
        frst_map, _ = load(self.inputs.in_frst)
        mask, _ = load(self.inputs.in_mask)
        try:
            bundle = load_bundle(self.inputs.models_dir or None, device=self.inputs.device)
        except CMBError as err:
            raise user_error(err) from None
        result = detect(
            norm,
            np.asarray(frst_map, dtype=np.float32),
            np.asarray(mask) > 0,
            img.affine,
            bundle,
            threshold=self.inputs.threshold,
        )
        self._results["out_probseg"] = save_like(result.probseg, img.affine, "probseg.nii.gz")
        self._results["out_labels"] = save_like(
            result.labels, img.affine, "lesion_labels.nii.gz", dtype=np.int16
        )
        self._results["out_candidates"] = save_like(
            result.candidate_labels, img.affine, "candidate_labels.nii.gz", dtype=np.int16
        )
        columns = ["id", "x", "y", "z", "i", "j", "k", "volume_mm3", "score"]
        rejected = pd.DataFrame(
            result.rejected or None, columns=None if result.rejected else columns
        )
        rejected["rule"] = [
            f"student score {s:.2f} < {result.threshold:.2f}" for s in rejected["score"]
        ]
        rejected = rejected.rename(columns={"score": "probability", "id": "candidate_id"})
        path = os.path.abspath("rejected.tsv")
        rejected.to_csv(path, sep="\t", index=False, na_rep="n/a")
        self._results["out_rejected"] = path
        meta = {
            **bundle.sidecar_fields(),
            "t_det": result.t_det,
            "threshold": result.threshold,
            "device": result.device,
            "seconds": result.seconds,
            "n_candidates": int(result.candidate_scores.size),
            "n_lesions": int(result.n_lesions),
        }
        self._results["out_meta"] = os.path.abspath("detection.json")
        with open(self._results["out_meta"], "w") as fh:
            json.dump(meta, fh, indent=2, default=float)
        return runtime
