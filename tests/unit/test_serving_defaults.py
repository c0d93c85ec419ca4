"""One source for the serving defaults and one parser for the version policy.

A server started without settings (ServeConfig), the batcher built without them and the
config.pbtxt that export writes must all say the same thing.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from serving.contract import serving_defaults
from serving.contract.triton_config import ServingSettings, render_config
from serving.contract.version_policy import VersionPolicy
from serving.grpc.config import ConfigError, ServeConfig, load_config
from serving.runtime.batcher import DynamicBatcher
from tests.unit.test_manifest_schema import make_manifest

# ServeConfig field -> the same setting's name in ServingSettings (config.pbtxt) and DynamicBatcher
SHARED = {
    "max_queue_delay_us": ("max_queue_delay_us", "max_queue_delay_us"),
    "preferred_batch_sizes": ("preferred_batch_sizes", "preferred_batch_sizes"),
    "max_queue_size": ("max_queue_size", "max_queue_size"),
    "instances": ("instances", None),
    "device": ("device", None),
}


def _serve_defaults() -> dict[str, object]:
    """ServeConfig's defaults as served: `instances: None` serves INSTANCES unless precision auto
    measures a layout (a version with several artefacts; config.pbtxt is written before that)."""
    values = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    assert values["instances"] is None
    return values | {"instances": serving_defaults.INSTANCES}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_serve_config_batcher_and_config_pbtxt_share_each_default(name: str) -> None:
    settings_name, batcher_name = SHARED[name]
    settings = {f.name: f.default for f in dataclasses.fields(ServingSettings)}
    assert settings[settings_name] == _serve_defaults()[name]
    if batcher_name is not None:
        batcher = inspect.signature(DynamicBatcher.__init__).parameters[batcher_name].default
        assert batcher == _serve_defaults()[name]


def test_the_written_config_pbtxt_states_the_served_defaults(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    served = ServeConfig(repo=tmp_path / "repo")
    written = text_format.Parse(render_config(make_manifest(tmp_path)), mc.ModelConfig())
    assert written.dynamic_batching.max_queue_delay_microseconds == served.max_queue_delay_us
    assert written.dynamic_batching.default_queue_policy.max_queue_size == served.max_queue_size
    assert list(written.dynamic_batching.preferred_batch_size) == list(served.preferred_batch_sizes)
    assert written.instance_group[0].count == (served.instances or serving_defaults.INSTANCES)
    assert written.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and served.device == "cpu"
    assert written.version_policy.latest.num_versions == served.policy.num_versions == 1


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("latest", VersionPolicy.latest(1)),
        ("latest:3", VersionPolicy.latest(3)),
        ("all", VersionPolicy.all()),
        ("specific:3,1", VersionPolicy.specific(1, 3)),
    ],
)
def test_serve_config_parses_the_policy_once_with_the_contract_parser(
    tmp_path: Path, text: str, policy: VersionPolicy
) -> None:
    config = ServeConfig(repo=tmp_path, version_policy=text)
    assert config.policy == policy and config.policy is config.policy


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("newest", "got 'newest'"),
        ("latest:0", "num_versions must be >= 1, got 0"),
        ("latest:x", "N and the versions are integers"),
        ("specific:", "got 'specific:'"),
        ("specific:0,2", "versions must be integers >= 1, got [0]"),
        ("all:2", "got 'all:2'"),
    ],
)
def test_a_bad_policy_names_the_forms_and_the_problem(tmp_path: Path, text: str, detail: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"KILN_REPO": str(tmp_path), "KILN_VERSION_POLICY": text})
    message = str(caught.value)
    assert message.startswith("version_policy: expected 'latest', 'latest:N', 'all' or 'specific:V1,V2'")
    assert detail in message
