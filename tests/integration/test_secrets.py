"""No configured secret ever leaves the daemon: a grep of everything it writes, at DEBUG and INFO.

Real `clearbudget run` processes get a distinctive fake secret in every secret-bearing setting
(the SASL password, the vLLM API key, the password inside a vLLM URL, credentials pasted into the
broker list) and go through start-up, a few queries, a pod that answers 500 with an error body
echoing the credentials it was sent, start-up failures (a broker that refuses SASL, no broker at
all, invalid settings) and shutdown. Then stdout, stderr, every record on the results, DLQ and
window-report topics, the /metrics, /readyz and /healthz bodies and `clearbudget config` (table
and JSON) are searched for the secrets, as sent and base64-encoded (Basic auth): none may appear.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.sim_server import create_app
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.schemas.messages import QueryRequest, QueryResult, Status
from tests.integration.test_daemon_kafka import read_all

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

STEM = "cbLEAK"  # every fake secret carries it; nothing else the daemon handles does
SASL_PASSWORD = f"{STEM}-sasl-Pw7731"
API_KEY = f"{STEM}-api-Key7731"
URL_USER, URL_PASSWORD = "alice", f"{STEM}-url-Pw7731"
BROKER_PASSWORD = f"{STEM}-broker-Pw7731"
BASIC_TOKEN = base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()
FORBIDDEN = (STEM, BASIC_TOKEN)

POOL = RolloutPool(
    [RolloutRecord("m", "b", "p", 10, "7", (RolloutSample(tokens=50, correct=True, answer="7"),))]
)
FAIL_MARK = "please-fail"  # prompts with it get the echoing 500
SEEN_AUTH = web.AppKey("seen_auth", list)  # the Authorization headers the echoing 500 saw


@dataclass
class Pod:
    address: str  # host:port
    seen_auth: list[str]


def _echo(request: web.Request) -> str:
    """What a careless gateway says back: the credentials it was sent, in several shapes."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme == "Basic":
        token = base64.b64decode(token).decode().partition(":")[2]
    return f"key {token} refused; Authorization: {auth}; api_key={token}"


