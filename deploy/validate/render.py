"""Render Kustomize trees with `kubectl kustomize` and validate the objects offline.

Built-in kinds are validated strictly (unknown fields are errors) against the Kubernetes OpenAPI
schemas bundled by the `kubernetes-validate` package, for several Kubernetes versions. Custom
resources (ServiceMonitor, PrometheusRule, RayJob) have no schema there: `crd_problems` checks
their shape explicitly, and the pod templates a RayJob embeds are validated against the core
PodTemplateSpec schema.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
K8S = DEPLOY / "k8s"
# Oldest version with every field used (the preStop `sleep` action is on by default from 1.30) and
# the newest the schema package knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources: (apiVersion, kind) -> why they are not schema-validated here.
CRD_ALLOW_LIST = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD; shape checked by crd_problems",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD; shape checked by crd_problems",
    ("ray.io/v1", "RayJob"): "KubeRay CRD; pod templates validated as core PodTemplateSpec",
}
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


class RenderError(RuntimeError):
    """kubectl is missing or `kubectl kustomize` failed (the message carries its stderr)."""


def kubectl() -> str | None:
    """Path of kubectl (env KUBECTL wins), or None when it is not installed."""
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize path` renders (offline; no cluster needed)."""
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl not found (set KUBECTL or install kubectl)")
    result = subprocess.run(
        [binary, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_with(
    overlay: Path, components: Sequence[Path], namespace: str = "kiln"
) -> list[dict[str, Any]]:
    """Render `overlay` with extra Kustomize components, as an operator enabling them would."""
    with tempfile.TemporaryDirectory(prefix="kiln-kustomize-") as tmp:
        # Kustomize refuses absolute paths: refer to the trees relative to the temporary root.
        rel = [os.path.relpath(p, tmp) for p in (overlay, *components)]
        doc = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": [rel[0]],
            "components": rel[1:],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        return kustomize(Path(tmp))


def find(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of `kind` (and `name`, when given)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`); AssertionError naming what was found otherwise."""
    found = find(objects, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def is_builtin(obj: dict[str, Any]) -> bool:
    """True unless the object is a custom resource on the allow-list."""
    return (obj["apiVersion"], obj["kind"]) not in CRD_ALLOW_LIST


def schema_problems(obj: dict[str, Any], version: str) -> list[str]:
    """Strict schema errors of a built-in object for Kubernetes `version` (empty: valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{_ref(obj)} @ {version}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{_ref(obj)} @ {version}: no schema (a custom resource missing from CRD_ALLOW_LIST?)"]
    return []


def definition_problems(data: Any, definition: str, version: str, where: str) -> list[str]:
    """Strict errors of `data` against one schema definition, e.g. io.k8s.api.core.v1.PodTemplateSpec."""
    import jsonschema

    defs = _definitions(version)
    schema = {"$defs": defs, "$ref": f"#/$defs/{definition}"}
    validator = jsonschema.Draft202012Validator(_rebase(schema))
    return [
        f"{where} @ {version}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(data)
    ]


@functools.cache
def _definitions(version: str) -> dict[str, Any]:
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((folder / "_definitions.json").read_text(encoding="utf-8"))["$defs"]


def _rebase(schema: dict[str, Any]) -> dict[str, Any]:
    """The bundled definitions refer to `_definitions.json#/$defs/X`; point them at this document."""
    text = json.dumps(schema).replace('"_definitions.json#/$defs/', '"#/$defs/')
    return json.loads(text)


def crd_problems(obj: dict[str, Any], version: str = KUBERNETES_VERSIONS[-1]) -> list[str]:
    """Shape errors of an allow-listed custom resource (empty: fine)."""
    checks = {
        "ServiceMonitor": _service_monitor,
        "PrometheusRule": _prometheus_rule,
        "RayJob": lambda o: _ray_job(o, version),
    }
    if is_builtin(obj):
        return [f"{_ref(obj)}: not a custom resource on the allow-list"]
    return [f"{_ref(obj)}: {p}" for p in checks[obj["kind"]](obj)]


def _service_monitor(obj: dict[str, Any]) -> list[str]:
    spec, problems = obj.get("spec", {}), []
    if not spec.get("selector", {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels is required here (a label selector on the Service)")
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problems.append("spec.endpoints must list at least one endpoint")
    known = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
             "relabelings", "metricRelabelings", "tlsConfig", "authorization", "params"}  # fmt: skip
    for i, ep in enumerate(endpoints):
        if not isinstance(ep.get("port"), str):
            problems.append(f"spec.endpoints[{i}].port must name a Service port")
        problems += [f"spec.endpoints[{i}].{k}: unknown field" for k in set(ep) - known]
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not _DURATION.match(str(ep[key])):
                problems.append(f"spec.endpoints[{i}].{key}: not a duration: {ep[key]!r}")
    return problems


def _prometheus_rule(obj: dict[str, Any]) -> list[str]:
    problems = []
    groups = obj.get("spec", {}).get("groups") or []
    if not groups:
        problems.append("spec.groups must not be empty")
    for g, group in enumerate(groups):
        if not group.get("name"):
            problems.append(f"spec.groups[{g}].name is required")
        for r, rule in enumerate(group.get("rules") or []):
            where = f"spec.groups[{g}].rules[{r}]"
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{where}: exactly one of alert and record is required")
            if not str(rule.get("expr", "")).strip():
                problems.append(f"{where}: expr is required")
            if "for" in rule and not _DURATION.match(str(rule["for"])):
                problems.append(f"{where}.for: not a duration: {rule['for']!r}")
            if "alert" in rule:
                if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    problems.append(f"{where}: labels.severity must be critical, warning or info")
                if not rule.get("annotations", {}).get("summary"):
                    problems.append(f"{where}: annotations.summary is required")
    return problems


def _ray_job(obj: dict[str, Any], version: str) -> list[str]:
    spec = obj.get("spec", {})
    problems = [] if str(spec.get("entrypoint", "")).strip() else ["spec.entrypoint is required"]
    cluster = spec.get("rayClusterSpec") or {}
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(cluster.get("rayVersion", ""))):
        problems.append("spec.rayClusterSpec.rayVersion must be a full Ray version")
    head = cluster.get("headGroupSpec") or {}
    groups = [("headGroupSpec", head), *((f"workerGroupSpecs[{i}]", w) for i, w in
                                         enumerate(cluster.get("workerGroupSpecs") or []))]  # fmt: skip
    for where, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.rayStartParams must map names to strings")
        template = group.get("template")
        if not isinstance(template, dict):
            problems.append(f"{where}.template is required")
            continue
        problems += definition_problems(template, "io.k8s.api.core.v1.PodTemplateSpec", version, where)
    for i, worker in enumerate(cluster.get("workerGroupSpecs") or []):
        if not worker.get("groupName"):
            problems.append(f"workerGroupSpecs[{i}].groupName is required")
        low, n, high = worker.get("minReplicas", 0), worker.get("replicas", 0), worker.get("maxReplicas", 0)
        if not low <= n <= high:
            problems.append(f"workerGroupSpecs[{i}]: need minReplicas <= replicas <= maxReplicas")
    return problems


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
