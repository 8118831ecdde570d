"""Bundle metadata and the model card (JSON and Markdown) of a training run."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from . import networks
from .bundle import save_bundle
from .data import FRST_RADII_MM
from .grid import MARGIN_MM, WORKING_VOXEL_MM
from .infer import MAX_CANDIDATE_MM3, MAX_WINDOW, MIN_CANDIDATE_MM3, OVERLAP

LIMITS = [
    "Trained and validated on SIMULATED data only (cmb_bidsapp.synth: susceptibility sources, "
    "dipole field, complex GRE signal, k-space truncation). No real labelled microbleed data "
    "was available to the project; performance on real scanners is unknown and must be measured "
    "by users on their own labelled data with cmb-bidsapp-eval.",
    "Validation figures are on held-out simulated SUBJECTS (split by subject), drawn from the "
    "same simulator as the training data; they overstate what to expect on real data.",
    "Lesions much larger than 10 mm (haemorrhages, cavernomas) are outside the candidate size "
    "bounds by design.",
]


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def bundle_meta(
    result: dict[str, Any], settings: Any, name: str, version: str, kd_threshold: float
) -> dict[str, Any]:
    """``bundle.json`` content (before ``files`` is added by :func:`save_bundle`)."""
    models = result["models"]
    return {
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "networks": {
            "detector": {
                "type": "UNet3D",
                "widths": list(models["detector"].widths),
                "in_channels": networks.IN_CHANNELS,
                "parameters": networks.n_parameters(models["detector"]),
            },
            "teacher": {
                "type": "Teacher",
                "widths": list(models["teacher"].widths),
                "patch_size": settings.patch_size,
                "parameters": networks.n_parameters(models["teacher"]),
            },
            "student": {
                "type": "Student",
                "widths": list(models["student"].widths),
                "patch_size": settings.patch_size,
                "parameters": networks.n_parameters(models["student"]),
            },
        },
        "inputs": ["lesion_bright", "frst"],
        "grid": {
            "voxel_mm": WORKING_VOXEL_MM,
            "margin_mm": MARGIN_MM,
            "orientation": "closest RAS",
        },
        "preprocessing": {
            "normalisation": "cmb_bidsapp.preproc.normalise.lesion_bright",
            "bias_correction": "cmb_bidsapp.preproc.bias.n4_correct (not for QSM)",
            "frst_radii_mm": list(FRST_RADII_MM),
            "frst_grid": settings.frst_grid,
            "frst": (
                "cmb_bidsapp.models.infer.working_frst(working-grid lesion_bright, working-grid "
                "brain, radii_mm): FRST computed on the working grid"
                if settings.frst_grid == "working"
                else "cmb_bidsapp.detect.frst.frst(lesion_bright, radii_mm, bright=True, "
                "mask=brain) on the source grid, resampled to the working grid"
            ),
        },
        "t_det": float(result["t_det"]),
        "default_threshold": float(kd_threshold),
        "inference": {
            "max_window": MAX_WINDOW,
            "overlap": OVERLAP,
            "min_candidate_mm3": MIN_CANDIDATE_MM3,
            "max_candidate_mm3": MAX_CANDIDATE_MM3,
            "detector_patch": settings.detector_patch,
            "student_tta": settings.student_tta,
        },
        "kd": {"temperature": settings.kd_temperature, "alpha": settings.kd_alpha},
        "ablation": {
            "file": "student_nokd.pt",
            "what": "the same student trained without distillation (alpha = 0), for the KD gain",
            "student_nokd_threshold": float(result["scored"]["student_nokd"]["threshold"]),
        },
        "versions": {
            "cmb_bidsapp": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def kd_gain(scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Figures of the students with and without KD, and their differences (KD − no KD)."""
    kd, nokd = scored["student"], scored["student_nokd"]
    out: dict[str, Any] = {}
    for label, s in (("with_kd", kd), ("without_kd", nokd)):
        at = s["at_default"]
        out[label] = {
            "threshold": s["threshold"],
            "sensitivity": at["sensitivity"],
            "fp_per_subject": at["fp_per_subject"],
            "precision": at["precision"],
            "f1": at["f1"],
            "candidate_auc": s["candidate_auc"],
        }
    same = next(r for r in nokd["rows"] if r["threshold"] == kd["threshold"])
    out["without_kd_at_kd_threshold"] = {
        k: same[k] for k in ("sensitivity", "fp_per_subject", "precision", "f1")
    }
    diff = {}
    for k in ("sensitivity", "fp_per_subject", "precision", "f1", "candidate_auc"):
        a, b = out["with_kd"][k], out["without_kd"][k]
        diff[k] = None if a is None or b is None else a - b
    out["gain"] = diff
    return out