@web.middleware
async def echoing_500(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if request.path == "/v1/completions" and FAIL_MARK in (await request.text()):
        request.app[SEEN_AUTH].append(request.headers.get("Authorization", ""))
        body = {
            "error": {"message": _echo(request), "type": "InternalServerError", "code": 500},
            "headers": dict(request.headers),
        }
        return web.json_response(body, status=500)
    return await handler(request)


@pytest.fixture
async def pod() -> AsyncIterator[Pod]:
    """The simulator as a pod that answers 500, echoing its credentials, to marked prompts."""
    app = create_app(SimulatedBackend(POOL))
    app.middlewares.append(echoing_500)
    seen: list[str] = []
    app[SEEN_AUTH] = seen
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Pod(f"127.0.0.1:{port}", seen)
    await runner.cleanup()


@dataclass
class Outputs:
    """Everything the processes wrote, by where it was read."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts[where] = self.texts.get(where, "") + text

    def leaks(self) -> list[str]:
        return [
            f"{where}: ...{text[max(0, text.find(s) - 80) : text.find(s) + 80]}..."
            for where, text in self.texts.items()
            for s in FORBIDDEN
            if s in text
        ]


def _env(level: str, **settings: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "COLUMNS": "400",  # the config table must not fold a value across lines
        "CLEAR_LOG_LEVEL": level,
        "CLEAR_HTTP_HOST": "127.0.0.1",
        "CLEAR_HTTP_PORT": str(free_loopback_port()),
        **{f"CLEAR_{name.upper()}": value for name, value in settings.items()},
    }


@dataclass
class Process:
    """A `clearbudget` process whose stdout and stderr are read as it runs (a full pipe would
    stall it)."""

    name: str
    process: asyncio.subprocess.Process
    streams: tuple[asyncio.Task[bytes], asyncio.Task[bytes]]

    @classmethod
    async def start(cls, name: str, args: list[str], env: dict[str, str]) -> Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clearbudget.daemon.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        reads = (process.stdout.read(), process.stderr.read())
        return cls(name, process, (asyncio.create_task(reads[0]), asyncio.create_task(reads[1])))

    async def finish(self, out: Outputs, *, within_s: float = 40) -> tuple[int, str, str]:
        """Wait for the exit; record what it wrote; (exit code, stdout, stderr)."""
        code = await asyncio.wait_for(self.process.wait(), within_s)
        stdout, stderr = (
            data.decode("utf-8", "replace") for data in await asyncio.gather(*self.streams)
        )
        out.add(f"{self.name} stdout", stdout)
        out.add(f"{self.name} stderr", stderr)
        return code, stdout, stderr


async def _topics(kafka_topic, names: tuple[str, ...]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {name: await kafka_topic(name) for name in names}


async def _serve_and_stop(
    out: Outputs, name: str, env: dict[str, str], topics: dict[str, str], bootstrap: str
) -> None:
    """One daemon's life: start, two good queries, two that hit the echoing 500, one bad record,
    every result read, the HTTP bodies scraped, SIGTERM, every topic read."""
    daemon = await Process.start(name, ["run"], env)
    port = int(env["CLEAR_HTTP_PORT"])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(400):  # the HTTP server starts once Kafka is connected
                assert daemon.process.returncode is None, f"{name} exited at start-up"
                try:
                    await client.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail(f"{name}: no HTTP server after 40 s")
            good = [QueryRequest(id=f"{name}-ok-{i}", prompt=prompt_for(POOL.records[0]))
                    for i in range(2)]  # fmt: skip
            bad = [QueryRequest(id=f"{name}-fail-{i}", prompt=f"{FAIL_MARK} {i}") for i in range(2)]
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
            await producer.start()
            try:
                for request in [*good, *bad]:
                    await producer.send(topics["queries"], request.model_dump_json().encode())
                await producer.send(topics["queries"], b"{not json")
                await producer.flush()
            finally:
                await producer.stop()
            raw = await read_all(bootstrap, topics["results"], want=4, timeout_s=30)
            results = {r.id: r for r in map(QueryResult.model_validate_json, raw)}
            assert {results[r.id].status for r in bad} == {Status.FAILED}, results
            for request in bad:  # the echo came back, masked
                reason = results[request.id].reason or ""
                assert "HTTP 500" in reason, reason
                assert "key *** refused" in reason, reason
            for path in ("/metrics", "/readyz", "/healthz"):
                out.add(f"{name} GET {path}", (await client.get(path)).text)
    finally:
        if daemon.process.returncode is None:
            daemon.process.send_signal(signal.SIGTERM)
        code, stdout, stderr = await daemon.finish(out)
    assert code == 0, stderr
    events = [json.loads(line)["event"] for line in stdout.splitlines()]
    assert "started" in events  # the whole life was logged
    assert "stopped" in events
    out.add(f"{name} results", b"\n".join(raw))
    for topic in ("dlq", "windows"):
        records = await read_all(bootstrap, topics[topic], want=1, timeout_s=10)
        out.add(f"{name} {topic}", b"\n".join(records))


@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
async def test_no_secret_in_any_output(
    level: str, kafka_broker: EmbeddedBroker, kafka_topic, pod: Pod
) -> None:
    out = Outputs()
    bootstrap = kafka_broker.bootstrap
    names = ("queries", "results", "dlq", "windows")

    def daemon_env(topics: dict[str, str], **settings: str) -> dict[str, str]:
        return _env(
            level,
            kafka_bootstrap=bootstrap,
            input_topic=topics["queries"],
            result_topic=topics["results"],
            dlq_topic=topics["dlq"],
            window_topic=topics["windows"],
            consumer_group=topics["queries"],
            kafka_idempotent_producer="false",
            tokens_per_second="20000",
            window_seconds="0.3",
            request_retries="1",
            vllm_outage_wait_seconds="0",
            **settings,
        )

    sasl = {
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_username": "svc",
        "kafka_sasl_password": SASL_PASSWORD,
    }
    url_credentials = f"http://{URL_USER}:{URL_PASSWORD}@{pod.address}"
    dead_broker = f"127.0.0.1:{free_loopback_port()}"
    failures = {  # name: (arguments, environment, exit code)
        "sasl-refused": (["run"], _env(level, kafka_bootstrap=bootstrap, **sasl,
                                       vllm_api_key=API_KEY), 2),
        "no-broker": (["run"], _env(level, kafka_bootstrap=dead_broker,
                                    vllm_endpoints=url_credentials), 2),
        "broker-credentials": (["run"], _env(
            level, kafka_bootstrap=f"svc:{BROKER_PASSWORD}@{dead_broker}"), 2),
        "bad-settings": (["run"], _env(
            level, kafka_sasl_password=SASL_PASSWORD, vllm_api_key=API_KEY,
            vllm_endpoints=f"{url_credentials}/?x=1"), 2),
        "config": (["config"], _env(level, **sasl, vllm_api_key=API_KEY), 0),
        "config-json": (["config", "--json"], _env(level, **sasl, vllm_api_key=API_KEY), 0),
        "config-url": (["config", "--json"], _env(level, vllm_endpoints=url_credentials), 0),
        "config-broker": (["config"], _env(
            level, kafka_bootstrap=f"SASL_SSL://svc:{BROKER_PASSWORD}@{dead_broker}"), None),
    }  # fmt: skip

    async def expect(name: str, args: list[str], env: dict[str, str], code: int | None) -> None:
        returned, _, stderr = await (await Process.start(name, args, env)).finish(out)
        assert code is None or returned == code, (name, stderr)

    with_key = await _topics(kafka_topic, names)
    with_url = await _topics(kafka_topic, names)
    await asyncio.gather(
        _serve_and_stop(
            out, "api-key", daemon_env(with_key, vllm_endpoints=f"http://{pod.address}",
                                       vllm_api_key=API_KEY), with_key, bootstrap),
        _serve_and_stop(
            out, "url-credentials", daemon_env(with_url, vllm_endpoints=url_credentials),
            with_url, bootstrap),
        *(expect(name, *spec) for name, spec in failures.items()),
    )  # fmt: skip

    # The secrets were there: sent to the pod, masked in the config.
    assert {f"Bearer {API_KEY}", f"Basic {BASIC_TOKEN}"} <= set(pod.seen_auth)
    assert '"CLEAR_KAFKA_SASL_PASSWORD": "***"' in out.texts["config-json stdout"]
    leaks = out.leaks()
    assert not leaks, "\n".join(leaks)
