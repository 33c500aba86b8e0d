"""`clearbudget submit`: send one prompt, or a JSONL file of QueryRequests, to the input topic.

Every query is validated first, by the daemon's own edge rules (`daemon.kafka.intake`, with the
daemon's CLEAR_MAX_PROMPT_BYTES); one bad line and nothing is sent, so a file is never half
sent by accident. `--wait` then follows the results topic until each query has its result.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clearbudget.daemon.cli.errors import fail
from clearbudget.daemon.cli.results import (
    ResultPrinter,
    load_command_settings,
    open_results,
    quiet_kafka_logs,
    some_ids,
    stream_results,
)

if TYPE_CHECKING:
    from clearbudget.daemon.settings import Settings
    from clearbudget.schemas.messages import QueryRequest

DEFAULT_TIMEOUT_S = 300.0
# Options of a single prompt, by the QueryRequest field they set (error messages name them).
PROMPT_OPTIONS = {"id": "--id", "tags": "--tag", "max_tokens": "--max-tokens",
                  "deadline": "--deadline-s", "prompt": "PROMPT"}  # fmt: skip


class InvalidInput(ValueError):
    """A query that would not pass the daemon's edge; the message names the line and field."""


def submit_command(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt of one query (or give --file).")
    ] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", help="JSONL, one QueryRequest per line (id optional); - is stdin."),
    ] = None,
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="KEY=VALUE tag of the prompt (repeatable).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Cap on the prompt's tokens.")
    ] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option("--deadline-s", help="The prompt expires this many seconds from now."),
    ] = None,
    query_id: Annotated[
        str | None, typer.Option("--id", help="The prompt's id (default: a new q-<hex> id).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the results topic until every query has one.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="With --wait: give up after this many seconds.")
    ] = DEFAULT_TIMEOUT_S,
    json_out: Annotated[
        bool, typer.Option("--json", help="With --wait: results as JSON lines, not a table.")
    ] = False,
) -> None:
    """Send queries to the input topic (CLEAR_INPUT_TOPIC) with the daemon's Kafka settings.

    One PROMPT (with --tag, --max-tokens, --deadline-s, --id), or --file with one QueryRequest
    JSON object per line; a line without an id gets a new one. Everything is validated before
    anything is sent: a bad line exits with status 2 naming the line and field, and nothing is
    sent. Without --wait the ids sent are printed, one per line. With --wait, stdout carries
    each result as it arrives (a table, or --json lines) and the command exits 0 once every
    query has one, or 1 after --timeout seconds naming how many are missing.
    """
    if (prompt is None) == (file is None):
        fail("give one PROMPT or --file, not both" if prompt is not None else
             "give a PROMPT or --file (see --help)")  # fmt: skip
    if file is not None and (tags or max_tokens is not None or deadline_s is not None
                             or query_id is not None):  # fmt: skip
        fail("--tag, --max-tokens, --deadline-s and --id go with a PROMPT, not --file")
    if not timeout > 0:
        fail(f"--timeout must be > 0, got {timeout:g}")
    settings = load_command_settings()
    try:
        if prompt is not None:
            requests = [prompt_request(prompt, tags or [], max_tokens, deadline_s, query_id,
                                       settings.max_prompt_bytes)]  # fmt: skip
        else:
            requests = read_requests(file or "-", settings.max_prompt_bytes)
    except InvalidInput as exc:
        fail(str(exc))
    import asyncio

    quiet_kafka_logs()
    try:
        missing = asyncio.run(_submit(settings, requests, wait, timeout, json_out))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if missing:
        fail(f"timed out after {timeout:g} s: no result for {some_ids(missing, len(requests))}",
             code=1)  # fmt: skip


def new_id() -> str:
    return f"q-{uuid.uuid4().hex[:16]}"


