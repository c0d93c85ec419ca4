"""The Kustomize manifests never open RepositoryModelLoad/Unload to whoever reaches the Service:
every tree an operator can apply resolves, in the real server's CLI, to repository control off,
or on only behind an admin token (SECURITY.md; issue 20, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.validate import pod, render
from deploy.validate.render import K8S

pytestmark = pytest.mark.skipif(render.kubectl() is None, reason="kubectl is not installed")

COMPONENTS = (K8S / "components" / "tls", K8S / "components" / "model-download")


@pytest.mark.parametrize("tree", ["cpu", "gpu", "cpu+components"], ids=lambda t: f"{t}-tree")
def test_load_and_unload_are_off_or_need_the_admin_token(tree: str, tmp_path: Path) -> None:
    overlay = K8S / "overlays" / tree.split("+")[0]
    objects = render.kustomize_with(overlay, COMPONENTS) if "+" in tree else render.kustomize(overlay)
    (tmp_path / "repo").mkdir()
    config = pod.resolved_config(pod.prepare(objects, tmp_path / "root"), tmp_path / "repo")
    guarded = config["admin_token"] is not None or config["admin_token_file"] is not None
    assert config["repository_control"] is False or guarded, "anyone could unload every model"
    env = {e["name"]: e for e in pod.server_container(objects).get("env", [])}
    if "KILN_ADMIN_TOKEN" in env:  # a token in the manifest itself would be readable by all
        assert "secretKeyRef" in env["KILN_ADMIN_TOKEN"].get("valueFrom", {})