def build_card(
    result: dict[str, Any],
    settings: Any,
    meta: dict[str, Any],
    data_info: dict[str, Any],
    command: str,
    timings: dict[str, float],
) -> tuple[dict[str, Any], str]:
    """The model card as a dict (``model_card.json``) and as Markdown (``model_card.md``)."""
    kd = result["scored"]["student"]
    gain = kd_gain(result["scored"])
    card = {
        "name": meta["name"],
        "version": meta["version"],
        "created": meta["created"],
        "intended_use": (
            "Candidate detection and discrimination of cerebral microbleeds on SWI, T2*-weighted "
            "GRE, combined multi-echo GRE and QSM, inside cmb-bidsapp. Research use only."
        ),
        "training_data": data_info,
        "training_command": command,
        "seed": settings.seed,
        "settings": settings.to_dict(),
        "architecture": meta["networks"],
        "preprocessing": meta["preprocessing"],
        "grid": meta["grid"],
        "t_det": meta["t_det"],
        "t_det_table": result["t_det_rows"],
        "default_threshold": meta["default_threshold"],
        "default_threshold_rule": kd["how"],
        "validation": {
            "subjects": result["val_keys"],
            "kinds": result["val_kinds"],
            "candidates": result["val_candidates"],
            "at_default_threshold": kd["at_default"],
            "student_candidate_auc": kd["candidate_auc"],
            "teacher_candidate_auc": result.get("teacher_candidate_auc"),
        },
        "training_candidates": result.get("train_candidates"),
        "histories": result["histories"],
        "kd_gain_validation": gain,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "versions": meta["versions"],
        "limits": LIMITS,
    }
    md = render_markdown(card, kd["rows"])
    return card, md


def t_det_sentence(card: dict[str, Any]) -> str:
    """The model card's sentence on ``t_det``, saying plainly when the candidate-sensitivity
    target was not reached on validation (then ``t_det`` is the most sensitive threshold)."""
    target = float(card.get("settings", {}).get("sensitivity_target", 0.97))
    rows = card.get("t_det_table") or []
    chosen = [r for r in rows if abs(float(r["t_det"]) - float(card["t_det"])) < 1e-9]
    sens = float(chosen[0]["sensitivity"]) if chosen else None
    if sens is None or sens >= target:
        return (
            f"Candidate threshold t_det = {card['t_det']:.3f} (highest that keeps >= "
            f"{target:.0%} of the reference microbleeds as candidates)."
        )
    return (
        f"Candidate threshold t_det = {card['t_det']:.3f}. **The {target:.0%} candidate-"
        f"sensitivity target was NOT reached on validation:** the most sensitive threshold keeps "
        f"{sens:.3f} of the validation microbleeds; t_det is the highest threshold that keeps "
        "that many."
    )


