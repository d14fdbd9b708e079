"""Probes, ports and metric names in deploy/k8s point at what the app really serves.

Routes come from ``create_app(Settings())``; the probes are then called on a running app (tiny
model) at the rendered paths, and the autoscaler's metric is looked up in the real /metrics text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from m2fp_service.api.app import create_app
from m2fp_service.config import Settings
from tests.api.conftest import make_settings, running_client

from .conftest import K8S, Obj, container, one, pod_spec

WITH_EVERYTHING = ("overlays/production", ("hpa-queue-depth", "servicemonitor", "model-volume"))


def get_routes() -> set[str]:
    """GET paths the app routes: its OpenAPI document, built from the registered routes."""
    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    return {path for path, ops in app.openapi()["paths"].items() if "get" in ops}


def _probes(c: Obj) -> dict[str, Obj]:
    return {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_probes_and_ports_match_the_app(render: Any) -> None:
    routes = get_routes()
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    objs = render(*WITH_EVERYTHING)
    deployment = one(objs, "Deployment")
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    settings_port = int(one(objs, "ConfigMap")["data"]["M2FP_PORT"])
    assert ports == {"http": settings_port}
    probes = _probes(c)
    assert {p["path"] for p in probes.values()} <= routes
    assert all(p["port"] in ports for p in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == settings_port

    service = one(objs, "Service")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert all(p["targetPort"] in ports for p in service_ports.values())
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] in routes
    policy = one(objs, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= set(ports)


def test_rendered_probe_paths_answer_on_a_running_app(render: Any, tiny_model_path: Path) -> None:
    objs = render(*WITH_EVERYTHING)
    probes = _probes(container(one(objs, "Deployment")))
    hpa_metrics = [m["pods"]["metric"]["name"] for m in one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"]
                   if m["type"] == "Pods"]
    rules = yaml.safe_load((K8S / "components/hpa-queue-depth/prometheus-adapter-rules.yaml").read_text())
    series = [r["seriesQuery"].split("{")[0] for r in rules["rules"]["custom"]]
    assert hpa_metrics == ["m2fp_queue_depth"] and series == hpa_metrics
    metrics_path = one(objs, "ServiceMonitor")["spec"]["endpoints"][0]["path"]
    with running_client(make_settings(tiny_model_path)) as client:
        for name, probe in probes.items():
            assert client.get(probe["path"]).status_code == 200, name
        response = client.get(metrics_path)
        assert response.status_code == 200
        exposed = {m.name for m in text_string_to_metric_families(response.text)}
    assert set(hpa_metrics) <= exposed, f"{hpa_metrics} not in {sorted(exposed)}"


def test_readiness_is_503_while_the_model_is_missing(tmp_path: Path, render: Any) -> None:
    """The readiness probe really gates traffic: no model, not ready; liveness still passes."""
    probes = _probes(container(one(render("overlays/small"), "Deployment")))
    with running_client(make_settings(tmp_path / "missing.onnx")) as client:
        assert client.get(probes["readinessProbe"]["path"]).status_code == 503
        assert client.get(probes["livenessProbe"]["path"]).status_code == 200


@pytest.mark.parametrize("target", ["batch"])
def test_batch_pods_have_no_probes_or_ports(render: Any, target: str) -> None:
    c = container(one(render(target), "Job"))
    assert not {"ports", "readinessProbe", "livenessProbe"} & set(c)
    assert pod_spec(one(render(target), "Job"))["restartPolicy"] == "Never"
