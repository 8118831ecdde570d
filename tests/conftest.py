"""Shared fixtures: the reference data beside the checkout, and a fixed thread count."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CMB_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real MEGRE crop, MARS atlas); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (not a package) loaded as a module, e.g. ``bench_group``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchmark_script():
    """:func:`load_benchmark`, for tests of the benchmark scripts."""
    return load_benchmark