def render_markdown(card: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    v = card["validation"]
    at = v["at_default_threshold"]
    g = card["kd_gain_validation"]
    arch = card["architecture"]
    td = card["training_data"]
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        "**Training and validation data are SIMULATED.** No real labelled microbleed scans were "
        "available to the project. Measure performance on your own labelled data with "
        "`cmb-bidsapp-eval` before relying on these models.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Training data",
        "",
    ]
    for k, val in td.items():
        lines.append(f"- {k}: {val}")
    lines += [
        "",
        "## Exact training command",
        "",
        "```",
        card["training_command"],
        "```",
        "",
        f"Seed {card['seed']}. Wall time (s): "
        + ", ".join(f"{k} {val}" for k, val in card["timings_s"].items()),
        "",
        "## Architecture",
        "",
        "| network | widths | parameters |",
        "|---|---|---|",
    ]
    for name, a in arch.items():
        lines.append(f"| {name} | {a['widths']} | {a['parameters']:,} |")
    lines += [
        "",
        "Inputs: the lesion-bright image and the radial-symmetry map (FRST radii "
        f"{card['preprocessing']['frst_radii_mm']} mm), on a {card['grid']['voxel_mm']} mm "
        "isotropic working grid in the closest RAS orientation.",
        "",
        "## Operating points (validation subjects)",
        "",
        t_det_sentence(card),
        f"Default `--threshold` = {card['default_threshold']:.2f}: {card['default_threshold_rule']}.",
        "",
        "| threshold | sensitivity | FP/subject | precision | F1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threshold']:.2f} | {_fmt(r['sensitivity'])} | {_fmt(r['fp_per_subject'], 2)} "
            f"| {_fmt(r['precision'])} | {_fmt(r['f1'])} |"
        )
    lines += [
        "",
        f"At the default threshold: sensitivity {_fmt(at['sensitivity'])}, FP/subject "
        f"{_fmt(at['fp_per_subject'], 2)}, precision {_fmt(at['precision'])}, F1 {_fmt(at['f1'])} "
        f"({at['tp']} TP, {at['fp']} FP, {at['fn']} FN on {len(v['subjects'])} validation images).",
        "",
        "## Knowledge distillation gain (validation)",
        "",
        "The same student trained with KD and without (α = 0), same data, seed and batches.",
        "",
        "| student | threshold | sensitivity | FP/subject | precision | F1 | candidate AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in ("with_kd", "without_kd"):
        s = g[label]
        lines.append(
            f"| {label.replace('_', ' ')} | {s['threshold']:.2f} | {_fmt(s['sensitivity'])} | "
            f"{_fmt(s['fp_per_subject'], 2)} | {_fmt(s['precision'])} | {_fmt(s['f1'])} | "
            f"{_fmt(s['candidate_auc'])} |"
        )
    lines += [
        "",
        "Gain (with − without): " + ", ".join(f"{k} {_fmt(val)}" for k, val in g["gain"].items()),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {val}" for k, val in card["versions"].items()),
        "",
        "## Limits",
        "",
    ]
    lines += [f"- {x}" for x in card["limits"]]
    return "\n".join(lines) + "\n"


def write_trained_bundle(
    out: str | Path,
    result: dict[str, Any],
    settings: Any,
    data_info: dict[str, Any],
    command: str,
    timings: dict[str, float],
    name: str = "cmb-bidsapp-models",
    version: str | None = None,
) -> Path:
    """Write the bundle folder of a finished :func:`~cmb_bidsapp.models.train.train_all` run."""
    kd = result["scored"]["student"]
    meta = bundle_meta(result, settings, name, version or __version__, kd["threshold"])
    card, md = build_card(result, settings, meta, data_info, command, timings)
    models = {k: result["models"][k] for k in ("detector", "teacher", "student", "student_nokd")}
    return save_bundle(out, models, meta, thresholds=kd["rows"], card_json=card, card_md=md)


def replace_markdown_section(text: str, title: str, block: str, before: str | None = None) -> str:
    """``text`` (a model card in Markdown) with its ``## {title}`` section replaced by ``block``.

    The section runs from its heading to the next ``## `` heading or the end. When there is no
    such section, ``block`` is inserted before the ``## {before}`` heading (when present), else
    appended. ``block`` starts with its own ``## {title}`` heading. ``title`` is matched as a
    prefix, so a section whose heading says more (a seed, a count) is replaced too.
    """
    import re

    pattern = re.compile(r"\n## " + re.escape(title) + r"[^\n]*\n.*?(?=\n## |\Z)", re.S)
    block = block.strip("\n") + "\n"
    if pattern.search(text):
        return pattern.sub(lambda _m: "\n" + block, text, count=1)
    marker = f"\n## {before}" if before else None
    if marker and marker in text:
        return text.replace(marker, "\n" + block + marker, 1)
    return text.rstrip("\n") + "\n\n" + block
