"""deploy/k8s renders with `kubectl kustomize`, validates strictly against the Kubernetes schemas of
several versions, and has the properties a safe rollout depends on (probes, drain, autoscaling,
security). The settings a pod resolves to are asked of the real `kiln serve --print-config`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.validate import pod, render
from deploy.validate.render import K8S, KUBERNETES_VERSIONS, find, one

pytestmark = pytest.mark.skipif(render.kubectl() is None, reason="kubectl is not installed")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

OVERLAYS = ("cpu", "gpu")
COMPONENTS = (K8S / "components" / "tls", K8S / "components" / "model-download")
DOCKER = K8S.parent / "docker"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every tree an operator can apply: both overlays, both with all components, the batch job."""
    trees = {name: render.kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    for name in OVERLAYS:
        trees[f"{name}+components"] = render.kustomize_with(K8S / "overlays" / name, COMPONENTS)
    trees["batch"] = render.kustomize(K8S / "batch")
    return trees


def _server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return pod.server_container(objects)


def test_every_tree_renders_the_expected_kinds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    server_kinds = {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                    "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ServiceAccount"}  # fmt: skip
    for name in OVERLAYS:
        kinds = {o["kind"] for o in rendered[name]}
        assert server_kinds <= kinds, f"{name}: missing {server_kinds - kinds}"
        assert {o["metadata"].get("namespace") for o in rendered[name]} == {"kiln"}
    assert {o["kind"] for o in rendered["batch"]} == {"RayJob", "PersistentVolumeClaim"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_strictly(rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    problems = [
        problem
        for objects in rendered.values()
        for obj in objects
        if render.is_builtin(obj)
        for problem in render.schema_problems(obj, version)
    ]
    assert not problems, "\n".join(problems)


def test_custom_resources_are_allow_listed_and_well_formed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    crds = [obj for objects in rendered.values() for obj in objects if not render.is_builtin(obj)]
    assert {o["kind"] for o in crds} == {"ServiceMonitor", "PrometheusRule", "RayJob"}
    problems = [
        p for obj in crds for version in KUBERNETES_VERSIONS for p in render.crd_problems(obj, version)
    ]
    assert not problems, "\n".join(problems)


def test_a_schema_violation_is_reported(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(one(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    assert render.schema_problems(deployment, KUBERNETES_VERSIONS[0])  # kubelet gRPC probes need a number
    job = yaml.safe_load(yaml.safe_dump(one(rendered["batch"], "RayJob")))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelectr"] = {}
    assert any("nodeSelectr" in p for p in render.crd_problems(job))


def test_probes_are_grpc_on_the_server_port_with_a_long_startup_budget(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name in OVERLAYS:
        container = _server(rendered[name])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"] == 8001, (name, probe)
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (1200 if name == "gpu" else 300), f"{name}: startup budget {budget}s"
        # a draining server reports NOT_SERVING: liveness must not kill it before it exits itself
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_rollouts_never_drop_below_the_current_capacity(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = one(rendered[name], "Deployment", "kiln")["spec"]
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
        assert "replicas" not in spec, "the HPA owns the replica count"
        pdb = one(rendered[name], "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_security_context_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in (*OVERLAYS, "cpu+components"):
        spec = pod.pod_spec(rendered[name])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, container["name"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        mounts = {m["mountPath"] for m in _server(rendered[name])["volumeMounts"]}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp volume"


def test_gpu_resources_appear_only_in_the_gpu_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objects in rendered.items():
        text = yaml.safe_dump_all(objects)
        if name.startswith("cpu"):
            assert "nvidia.com/gpu" not in text, name
    gpu = pod.pod_spec(rendered["gpu"])
    limits = _server(rendered["gpu"])["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    for worker in one(rendered["batch"], "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_cpu_pods_are_guaranteed_qos_with_threads_from_the_limit(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    resources = _server(rendered["cpu"])["resources"]
    for key in ("cpu", "memory"):
        assert resources["requests"][key] == resources["limits"][key]
    env = {e["name"]: e for e in _server(rendered["cpu"])["env"]}
    assert env["KILN_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_hpa_scales_the_deployment_on_queue_wait_with_a_cpu_fallback(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    from deploy.validate.promql import adapter_rules

    exposed = {rule["name"]["as"] for rule in adapter_rules()}
    for name in OVERLAYS:
        hpa = one(rendered[name], "HorizontalPodAutoscaler")
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "kiln")
        kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert kinds["Pods"]["pods"]["metric"]["name"] in exposed
        assert kinds["Pods"]["pods"]["target"]["type"] == "AverageValue"
        assert kinds["Resource"]["resource"]["name"] == "cpu"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_services_headless_and_clusterip_and_the_monitor_scrapes_metrics(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name in OVERLAYS:
        objects = rendered[name]
        selector = one(objects, "Deployment", "kiln")["spec"]["selector"]["matchLabels"]
        services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
        assert services["kiln-headless"]["spec"]["clusterIP"] == "None"
        assert services["kiln"]["spec"]["type"] == "ClusterIP"
        for service in services.values():
            assert service["spec"]["selector"] == selector
        monitor = one(objects, "ServiceMonitor")
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if wanted.items() <= s["metadata"]["labels"].items()]
        assert [s["metadata"]["name"] for s in matched] == ["kiln"]
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert {ep["port"] for ep in monitor["spec"]["endpoints"]} <= port_names


def test_every_referenced_config_map_is_rendered(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("cpu", "gpu", "gpu+components"):
        objects = rendered[name]
        missing = pod.referenced_names(objects, "ConfigMap") - pod.rendered_names(objects, "ConfigMap")
        assert not missing, f"{name}: pod refers to ConfigMaps that are not rendered: {missing}"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.pod_spec(objects)["volumes"]
                  if "persistentVolumeClaim" in v}  # fmt: skip
        assert claims <= pod.rendered_names(objects, "PersistentVolumeClaim"), name
    assert pod.referenced_names(rendered["cpu+components"], "Secret") == {"kiln-tls"}


# ids avoid the bare word "gpu": it is the marker that skips tests needing a CUDA device
@pytest.mark.parametrize("name", OVERLAYS, ids=lambda name: f"{name}-overlay")
def test_the_pod_settings_resolve_in_the_real_server(
    rendered: dict[str, list[dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    from serving.grpc.config import ENV_PREFIX, field_names

    objects = rendered[name]
    container, spec = _server(objects), pod.pod_spec(objects)
    unknown = [e["name"] for e in container["env"] if e["name"].startswith(ENV_PREFIX)
               and e["name"][len(ENV_PREFIX):].lower() not in field_names()]  # fmt: skip
    assert not unknown, f"KILN_* variables the server does not read: {unknown}"
    (tmp_path / "repo").mkdir()
    config = pod.resolved_config(pod.prepare(objects, tmp_path / "root"), tmp_path / "repo")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config["port"] == ports["grpc"] and config["metrics_port"] == ports["metrics"]
    assert config["device"] == ("cuda" if name == "gpu" else "cpu")
    assert config["max_connection_age_s"], "clients of the headless Service must re-resolve"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + config["grace_period_s"] + 5 <= spec["terminationGracePeriodSeconds"]
    assert config["log_format"] == "json"


def test_a_bad_setting_in_the_config_map_is_refused_by_the_server(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = yaml.safe_load_all(yaml.safe_dump_all(rendered["cpu"]))
    objects = list(objects)
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "kiln.yaml" in o.get("data", {}))
    cm["data"]["kiln.yaml"] += "max_queue_delay_ms: 2\n"
    (tmp_path / "repo").mkdir()
    with pytest.raises(RuntimeError, match="max_queue_delay_ms"):
        pod.resolved_config(pod.prepare(objects, tmp_path / "root"), tmp_path / "repo")


def test_tls_component_wires_the_secret_into_the_server_settings(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from serving.grpc.config import field_names

    objects = rendered["cpu+components"]
    container = _server(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert env["KILN_TLS_CERT"].startswith(mount["mountPath"] + "/")
    assert env["KILN_TLS_KEY"].startswith(mount["mountPath"] + "/")
    if "health_port" not in field_names():
        pytest.skip("the server has no health_port setting yet: kubelet probes cannot reach a TLS port")
    (tmp_path / "repo").mkdir()
    config = pod.resolved_config(pod.prepare(objects, tmp_path / "root"), tmp_path / "repo")
    assert config["tls_cert"] and config["tls_key"]
    assert container["startupProbe"]["grpc"]["port"] == config["health_port"] != config["port"]


def test_model_download_component_replaces_the_claim_with_an_init_copy(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu+components"]
    spec = pod.pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["models"] and "persistentVolumeClaim" not in volumes["models"]
    assert not find(objects, "PersistentVolumeClaim")
    init = spec["initContainers"][0]
    assert any(m["name"] == "models" and not m.get("readOnly") for m in init["volumeMounts"])
    assert any(m["name"] == "models" and m["readOnly"] for m in _server(objects)["volumeMounts"])


def test_ray_job_runs_kiln_score_on_the_pinned_ray(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import argparse

    from serving.clients import score_cli

    job = one(rendered["batch"], "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["kiln", "score"]
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    args = parser.parse_args(argv[2:])  # exits (SystemExit) on a flag kiln score does not have
    assert args.engine == "ray" and args.device.startswith("cuda")
    assert args.ray_address, "inside the RayJob the driver must join the cluster, not start a local Ray"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert args.actors <= sum(w["replicas"] for w in workers)  # one GPU actor per GPU worker
    from deploy.docker.lock import pinned

    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned(DOCKER / "requirements-ray.txt")["ray"]
    assert all(c["image"].endswith("kiln-ray:0.1.0") for c in _ray_containers(job))


def _ray_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]
