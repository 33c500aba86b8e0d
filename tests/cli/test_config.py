"""`clearbudget --version` and `clearbudget config` (effective settings, secrets masked)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import clearbudget.daemon.cli.version
from clearbudget.daemon.cli import app
from clearbudget.daemon.settings import env_var_names

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("s3cret-sasl", "sk-api-key", "hunter2")
SECURED_ENV = {
    "CLEAR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "CLEAR_KAFKA_SASL_USERNAME": "alice",
    "CLEAR_KAFKA_SASL_PASSWORD": "s3cret-sasl",
    "CLEAR_VLLM_API_KEY": "sk-api-key",
    "CLEAR_VLLM_ENDPOINTS": "http://pod-a:8000,http://pod-b:8000",
}
# user:password@ in a URL instead of an API key (the two together are refused).
URL_CREDENTIALS_ENV = {"CLEAR_VLLM_ENDPOINTS": "http://bob:hunter2@pod-a:8000,http://pod-b:8000"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CLEAR_* variable from the outer environment, no .env file but the test's own."""
    for name in [n for n in os.environ if n.upper().startswith("CLEAR_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, list(args), env=env)
    return out.exit_code, out.stdout, out.stderr


def test_version_prints_the_installed_version() -> None:
    code, stdout, stderr = invoke("--version")
    assert (code, stderr) == (0, "")
    assert stdout == f"clearbudget {importlib.metadata.version('clearbudget')}\n"


def test_version_without_package_metadata_reads_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    checkout = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert invoke("--version")[:2] == (0, f"clearbudget {checkout}\n")
    monkeypatch.setattr(clearbudget.daemon.cli.version, "PYPROJECT", tmp_path / "missing.toml")
    assert invoke("--version")[:2] == (0, "clearbudget unknown\n")


def test_config_json_lists_every_setting_with_secrets_masked() -> None:
    code, stdout, stderr = invoke("config", "--json", env=SECURED_ENV)
    assert (code, stderr) == (0, "")
    assert not [secret for secret in SECRETS if secret in stdout]
    values = json.loads(stdout)
    assert set(values) == env_var_names()
    assert values["CLEAR_KAFKA_SASL_PASSWORD"] == "***"
    assert values["CLEAR_VLLM_API_KEY"] == "***"
    assert values["CLEAR_KAFKA_SASL_USERNAME"] == "alice"
    assert values["CLEAR_TOKENS_PER_SECOND"] == 4000.0  # a default


@pytest.mark.parametrize("json_out", [False, True])
def test_config_masks_credentials_inside_urls(json_out: bool) -> None:
    args = ("config", "--json") if json_out else ("config",)
    code, stdout, stderr = invoke(*args, env=URL_CREDENTIALS_ENV)
    assert (code, stderr) == (0, "")
    assert "hunter2" not in stdout
    if json_out:
        endpoints = json.loads(stdout)["CLEAR_VLLM_ENDPOINTS"]
        assert endpoints == ["http://***@pod-a:8000", "http://pod-b:8000"]
    else:
        assert "http://***@pod-a:8000" in stdout


def test_config_json_shows_unset_secrets_as_null() -> None:
    code, stdout, _ = invoke("config", "--json")
    assert code == 0
    values = json.loads(stdout)
    assert values["CLEAR_KAFKA_SASL_PASSWORD"] is None
    assert values["CLEAR_VLLM_API_KEY"] is None


def test_config_table_masks_secrets_and_says_where_values_came_from(clean_env: Path) -> None:
    (clean_env / ".env").write_text("CLEAR_WINDOW_SECONDS=5\n")
    code, stdout, stderr = invoke("config", env=SECURED_ENV)
    assert (code, stderr) == (0, "")
    assert not [secret for secret in SECRETS if secret in stdout]
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if "│ CLEAR_" in line}
    assert set(rows) == env_var_names()
    assert "***" in rows["CLEAR_KAFKA_SASL_PASSWORD"]
    assert "***" in rows["CLEAR_VLLM_API_KEY"]
    assert "alice" in rows["CLEAR_KAFKA_SASL_USERNAME"]
    assert "environment" in rows["CLEAR_KAFKA_SASL_USERNAME"]
    assert "5.0" in rows["CLEAR_WINDOW_SECONDS"]
    assert ".env" in rows["CLEAR_WINDOW_SECONDS"]
    assert "default" in rows["CLEAR_TOKENS_PER_SECOND"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CLEAR_TOKENS_PER_SECOND": "-1"}, "CLEAR_TOKENS_PER_SECOND"),
        ({"CLEAR_TOKENS_PER_SECOD": "5"}, "CLEAR_TOKENS_PER_SECOD: unknown setting"),
        ({"CLEAR_KAFKA_SASL_USERNAME": "alice", "CLEAR_KAFKA_SASL_PASSWORD": "hunter2"},
         "CLEAR_KAFKA_SASL_USERNAME/CLEAR_KAFKA_SASL_PASSWORD are set but"),
        ({"CLEAR_VLLM_ENDPOINTS": "http://bob:hunter2@pod-a:8000?x=1"}, "CLEAR_VLLM_ENDPOINTS"),
        ({**URL_CREDENTIALS_ENV, "CLEAR_VLLM_API_KEY": "hunter2-key"},
         "CLEAR_VLLM_ENDPOINTS carries user:password@ and CLEAR_VLLM_API_KEY is set"),
        ({"CLEAR_KAFKA_BOOTSTRAP": "bob:hunter2@kafka:9092"}, "CLEAR_KAFKA_BOOTSTRAP: brokers"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("json_out", [False, True])
def test_config_fails_naming_the_bad_variable_as_run_does(
    env: dict[str, str], named: str, json_out: bool
) -> None:
    code, stdout, stderr = invoke("config", *(["--json"] if json_out else []), env=env)
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: invalid settings: {named}")
    assert stderr.count("\n") == 1  # one bad variable, one line
    assert "hunter2" not in stderr
    assert (code, stderr) == invoke("run", env=env)[::2]
