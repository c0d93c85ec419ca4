"""Run `kiln serve` locally the way a rendered pod would: its args, its KILN_* environment and the
files its ConfigMap/Secret volumes mount, with container paths mapped into a local folder.

This is how the deploy tests check the manifests against the real server: `resolved_config`
asks the server's own CLI (`kiln serve --print-config`) what the pod's settings resolve to, and
`serve_command` gives the command line of a live server for health and /metrics checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.validate.render import find, one

REPO_ROOT = Path(__file__).resolve().parents[2]
_QUANTITY = {"m": 1e-3, "": 1.0, "k": 1e3}


@dataclass(frozen=True, kw_only=True)
class PodRun:
    """What a container needs locally: argv after `kiln serve`, and its environment."""

    args: list[str]
    env: dict[str, str]


def server_container(objects: list[dict[str, Any]], name: str = "kiln") -> dict[str, Any]:
    """The `kiln` container of the `kiln` Deployment."""
    spec = one(objects, "Deployment", "kiln")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of the `kiln` Deployment."""
    return one(objects, "Deployment", "kiln")["spec"]["template"]["spec"]


def prepare(objects: list[dict[str, Any]], root: Path) -> PodRun:
    """Lay out the container's mounted ConfigMaps/Secrets under `root`; map args and env onto it.

    Secrets are not part of the render (they are created by the operator or cert-manager), so
    each mounted Secret gets placeholder files for the keys a kubernetes.io/tls Secret has.
    """
    spec, container = pod_spec(objects), server_container(objects)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume, local = volumes[mount["name"]], root / mount["mountPath"].lstrip("/")
        if "configMap" in volume:
            cm = one(objects, "ConfigMap", volume["configMap"]["name"])
            _write(local, cm.get("data", {}))
        elif "secret" in volume:
            _write(local, {key: "placeholder\n" for key in ("tls.crt", "tls.key", "ca.crt")})
        else:
            continue  # data volumes (models, /tmp): the caller passes its own repository
        mounts[mount["mountPath"]] = local
    args = [_local(a, mounts) for a in container.get("args", [])]
    env = {e["name"]: _local(_env_value(e, container), mounts) for e in container.get("env", [])}
    return PodRun(args=args, env=env)


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, text in files.items():
        (folder / key).write_text(text, encoding="utf-8")


def _local(value: str, mounts: dict[str, Path]) -> str:
    for mount_path, local in mounts.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path.rstrip("/")) :]
    return value


def _env_value(entry: dict[str, Any], container: dict[str, Any]) -> str:
    """A literal value, or a resourceFieldRef resolved as the kubelet would (ceil to the divisor)."""
    if "value" in entry:
        return str(entry["value"])
    ref = entry.get("valueFrom", {}).get("resourceFieldRef")
    if ref is None:
        raise ValueError(f"env {entry['name']}: only value and resourceFieldRef are resolved here")
    kind, _, resource = ref["resource"].partition(".")
    amount = quantity(str(container["resources"][kind][resource]))
    return str(math.ceil(amount / quantity(str(ref.get("divisor", "1")))))


def quantity(text: str) -> float:
    """A CPU-style Kubernetes quantity ("2", "500m", "1.5") as a number."""
    suffix = text[-1] if text[-1] in _QUANTITY and not text[-1].isdigit() else ""
    return float(text[: len(text) - len(suffix)]) * _QUANTITY[suffix]


def kiln_env(run: PodRun) -> dict[str, str]:
    """This process's environment without any KILN_* variable, plus the pod's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return env | run.env


def resolved_config(run: PodRun, repo: Path) -> dict[str, Any]:
    """`kiln serve <pod args> --repo repo --print-config` under the pod's environment, as a dict.

    Raises RuntimeError with the server's one-line message when the settings do not validate.
    """
    cmd = [
        sys.executable,
        "-m",
        "serving.dispatch",
        "serve",
        *run.args,
        "--repo",
        str(repo),
        "--print-config",
    ]
    result = subprocess.run(
        cmd, cwd=REPO_ROOT, env=kiln_env(run), capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"exit {result.returncode}")
    return json.loads(result.stdout)


def serve_command(run: PodRun, repo: Path) -> list[str]:
    """`kiln serve` as the pod runs it, on loopback with free ports (the pod's own are fixed)."""
    local = ["--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    return [sys.executable, "-m", "serving.dispatch", "serve", *run.args, *local]


def referenced_names(objects: list[dict[str, Any]], kind: str) -> set[str]:
    """Names of the ConfigMaps (kind="ConfigMap") or Secrets the kiln pod template refers to."""
    spec, key = pod_spec(objects), {"ConfigMap": "configMap", "Secret": "secret"}[kind]
    names = {v[key].get("name") or v[key].get("secretName") for v in spec.get("volumes", []) if key in v}
    ref_key = {"ConfigMap": "configMapKeyRef", "Secret": "secretKeyRef"}[kind]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        names |= {
            e["valueFrom"][ref_key]["name"] for e in c.get("env", []) if ref_key in e.get("valueFrom", {})
        }
    return names


def rendered_names(objects: list[dict[str, Any]], kind: str) -> set[str]:
    """Names of the rendered objects of `kind`."""
    return {o["metadata"]["name"] for o in find(objects, kind)}
