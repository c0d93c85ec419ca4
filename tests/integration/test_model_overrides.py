"""Per-model settings (model_overrides) reach the model they name, and only that model.

The promotion policy per model is tested under load in test_shadow_rollout.py; here the
latency target: one model's batcher chooses its delay against its own target, the other keeps
the server-wide fixed delay.
"""

from __future__ import annotations

from pathlib import Path

from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import publish_tiny_model, running_server


def test_a_latency_target_set_for_one_model_reaches_its_batcher_only(tmp_path: Path) -> None:
    for model in ("tiny", "targeted"):
        publish_tiny_model(tmp_path, model, seed=1)
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None,
                         model_overrides={"targeted": {"latency_target_ms": 25.0}})  # fmt: skip
    with running_server(config) as srv:
        manager = srv.server.manager
        policies = {model: manager.get(model).batcher._policy for model in ("tiny", "targeted")}
    assert policies["tiny"] is None
    assert policies["targeted"] is not None and policies["targeted"].target == 0.025
