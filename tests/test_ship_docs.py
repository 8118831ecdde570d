"""The Sphinx docs: they build with warnings as errors, list every page, and stay offline."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [
    "installation",
    "usage",
    "outputs",
    "method",
    "simulation",
    "training",
    "model-card",
    "clusters",
    "performance",
    "troubleshooting",
    "limitations",
    "citing",
    "development",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    for module in ("sphinx", "myst_parser", "sphinxarg"):
        pytest.importorskip(module, reason=f"{module} is not installed (the [docs] extra)")
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "html"


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_index_lists_every_page():
    index = (DOCS / "index.md").read_text()
    trees = re.findall(r"```\{toctree\}(.*?)```", index, re.S)
    listed = [ln.strip() for tree in trees for ln in tree.splitlines()]
    listed = [ln for ln in listed if ln and not ln.startswith(":")]
    assert sorted(listed) == sorted(PAGES)
    for page in PAGES:
        assert (DOCS / f"{page}.md").is_file(), page


def test_docs_build_with_warnings_as_errors(built):
    for page in ["index", *PAGES]:
        assert (built / f"{page}.html").is_file(), page


def test_usage_has_every_option_of_the_parser(built):
    from cmb_bidsapp.cli.parser import build_parser

    text = _text(built / "usage.html")
    options = [
        s
        for a in build_parser()._actions
        for s in a.option_strings
        if s.startswith("--") and s != "--help"
    ]
    assert len(options) > 20
    missing = [o for o in options if o not in text]
    assert not missing, f"options missing from the generated reference: {missing}"


def test_usage_exit_codes_match_the_code():
    from cmb_bidsapp import errors

    usage = (DOCS / "usage.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", usage, re.M))
    assert set(rows) == {
        str(errors.EXIT_OK),
        str(errors.EXIT_FAILED_IMAGES),
        str(errors.EXIT_INVALID_DATASET),
        str(errors.EXIT_NO_MATCH),
        str(errors.EXIT_USAGE),
    }
    assert "not a valid BIDS dataset" in rows["16"] and "matched no image" in rows["18"]


def test_clusters_page_shows_the_shipped_array_script(built):
    text = _text(built / "clusters.html")
    script = (ROOT / "scripts" / "slurm" / "cmb_array.sbatch").read_text()
    assert "#SBATCH --job-name=cmb-bidsapp" in text
    assert script.splitlines()[-1].strip() in text
    assert "apptainer run --cleanenv -B" in text and "plugin: SLURM" in text
    assert "TEMPLATEFLOW_HOME" in text


def test_pages_load_nothing_from_the_internet(built):
    remote = re.compile(r"""<(?:script|link|img)\b[^>]*(?:src|href)=["'](?:https?:)?//""", re.I)
    for page in built.glob("*.html"):
        assert not remote.search(page.read_text()), page.name
    for css in (built / "_static").glob("*.css"):
        assert not re.search(r"@import\s+url\(\s*['\"]?https?:", css.read_text()), css.name
