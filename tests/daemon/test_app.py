"""The composition root's helpers: collector tuning, window id prefixes."""

from __future__ import annotations

import gc
import re
import socket
from collections.abc import Iterator

import pytest

from daemon.app import GC_GEN0_THRESHOLD, tune_gc, window_id_prefix
from schemas.types import ID_PATTERN


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
