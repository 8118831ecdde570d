"""The default threshold: chosen on realistic simulated cohorts, stored consistently in the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmb_bidsapp.models.bundle import copy_bundle, default_bundle_path, load_bundle, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _image(by_threshold):
    return {"cohort": "c", "key": "k", "kind": "swi", "n_ref": 4, "by_threshold": by_threshold}


def test_choose_is_the_most_sensitive_threshold_within_the_budget(benchmark_script):
    cal = benchmark_script("calibrate_threshold")
    # FP per subject (2 images): falls with the threshold, with a bump at 0.50
    fps = {f"{t:.2f}": 0 for t in (0.0, *cal.GRID)}
    for t in cal.GRID:
        fps[f"{t:.2f}"] = 6 if t < 0.3 else (1 if t < 0.5 else (3 if t < 0.55 else 1))
    fps["0.00"] = 10
    images = [_image({k: [3, v, 1] for k, v in fps.items()}) for _ in range(2)]
    rows = cal.table(images)
    assert rows[0]["threshold"] == 0.0 and rows[0]["fp_per_subject"] == 10
    chosen = cal.choose(rows, budget=1.0)
    # 0.30-0.45 are within the budget, but 0.50 is not: the first safe one above the bump
    assert chosen["threshold"] == 0.55
    assert chosen["sensitivity"] == 0.75 and chosen["fp_per_subject"] == 1.0


def test_written_threshold_is_read_back_and_the_bundle_still_verifies(tmp_path, benchmark_script):
    cal = benchmark_script("calibrate_threshold")
    bundle_dir = copy_bundle(default_bundle_path(), tmp_path / "bundle")
    rows = cal.table([_image({f"{t:.2f}": [3, 1, 1] for t in (0.0, *cal.GRID)})])
    calib = {
        "threshold": 0.35,
        "rule": "test",
        "fp_budget": 1.0,
        "description": "test cohort",
        "n_images": 1,
        "n_reference": 4,
        "command": "calibrate_threshold.py test",
        "table": rows,
    }
    cal.write_into_bundle(bundle_dir, calib)
    cal.write_into_bundle(bundle_dir, calib)  # idempotent: one section in the card
    b = load_bundle(bundle_dir, "cpu")
    assert b.default_threshold == pytest.approx(0.35)
    card = json.loads((bundle_dir / "model_card.json").read_text())
    assert card["sha256"]["bundle.json"] == sha256_file(bundle_dir / "bundle.json")
    md = (bundle_dir / "model_card.md").read_text()
    assert md.count("## Default threshold: calibrated") == 1
    assert "Default `--threshold` = 0.35" in md


def test_shipped_bundle_default_is_its_calibrated_threshold():
    root = default_bundle_path()
    meta = json.loads((root / "bundle.json").read_text())
    card = json.loads((root / "model_card.json").read_text())
    assert meta["calibration"]["threshold"] == meta["default_threshold"]
    assert card["default_threshold"] == meta["default_threshold"]
    assert card["sha256"]["bundle.json"] == sha256_file(root / "bundle.json")
    assert meta["calibration"]["n_reference"] >= 100  # a cohort large enough to calibrate on
    row = next(
        r for r in card["calibration"]["table"] if r["threshold"] == meta["default_threshold"]
    )
    assert row["fp_per_subject"] <= meta["calibration"]["fp_budget"] <= 1.0


def test_fresh_cohort_result_replaces_its_card_section(tmp_path, benchmark_script):
    """accuracy.py --write-card: the JSON record and the Markdown section (one, replaced, in
    place) carry the figures of accuracy.json; writing twice changes nothing."""
    acc = benchmark_script("accuracy")
    bundle = copy_bundle(default_bundle_path(), tmp_path / "bundle")
    totals = {
        "sensitivity": 0.5,
        "fp_per_subject": 0.25,
        "precision": 0.8,
        "f1": 0.615,
        "tp": 3,
        "fp": 1,
        "fn": 3,
        "n_images": 4,
        "n_ref": 6,
        "mean_abs_count_difference": 0.75,
    }
    result = {
        "command": "python benchmarks/accuracy.py OUT --n 4 --seed 4242",
        "n_subjects": 4,
        "seed": 4242,
        "eval": {"totals": totals, "per_kind": {"swi": totals}, "per_class": {"lobar": totals}},
        "eval_candidates": {"totals": totals | {"sensitivity": 0.9}, "per_kind": {}},
        "eval_nokd": {"totals": totals},
    }
    rec = acc.card_record(result, 0.85, 0.9)
    for _ in range(2):
        acc.write_card(bundle, rec)
    md = (bundle / "model_card.md").read_text()
    assert md.count("## Accuracy on a fresh simulated cohort") == 1
    assert (
        "(4 images, seed 4242)" in md and "| KD student (default, threshold 0.85) | 0.500 |" in md
    )
    assert "no-KD student (threshold 0.90)" in md and "**Below the targets" in md
    assert md.index("## Accuracy on a fresh") < md.index("## Versions")
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["fresh_cohort"]["seed"] == 4242
    assert card["fresh_cohort"]["detector_candidates_at_t_det"]["sensitivity"] == 0.9
