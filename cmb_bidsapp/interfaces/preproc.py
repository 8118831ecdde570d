"""Thin interfaces over preproc/: reading the input, brain extraction, bias correction, normalisation."""

from __future__ import annotations

import json

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..errors import CMBError
from .base import load, save_like, set_threads, user_error, write_json

KINDS = ("swi", "t2starw", "megre", "qsm")


class _LoadInputIn(BaseInterfaceInputSpec):
    in_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="magnitude file(s); MEGRE: one per echo"
    )
    phase_files = InputMultiObject(File(exists=True), desc="phase file(s) beside the magnitude")
    echo_times = traits.List(traits.Float, desc="echo times (s)")
    kind = traits.Enum(*KINDS, mandatory=True)
    units = traits.Str("", usedefault=True, desc="the sidecar's Units (QSM)")
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _LoadInputOut(TraitedSpec):
    out_file = File(
        exists=True, desc="float32 image in the source grid (MEGRE: echoes combined; QSM: ppm)"
    )
    out_phase = File(desc="high-pass phase (radians) in the source grid, when phase is present")
    out_info = File(
        exists=True, desc="JSON: shape, voxel sizes, orientation, slice axis, data type"
    )


class LoadInput(SimpleInterface):
    """Read the input defensively; combine MEGRE echoes; convert phase to a high-pass phase map."""

    input_spec = _LoadInputIn
    output_spec = _LoadInputOut

    def _run_interface(self, runtime):
        from ..preproc.steps import read_input

        set_threads(self.inputs.num_threads)
        try:
            result = read_input(
                [str(f) for f in self.inputs.in_files],
                kind=self.inputs.kind,
                phase_files=[str(f) for f in self.inputs.phase_files]
                if isdefined(self.inputs.phase_files)
                else [],
                echo_times=list(self.inputs.echo_times)
                if isdefined(self.inputs.echo_times)
                else [],
                units=self.inputs.units,
            )
        except CMBError as err:
            raise user_error(err) from None
        self._results["out_file"] = save_like(result.image, result.affine, "input.nii.gz")
        if result.phase is not None:
            self._results["out_phase"] = save_like(
                result.phase, result.affine, "phase_highpass.nii.gz"
            )
        self._results["out_info"] = write_json(result.info, "input_info.json")
        return runtime


class _BrainIn(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    kind = traits.Enum(*KINDS, mandatory=True)
    mode = traits.Enum("auto", "force", "skip", usedefault=True)
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _BrainOut(TraitedSpec):
    out_mask = File(exists=True)
    out_report = File(exists=True, desc="JSON: method used, skull detected, volume, warnings")


class BrainExtraction(SimpleInterface):
    """Brain mask: deepbet (weights shipped in its wheel) with a fallback; `auto` detects skull."""

    input_spec = _BrainIn
    output_spec = _BrainOut

    def _run_interface(self, runtime):
        from ..preproc.steps import brain_mask

        set_threads(self.inputs.num_threads)
        data, affine = load(self.inputs.in_file)
        try:
            mask, report = brain_mask(
                np.asarray(data, dtype=np.float32),
                affine,
                kind=self.inputs.kind,
                mode=self.inputs.mode,
                threads=self.inputs.num_threads,
            )
        except CMBError as err:
            raise user_error(err) from None
        self._results["out_mask"] = save_like(mask, affine, "brain_mask.nii.gz", dtype=np.uint8)
        self._results["out_report"] = write_json(report, "brain_report.json")
        return runtime


class _BiasIn(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    kind = traits.Enum(*KINDS, mandatory=True)
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads (not part of the cache key)"
    )


class _BiasOut(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image (QSM: unchanged)")
    out_bias = File(exists=True, desc="estimated multiplicative bias field (QSM: ones)")


class BiasCorrection(SimpleInterface):
    """N4 bias-field correction with SimpleITK (not applied to QSM, which has no receive bias)."""

    input_spec = _BiasIn
    output_spec = _BiasOut

    def _run_interface(self, runtime):
        from ..preproc.bias import n4_correct

        set_threads(self.inputs.num_threads)
        data, affine = load(self.inputs.in_file)
        mask, _ = load(self.inputs.in_mask)
        data = np.asarray(data, dtype=np.float32)
        if self.inputs.kind == "qsm":
            corrected, bias = data, np.ones_like(data)
        else:
            corrected, bias = n4_correct(data, np.asarray(mask) > 0, affine)
        self._results["out_file"] = save_like(corrected, affine, "preproc.nii.gz")
        self._results["out_bias"] = save_like(bias, affine, "bias_field.nii.gz")
        return runtime


class _NormIn(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    kind = traits.Enum(*KINDS, mandatory=True)


class _NormOut(TraitedSpec):
    out_file = File(exists=True, desc="lesion-bright intensity in [0, 1], 0 outside the brain")


class Normalise(SimpleInterface):
    """Robust intensity normalisation with microbleeds made bright (QSM keeps its sign)."""

    input_spec = _NormIn
    output_spec = _NormOut

    def _run_interface(self, runtime):
        from ..preproc.normalise import lesion_bright

        data, affine = load(self.inputs.in_file)
        mask, _ = load(self.inputs.in_mask)
        out = lesion_bright(
            np.asarray(data, dtype=np.float32), np.asarray(mask) > 0, self.inputs.kind
        )
        self._results["out_file"] = save_like(out, affine, "lesion_bright.nii.gz")
        return runtime


def read_info(path: str) -> dict:
    return json.loads(open(path).read())
