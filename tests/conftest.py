"""Fixtures every test may use: a fresh metrics registry, the shared recorded data.

The heavy ones (the real Tansu broker, the real vLLM server) are in tests/integration/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT / "data"  # copies of the recorded data the project ships


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry per test: no metric leaks between tests."""
    return CollectorRegistry()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"recorded data folder missing: {SHARED_DATA}")
    return SHARED_DATA
