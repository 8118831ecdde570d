"""QC reports: figures and HTML templates."""
