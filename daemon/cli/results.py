"""`clearbudget results`: read QueryResults from the results topic, filtered, as a table or JSON.

Also the reading and printing half of `clearbudget submit --wait`. The reader belongs to no
consumer group (`daemon.kafka.clients.make_reader`): it assigns every partition itself and
commits nothing, so it never disturbs the daemon's group.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from clearbudget.daemon.cli.errors import fail

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from rich.console import Console
    from rich.table import Table

    from clearbudget.daemon.settings import Settings
    from clearbudget.schemas.messages import QueryResult

# schemas.messages.Status, spelt out so that --help imports no pydantic model (a test keeps the
# two equal).
STATUSES = ("answered", "abandoned", "expired", "failed", "rejected")
STATUS_STYLES = {"answered": "green", "abandoned": "yellow", "expired": "yellow"}  # else red
POLL_MS = 200
# A finite read (no --follow) that makes no progress towards the end this long has failed.
STALL_S = 10.0


def results_command(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Only this query id (repeatable).")
    ] = None,
    statuses: Annotated[
        list[str] | None,
        typer.Option("--status", help=f"Only this status (repeatable): {', '.join(STATUSES)}."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep waiting for new results (Ctrl-C or --limit stops)."
        ),
    ] = False,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning", help="With --follow: start at the oldest result, not new ones."
        ),
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="Stop after printing this many results.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One QueryResult JSON object per line.")
    ] = False,
) -> None:
    """Print QueryResults from the results topic (CLEAR_RESULT_TOPIC), as a table or JSON lines.

    Without --follow: every result on the topic now, oldest first, then exit; with --id, exit
    status 1 when an id has no (matching) result. With --follow: only results that arrive from
    now on (all of them with --from-beginning), until Ctrl-C or --limit. Kafka settings are the
    daemon's (CLEAR_KAFKA_*, environment or .env). Results are at least once: a query in flight
    when a daemon restarted can show twice.
    """
    if limit is not None and limit < 1:
        fail(f"--limit must be >= 1, got {limit}")
    wanted = ResultFilter.of(ids, statuses)
    settings = load_command_settings()
    import asyncio

    quiet_kafka_logs()
    printer = ResultPrinter(json_out)
    try:
        found = asyncio.run(_read(settings, wanted, printer, follow, from_beginning, limit))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not follow and wanted.ids and limit is None and (missing := wanted.ids - found):
        fail(f"no matching result for {some_ids(missing, len(wanted.ids))}", code=1)


@dataclass(frozen=True)
class ResultFilter:
    """Which results to print: None is no filter on that field."""

    ids: frozenset[str] | None = None
    statuses: frozenset[str] | None = None

    @classmethod
    def of(cls, ids: Iterable[str] | None, statuses: Iterable[str] | None) -> ResultFilter:
        """From the command-line values; an unknown status fails naming --status."""
        statuses = [s.lower() for s in statuses or ()]
        for status in statuses:
            if status not in STATUSES:
                fail(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
        return cls(frozenset(ids) if ids else None, frozenset(statuses) if statuses else None)

    def matches(self, result: QueryResult) -> bool:
        if self.ids is not None and result.id not in self.ids:
            return False
        return self.statuses is None or result.status.value in self.statuses


class ResultPrinter:
    """Results on stdout as they arrive: JSON lines, or rows of a table with fixed columns (a
    table that grows row by row, so a followed stream prints at once)."""

    COLUMNS = (("id", 26), ("status", 9), ("code", 22), ("tokens", 7), ("probe", 6),
               ("allocated", 9), ("price", 9), ("answer / reason", None))  # fmt: skip

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self._console: Console | None = None
        self.printed = 0

    def print(self, result: QueryResult) -> None:
        self.printed += 1
        if self.json_out:
            typer.echo(result.model_dump_json())
            return
        if self._console is None:
            from rich.console import Console

            self._console = Console(width=max(Console().width, 124))
            self._console.print(self._table(header=True))
        from rich.text import Text

        table = self._table(header=False)
        # Text, not markup: an answer or reason may hold brackets; one line per result.
        if result.answer is not None:
            last = Text(" ".join(result.answer.split()))
        else:
            last = Text(" ".join((result.reason or "").split()), style="dim")
        status = result.status.value
        price = "" if result.shadow_price is None else f"{result.shadow_price:.3g}"
        code = result.reason_code.value if result.reason_code is not None else ""  # v1: none
        table.add_row(result.id, Text(status, style=STATUS_STYLES.get(status, "red")), code,
                      str(result.tokens_used), str(result.tokens_probe),
                      str(result.allocated_tokens), price, last)  # fmt: skip
        self._console.print(table)

    def _table(self, header: bool) -> Table:
        from rich.table import Table

        table = Table(box=None, show_header=header, pad_edge=False, show_edge=False)
        for name, width in self.COLUMNS:
            numeric = name in ("tokens", "probe", "allocated", "price")
            table.add_column(name, width=width, no_wrap=True, overflow="ellipsis",
                             justify="right" if numeric else "left")  # fmt: skip
        return table


def some_ids(ids: Iterable[str], total: int, shown: int = 5) -> str:
    """'2 of 5 ids: a, b' (the first few, sorted)."""
    ordered = sorted(ids)
    listed = ", ".join(ordered[:shown]) + (", ..." if len(ordered) > shown else "")
    return f"{len(ordered)} of {total} ids: {listed}"


def load_command_settings() -> Settings:
    """The daemon's settings (environment, .env, defaults); invalid ones fail as `run` does."""
    from clearbudget.daemon.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        fail(str(exc))


