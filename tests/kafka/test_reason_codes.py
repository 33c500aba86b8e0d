"""The reason codes of results the Kafka service builds through `unserved_results`: its reason
texts are the ones the pipeline maps to `shutdown` and `handover` (service.py passes no code)."""

from __future__ import annotations

from clearbudget.daemon.core.pipeline import UNSERVED_REASON_CODES, PendingQuery, unserved_results
from clearbudget.daemon.kafka import service
from clearbudget.schemas.messages import QueryRequest, ReasonCode, Status


def test_the_services_reasons_are_the_ones_the_pipeline_maps() -> None:
    assert UNSERVED_REASON_CODES[service.SHUTDOWN_REASON] is ReasonCode.SHUTDOWN
    assert UNSERVED_REASON_CODES[service.HANDOVER_REASON] is ReasonCode.HANDOVER


def test_cut_off_and_failed_windows_get_their_codes() -> None:
    items = [PendingQuery(QueryRequest(id="q-1", prompt="p"), 0.0, offset=7)]
    (handed,) = unserved_results(items, Status.ABANDONED, service.HANDOVER_REASON, shadow_price=0.0)
    (failed,) = unserved_results(items, Status.FAILED, "internal error in window w: boom",
                                 window_id="w")  # fmt: skip
    assert (handed.status, handed.reason_code) == (Status.ABANDONED, ReasonCode.HANDOVER)
    assert (failed.status, failed.reason_code) == (Status.FAILED, ReasonCode.WINDOW_ERROR)
