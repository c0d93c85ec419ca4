"""The config.pbtxt that publishing writes and the ModelConfig RPC of a real server are one proto.

Both come from serving/contract/triton_config.py: with `kiln serve`'s default settings the file
(parsed with protobuf's text format) equals the RPC's answer field for field; with other
settings only those settings differ.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import publish_tiny_model, running_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root, "tiny", seed=0, max_batch_size=8)
    return root


def _written(repo: Path) -> mc.ModelConfig:
    return text_format.Parse((repo / "tiny" / "config.pbtxt").read_text(), mc.ModelConfig())


def _served(repo: Path, **settings: object) -> mc.ModelConfig:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, **settings)  # type: ignore[arg-type]
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=30).config


def test_the_written_file_is_what_a_default_server_answers(repo: Path) -> None:
    written, served = _written(repo), _served(repo)
    assert served == written, text_format.MessageToString(served)
    # and it is a full description, not two empty messages that agree
    assert written.max_batch_size == 8 and written.HasField("dynamic_batching")
    assert [i.name for i in written.input] == ["input"] and written.version_policy.HasField("latest")


def test_other_settings_change_only_their_own_fields(repo: Path) -> None:
    served = _served(
        repo,
        max_batch_size=4,
        max_queue_delay_us=700,
        preferred_batch_sizes=(2, 16),
        max_queue_size=32,
        version_policy="latest:2",
    )
    expected = _written(repo)
    expected.max_batch_size = 4
    batching = expected.dynamic_batching
    batching.max_queue_delay_microseconds = 700
    batching.preferred_batch_size[:] = [2]  # 16 is above this server's batch limit
    batching.default_queue_policy.max_queue_size = 32
    expected.version_policy.latest.num_versions = 2
    assert served == expected, text_format.MessageToString(served)