def quiet_kafka_logs() -> None:
    """aiokafka logs every failed connection itself; a command reports in its own one line."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def open_results(
    settings: Settings, *, from_beginning: bool
) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    """A group-less reader on every partition of the results topic, its positions pinned (at the
    oldest result or the end) before this returns, so nothing published later is missed.
    Raises `StartupError` (a line naming the variable) when the broker or topic is not there.

    On Tansu the end is where the partition's last batch starts, not its last record (its
    ListOffsets counts batches), so "from the end" may re-read a few older results there."""
    from aiokafka import TopicPartition

    from clearbudget.daemon.kafka.clients import start_reader

    consumer = await start_reader(settings, ["result_topic"])
    partitions = consumer.partitions_for_topic(settings.result_topic) or set()
    assigned = [TopicPartition(settings.result_topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    if from_beginning:
        await consumer.seek_to_beginning(*assigned)
    else:
        await consumer.seek_to_end(*assigned)
    for tp in assigned:
        await consumer.position(tp)
    return consumer, assigned


async def stream_results(
    consumer: AIOKafkaConsumer,
    assigned: list[TopicPartition],
    *,
    follow: bool,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[QueryResult]:
    """Every QueryResult from the reader's positions on; a record that is not one is skipped
    with a warning on stderr. `follow=False` ends at the end of each partition as its first fetch
    saw it; a read that makes no progress for STALL_S raises `TimeoutError`."""
    from pydantic import ValidationError

    from clearbudget.daemon.kafka.intake import describe_validation_error
    from clearbudget.schemas.messages import QueryResult

    targets: dict[TopicPartition, int] = {}
    progress_at = clock()
    while True:
        batch = await consumer.getmany(*assigned, timeout_ms=POLL_MS)
        for tp, records in batch.items():
            for record in records:
                try:
                    yield QueryResult.model_validate_json(record.value or b"")
                except ValidationError as exc:
                    typer.echo(
                        f"warning: {tp.topic} partition {tp.partition} offset {record.offset}: "
                        f"not a QueryResult ({describe_validation_error(exc)}), skipped",
                        err=True,
                    )
        if follow:
            continue
        if batch:
            progress_at = clock()
        if await _at_end(consumer, assigned, targets):
            return
        if clock() - progress_at > STALL_S:
            raise TimeoutError(f"no progress towards the end of the results topic in {STALL_S:g} s")


async def _at_end(
    consumer: AIOKafkaConsumer, assigned: list[TopicPartition], targets: dict[TopicPartition, int]
) -> bool:
    """Whether every partition is read up to `targets`: the high watermark its first fetch
    reported (not the listed end offset, which Tansu puts at the start of the last batch)."""
    for tp in assigned:
        if tp not in targets:
            highwater = consumer.highwater(tp)
            if highwater is None:  # no fetch answered for it yet
                return False
            targets[tp] = highwater
        if await consumer.position(tp) < targets[tp]:
            return False
    return True


async def _read(
    settings: Settings,
    wanted: ResultFilter,
    printer: ResultPrinter,
    follow: bool,
    from_beginning: bool,
    limit: int | None,
) -> set[str]:
    """Print the matching results; the ids printed."""
    from clearbudget.daemon.kafka.clients import StartupError

    try:
        consumer, assigned = await open_results(
            settings, from_beginning=from_beginning or not follow
        )
    except StartupError as exc:
        fail(str(exc), secrets=settings.secret_values())
    found: set[str] = set()
    try:
        async with aclosing(stream_results(consumer, assigned, follow=follow)) as stream:
            async for result in stream:
                if not wanted.matches(result):
                    continue
                printer.print(result)
                found.add(result.id)
                if limit is not None and printer.printed >= limit:
                    break
    except TimeoutError as exc:
        fail(str(exc), code=1, secrets=settings.secret_values())
    finally:
        await consumer.stop()
    return found
