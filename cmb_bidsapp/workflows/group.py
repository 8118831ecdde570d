"""The group level: summarise the participant outputs of OUTPUT_DIR (tables only, no image)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..errors import EXIT_OK, NoMatchError


def run_group(config) -> int:
    """Write the group tables, their dictionaries and `group.html`; return the exit code.

    Reads only TSV and JSON files under `config.output_dir` (see `reports.group`). Images that
    failed and participants without outputs are listed, not fatal: exit 0. Exit 18 (with a
    one-line message on stderr) when OUTPUT_DIR holds no participant output at all.
    """
    from ..bids import DerivativesWriter
    from ..reports.group import collect, counts_dictionary, lesions_dictionary, render_group_html

    t0 = time.monotonic()
    output_dir = Path(config.output_dir)
    try:
        if not output_dir.is_dir():
            raise NoMatchError(
                "does not exist",
                path=output_dir,
                fix="Run the participant level first: cmb-bidsapp BIDS_DIR OUTPUT_DIR participant.",
            )
        data = collect(
            output_dir,
            bids_dir=config.bids_dir,
            participant_label=config.participant_label,
            session_label=config.session_label,
        )
        if data.counts.empty:
            raise NoMatchError(
                "holds no participant outputs (no sub-*/…/*_desc-CMB_counts.tsv and no QC record)",
                path=output_dir,
                fix="Run the participant level first, or point OUTPUT_DIR at its output folder"
                + (
                    " (check --participant-label/--session-label)."
                    if config.participant_label or config.session_label
                    else "."
                ),  # fmt: skip
            )
    except NoMatchError as err:
        print(f"cmb-bidsapp: error: {err.format()}", file=sys.stderr)
        return err.exit_code

    writer = DerivativesWriter(output_dir, config.bids_dir)
    writer.init_dataset()
    writer.write_tsv(None, data.counts, desc="CMB", suffix="counts", dictionary=counts_dictionary())
    writer.write_tsv(
        None,
        data.lesions,
        desc="CMB",
        suffix="lesions",
        dictionary=lesions_dictionary(list(data.lesions.columns)),
    )
    command = shlex.join(str(c) for c in (getattr(config, "command", None) or []))
    writer.write_text(output_dir / "group.html", render_group_html(data, command=command))
    n_failed = int((data.counts["status"] == "failed").sum())
    elapsed = time.monotonic() - t0
    print(
        f"cmb-bidsapp: group summary of {len(data.counts)} image(s) "
        f"({data.counts['participant_id'].nunique()} participant(s), {n_failed} failed, "
        f"{len(data.lesions)} lesion(s)) written in {elapsed:.1f} s: "
        f"{output_dir / 'group.html'}",
        file=sys.stderr,
    )
    for note in data.notes:
        print(f"cmb-bidsapp: note: {note}", file=sys.stderr)
    if data.missing_subjects:
        shown = ", ".join(data.missing_subjects[:10])
        more = " …" if len(data.missing_subjects) > 10 else ""
        print(
            f"cmb-bidsapp: note: {len(data.missing_subjects)} participant(s) without outputs: "
            f"{shown}{more}",
            file=sys.stderr,
        )
    return EXIT_OK
