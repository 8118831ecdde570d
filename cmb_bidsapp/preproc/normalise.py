"""Intensity normalisation that makes microbleeds bright, in [0, 1], for every input kind.

Formulas
--------
Dark-lesion kinds (``swi``, ``t2starw``, ``megre``: magnitude, bias-corrected)::

    P   = 99th percentile of I inside the brain mask
    out = clip(1 - I / P, 0, 1)   inside the mask, 0 outside

This is the published ``1 - I / max(I)`` made robust: the maximum of a magnitude image is an
outlier (a vessel's inflow, an artefact), the 99th percentile is not. Tissue ends up at about
0.1-0.5 and a microbleed, darker than tissue, near 1.

QSM (``qsm``, χ in ppm)::

    out = clip(0.5 + χ / (2 · 0.5 ppm), 0, 1)   inside the mask, 0 outside

so χ = 0 maps to 0.5, χ >= +0.5 ppm (paramagnetic: bleeds) to 1, and χ <= -0.5 ppm
(diamagnetic: calcifications) to 0. Bleeds are bright, calcifications dark. A map whose
99th percentile of |χ| exceeds 20 is taken to be in ppb and divided by 1000 (logged).
"""

from __future__ import annotations

import logging

import numpy as np

LOGGER = logging.getLogger(__name__)

DARK_KINDS: tuple[str, ...] = ("swi", "t2starw", "megre")
BRIGHT_KINDS: tuple[str, ...] = ("qsm",)
KINDS: tuple[str, ...] = DARK_KINDS + BRIGHT_KINDS

REFERENCE_PERCENTILE = 99.0
"""Percentile of brain intensities used as the reference white level (dark-lesion kinds)."""

QSM_HALF_RANGE_PPM = 0.5
"""χ (ppm) that maps to 1 (and its negative to 0) in the QSM mapping."""

PPB_THRESHOLD = 20.0
"""A QSM map whose 99th percentile of |χ| is above this is assumed to be in ppb, not ppm."""


def qsm_to_ppm(chi: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Return χ in ppm: divide by 1000 when the map looks like ppb (see module docstring)."""
    chi = np.asarray(chi, dtype=np.float32)
    values = chi[np.asarray(mask) > 0] if mask is not None else chi[chi != 0]
    if values.size and float(np.percentile(np.abs(values), 99.0)) > PPB_THRESHOLD:
        LOGGER.warning("QSM values look like ppb (|χ| 99th percentile > 20): dividing by 1000")
        return chi / np.float32(1000.0)
    return chi


def lesion_bright(data: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """Map an image to [0, 1] with microbleeds bright; 0 outside the mask (float32).

    Parameters
    ----------
    data
        Bias-corrected magnitude (``swi``, ``t2starw``, ``megre``) or χ map in ppm (``qsm``).
    mask
        Brain mask (non-zero inside), same grid.
    kind
        One of ``swi``, ``t2starw``, ``megre``, ``qsm``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    data = np.asarray(data, dtype=np.float32)
    inside = np.asarray(mask) > 0
    out = np.zeros(data.shape, dtype=np.float32)
    if not inside.any():
        return out
    if kind in DARK_KINDS:
        ref = float(np.percentile(data[inside], REFERENCE_PERCENTILE))
        if ref <= 0:
            return out
        values = 1.0 - data[inside] / np.float32(ref)
    else:
        chi = qsm_to_ppm(data, inside)
        values = 0.5 + chi[inside] / np.float32(2.0 * QSM_HALF_RANGE_PPM)
    out[inside] = np.clip(values, 0.0, 1.0)
    return out
