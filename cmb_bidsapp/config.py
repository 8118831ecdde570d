"""The settings of one run, as one object: built from argv, saved as TOML in the run's log folder."""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from . import __version__


@dataclass
class Config:
    """Everything a run needs to know. Paths are absolute."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filters: dict[str, Any] = field(default_factory=dict)
    bids_filter_file: Path | None = None
    input_kind: str = "auto"
    work_dir: Path | None = None
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = "Linear"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    plugin_chosen: bool = False
    """True when --use-plugin named the plugin (the app then never swaps it)."""
    skull_strip: str = "auto"
    device: str = "auto"
    models_dir: Path | None = None
    threshold: float | None = None
    skip_bids_validation: bool = False
    reports_only: bool = False
    boilerplate_only: bool = False
    stop_on_first_crash: bool = False
    verbose: int = 0
    run_uuid: str = field(default_factory=lambda: _new_run_uuid())
    version: str = __version__
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    @property
    def log_dir(self) -> Path:
        """This run's log folder: config, status, stage timings, crash files."""
        return self.output_dir / "logs" / self.run_uuid

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    def save(self, path: str | Path | None = None) -> Path:
        """Write the settings to TOML (default: `<log_dir>/config.toml`)."""
        from .io import atomic_write_text

        path = Path(path) if path else self.log_dir / "config.toml"
        data = {"cmb_bidsapp": _toml_safe(self.to_dict())}
        atomic_write_text(path, tomli_w.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read settings saved by `save`, to reproduce a run."""
        data = tomllib.loads(Path(path).read_text())["cmb_bidsapp"]
        kwargs = {}
        types = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in types:
                continue
            if key in ("bids_dir", "output_dir", "work_dir", "models_dir", "bids_filter_file"):
                value = Path(value)
            kwargs[key] = value
        return cls(**kwargs)


def _new_run_uuid() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}_{os.getpid()}"


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value