def prompt_request(
    prompt: str,
    tags: Iterable[str],
    max_tokens: int | None,
    deadline_s: float | None,
    query_id: str | None,
    max_prompt_bytes: int,
    *,
    make_id: Callable[[], str] = new_id,
    now: Callable[[], float] = time.time,
) -> QueryRequest:
    """The one query of `submit PROMPT`; a bad option raises `InvalidInput` naming it."""
    body: dict[str, Any] = {"id": query_id if query_id is not None else make_id(),
                            "prompt": prompt, "tags": parse_tags(tags)}  # fmt: skip
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if deadline_s is not None:
        if not 0 < deadline_s < 1e9:
            raise InvalidInput(
                f"--deadline-s must be > 0 (seconds from now, under 1e9), got {deadline_s:g}"
            )
        body["deadline"] = now() + deadline_s
    try:
        return validate(json.dumps(body).encode("utf-8"), max_prompt_bytes)
    except InvalidInput as exc:
        raise InvalidInput(_name_options(str(exc))) from None


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` options as a mapping; the value may hold '='."""
    parsed: dict[str, str] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--tag must be KEY=VALUE, got {tag!r}")
        if key in parsed:
            raise InvalidInput(f"--tag {key} is given twice")
        parsed[key] = value
    return parsed


def _name_options(error: str) -> str:
    """'max_tokens: must be >= 1; tags.X: ...' with each field replaced by its option."""
    parts = []
    for part in error.split("; "):
        field, sep, rest = part.partition(":")
        head, _, tail = field.partition(".")
        option = PROMPT_OPTIONS.get(head)
        if sep and option:
            if tail.endswith(".[key]"):  # the tag's key, not its value, is wrong
                tail, rest = tail.removesuffix(".[key]"), " key" + rest
            field = f"{option} {tail}" if tail else option
        parts.append(f"{field}{sep}{rest}")
    return "; ".join(parts)


def validate(value: bytes, max_prompt_bytes: int) -> QueryRequest:
    """The record as the daemon's edge would read it; `InvalidInput('field: problem')` if not."""
    from clearbudget.daemon.kafka.intake import Intake, IntakeLimits, Rejection

    admitted = Intake(IntakeLimits(max_prompt_bytes=max_prompt_bytes)).admit(
        value, topic="submit", partition=0, offset=0, seen_ids=set()
    )
    if isinstance(admitted, Rejection):
        raise InvalidInput(admitted.error)
    return admitted


def read_requests(path: str, max_prompt_bytes: int) -> list[QueryRequest]:
    """Every query of a JSONL file (`-`: stdin); the first bad line (and how many more there
    are) raises `InvalidInput`, so nothing is sent from a file with one."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as handle:
                data = handle.read()
        # Undecodable bytes stay (as lone surrogates) until their line reports them.
        lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    except FileNotFoundError:
        raise InvalidInput(f"{name}: file not found") from None
    except OSError as exc:
        raise InvalidInput(f"{name}: cannot read ({exc.strerror or exc})") from None
    requests, errors = parse_lines(lines, max_prompt_bytes)
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise InvalidInput(f"{name}: {errors[0]}{more}; nothing was sent")
    if not requests:
        raise InvalidInput(f"{name}: holds no queries")
    return requests


def parse_lines(
    lines: Iterable[str], max_prompt_bytes: int, make_id: Callable[[], str] = new_id
) -> tuple[list[QueryRequest], list[str]]:
    """The queries of JSONL lines (blank lines skipped; an object without "id" gets
    `make_id()`), and one 'line N: field: problem' per line that is not a valid query or
    repeats an id."""
    requests: list[QueryRequest] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = _with_id(line, make_id).encode("utf-8")
        except UnicodeEncodeError:
            errors.append(f"line {number}: message: not valid UTF-8")
            continue
        try:
            request = validate(value, max_prompt_bytes)
        except InvalidInput as exc:
            errors.append(f"line {number}: {exc}")
            continue
        if request.id in first_line:
            errors.append(
                f"line {number}: id: {request.id!r} is already the id of line "
                f"{first_line[request.id]}"
            )
            continue
        first_line[request.id] = number
        requests.append(request)
    return requests, errors


def _with_id(line: str, make_id: Callable[[], str]) -> str:
    """The line with `"id": make_id()` first in its object when it is an object without one;
    otherwise as it is (the edge rules judge it), so every other byte is validated as sent."""
    try:
        payload = json.loads(line)
    except (ValueError, RecursionError):
        return line
    if not isinstance(payload, dict) or "id" in payload:
        return line
    inner = line.strip()[1:].lstrip()
    return '{"id": ' + json.dumps(make_id()) + ("" if inner.startswith("}") else ", ") + inner


async def _submit(
    settings: Settings, requests: list[QueryRequest], wait: bool, wait_s: float, json_out: bool
) -> list[str]:
    """Send; with `wait`, print results until each id has one. The ids still missing."""
    import structlog

    from clearbudget.daemon.kafka.clients import StartupError

    # The idempotent-producer fallback warns in the daemon's log; a command falls back quietly.
    log = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(40),  # logging.ERROR
    )
    reader = None
    try:
        if wait:  # positioned before anything is sent, so no result can slip past
            reader, assigned = await open_results(settings, from_beginning=False)
        await _send(settings, requests, log)
    except StartupError as exc:
        if reader is not None:
            await reader.stop()
        fail(str(exc), secrets=settings.secret_values())
    except BaseException:
        if reader is not None:
            await reader.stop()
        raise
    ids = [r.id for r in requests]
    if reader is None:
        for query_id in ids:
            typer.echo(query_id)
        return []
    typer.echo(
        f"submitted {len(ids)} {'query' if len(ids) == 1 else 'queries'} to "
        f"{settings.input_topic!r}; waiting up to {wait_s:g} s for the results",
        err=True,
    )
    try:
        return await _await_results(reader, assigned, ids, wait_s, ResultPrinter(json_out))
    finally:
        await reader.stop()


async def _send(settings: Settings, requests: list[QueryRequest], log: Any) -> None:
    """Produce every request, keyed by id; a refused send fails (code 1) saying how many
    were sent."""
    import asyncio

    from aiokafka.errors import KafkaError

    from clearbudget.daemon.kafka.clients import start_command_producer

    producer = await start_command_producer(settings, log, ["input_topic"])
    deliveries: list[asyncio.Future[Any]] = []
    error: BaseException | None = None
    try:
        for request in requests:
            value = request.model_dump_json(exclude_none=True).encode("utf-8")
            key = request.id.encode("utf-8")
            deliveries.append(await producer.send(settings.input_topic, value, key=key))
    except KafkaError as exc:
        error = exc
    finally:
        outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
        await producer.stop()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    error = error or (failed[0] if failed else None)
    if error is not None:
        sent = len(outcomes) - len(failed)
        fail(f"sending to {settings.input_topic!r} failed ({type(error).__name__}: {error}); "
             f"{sent} of {len(requests)} queries were sent", code=1,
             secrets=settings.secret_values())  # fmt: skip


async def _await_results(
    reader: Any, assigned: Any, ids: list[str], wait_s: float, printer: ResultPrinter
) -> list[str]:
    """Print the first result of each id as it arrives; the ids without one at the time-out."""
    import asyncio

    pending = set(ids)
    try:
        async with asyncio.timeout(wait_s):
            stream = stream_results(reader, assigned, follow=True)
            async with aclosing(stream):
                async for result in stream:
                    if result.id in pending:
                        pending.discard(result.id)
                        printer.print(result)
                        if not pending:
                            return []
    except TimeoutError:
        pass
    return [query_id for query_id in ids if query_id in pending]
