"""QC reports: figures and HTML templates.

- `figures`: the figures of one image (overlay mosaics, triplanar lesion crops), pure functions.
- `subject`: the per-image QC record (`sub-XX/figures/<source>_desc-qc_<suffix>.json`) and
  `write_reports(config, inputs, failures)`, which writes `OUTPUT_DIR/sub-XX.html`.
- `group`: the group tables and `group.html` (called by `workflows.group.run_group`).
- `citation`: the methods text `logs/CITATION.md`.
- `templates/`: jinja2 templates and the inline CSS/JS of the pages.
"""
