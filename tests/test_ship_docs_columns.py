"""The outputs page documents every column the app writes (no drift between code and docs)."""

from pathlib import Path

from cmb_bidsapp.outputs import COUNT_COLUMNS, LESION_COLUMNS, REJECTED_COLUMNS
from cmb_bidsapp.reports.group import counts_dictionary

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"


def test_every_column_is_documented():
    text = DOC.read_text()
    columns = [*LESION_COLUMNS, *COUNT_COLUMNS, *REJECTED_COLUMNS, *counts_dictionary()]
    missing = [c for c in columns if f"`{c}`" not in text]
    assert not missing, f"columns missing from docs/outputs.md: {missing}"
