"""Daemon configuration: the one place environment variables (prefix `CLEAR_`) are read.

`load_settings()` reads the process environment and an optional `.env` file and turns every
validation failure into a `SettingsError` whose message names the environment variable, so
`clearbudget run` can print it and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import (
    AnyHttpUrl,
    Field,
    FilePath,
    InstanceOf,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clearbudget.daemon.core.ports import (
    DEFAULT_THINKING_ANSWER_TOKENS,
    BudgetMode,
    answer_allowance,
)
from clearbudget.daemon.core.tags import TagBudgets
from clearbudget.schemas.messages import DEFAULT_MAX_PROMPT_BYTES

ENV_PREFIX = "CLEAR_"
# The default backlog floor in probes per query (benchmarks/RESULTS.md, "Trust").
PACING_PROBES = 4
DEFAULT_ENV_FILE = Path(".env")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# How CLEAR_VLLM_ENDPOINTS become endpoints (daemon.vllm.pool.Discovery): "none", one per URL;
# "dns", one per address its host name resolves to (a headless Service: one per ready pod).
VllmDiscovery = Literal["none", "dns"]

# Kafka's own rule for topic names (legal characters, at most 249 of them).
_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HTTP_URL = TypeAdapter(AnyHttpUrl)


class SettingsError(ValueError):
    """Invalid configuration; the message names each offending environment variable."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:  # one line, as every other CLI error
            super().__init__(f"invalid settings: {self.problems[0]}")
        else:
            super().__init__("invalid settings:\n  " + "\n  ".join(self.problems))


def env_var(field_name: str) -> str:
    """The environment variable that sets the `Settings` field `field_name`."""
    return ENV_PREFIX + field_name.upper()


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _validate_topic(value: str) -> str:
    if not _TOPIC_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise ValueError(
            f"{value!r} is not a Kafka topic name (letters, digits, '.', '_', '-'; 1-249 chars)"
        )
    return value


