"""The composition root's helpers: collector tuning, window id prefixes, logging, health."""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import structlog

from clearbudget.daemon.app import (
    GC_GEN0_THRESHOLD,
    _readiness,
    configure_logging,
    tune_gc,
    window_id_prefix,
)
from clearbudget.daemon.kafka.service import DaemonState
from clearbudget.daemon.kafka.sinks import BrokerHealth
from clearbudget.schemas.types import ID_PATTERN


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_gc()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, gen1, gen2)
    assert gc.get_freeze_count() > 0
    assert gc.isenabled()  # cycles are still collected


def test_window_ids_name_the_replica_and_its_start() -> None:
    prefix = window_id_prefix()
    assert re.fullmatch(ID_PATTERN, f"{prefix}-12345")
    assert prefix.startswith(re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:100])
    assert re.search(r"-\d{8}T\d{6}Z$", prefix)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:], root.level = handlers, level
    structlog.configure(**config)


@pytest.mark.usefixtures("restored_logging")
def test_logs_mask_the_secrets_in_every_field_and_in_library_records(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG", ["s3cret-api-key"])
    log = structlog.get_logger("clearbudget")
    log.debug("vllm_error_body", body='{"detail": "key s3cret-api-key refused"}', n=3)
    log.warning("nested", error=ValueError("s3cret-api-key"), where=["x", {"k": "s3cret-api-key"}])
    try:
        raise RuntimeError("bad key s3cret-api-key")
    except RuntimeError:
        log.exception("failed")
        logging.getLogger("somelib").exception("library says s3cret-api-key")
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err
    events = [json.loads(line) for line in (out + err).splitlines()]
    assert [e["event"] for e in events] == [
        "vllm_error_body",
        "nested",
        "failed",
        "library says ***",
    ]
    assert events[0]["body"] == '{"detail": "key *** refused"}'
    assert events[0]["n"] == 3
    assert events[1]["error"] == "ValueError('***')"
    assert events[1]["where"] == ["x", {"k": "***"}]
    assert "RuntimeError: bad key ***" in events[2]["exception"]
    assert "RuntimeError: bad key ***" in events[3]["exception"]


def test_readiness_gives_the_fatal_reason_while_the_daemon_drains() -> None:
    fatal = "publishing refused: results: TopicAuthorizationFailedError: denied"
    daemon = SimpleNamespace(
        state=DaemonState(consuming=False, fatal_error=fatal), broker_health=BrokerHealth()
    )
    backend = SimpleNamespace(ready=lambda: True)
    assert _readiness(daemon, backend) == fatal  # type: ignore[arg-type]
    daemon.state.fatal_error = None
    assert _readiness(daemon, backend) == "not consuming"  # type: ignore[arg-type]
