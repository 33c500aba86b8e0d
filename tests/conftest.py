"""Fixtures every test may use: a fresh metrics registry, the shared recorded data.

The heavy ones (the real Tansu broker, the real vLLM server) are in tests/integration/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT / "data"  # copies of the recorded data the project ships


@pytest.fixture(autouse=True)
def fresh_structlog() -> Iterator[None]:
    """structlog's configuration is process-wide: a test that configures the daemon's logging
    (level filter, cached loggers) must not hide other tests' log lines from `capture_logs`."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry per test: no metric leaks between tests."""
    return CollectorRegistry()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"recorded data folder missing: {SHARED_DATA}")
    return SHARED_DATA