class Settings(BaseSettings):
    """Everything the daemon is configured with; one environment variable per field."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=DEFAULT_ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        default="localhost:9092", description="Comma-separated host:port list of brokers."
    )
    input_topic: str = Field(default="clear.queries", description="QueryRequest messages.")
    result_topic: str = Field(default="clear.results", description="QueryResult messages.")
    dlq_topic: str = Field(default="clear.dlq", description="Rejected input with its error.")
    window_topic: str | None = Field(
        default="clear.windows", description="Per-window reports; empty disables them."
    )
    feedback_topic: str | None = Field(
        default=None,
        description="Graded feedback (Feedback messages) from a downstream grader; empty: none.",
    )
    consumer_group: str = Field(default="clearbudget", min_length=1)
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: FilePath | None = None
    kafka_ssl_certfile: FilePath | None = None
    kafka_ssl_keyfile: FilePath | None = None
    kafka_idempotent_producer: bool = Field(
        default=True, description="Idempotent result producer; turn off for brokers without it."
    )
    kafka_startup_wait_seconds: float = Field(
        default=0.0, ge=0, description="Wait this long for the broker at start (orchestration)."
    )

    # --- vLLM backends ---------------------------------------------------------------------
    vllm_endpoints: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("http://localhost:8000",),
        description="Comma-separated base URLs of OpenAI-compatible vLLM servers.",
    )
    vllm_api_key: SecretStr | None = None
    model: str = Field(default="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", min_length=1)
    endpoint_concurrency: int = Field(default=32, gt=0, description="In-flight requests/pod.")
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    request_retries: int = Field(default=2, ge=0, le=20)
    # While no pod can take work, a request waits this long for one to come back (0: fail).
    vllm_outage_wait_seconds: float = Field(default=600.0, ge=0)
    vllm_discovery: VllmDiscovery = Field(
        default="none", description="dns: one endpoint per address each host name resolves to."
    )
    vllm_discovery_interval_seconds: float = Field(default=10.0, gt=0)

    # --- Budget and windows ----------------------------------------------------------------
    tokens_per_second: float = Field(default=4000.0, gt=0, description="Global token budget.")
    window_seconds: float = Field(default=2.0, gt=0)
    window_max_queries: int = Field(default=256, gt=0)
    carry_over_windows: float = Field(
        default=1.0, ge=0, description="Unspent budget carried over, capped at N windows' worth."
    )
    # One 256-token probe, later continued, beat two parallel probes on the shared rollouts
    # (DESIGN.md, "Probes and fitting").
    probe_samples: int = Field(default=1, ge=0, le=64, description="0 disables probing.")
    probe_tokens: int = Field(default=256, gt=0)
    max_tokens_per_query: int = Field(default=8192, gt=0)
    budget_mode: BudgetMode = Field(
        default="max_tokens",
        description="max_tokens: cut a chain at its allocation; thinking: end its thinking "
        "there (vLLM thinking_token_budget) and let it answer.",
    )
    # Thinking mode: the last this-many tokens of each continuation's allocation are kept for
    # the answer (the allocation still bounds every generated token).
    thinking_answer_tokens: int = Field(default=DEFAULT_THINKING_ANSWER_TOKENS, gt=0)
    # Backlog pacing: a window never holds more queries than its budget pays this many tokens
    # each; the rest wait in Kafka. Unset: four probes' worth (a probe and room to continue it;
    # at one probe's worth a backlog is spent on probes alone); 0: no pacing (windows close on
    # count whatever their budget).
    min_tokens_per_query: int | None = Field(default=None, ge=0)
    max_prompt_bytes: int = Field(default=DEFAULT_MAX_PROMPT_BYTES, gt=0)
    # `TAG=VALUE:SHARE,...`: shares of each window's budget reserved for the queries whose
    # tag TAG is VALUE; the rest is shared by all (daemon/core/tags.py). Unset: none.
    tag_budgets: Annotated[InstanceOf[TagBudgets] | None, NoDecode] = None

    # --- Process ---------------------------------------------------------------------------
    http_port: int = Field(default=8080, ge=1, le=65535)
    # Where /metrics, /healthz and /readyz listen: all interfaces in a pod by default;
    # 127.0.0.1 keeps them on the machine.
    http_host: str = Field(default="0.0.0.0", min_length=1)
    log_level: LogLevel = "INFO"
    shutdown_deadline_seconds: float = Field(default=25.0, gt=0)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        if "@" in value or "//" in value:  # checked first: the value is not echoed back
            raise ValueError(
                "brokers are plain host:port entries, without a scheme or user:password@; "
                f"set credentials in {env_var('kafka_sasl_username')} and "
                f"{env_var('kafka_sasl_password')}"
            )
        servers = [part.strip() for part in value.split(",") if part.strip()]
        if not servers:
            raise ValueError("needs at least one host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @field_validator("input_topic", "result_topic", "dlq_topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        return _validate_topic(value)

    @field_validator("window_topic", "feedback_topic", mode="before")
    @classmethod
    def _check_optional_topic(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            return _validate_topic(value.strip())
        return value

    @field_validator("kafka_sasl_username", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "kafka_sasl_password",
        "vllm_api_key",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "min_tokens_per_query",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A Kubernetes Secret or ConfigMap key left empty means "not configured".
        return None if value == "" else value

    @field_validator("tag_budgets", mode="before")
    @classmethod
    def _parse_tag_budgets(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            return TagBudgets.parse(value)
        return value

    @field_serializer("tag_budgets")
    def _show_tag_budgets(self, value: TagBudgets | None) -> str | None:
        return None if value is None else str(value)

    @field_validator("vllm_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("vllm_endpoints")
    @classmethod
    def _check_endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one base URL")
        normalised = tuple(_normalise_base_url(url) for url in value)
        if len(set(normalised)) != len(normalised):
            raise ValueError("lists the same URL twice")
        return normalised

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", "log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("vllm_discovery", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        problems = [
            *self._topic_clashes(),
            *self._security_problems(),
            *self._budget_problems(),
            *self._discovery_problems(),
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _topic_clashes(self) -> list[str]:
        seen: dict[str, str] = {}
        clashes = []
        for name in ("input_topic", "result_topic", "dlq_topic", "window_topic", "feedback_topic"):
            topic = getattr(self, name)
            if topic is None:
                continue
            if topic in seen:
                clashes.append(f"{env_var(name)} and {env_var(seen[topic])} are both {topic!r}")
            seen[topic] = name
        return clashes

    def _security_problems(self) -> list[str]:
        problems = []
        sasl = self.kafka_security_protocol.startswith("SASL_")
        tls = self.kafka_security_protocol.endswith("SSL")
        has_credentials = (
            self.kafka_sasl_username is not None or self.kafka_sasl_password is not None
        )
        if sasl and (self.kafka_sasl_username is None or self.kafka_sasl_password is None):
            problems.append(
                f"{env_var('kafka_sasl_username')} and {env_var('kafka_sasl_password')} are "
                f"required when {env_var('kafka_security_protocol')} is "
                f"{self.kafka_security_protocol}"
            )
        if not sasl and has_credentials:
            problems.append(
                f"{env_var('kafka_sasl_username')}/{env_var('kafka_sasl_password')} are set but "
                f"{env_var('kafka_security_protocol')} is {self.kafka_security_protocol} "
                "(use SASL_SSL or SASL_PLAINTEXT)"
            )
        tls_files = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
        if not tls and any(getattr(self, name) is not None for name in tls_files):
            problems.append(
                f"TLS files are set but {env_var('kafka_security_protocol')} is "
                f"{self.kafka_security_protocol} (use SSL or SASL_SSL)"
            )
        if self.vllm_api_key is not None and any(
            _url_credentials(url) for url in self.vllm_endpoints
        ):
            problems.append(
                f"{env_var('vllm_endpoints')} carries user:password@ and "
                f"{env_var('vllm_api_key')} is set: use one or the other"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            problems.append(
                f"{env_var('kafka_ssl_certfile')} and {env_var('kafka_ssl_keyfile')} "
                "must be set together"
            )
        return problems

    def _budget_problems(self) -> list[str]:
        problems = []
        if self.probe_samples > 0 and self.probe_tokens > self.max_tokens_per_query:
            problems.append(
                f"{env_var('probe_tokens')} ({self.probe_tokens}) exceeds "
                f"{env_var('max_tokens_per_query')} ({self.max_tokens_per_query})"
            )
        if self.budget_mode == "thinking" and (
            self.thinking_answer_tokens >= self.max_tokens_per_query
        ):
            problems.append(
                f"{env_var('thinking_answer_tokens')} ({self.thinking_answer_tokens}) leaves no "
                f"room to think within {env_var('max_tokens_per_query')} "
                f"({self.max_tokens_per_query})"
            )
        return problems

    @property
    def thinking_answer_allowance(self) -> int | None:
        """The pipeline's `thinking_answer_tokens`: None unless CLEAR_BUDGET_MODE=thinking."""
        return answer_allowance(self.budget_mode, self.thinking_answer_tokens)

    def _discovery_problems(self) -> list[str]:
        if self.vllm_discovery != "dns":
            return []
        # A discovered pod is labelled host:port/path/address in the metrics: two URLs that
        # differ only in scheme or credentials would give their pods the same labels.
        seen: set[str] = set()
        for url in self.vllm_endpoints:
            parts = urlsplit(url)
            key = parts.netloc.rpartition("@")[2] + parts.path
            if key in seen:
                return [
                    f"{env_var('vllm_endpoints')} names {key} twice (scheme or credentials "
                    f"apart), which {env_var('vllm_discovery')}=dns cannot tell apart"
                ]
            seen.add(key)
        return []

    @property
    def window_budget_tokens(self) -> float:
        """The budget of one full-length window, before carry-over."""
        return self.tokens_per_second * self.window_seconds

    @property
    def paced_tokens_per_query(self) -> int:
        """The per-query floor windows are paced to (see `min_tokens_per_query`)."""
        if self.min_tokens_per_query is not None:
            return self.min_tokens_per_query
        return PACING_PROBES * self.probe_samples * self.probe_tokens

    @property
    def carry_over_cap_tokens(self) -> float:
        """The most unspent budget that may roll into the next window."""
        return self.carry_over_windows * self.window_budget_tokens

    @property
    def bootstrap_servers(self) -> list[str]:
        """`kafka_bootstrap` split into host:port entries (what aiokafka accepts)."""
        return self.kafka_bootstrap.split(",")

    def secret_values(self) -> tuple[str, ...]:
        """The secrets as they may show up in text: the SASL password, the vLLM API key and
        the credentials inside vLLM URLs (as written, decoded, and as a Basic auth token)."""
        values = [
            secret.get_secret_value()
            for secret in (self.kafka_sasl_password, self.vllm_api_key)
            if secret is not None
        ]
        for url in self.vllm_endpoints:
            values += _url_credentials(url)
        return tuple(dict.fromkeys(values))


