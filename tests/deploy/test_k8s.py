"""deploy/k8s: every overlay renders with the real kustomize, validates against the pinned
Kubernetes schemas (offline, strict: unknown fields are errors), and says what docs/deploy.md says.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import kubernetes_validate
import pytest

from m2fp_service import __version__
from m2fp_service.cli import build_parser
from m2fp_service.config import Settings

from .conftest import COMPONENTS, K8S_VERSION, OVERLAYS, Obj, container, one, pod_spec

# Custom resources: no schema in the Kubernetes set; their fields are checked in test_routes.py.
CRD_GROUPS = ("monitoring.coreos.com/",)

_DELETE = object()

TARGETS = [(o, ()) for o in OVERLAYS] + [
    ("overlays/production", ("hpa-queue-depth", "servicemonitor", "model-volume")),
    ("overlays/small", ("model-export-init",)),
]


def _validate(obj: Obj) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("target", "components"), TARGETS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_renders_and_validates(render: Any, target: str, components: tuple[str, ...]) -> None:
    objs = render(target, components)
    assert objs, "nothing rendered"
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            _validate(obj)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target} {obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: "
                        f"{exc.message}")
    if target != "batch":
        assert {o["metadata"].get("namespace") for o in objs} == {"m2fp"}


def test_every_component_is_exercised() -> None:
    assert {c for _, cs in TARGETS for c in cs} == set(COMPONENTS)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGett"), {}, "Additional properties"),
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "http", "not of type"),
        (("spec", "template", "spec", "containers", 0, "name"), _DELETE, "'name' is a required property"),
    ],
)
def test_the_validator_catches_mistakes(render: Any, path: tuple[Any, ...], value: Any, message: str) -> None:
    import copy

    deployment = copy.deepcopy(one(render("overlays/small"), "Deployment"))
    _validate(deployment)
    node = deployment
    for step in path[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        _validate(deployment)


def test_small_is_one_plain_replica(render: Any) -> None:
    objs = render("overlays/small")
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Deployment", "Service"]
    deployment = one(objs, "Deployment")
    assert "replicas" not in deployment["spec"]  # 1 by default
    api_key = next(e for e in container(deployment)["env"] if e["name"] == "M2FP_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True


def test_production_scales_spreads_and_is_closed(render: Any) -> None:
    objs = render("overlays/production")
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                                               "NetworkPolicy", "PodDisruptionBudget", "Service"]
    deployment = one(objs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it

    def selects_pods(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    hpa = one(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = one(objs, "PodDisruptionBudget")
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"]) and pdb["spec"]["maxUnavailable"] == 1
    assert selects_pods(one(objs, "Service")["spec"]["selector"])
    assert selects_pods(deployment["spec"]["selector"]["matchLabels"])
    policy = one(objs, "NetworkPolicy")
    assert selects_pods(policy["spec"]["podSelector"]["matchLabels"])
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    anti = pod_spec(deployment)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects_pods(anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"])
    api_key = next(e for e in container(deployment)["env"] if e["name"] == "M2FP_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "m2fp-api-key", "key": "api-key", "optional": False}


def test_queue_depth_variant_adds_a_pods_metric(render: Any) -> None:
    hpa = one(render("overlays/production", ("hpa-queue-depth",)), "HorizontalPodAutoscaler")
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "m2fp_queue_depth"


@pytest.mark.parametrize(("target", "components"), TARGETS,
                         ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_pods_meet_the_restricted_pod_security_standard(render: Any, target: str,
                                                        components: tuple[str, ...]) -> None:
    for obj in render(target, components):
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["enableServiceLinks"] is False  # else M2FP_SERVICE_PORT=tcp://... lands in our settings' prefix
        assert spec["automountServiceAccountToken"] is False
        assert not any(k in spec for k in ("hostNetwork", "hostPID", "hostIPC"))
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values())
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]
            for m in mounts.values():  # anything writable is scratch or data, never the image
                assert m.get("readOnly") or {"emptyDir", "persistentVolumeClaim"} & set(volumes[m["name"]])
            res = c["resources"]
            assert res["requests"] == res["limits"], "requests = limits (Guaranteed QoS)"
            assert re.fullmatch(r"\d+", res["limits"]["cpu"]), "whole CPUs, so threads = the limit exactly"


@pytest.mark.parametrize(("target", "components"), TARGETS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_the_optimised_graph_cache_is_a_writable_scratch_volume(render: Any, target: str,
                                                                components: tuple[str, ...]) -> None:
    """The model folder is read-only in every pod: M2FP_ORT_CACHE_DIR names a writable emptyDir, room for the FP32
    model's optimised graph written beside its last copy (2 x 398 MB), so container restarts load it and an INT8
    model's convolutions run on AMX tiles (README, docs/deploy.md)."""
    units = {"Mi": 2**20, "Gi": 2**30}
    for obj in render(target, components):
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        c = container(obj)
        env = {e["name"]: e.get("value") for e in c["env"]}
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == env["M2FP_ORT_CACHE_DIR"])
        assert not mount.get("readOnly")
        volume = next(v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"])
        size = re.fullmatch(r"(\d+)(Mi|Gi)", volume["emptyDir"]["sizeLimit"])
        assert size and int(size[1]) * units[size[2]] >= 2 * 398 * 10**6
        assert "medium" not in volume["emptyDir"]  # on the node's disk: "Memory" would count against the limit
        assert env["M2FP_ORT_CACHE_DIR"] == "/var/cache/m2fp"  # the image's own (Dockerfile, test_dockerfile.py)


def _settings_env(render: Any) -> dict[str, str]:
    data: dict[str, str] = one(render("overlays/small"), "ConfigMap")["data"]
    return data


def test_configmap_settings_are_real_settings(render: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _settings_env(render)
    unknown = [k for k in env if k.removeprefix("M2FP_").lower() not in Settings.model_fields]
    assert not unknown, f"not settings (typo?): {unknown}"
    assert "M2FP_INTRA_OP_THREADS" not in env and "M2FP_API_KEY" not in env  # from the limit / a Secret
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.host == "0.0.0.0" and settings.workers == 1


@pytest.mark.parametrize("target", ["overlays/small", "overlays/production", "batch"])
def test_threads_grace_and_image(render: Any, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in _settings_env(render).items():
        monkeypatch.setenv(k, v)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    workload = next(o for o in render(target) if o["kind"] in ("Deployment", "Job"))
    c = container(workload)
    threads = next(e for e in c["env"] if e["name"] == "M2FP_INTRA_OP_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    assert c["image"] == f"m2fp-service:{__version__}"
    for e in c["env"]:  # literal settings parse too
        if "value" in e and e["name"].startswith("M2FP_"):
            monkeypatch.setenv(e["name"], e["value"])
            Settings(_env_file=None)  # type: ignore[call-arg]
    if workload["kind"] == "Deployment":
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= int(pre_stop[1]) + settings.shutdown_timeout_s + 5, grace


def test_batch_job_shards_with_the_real_cli(render: Any) -> None:
    objs = render("batch")
    job = one(objs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    c = container(job)
    assert c["command"] == ["m2fp", "parse"]
    shard_arg = c["args"][c["args"].index("--shard") + 1]
    assert shard_arg == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}", "N in --shard must equal completions"
    parser = build_parser()
    for index in (0, spec["completions"] - 1):  # what Kubernetes hands each pod, through the real parser
        args = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in c["args"]]
        ns: argparse.Namespace = parser.parse_args([*c["command"][1:], *args])
        assert (ns.shard.index, ns.shard.count) == (index, spec["completions"])
        assert ns.resume is True
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [1, 2]
    claim = next(v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    data = next(m for m in c["volumeMounts"] if m["name"] == claim["name"])["mountPath"]
    assert all(a.startswith(data) for a in (c["args"][0], c["args"][c["args"].index("-o") + 1]))


def test_model_sources_point_the_server_at_the_mounted_model(render: Any) -> None:
    for component in ("model-volume", "model-export-init"):
        deployment = one(render("overlays/small", (component,)), "Deployment")
        c = container(deployment)
        model = next(e for e in c["env"] if e["name"] == "M2FP_MODEL")["value"]
        mount = next(m for m in c["volumeMounts"] if model.startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True
        if component == "model-export-init":
            init = pod_spec(deployment)["initContainers"][0]
            out = init["args"][init["args"].index("-o") + 1]
            writer = next(m for m in init["volumeMounts"] if m["name"] == mount["name"])
            assert out == model.replace(mount["mountPath"], writer["mountPath"], 1)
            assert init["image"] == f"m2fp-service-exporter:{__version__}"
