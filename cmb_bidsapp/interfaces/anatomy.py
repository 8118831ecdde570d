"""Thin interface over anatomy/: registration to MNI152NLin2009cAsym and the MARS map in native space."""

from __future__ import annotations

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

from .base import save_like, set_threads, write_json


class _RegIn(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="preprocessed image (source grid)")
    in_mask = File(exists=True, mandatory=True, desc="brain mask (source grid)")
    t1w = File(exists=True, desc="a T1w of the same session")
    deformable = traits.Bool(False, usedefault=True)
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _RegOut(TraitedSpec):
    out_regions = File(exists=True, desc="MARS region labels (1..13) in the source grid")
    out_transform = File(
        exists=True, desc="maps native scanner points to template points (SimpleITK)"
    )
    out_inverse = File(
        exists=True, desc="maps template points to native scanner points (SimpleITK)"
    )
    out_report = File(exists=True, desc="JSON: quality figures, flag and reason")


class RegisterTemplate(SimpleInterface):
    """Register the brain to the template (rigid, affine, optional deformable) and map MARS back."""

    input_spec = _RegIn
    output_spec = _RegOut

    def _run_interface(self, runtime):
        import nibabel as nib

        from ..anatomy.registration import mars_in_native, register_to_template

        set_threads(self.inputs.num_threads)
        moving = nib.load(self.inputs.in_file)
        mask = nib.load(self.inputs.in_mask)
        t1w = nib.load(self.inputs.t1w) if isdefined(self.inputs.t1w) else None
        result = register_to_template(moving, mask, deformable=self.inputs.deformable, t1w=t1w)
        regions = mars_in_native(result, moving)
        self._results["out_regions"] = save_like(
            np.asarray(regions), moving.affine, "mars_native.nii.gz", dtype=np.int16
        )
        tfm = os.path.abspath("native_to_template.tfm")
        inv = os.path.abspath("template_to_native.tfm")
        result.save(tfm, inv)
        self._results["out_transform"] = tfm
        self._results["out_inverse"] = inv
        self._results["out_report"] = write_json(result.report(), "registration.json")
        return runtime