def _normalise_base_url(raw: str) -> str:
    try:
        url = _HTTP_URL.validate_python(raw)
    except ValidationError:
        raise ValueError(f"{raw!r} is not an http(s) URL") from None
    if url.query or url.fragment:
        raise ValueError(f"{raw!r}: a base URL has no query or fragment")
    return str(url).rstrip("/")


def _url_credentials(url: str) -> list[str]:
    """The secret parts of `scheme://user:password@host`: the password (else a bare user, a
    token), as written and percent-decoded, and the Basic token aiohttp sends for them."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    if not at:
        return []
    user, colon, password = userinfo.partition(":")
    secret = password if colon else user
    basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return [secret, unquote(secret), basic]


# Shorter secrets are not searched for: every occurrence of, say, "ab" would be masked.
MIN_SCRUBBED_CHARS = 4
SCRUBBED = "***"


class Scrubber:
    """Masks the exact values of the configured secrets in text on its way out (logs, Kafka
    records, health reasons), whatever put them there: an echoing gateway, an exception."""

    def __init__(self, secrets: Iterable[str]) -> None:
        needles: set[str] = set()
        for secret in secrets:
            if len(secret) >= MIN_SCRUBBED_CHARS:  # as is, and as JSON writes it in a string
                escaped = (json.dumps(secret, ensure_ascii=flag)[1:-1] for flag in (True, False))
                needles |= {secret, *escaped}
        # Longest first: a secret that contains another is masked whole.
        self._needles = tuple(sorted(needles, key=len, reverse=True))
        self._byte_needles = tuple(needle.encode() for needle in self._needles)

    def __bool__(self) -> bool:
        return bool(self._needles)

    def text(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, SCRUBBED)
        return text

    def data(self, data: bytes) -> bytes:
        """`text` for UTF-8 (e.g. a serialised record)."""
        for needle in self._byte_needles:
            if needle in data:
                data = data.replace(needle, SCRUBBED.encode())
        return data


def env_var_names() -> frozenset[str]:
    """Every environment variable `Settings` reads (for manifests and docs)."""
    return frozenset(env_var(name) for name in Settings.model_fields)


def _mentions(annotation: object, target: type) -> bool:
    return annotation is target or any(_mentions(arg, target) for arg in get_args(annotation))


def _fields_of_type(target: type) -> frozenset[str]:
    return frozenset(
        name for name, field in Settings.model_fields.items() if _mentions(field.annotation, target)
    )


# Fields whose values must never be printed, and fields that name files inside the container.
SECRET_FIELDS = _fields_of_type(SecretStr)
FILE_FIELDS = _fields_of_type(Path)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    env_file: Path | str | None = DEFAULT_ENV_FILE,
) -> Settings:
    """Read and validate the settings.

    `env=None` reads the process environment, then `env_file` (if it exists) for variables the
    environment does not set. A mapping replaces both, which keeps tests hermetic.
    Raises `SettingsError` naming every bad or unknown `CLEAR_*` variable.
    """
    if env is None:
        file_values = _read_env_file(env_file)
        unknown = _unknown([*os.environ, *file_values])
        return _validated(lambda: Settings(_env_file=env_file), unknown)
    values = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.upper().startswith(ENV_PREFIX)
    }
    return _validated(lambda: Settings.model_validate(values), _unknown(env))


def _read_env_file(env_file: Path | str | None) -> dict[str, str | None]:
    if env_file is None or not Path(env_file).is_file():
        return {}
    return dotenv_values(env_file)


def _unknown(names: Iterable[str]) -> list[str]:
    """A problem line per unknown `CLEAR_*` name: a misspelt variable would otherwise be
    ignored silently and its default used."""
    known = env_var_names()
    unknown = {n for n in names if n.upper().startswith(ENV_PREFIX) and n.upper() not in known}
    return [f"{name}: unknown setting (a typo?)" for name in sorted(unknown)]


def _validated(build: Callable[[], Settings], unknown: Sequence[str]) -> Settings:
    """The settings `build` makes; `SettingsError` naming every problem, the `unknown`
    variables' and the invalid values' together."""
    try:
        settings = build()
    except ValidationError as exc:
        raise SettingsError([*unknown, *(_describe(error) for error in exc.errors())]) from None
    if unknown:
        raise SettingsError(unknown)
    return settings


_URL_FIELDS = frozenset({"kafka_bootstrap", "vllm_endpoints"})
# `scheme://user:password@host`: the user:password part, never echoed in an error.
_URL_CREDENTIALS = re.compile(r"(?<=//)[^/@\s'\",]+@")


def _describe(error: Mapping[str, Any]) -> str:
    message = _redact(str(error["msg"]).removeprefix("Value error, "))
    loc = error.get("loc") or ()
    if not loc:
        return message
    field = str(loc[0])
    if field in SECRET_FIELDS:
        return f"{env_var(field)}: {message}"
    shown = _redact(repr(error.get("input")))
    if field in _URL_FIELDS and "@" in shown.replace("***@", ""):
        # user:password@ that `_redact` could not cut out (a ',' or '/' in the password, no
        # scheme): neither the value nor a message quoting part of it is echoed.
        if field != "kafka_bootstrap":  # its own message for this case quotes nothing
            message = "an entry with user:password@ is not valid (not shown: it holds a password)"
        return f"{env_var(field)}: {message}"
    return f"{env_var(field)}: {message} (got {shown})"


def _redact(text: str) -> str:
    return _URL_CREDENTIALS.sub("***@", text)
