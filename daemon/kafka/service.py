"""The daemon's main loop: consume → admit → window → pipeline → publish → commit.

The consume loop never waits on dispatch: closed windows go to a bounded queue, windows run
as concurrent tasks, and when the queue is full the loop pauses its partitions but keeps
calling `getmany` (heartbeats, rebalances) well inside `max_poll_interval_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from clearbudget.daemon.core.budget import BudgetLedger
from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import (
    HANDOVER_REASON,
    SHUTDOWN_REASON,
    PendingQuery,
    WindowPipeline,
    unserved_results,
)
from clearbudget.daemon.core.ports import ResultSink
from clearbudget.daemon.core.windowing import Window, WindowAssembler
from clearbudget.daemon.kafka.intake import Intake, Rejection
from clearbudget.daemon.kafka.offsets import OffsetTracker
from clearbudget.daemon.kafka.sinks import BrokerHealth, FatalPublishError
from clearbudget.schemas.messages import Status, WindowReport

POLL_TIMEOUT_MS = 100
BROKER_CHECK_INTERVAL_S = 5.0
BROKER_CHECK_TIMEOUT_S = 3.0
COMMIT_INTERVAL_S = 0.5
MAX_RECORDS_PER_POLL = 2000
# After the shutdown deadline: a moment for windows caught publishing, then the abandoned
# queries' results (the pod's grace period is the deadline + 5 s).
PUBLISHING_GRACE_S = 1.0
LAST_PUBLISH_S = 3.0


class Consumer(Protocol):
    """What the loop needs of a Kafka consumer (aiokafka's `AIOKafkaConsumer` has it all), so
    the loop can be unit-tested with an in-memory one."""

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None: ...

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]: ...

    def assignment(self) -> set[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None: ...

    async def topics(self) -> set[str]: ...

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...

    async def position(self, partition: TopicPartition) -> int: ...


@dataclass
class DaemonState:
    """What /readyz and /healthz report."""

    consuming: bool = False
    last_poll_at: float = 0.0
    fatal_error: str | None = None
    windows_done: int = 0


class Daemon:
    """Wires the Kafka consumer, intake, windows, pipeline, sink and commit bookkeeping."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        sink: ResultSink,
        pipeline: WindowPipeline,
        ledger: BudgetLedger,
        intake: Intake,
        metrics: PipelineMetrics,
        input_topic: str,
        window_seconds: float,
        window_max_queries: int,
        max_windows_in_flight: int = 4,
        min_tokens_per_query: float = 0.0,
        shutdown_deadline_s: float = 25.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        broker_health: BrokerHealth | None = None,
        backend_ready: Callable[[], bool] = lambda: True,
        window_id_prefix: str = "w",
        broker_check_interval_s: float = BROKER_CHECK_INTERVAL_S,
    ) -> None:
        self._consumer = consumer
        self.broker_health = broker_health or BrokerHealth()
        self._last_broker_check = 0.0
        self._broker_check_interval_s = broker_check_interval_s
        # End offsets asked for while paused: a paused partition is not fetched, so the
        # consumer's highwater (learned from fetches) stops moving and the lag would freeze.
        self._end_offsets: dict[TopicPartition, int] = {}
        # Where a paused partition that nothing was read from yet will start reading.
        self._start_offsets: dict[TopicPartition, int] = {}
        self._sink = sink
        self._pipeline = pipeline
        self._ledger = ledger
        self._intake = intake
        self._metrics = metrics
        self._topic = input_topic
        self._clock = clock
        self._sleep = sleep
        self._log = logger or structlog.get_logger("clearbudget")
        self._backend_ready = backend_ready
        self._assembler: WindowAssembler[PendingQuery] = WindowAssembler(
            window_seconds, window_max_queries, started_at=clock(), id_prefix=window_id_prefix
        )
        # Pacing: windows hold no more queries than their budget pays this much each, and
        # start no faster than the budget accrues for them (a backlog waits in Kafka).
        self._window_seconds = window_seconds
        self._window_max_queries = window_max_queries
        self._min_tokens_per_query = min_tokens_per_query
        self._last_reserve_at = clock()
        self._resize_windows()
        self._seen_ids: set[str] = set()
        self._offsets = OffsetTracker()
        # Closed windows wait here for one of `max_windows_in_flight` slots. One poll's batch
        # can close several at once; the loop pauses its partitions while any wait.
        self._windows: asyncio.Queue[Window[PendingQuery]] = asyncio.Queue()
        self._max_windows_in_flight = max_windows_in_flight
        self._slots = asyncio.Semaphore(max_windows_in_flight)
        # Window tasks in flight and the queries each holds (for the shutdown deadline), and
        # those publishing their results.
        self._running: dict[asyncio.Task[None], Window[PendingQuery]] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()  # rejections being published
        self._shutdown_deadline_s = shutdown_deadline_s
        self._last_commit = 0.0
        self._paused = False
        self._fenced: set[TopicPartition] = set()  # revoked, not (yet) assigned again
        self.state = DaemonState()
        # Set once the group gave this replica partitions: its budget share is known from then.
        self.assigned = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain within the shutdown deadline and commit."""
        self._consumer.subscribe([self._topic], listener=_Rebalance(self))
        dispatcher = asyncio.create_task(self._dispatch_windows(), name="window-dispatcher")
        self.state.consuming = True
        try:
            while not stop.is_set() and self.state.fatal_error is None:
                await self._poll_once()
        finally:
            self.state.consuming = False
            await self._drain(dispatcher)

    async def _poll_once(self) -> None:
        self._apply_backpressure()
        try:
            # Bounded: without a group coordinator aiokafka's getmany can wait for an assignment
            # indefinitely, and this loop must keep checking the broker and committing.
            batch = await asyncio.wait_for(
                self._consumer.getmany(
                    timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL
                ),
                POLL_TIMEOUT_MS / 1000 + BROKER_CHECK_TIMEOUT_S,
            )
        except TimeoutError:
            batch = {}
        self.state.last_poll_at = self._clock()
        rejections: list[Rejection] = []
        for tp, records in batch.items():
            for record in records:
                rejection = self._admit(tp, record)
                if rejection is not None:
                    rejections.append(rejection)
        if rejections:  # published beside the loop: a slow or refusing DLQ must not stall it
            self._track(asyncio.create_task(self._publish_rejections(rejections)))
        self._enqueue(self._assembler.due(self._clock()))
        self._metrics.queue_depth.set(self._assembler.pending)
        self._metrics.in_flight.set(self._offsets.in_flight())
        self._metrics.lag.set(self._lag())
        await self._maybe_commit()
        await self._maybe_check_broker()

    async def _maybe_check_broker(self) -> None:
        """`getmany` hides a lost broker (it just returns nothing): ask for metadata now and
        then, so /readyz turns red during an outage and green when the broker is back. While
        paused, ask for the end offsets too, so the lag keeps counting what arrives."""
        now = self._clock()
        if now - self._last_broker_check < self._broker_check_interval_s:
            return
        self._last_broker_check = now
        try:
            await asyncio.wait_for(self._consumer.topics(), BROKER_CHECK_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            self.broker_health.down(exc)
            return
        self.broker_health.up()
        if self._paused:
            await self._refresh_end_offsets()

    async def _refresh_end_offsets(self) -> None:
        """The assigned partitions' end offsets, for the lag while paused; on a failure (a
        leader election, an old broker) the last ones known are kept: the broker's health is
        `topics()`'s to say."""
        partitions = list(self._consumer.assignment())
        unread = [tp for tp in partitions if self._offsets.next_offset(tp) is None]
        try:
            ends = await asyncio.wait_for(
                self._consumer.end_offsets(partitions), BROKER_CHECK_TIMEOUT_S
            )
            for tp in unread:
                self._start_offsets[tp] = await asyncio.wait_for(
                    self._consumer.position(tp), BROKER_CHECK_TIMEOUT_S
                )
        except (KafkaError, TimeoutError) as exc:
            self._log.debug("end_offsets_failed", error=type(exc).__name__)
            return
        self._end_offsets.update(ends)
        self._metrics.lag.set(self._lag())

    def _waiting(self) -> int:
        """Queries behind a starting window, at least: in Kafka and in the open window."""
        return self._lag() + self._assembler.pending

    def _lag(self) -> int:
        """Records waiting in the assigned partitions past what this replica has read."""
        lag = 0
        for tp in self._consumer.assignment():
            ends = (self._consumer.highwater(tp), self._end_offsets.get(tp))
            known = [end for end in ends if end is not None]
            read = self._offsets.next_offset(tp)
            if read is None:
                read = self._start_offsets.get(tp)
            if known and read is not None:
                lag += max(max(known) - read, 0)
        return lag

    def _apply_backpressure(self) -> None:
        # A full window queue, or no pod to run windows on: stop fetching, keep polling.
        hold = self._windows.qsize() >= self._max_windows_in_flight or not self._backend_ready()
        partitions = self._consumer.assignment()
        if hold and not self._paused and partitions:
            self._consumer.pause(*partitions)
            self._paused = True
        elif not hold and self._paused:
            self._consumer.resume(*partitions)
            self._paused = False

    # --- intake ---------------------------------------------------------------------------
    def _admit(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> Rejection | None:
        self._offsets.consumed(tp, record.offset)
        admitted = self._intake.admit(
            record.value,
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            seen_ids=self._seen_ids,
        )
        if isinstance(admitted, Rejection):
            return admitted
        pending = PendingQuery(admitted, self._clock(), tp, record.offset)
        self._enqueue(self._assembler.add(pending, pending.arrived_at))
        return None

    def _enqueue(self, closed: list[Window[PendingQuery]]) -> None:
        if not closed:
            return
        # Ids must be unique within a window: the open window starts a fresh set.
        self._seen_ids = {p.request.id for p in self._assembler.pending_items}
        for window in closed:
            self._windows.put_nowait(window)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _publish_rejections(self, rejections: list[Rejection]) -> None:
        try:
            await self._sink.publish_dead_letters([r.dead_letter for r in rejections])
            results = [r.result for r in rejections if r.result is not None]
            if results:
                await self._sink.publish_results(results)
        except FatalPublishError as exc:
            self._fatal(exc)
            return
        self._metrics.dead_letters.inc(len(rejections))
        self._metrics.queries.labels(status="rejected").inc(len(rejections))
        for rejection in rejections:
            letter = rejection.dead_letter
            self._offsets.done(TopicPartition(letter.topic, letter.partition), letter.offset)

    # --- windows --------------------------------------------------------------------------
    async def _dispatch_windows(self) -> None:
        while True:
            # A window waiting here for a slot or its budget is neither queued nor running: a
            # revoke or the shutdown drops it (it is re-read), like the queued ones.
            window = await self._windows.get()
            await self._slots.acquire()
            await self._pace(window)
            self._start_window(window, holds_slot=True)

    async def _pace(self, window: Window[PendingQuery]) -> None:
        """Hold a window until its budget pays `min_tokens_per_query` for each of its queries,
        or one window length has accrued since the last start, whichever comes first."""
        needed = len(window.items) * self._min_tokens_per_query
        while True:  # a sleep may end a hair early: look again
            elapsed = self._clock() - self._last_reserve_at
            wait = min(self._ledger.seconds_until(needed, elapsed), self._window_seconds - elapsed)
            if wait <= 0:
                return
            await self._sleep(wait)

    def _reserve(self) -> float:
        """The starting window's budget: what accrued since the last start (at most one window
        length: an idle spell's surplus is the capped carry) plus the carry, taken."""
        now = self._clock()
        seconds = min(now - self._last_reserve_at, self._window_seconds)
        self._last_reserve_at = now
        earned_before = self._ledger.earned_total
        budget = self._ledger.reserve(seconds)
        self._metrics.budget_earned.inc(self._ledger.earned_total - earned_before)
        self._metrics.budget_carry.set(self._ledger.carry)
        self._metrics.budget_debt.set(self._ledger.debt)
        return budget

    def _resize_windows(self) -> None:
        self._assembler.max_items = self._ledger.paced_size(
            self._window_seconds, self._min_tokens_per_query, self._window_max_queries
        )

    def _start_window(self, window: Window[PendingQuery], *, holds_slot: bool = False) -> None:
        if self._fenced:  # a window the dispatcher held through a revoke
            items = tuple(item for item in window.items if item.partition not in self._fenced)
            if not items:
                if holds_slot:
                    self._slots.release()
                return
            window = replace(window, items=items)
        # Reserved here, not in the task: the next window's pacing must see this start.
        budget = self._reserve()
        task = asyncio.create_task(
            self._run_window(window, budget, holds_slot), name=window.window_id
        )
        self._running[task] = window
        task.add_done_callback(lambda done: self._running.pop(done, None))

    async def _run_window(
        self, window: Window[PendingQuery], budget: float, holds_slot: bool
    ) -> None:
        started = self._clock()
        try:
            outcome = await self._pipeline.run(
                window, budget, waiting=self._waiting(), carry_room=self._ledger.carry_room
            )
            self._publishing.add(asyncio.current_task())  # type: ignore[arg-type]
            await self._sink.publish_results(outcome.results)
            # Published: done, whatever happens to the report (a drain must not relabel them).
            self._finish(window.items)
            self._running.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._ledger.settle(budget, outcome.report.spent_tokens)
            self._metrics.budget_carry.set(self._ledger.carry)
            self._metrics.budget_debt.set(self._ledger.debt)
            self.state.windows_done += 1
            if holds_slot:  # the report is best-effort: the next window need not wait for it
                self._slots.release()
                holds_slot = False
            await self._publish_report(outcome.report)
            self._metrics.window_seconds.observe(self._clock() - started)
        except asyncio.CancelledError:
            raise
        except FatalPublishError as exc:  # offsets stay uncommitted: a restart redoes them
            self._fatal(exc)
        except Exception as exc:  # a window must never take the daemon down, nor lose a query
            self._log.exception("window_failed", window_id=window.window_id, error=str(exc))
            self._metrics.window_errors.inc()
            await self._fail_window(window, exc)
        finally:
            self._publishing.discard(asyncio.current_task())  # type: ignore[arg-type]
            if holds_slot:
                self._slots.release()

    async def _publish_report(self, report: WindowReport) -> None:
        """The window report, best-effort: its results are out, so nothing that goes wrong
        here may fail the window (that would give its queries a second, `failed` result)."""
        try:
            await self._sink.publish_window(report)
        except Exception as exc:
            self._log.warning("window_report_dropped", window_id=report.window_id, error=str(exc))

    async def _fail_window(self, window: Window[PendingQuery], exc: Exception) -> None:
        """Publish `failed` for every query of a window that broke; if even that fails, the
        offsets stay uncommitted and a restart re-reads the queries (liveness turns red)."""
        try:
            reason = f"internal error in window {window.window_id}: {type(exc).__name__}: {exc}"
            await self._sink.publish_results(
                unserved_results(window.items, Status.FAILED, reason, window_id=window.window_id)
            )
        except Exception as publish_error:
            self.state.fatal_error = f"window {window.window_id}: {publish_error}"
            return
        self._metrics.queries.labels(status="failed").inc(len(window.items))
        self._finish(window.items)

    def publish_refused(self, error: FatalPublishError) -> None:
        """A topic refused a record for good outside this loop (the feedback reader's DLQ):
        stop as if one of the loop's own publishes had been refused."""
        self._fatal(error)

    def _fatal(self, error: FatalPublishError) -> None:
        """A topic refuses the daemon for good: stop consuming, turn unhealthy, exit non-zero
        after the drain (nothing is committed past what was published)."""
        if self.state.fatal_error is None:
            self._log.error("publish_refused", error=str(error))
            self.state.fatal_error = f"publishing refused: {error}"

    def _finish(self, items: Sequence[PendingQuery]) -> None:
        for item in items:
            self._offsets.done(item.partition, item.offset)

    # --- commits and rebalance -----------------------------------------------------------
    async def _maybe_commit(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        await self.commit()

    async def commit(self) -> None:
        assigned = self._consumer.assignment()
        positions = {tp: v for tp, v in self._offsets.committable().items() if tp in assigned}
        if not positions:
            return
        try:
            # Bounded: aiokafka would otherwise wait for a coordinator for as long as it is gone.
            await asyncio.wait_for(self._consumer.commit(positions), BROKER_CHECK_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:  # the next interval tries again
            self.broker_health.down(exc)
            self._log.warning("commit_failed", error=str(exc))
            return
        self._offsets.mark_committed(positions)

    def on_assignment(self, assigned: set[TopicPartition]) -> None:
        self._fenced -= assigned
        total = len(self._consumer.partitions_for_topic(self._topic) or ()) or len(assigned) or 1
        mine = sum(1 for tp in assigned if tp.topic == self._topic)
        self._ledger.set_share(mine / total)
        self._metrics.budget_share.set(mine / total)
        self._resize_windows()
        if mine:
            self.assigned.set()
        self._log.info("partitions_assigned", assigned=mine, total=total, share=mine / total)

    async def on_revoke(self, revoked: set[TopicPartition]) -> None:
        """Hand the revoked partitions over cleanly: windows already running on them finish
        and publish (within the shutdown deadline), work not yet started is dropped, and what
        is done is committed, so the new owner re-reads exactly what has no result."""
        await self._fence(set(revoked))
        with contextlib.suppress(Exception):
            await self.commit()
        self._offsets.forget(revoked)
        for tp in revoked:
            self._end_offsets.pop(tp, None)
            self._start_offsets.pop(tp, None)

    async def _fence(self, revoked: set[TopicPartition]) -> None:
        def kept(item: PendingQuery) -> bool:
            return item.partition not in revoked

        # From now on nothing of these partitions starts (the dispatcher may hold a window).
        self._fenced |= revoked
        self._assembler.retain(kept)
        self._seen_ids = {p.request.id for p in self._assembler.pending_items}
        queued = self._drop_queued()
        for window in queued:
            self._requeue(window, kept)
        hit = {task for task, w in self._running.items() if not all(map(kept, w.items))}
        late = await self._finish_running(hit, HANDOVER_REASON)  # the rest was dropped
        if hit or queued:
            self._log.info("partitions_revoked", finished_windows=len(hit) - late,
                           abandoned_windows=late)  # fmt: skip

    async def _finish_running(self, tasks: set[asyncio.Task[None]], reason: str) -> int:
        """Let running windows finish and publish, within the shutdown deadline; those still
        running then are cancelled and their queries published `abandoned` with `reason`.
        Running windows hold the earliest offsets: a window cancelled unpublished behind one
        that published would have the new owner re-read, and perhaps answer differently,
        queries that already have a result. Returns how many were abandoned."""
        if not tasks:
            return 0
        _, late = await asyncio.wait(tasks, timeout=self._shutdown_deadline_s)
        await self._abandon_late(late, reason)
        return len(late)

    def _requeue(self, window: Window[PendingQuery], kept: Callable[[PendingQuery], bool]) -> None:
        """Put back the queries of partitions still owned (a window cut by a revoke)."""
        items = tuple(filter(kept, window.items))
        if items:
            self._windows.put_nowait(replace(window, items=items))

    # --- shutdown -------------------------------------------------------------------------
    async def _drain(self, dispatcher: asyncio.Task[None]) -> None:
        """Running windows finish within the deadline (what is left is abandoned), rejections
        are published, everything done is committed. Work not started (the open window, the
        queued ones) is left uncommitted for a restart or the next owner: starting it now
        would run it on no budget."""
        dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatcher
        left = self._assembler.pending + sum(len(w.items) for w in self._drop_queued())
        if left:
            self._log.info("shutdown_leaves_unstarted", queries=left)
        await self._finish_running(set(self._running) | self._side_tasks, SHUTDOWN_REASON)
        with contextlib.suppress(Exception):
            await self.commit()

    def _drop_queued(self) -> list[Window[PendingQuery]]:
        return [self._windows.get_nowait() for _ in range(self._windows.qsize())]

    async def _abandon_late(self, late: set[asyncio.Task[None]], reason: str) -> None:
        # A window caught publishing gets a moment more: cut off, its queries could end up
        # with its results and with `abandoned`.
        publishing = late & self._publishing
        if publishing:
            _, still = await asyncio.wait(publishing, timeout=PUBLISHING_GRACE_S)
            late = (late - publishing) | still
        unpublished = [
            self._running[task]
            for task in late
            if task in self._running and task not in self._publishing
        ]
        leftovers = [item for window in unpublished for item in window.items]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if not leftovers:
            return
        results = unserved_results(leftovers, Status.ABANDONED, reason, shadow_price=0.0)
        try:  # bounded: SIGTERM ends the process; what is not published is re-read on restart
            await asyncio.wait_for(self._sink.publish_results(results), LAST_PUBLISH_S)
        except (TimeoutError, FatalPublishError) as exc:
            self._log.warning("shutdown_publish_failed", queries=len(results), error=str(exc))
            return
        self._finish(leftovers)
        self._metrics.queries.labels(status="abandoned").inc(len(results))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._daemon.on_revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._daemon.on_assignment(assigned)
