"""Sphinx configuration of the cmb-bidsapp documentation (Markdown pages through MyST).

Builds offline: no intersphinx, no remote images or themes (the built-in `alabaster` theme).
The command-line reference is generated from `cmb_bidsapp.cli.parser:build_parser` by
sphinx-argparse. Build with `make docs` (warnings are errors).
"""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
os.environ.setdefault("NO_ET", "1")

try:
    from cmb_bidsapp import __version__ as release
except Exception:  # the docs must build even where the package cannot be imported
    release = "0.0.0+unknown"

project = "cmb-bidsapp"
author = "cmb-bidsapp developers"
copyright = f"{date.today().year}, {author}"
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"cmb-bidsapp {release}"
html_theme_options = {
    "description": "Cerebral microbleed detection as a BIDS-App",
    "fixed_sidebar": True,
    "show_powered_by": False,
}
html_static_path: list[str] = []
html_last_updated_fmt = None
html_show_sourcelink = False
