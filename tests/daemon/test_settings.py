"""Settings: defaults, environment and `.env` parsing, and errors that name the variable."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from clearbudget.daemon.settings import (
    ENV_PREFIX,
    SECRET_FIELDS,
    Scrubber,
    Settings,
    SettingsError,
    env_var,
    env_var_names,
    load_settings,
)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CLEAR_* variables in the process environment; cwd is an empty directory."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    return str(caught.value)


def test_defaults_follow_design() -> None:
    settings = load_settings({})
    assert settings.input_topic == "clear.queries"
    assert settings.result_topic == "clear.results"
    assert settings.dlq_topic == "clear.dlq"
    assert settings.window_topic == "clear.windows"
    # DESIGN.md's measured note: one 256-token probe beats two parallel probes.
    assert (settings.probe_samples, settings.probe_tokens) == (1, 256)
    assert settings.log_level == "INFO"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.kafka_idempotent_producer is True


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": "k1:9092, k2:9093",
            "CLEAR_VLLM_ENDPOINTS": "http://vllm-0.vllm:8000/, https://gpu.example/v1",
            "CLEAR_TOKENS_PER_SECOND": "1500.5",
            "CLEAR_WINDOW_SECONDS": "0.5",
            "CLEAR_WINDOW_MAX_QUERIES": "64",
            "CLEAR_PROBE_SAMPLES": "0",
            "CLEAR_HTTP_PORT": "9100",
            "CLEAR_LOG_LEVEL": "debug",
            "CLEAR_WINDOW_TOPIC": "",
            "CLEAR_CARRY_OVER_WINDOWS": "0.5",
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
        }
    )
    assert settings.kafka_idempotent_producer is False
    assert settings.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert settings.vllm_endpoints == ("http://vllm-0.vllm:8000", "https://gpu.example/v1")
    assert settings.tokens_per_second == 1500.5
    assert settings.window_budget_tokens == pytest.approx(750.25)
    assert settings.carry_over_cap_tokens == pytest.approx(375.125)
    assert settings.window_max_queries == 64
    assert settings.probe_samples == 0
    assert settings.http_port == 9100
    assert settings.log_level == "DEBUG"
    assert settings.window_topic is None  # empty disables window reports


def test_process_environment_overrides_env_file(
    clean_environ: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environ / ".env").write_text(
        "CLEAR_TOKENS_PER_SECOND=123\nCLEAR_MODEL=from-file\nCLEAR_VLLM_ENDPOINTS=http://a:1,http://b:2\n"
    )
    monkeypatch.setenv("CLEAR_MODEL", "from-env")
    settings = load_settings()
    assert settings.tokens_per_second == 123
    assert settings.model == "from-env"
    assert settings.vllm_endpoints == ("http://a:1", "http://b:2")


def test_explicit_env_file_path(clean_environ: Path) -> None:
    env_file = clean_environ / "daemon.env"
    env_file.write_text("CLEAR_WINDOW_SECONDS=7\n")
    assert load_settings(env_file=env_file).window_seconds == 7
    assert load_settings(env_file=None).window_seconds == Settings().window_seconds


def test_env_file_errors_name_the_variable(clean_environ: Path) -> None:
    (clean_environ / ".env").write_text("CLEAR_HTTP_PORT=70000\n")
    with pytest.raises(SettingsError, match=r"CLEAR_HTTP_PORT: .*65535.*'70000'"):
        load_settings()


def test_unknown_variable_in_env_file_is_reported(clean_environ: Path) -> None:
    (clean_environ / ".env").write_text("CLEAR_TOKEN_PER_SECOND=5\n")
    with pytest.raises(SettingsError, match="CLEAR_TOKEN_PER_SECOND: unknown setting"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CLEAR_TOKENS_PER_SECOND", "-5", r"greater than 0 \(got '-5'\)"),
        ("CLEAR_TOKENS_PER_SECOND", "lots", r"valid number"),
        ("CLEAR_WINDOW_SECONDS", "0", r"greater than 0"),
        ("CLEAR_WINDOW_MAX_QUERIES", "0", r"greater than 0"),
        ("CLEAR_PROBE_SAMPLES", "-1", r"greater than or equal to 0"),
        ("CLEAR_PROBE_TOKENS", "0", r"greater than 0"),
        ("CLEAR_MAX_TOKENS_PER_QUERY", "-3", r"greater than 0"),
        ("CLEAR_MAX_PROMPT_BYTES", "0", r"greater than 0"),
        ("CLEAR_ENDPOINT_CONCURRENCY", "0", r"greater than 0"),
        ("CLEAR_REQUEST_TIMEOUT_SECONDS", "0", r"greater than 0"),
        ("CLEAR_REQUEST_RETRIES", "-1", r"greater than or equal to 0"),
        ("CLEAR_SHUTDOWN_DEADLINE_SECONDS", "-1", r"greater than 0"),
        ("CLEAR_CARRY_OVER_WINDOWS", "-0.5", r"greater than or equal to 0"),
        ("CLEAR_HTTP_PORT", "0", r"greater than or equal to 1"),
        ("CLEAR_LOG_LEVEL", "verbose", r"'DEBUG', 'INFO'"),
        ("CLEAR_KAFKA_SECURITY_PROTOCOL", "TLS", r"'SASL_SSL'"),
        ("CLEAR_KAFKA_SASL_MECHANISM", "GSSAPI", r"'SCRAM-SHA-512'"),
        ("CLEAR_KAFKA_BOOTSTRAP", "broker", r"'broker' is not host:port"),
        ("CLEAR_KAFKA_BOOTSTRAP", " , ", r"at least one"),
        ("CLEAR_INPUT_TOPIC", "bad topic!", r"not a Kafka topic name"),
        ("CLEAR_WINDOW_TOPIC", "a/b", r"not a Kafka topic name"),
        ("CLEAR_VLLM_ENDPOINTS", "", r"at least one base URL"),
        ("CLEAR_VLLM_ENDPOINTS", "http://a:8000,vllm:8000", r"'vllm:8000' is not an http"),
        ("CLEAR_VLLM_ENDPOINTS", "ftp://files", r"'ftp://files' is not an http"),
        ("CLEAR_VLLM_ENDPOINTS", "http://a:1/?x=1", r"no query or fragment"),
        ("CLEAR_VLLM_ENDPOINTS", "http://a:1,http://a:1/", r"same URL twice"),
        ("CLEAR_KAFKA_SSL_CAFILE", "/nonexistent/ca.pem", r"does not point to a file"),
        ("CLEAR_MODEL", "", r"at least 1 character"),
        ("CLEAR_KAFKA_IDEMPOTENT_PRODUCER", "maybe", r"valid boolean"),
        ("CLEAR_BUDGET_MODE", "thought", r"'max_tokens' or 'thinking'"),
        ("CLEAR_THINKING_ANSWER_TOKENS", "0", r"greater than 0"),
    ],
)
def test_each_invalid_value_names_its_variable(variable: str, value: str, expected: str) -> None:
    message = problems_of({variable: value})
    assert f"{variable}: " in message
    assert re.search(expected, message), message


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"CLEAR_TOKENS_PER_SECOND": "0", "CLEAR_HTTP_PORT": "-1"})
    variables = {problem.split(":")[0] for problem in caught.value.problems}
    assert variables == {"CLEAR_TOKENS_PER_SECOND", "CLEAR_HTTP_PORT"}


def test_sasl_needs_username_and_password() -> None:
    message = problems_of(
        {"CLEAR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CLEAR_KAFKA_SASL_USERNAME": "clear"}
    )
    assert "CLEAR_KAFKA_SASL_USERNAME and CLEAR_KAFKA_SASL_PASSWORD are required" in message


def test_sasl_credentials_without_sasl_protocol_are_rejected() -> None:
    message = problems_of({"CLEAR_KAFKA_SASL_USERNAME": "u", "CLEAR_KAFKA_SASL_PASSWORD": "p"})
    assert "CLEAR_KAFKA_SECURITY_PROTOCOL is PLAINTEXT" in message


def test_tls_files_need_a_tls_protocol_and_come_in_pairs(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not checked here")
    message = problems_of({"CLEAR_KAFKA_SSL_CAFILE": str(pem)})
    assert "CLEAR_KAFKA_SECURITY_PROTOCOL is PLAINTEXT" in message
    message = problems_of(
        {"CLEAR_KAFKA_SECURITY_PROTOCOL": "SSL", "CLEAR_KAFKA_SSL_CERTFILE": str(pem)}
    )
    assert "CLEAR_KAFKA_SSL_CERTFILE and CLEAR_KAFKA_SSL_KEYFILE must be set together" in message


def test_valid_sasl_ssl_configuration(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        {
            "CLEAR_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "CLEAR_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "CLEAR_KAFKA_SASL_USERNAME": "clear",
            "CLEAR_KAFKA_SASL_PASSWORD": "hunter2",
            "CLEAR_KAFKA_SSL_CAFILE": str(ca),
        }
    )
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "hunter2"
    assert settings.kafka_ssl_cafile == ca


def test_topics_must_differ() -> None:
    message = problems_of({"CLEAR_DLQ_TOPIC": "clear.results"})
    assert "CLEAR_DLQ_TOPIC and CLEAR_RESULT_TOPIC are both 'clear.results'" in message


def test_probe_must_fit_in_query_cap() -> None:
    message = problems_of({"CLEAR_PROBE_TOKENS": "512", "CLEAR_MAX_TOKENS_PER_QUERY": "256"})
    assert "CLEAR_PROBE_TOKENS (512) exceeds CLEAR_MAX_TOKENS_PER_QUERY (256)" in message
    # With probing off the probe length does not matter.
    env = {"CLEAR_PROBE_SAMPLES": "0", "CLEAR_PROBE_TOKENS": "512"}
    assert load_settings({**env, "CLEAR_MAX_TOKENS_PER_QUERY": "256"}).probe_samples == 0


def test_secrets_are_hidden_in_repr() -> None:
    settings = load_settings(
        {
            "CLEAR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CLEAR_KAFKA_SASL_USERNAME": "clear",
            "CLEAR_KAFKA_SASL_PASSWORD": "hunter2-secret",
            "CLEAR_VLLM_API_KEY": "sk-very-secret",
        }
    )
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "hunter2-secret" not in text
        assert "sk-very-secret" not in text
    assert settings.vllm_api_key is not None
    assert settings.vllm_api_key.get_secret_value() == "sk-very-secret"
    assert sorted(SECRET_FIELDS) == ["kafka_sasl_password", "vllm_api_key"]


def test_unknown_clear_variable_is_reported() -> None:
    assert "CLEAR_TOKEN_PER_SECOND: unknown setting" in problems_of({"CLEAR_TOKEN_PER_SECOND": "1"})


def test_an_unknown_variable_does_not_hide_a_bad_value_beside_it() -> None:
    problems = problems_of({"CLEAR_NOSUCH": "1", "CLEAR_WINDOW_SECONDS": "0"})
    assert "CLEAR_NOSUCH: unknown setting" in problems
    assert "CLEAR_WINDOW_SECONDS" in problems


def test_env_var_names_cover_every_field() -> None:
    names = env_var_names()
    assert len(names) == len(Settings.model_fields)
    assert {"CLEAR_TOKENS_PER_SECOND", "CLEAR_SHUTDOWN_DEADLINE_SECONDS"} <= names
    assert env_var("vllm_endpoints") == "CLEAR_VLLM_ENDPOINTS"


def test_settings_are_immutable() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError, match="frozen"):
        settings.http_port = 1  # type: ignore[misc]


def test_errors_never_echo_url_credentials() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {"CLEAR_VLLM_ENDPOINTS": "http://user:s3cret@host:8000,ftp://bob:hunter2@x"},
            env_file=None,
        )
    text = str(caught.value)
    assert "CLEAR_VLLM_ENDPOINTS" in text
    assert "s3cret" not in text
    assert "hunter2" not in text
    assert "***@host:8000" in text


@pytest.mark.parametrize(
    "bootstrap",
    ["svc:s3cret-pw@k1:9092", "SASL_SSL://svc:s3cret-pw@k1:9092", "k0:1,svc:s3,cret-pw@k1:9"],
)
def test_a_broker_list_with_credentials_is_refused_without_echoing_them(bootstrap: str) -> None:
    message = problems_of({"CLEAR_KAFKA_BOOTSTRAP": bootstrap})
    assert "CLEAR_KAFKA_BOOTSTRAP: brokers are plain host:port entries" in message
    assert "CLEAR_KAFKA_SASL_PASSWORD" in message  # where credentials go instead
    assert "s3" not in message
    assert "cret-pw" not in message


def test_a_malformed_url_with_credentials_is_not_echoed() -> None:
    # The ',' in the password splits the list, so neither half can be masked as user:password@.
    message = problems_of({"CLEAR_VLLM_ENDPOINTS": "http://u:pa,ss-word@vllm:8000"})
    assert "CLEAR_VLLM_ENDPOINTS: an entry with user:password@ is not valid" in message
    assert "pa" not in message.replace("password", "")
    assert "ss-word" not in message


def test_url_credentials_and_an_api_key_are_refused_together() -> None:
    message = problems_of(
        {"CLEAR_VLLM_ENDPOINTS": "http://u:s3cret@vllm:8000", "CLEAR_VLLM_API_KEY": "k3y-value"}
    )
    assert "CLEAR_VLLM_ENDPOINTS carries user:password@ and CLEAR_VLLM_API_KEY is set" in message
    assert "s3cret" not in message
    assert "k3y-value" not in message


def test_secret_values_are_every_form_a_secret_travels_in() -> None:
    settings = load_settings(
        {
            "CLEAR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CLEAR_KAFKA_SASL_USERNAME": "clear",
            "CLEAR_KAFKA_SASL_PASSWORD": "hunter2-secret",
            "CLEAR_VLLM_ENDPOINTS": "http://a:p%40ss-word@vllm-0:8000,http://t0ken-only@vllm-1:8000",
        }
    )
    assert settings.secret_values() == (
        "hunter2-secret",
        "p%40ss-word", "p@ss-word", base64.b64encode(b"a:p@ss-word").decode(),
        "t0ken-only", base64.b64encode(b"t0ken-only:").decode(),
    )  # fmt: skip
    assert load_settings({}).secret_values() == ()


def test_the_scrubber_masks_exact_values_also_as_json_writes_them() -> None:
    scrubber = Scrubber(['k"3y\\é-long', 'k"3y', "abc"])
    assert scrubber  # "abc" is too short to look for: masking it would maul the logs
    assert scrubber.text('auth k"3y\\é-long and k"3y, abc') == "auth *** and ***, abc"
    for ensure_ascii in (True, False):
        escaped = json.dumps({"reason": 'key k"3y\\é-long'}, ensure_ascii=ensure_ascii)
        assert json.loads(scrubber.text(escaped)) == {"reason": "key ***"}
        assert json.loads(scrubber.data(escaped.encode())) == {"reason": "key ***"}
    assert not Scrubber(["", "ab"])


def test_tag_budgets_parse_and_empty_means_none(clean_environ: Path) -> None:
    settings = load_settings({"CLEAR_TAG_BUDGETS": "tenant=acme:0.3, tenant=beta:0.2"})
    assert settings.tag_budgets is not None
    assert settings.tag_budgets.keys == ("tenant=acme", "tenant=beta")
    assert settings.model_dump(mode="json")["tag_budgets"] == "tenant=acme:0.3,tenant=beta:0.2"
    assert load_settings({"CLEAR_TAG_BUDGETS": ""}).tag_budgets is None
    assert load_settings({}).tag_budgets is None
    (clean_environ / ".env").write_text("CLEAR_TAG_BUDGETS=tenant=acme:1\n")
    from_file = load_settings(env_file=clean_environ / ".env")
    assert from_file.tag_budgets is not None
    assert from_file.tag_budgets.keys == ("tenant=acme",)


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        ("tenant=acme:1.5", "'tenant=acme:1.5'"),
        ("tenant=acme:0.3,beta", "'beta'"),
        ("tenant=acme:0.3,tenant=acme:0.2", "'tenant=acme:0.2'"),
        ("tenant=acme:0.6,tenant=beta:0.6", "add up to 1.2"),
    ],
)
def test_a_bad_tag_budget_names_the_variable_and_the_entry(value: str, entry: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"CLEAR_TAG_BUDGETS": value})
    (problem,) = caught.value.problems  # one line
    assert problem.startswith("CLEAR_TAG_BUDGETS: ")
    assert entry in problem
    assert "\n" not in problem


def test_vllm_discovery_is_off_by_default_and_dns_builds_a_discovering_pool() -> None:
    from prometheus_client import CollectorRegistry

    from clearbudget.daemon.app import build_backend

    defaults = load_settings({})
    assert (defaults.vllm_discovery, defaults.vllm_discovery_interval_seconds) == ("none", 10.0)
    settings = load_settings(
        {
            "CLEAR_VLLM_ENDPOINTS": "http://vllm:8000",
            "CLEAR_VLLM_DISCOVERY": " DNS ",
            "CLEAR_VLLM_DISCOVERY_INTERVAL_SECONDS": "2.5",
        }
    )
    assert (settings.vllm_discovery, settings.vllm_discovery_interval_seconds) == ("dns", 2.5)
    pool = build_backend(settings, CollectorRegistry())
    assert pool.breaker_states() == {}  # the pods are known once the name is looked up
    assert pool._discovery_interval_s == 2.5
    assert build_backend(defaults, CollectorRegistry()).breaker_states() == {
        "http://localhost:8000": "closed"
    }


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CLEAR_VLLM_DISCOVERY": "srv"}, r"CLEAR_VLLM_DISCOVERY: .*'none' or 'dns'"),
        ({"CLEAR_VLLM_DISCOVERY_INTERVAL_SECONDS": "0"}, r"INTERVAL_SECONDS: .*greater than 0"),
        (
            {"CLEAR_VLLM_DISCOVERY": "dns", "CLEAR_VLLM_ENDPOINTS": "http://v:1,https://v:1"},
            r"CLEAR_VLLM_ENDPOINTS names v:1 twice",
        ),
    ],
)
def test_bad_vllm_discovery_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    assert re.search(expected, problems_of(env)), problems_of(env)


def test_thinking_mode_keeps_an_answer_allowance_and_is_off_by_default() -> None:
    assert load_settings({}).thinking_answer_allowance is None
    thinking = load_settings({"CLEAR_BUDGET_MODE": "thinking"})
    assert thinking.thinking_answer_allowance == thinking.thinking_answer_tokens == 128
    message = problems_of({"CLEAR_BUDGET_MODE": "thinking", "CLEAR_THINKING_ANSWER_TOKENS": "900",
                           "CLEAR_MAX_TOKENS_PER_QUERY": "900"})  # fmt: skip
    assert "CLEAR_THINKING_ANSWER_TOKENS (900) leaves no room to think" in message
    assert "CLEAR_MAX_TOKENS_PER_QUERY (900)" in message
