"""Run the official BIDS validator (PyPI `bids-validator-deno`), ignoring only `_swi` issues.

`_swi` files are in wide use but not yet in the BIDS specification: the validator reports them as
NOT_INCLUDED. Those issues, and no others, are ignored through the validator's configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CMBError

# Issues about files with the `swi` suffix (and their sidecars) are the only ones ignored.
SWI_IGNORE = [
    {"code": "NOT_INCLUDED", "location": "**/*_swi.nii*"},
    {"code": "NOT_INCLUDED", "location": "**/*_swi.json"},
]


@dataclass
class Issue:
    severity: str
    code: str
    location: str | None
    message: str = ""


@dataclass
class ValidationResult:
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    swi_files_ignored: int = 0

    @property
    def valid(self) -> bool:
        return not self.errors

    def summary(self, limit: int = 3) -> str:
        parts = [f"{i.code} at {i.location or '(dataset)'}" for i in self.errors[:limit]]
        more = f" and {len(self.errors) - limit} more" if len(self.errors) > limit else ""
        return "; ".join(parts) + more


def validator_executable() -> str:
    """Path of the `bids-validator-deno` executable installed beside this Python."""
    beside = Path(sys.executable).parent / "bids-validator-deno"
    if beside.exists():
        return str(beside)
    found = shutil.which("bids-validator-deno")
    if found:
        return found
    raise CMBError(
        "the BIDS validator (bids-validator-deno) is not installed",
        fix="Install it with `pip install bids-validator-deno`, or pass --skip-bids-validation.",
    )


def validate(
    path: str | Path, *, ignore_swi: bool = True, timeout: float = 600
) -> ValidationResult:
    """Validate a raw or derivative dataset and return its errors and warnings."""
    exe = validator_executable()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="cmb-validator-") as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps({"ignore": SWI_IGNORE if ignore_swi else []}))
        cmd = [exe, str(path), "--format", "json", "--config", str(cfg), "--no-color"]
        env = {**os.environ, "NO_COLOR": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise CMBError(
                f"the BIDS validator did not finish within {timeout:.0f} s",
                path=path,
                fix="Pass --skip-bids-validation to skip it.",
            ) from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CMBError(
            f"the BIDS validator failed to run ({proc.stderr.strip().splitlines()[-1:] or 'no output'})",
            path=path,
            fix="Pass --skip-bids-validation to skip it.",
        ) from None
    result = ValidationResult()
    messages = (
        {m.get("code"): m.get("message", "") for m in report["issues"].get("codeMessages", [])}
        if isinstance(report["issues"].get("codeMessages"), list)
        else {}
    )
    for item in report["issues"]["issues"]:
        issue = Issue(
            severity=item.get("severity", "error"),
            code=item.get("code", "?"),
            location=item.get("location"),
            message=messages.get(item.get("code"), ""),
        )
        (result.errors if issue.severity == "error" else result.warnings).append(issue)
    if ignore_swi:
        result.swi_files_ignored = sum(1 for _ in path.rglob("*_swi.nii*"))
    return result
