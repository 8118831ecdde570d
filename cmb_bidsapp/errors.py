"""Errors that reach the user: each carries its exit code and a one-line message with the fix."""

from __future__ import annotations

from pathlib import Path

# Exit codes of the contract (draft BIDS execution specification).
EXIT_OK = 0
EXIT_FAILED_IMAGES = 1
EXIT_INVALID_DATASET = 16
EXIT_NO_MATCH = 18
EXIT_USAGE = 64


class CMBError(Exception):
    """Base class: an error explained to the user in one or two lines, never a traceback."""

    exit_code = EXIT_FAILED_IMAGES

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        where = f"{self.path}: " if self.path else ""
        fix = f" {self.fix}" if self.fix else ""
        return f"{where}{self.message}.{fix}".replace("..", ".")


class UsageError(CMBError):
    """Bad command-line usage (exit 64)."""

    exit_code = EXIT_USAGE


class InvalidDatasetError(CMBError):
    """BIDS_DIR is not a valid BIDS dataset (exit 16)."""

    exit_code = EXIT_INVALID_DATASET


class NoMatchError(CMBError):
    """The selection matched no image (exit 18)."""

    exit_code = EXIT_NO_MATCH


class InputError(CMBError):
    """One input file is unusable; the image fails, the others go on (exit 1 at the end)."""

    exit_code = EXIT_FAILED_IMAGES
