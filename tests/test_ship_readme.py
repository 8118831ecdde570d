"""The README is what a newcomer reads first: its commands, options and exit codes are real."""

from __future__ import annotations

import re
from pathlib import Path

from cmb_bidsapp.cli.parser import build_parser
from cmb_bidsapp.errors import EXIT_FAILED_IMAGES, EXIT_INVALID_DATASET, EXIT_NO_MATCH, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_documents_every_option_of_the_parser():
    missing = []
    for action in build_parser()._actions:
        dashed = [o for o in action.option_strings if o.startswith("--") and "_" not in o]
        if dashed and dashed[0] != "--help" and not any(f"`{o}" in README for o in dashed):
            missing.append(dashed[0])
    assert not missing, f"options missing from README.md: {missing}"


def test_readme_two_commands_exist_in_the_makefile_and_ci_runs_the_test_one():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, re.M), f"no '{target}' target in Makefile"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == "make test"


def test_readme_exit_codes_match_the_code():
    for code in (0, EXIT_FAILED_IMAGES, EXIT_INVALID_DATASET, EXIT_NO_MATCH, EXIT_USAGE):
        assert f"`{code}`" in README, code


def test_readme_picture_exists():
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / target).is_file(), target


def test_readme_has_no_unfilled_placeholder():
    assert not re.search(r"\b(TODO|TBD|MEASURED-NUMBERS|LIMITS)\b", README)
