"""Every GPU setting of `kiln serve` is a YAML key, a KILN_* variable and a flag, shows in
--print-config, reaches BackendOptions through `backend_options(config)` (and the CUDA EP's
provider options), and a bad value stops the server at start with one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving import cli
from serving.contract.manifest import read_manifest
from serving.grpc.config import BACKEND_FIELDS, ServeConfig, field_names, load_config
from serving.grpc.model_version import backend_options
from serving.runtime.backends import BackendOptions, NullTiming, load_backend
from serving.runtime.backends.onnxruntime_backend import cuda_ep_options
from tests.integration.server_fixtures import publish_tiny_model

# field -> a value other than its default (as the flag spells it, then as the config holds it)
CHANGED: dict[str, tuple[list[str], Any]] = {
    "iobinding": (["--no-iobinding"], False),
    "pinned_memory": (["--no-pinned-memory"], False),
    "pad_to_buckets": (["--no-pad-to-buckets"], False),
    "cuda_graphs": (["--cuda-graphs"], True),
    "cuda_prefer_nhwc": (["--cuda-prefer-nhwc"], True),
    "cuda_tf32": (["--no-cuda-tf32"], False),
    "cudnn_conv_algo_search": (["--cudnn-conv-algo-search", "EXHAUSTIVE"], "EXHAUSTIVE"),
    "onnx_provider": (["--onnx-provider", "tensorrt"], "tensorrt"),
    "trt_engine_cache_dir": (["--trt-engine-cache-dir", "{tmp}"], "{tmp}"),
    "trt_workspace_bytes": (["--trt-workspace-bytes", "268435456"], 268435456),
    "trt_allow_other_gpu": (["--trt-allow-other-gpu"], True),
}
# BackendOptions fields that ServeConfig spells differently (everything else: BACKEND_FIELDS)
MAPPED = {
    "device", "instances", "intra_op_threads", "allow_spinning", "lone_batch_spinning",
    "single_thread_small_batches", "share_cores", "pin_threads", "share_arena",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_kiln_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def _fill(value: Any, tmp: Path) -> Any:
    return Path(str(tmp)) if value == "{tmp}" else value


def test_every_backend_option_has_a_serve_setting() -> None:
    options = {f.name for f in dataclasses.fields(BackendOptions)}
    assert options == set(BACKEND_FIELDS) | MAPPED
    assert set(BACKEND_FIELDS) <= set(field_names()) and set(BACKEND_FIELDS) == set(CHANGED)
    dests = {action.dest for action in argparse.ArgumentParser()._actions}
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    dests = {action.dest for action in parser._actions} - dests
    assert set(BACKEND_FIELDS) <= dests, sorted(set(BACKEND_FIELDS) - dests)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_gpu_setting_reaches_the_backend_options_from_flag_env_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv, raw = CHANGED[name]
    want = _fill(raw, tmp_path)
    flag = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    args = _parse(["--repo", str(tmp_path), "--device", "cuda", *flag, "--print-config"])
    assert cli.run(args) == 0
    shown = json.loads(capsys.readouterr().out)[name]
    assert shown == (str(want) if isinstance(want, Path) else want)
    text = str(want).lower() if isinstance(want, bool) else str(want)
    from_env = load_config(
        env={"KILN_REPO": str(tmp_path), "KILN_DEVICE": "cuda", f"KILN_{name.upper()}": text}
    )
    yaml_file = tmp_path / "kiln.yaml"
    yaml_file.write_text(f"repo: {tmp_path}\ndevice: cuda\n{name}: {text}\n")
    from_file = load_config(config_file=yaml_file, env={})
    from_flag = load_config(env={}, overrides=cli._overrides(args))  # what `kiln serve` resolves
    for config in (from_env, from_file, from_flag):
        options = backend_options(config)
        assert getattr(options, name) == want, (name, config)
        assert options.device == "cuda"


def test_the_mapped_settings_reach_the_backend_options(tmp_path: Path) -> None:
    config = ServeConfig(
        repo=tmp_path, instances=3, intra_op_threads=2, intra_op_spinning=True, lone_batch_spinning="on",
        single_thread_small_batches="off", workers_share_cores=False, pin_ort_threads=False,
        share_ort_arena=False,
    )  # fmt: skip
    assert backend_options(config) == BackendOptions(
        device="cpu", instances=3, intra_op_threads=2, allow_spinning=True, lone_batch_spinning="on",
        single_thread_small_batches="off", share_cores=False, pin_threads=False, share_arena=False,
    )  # fmt: skip
    assert backend_options(ServeConfig(repo=tmp_path)) == BackendOptions()  # same defaults both sides


@pytest.mark.parametrize(
    ("setting", "field"), [("pin_ort_threads", "pin_threads"), ("share_ort_arena", "share_arena")]
)
def test_cpu_switches_on_by_default_and_off_from_flag_env_and_file(
    setting: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert getattr(backend_options(ServeConfig(repo=tmp_path)), field)
    flag = "--no-" + setting.replace("_", "-")
    assert cli.run(_parse(["--repo", str(tmp_path), flag, "--print-config"])) == 0
    assert json.loads(capsys.readouterr().out)[setting] is False
    from_env = load_config(env={"KILN_REPO": str(tmp_path), f"KILN_{setting.upper()}": "false"})
    (tmp_path / "kiln.yaml").write_text(f"repo: {tmp_path}\n{setting}: false\n")
    from_file = load_config(config_file=tmp_path / "kiln.yaml", env={})
    assert not getattr(backend_options(from_env), field) and not getattr(backend_options(from_file), field)


def test_pin_ort_threads_not_for_workers_that_cannot_tell_their_cores(tmp_path: Path) -> None:
    # workers with the core table start their blocks on their own share; without it all would pin alike
    assert backend_options(ServeConfig(repo=tmp_path, workers=2)).pin_threads
    assert not backend_options(ServeConfig(repo=tmp_path, workers=2, workers_share_cores=False)).pin_threads
    assert backend_options(ServeConfig(repo=tmp_path, workers=1, workers_share_cores=False)).pin_threads


def test_cuda_settings_become_the_cuda_ep_provider_options() -> None:
    options = BackendOptions(
        device="cuda:1", cuda_graphs=True, cuda_tf32=False, cuda_prefer_nhwc=True,
        cudnn_conv_algo_search="EXHAUSTIVE",
    )  # fmt: skip
    assert cuda_ep_options(options) == {
        "device_id": 1,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "enable_cuda_graph": 1,
        "use_tf32": 0,
        "prefer_nhwc": 1,
        "use_ep_level_unified_stream": 1,
    }


def test_pad_to_buckets_reaches_a_loaded_backend(tmp_path: Path) -> None:
    """Through the same function the model manager calls, into a real (timing) backend."""
    version_dir = publish_tiny_model(tmp_path, max_batch_size=8)
    manifest = read_manifest(version_dir / "kiln.json")
    buckets = {}
    for pad in (True, False):
        config = ServeConfig(repo=tmp_path, backend="null", pad_to_buckets=pad)
        backend = load_backend(
            manifest, manifest.artefacts[0], version_dir=version_dir,
            options=backend_options(config), null_timing=NullTiming(),
        )  # fmt: skip
        try:
            backend.infer({"input": np.zeros((3, 3, 8, 8), np.float32)})
            buckets[pad] = backend.buckets  # type: ignore[attr-defined]
        finally:
            backend.close()
    assert buckets == {True: (1, 2, 4, 8), False: ()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--device", "cuda", "--cudnn-conv-algo-search", "fastest"],
            "cudnn_conv_algo_search must be one of ['HEURISTIC', 'EXHAUSTIVE', 'DEFAULT'], got 'fastest'",
        ),
        (
            ["--device", "cuda", "--onnx-provider", "openvino"],
            "onnx_provider must be one of ['auto', 'cuda', 'tensorrt'], got 'openvino'",
        ),
        (
            ["--device", "cuda", "--cuda-graphs", "--no-iobinding"],
            "cuda_graphs: needs iobinding and pad_to_buckets on the CUDA EP, got iobinding=False",
        ),
        (
            ["--device", "cuda", "--cuda-graphs", "--onnx-provider", "tensorrt"],
            "cuda_graphs: needs iobinding and pad_to_buckets on the CUDA EP",
        ),
        (
            ["--device", "cuda", "--trt-workspace-bytes", "0"],
            "trt_workspace_bytes must be an integer >= 1, got 0",
        ),
        (
            ["--device", "cuda", "--trt-engine-cache-dir", "/nonexistent/trt"],
            "trt_engine_cache_dir: not a directory",
        ),
        (["--cuda-graphs"], "cuda_graphs: acts on a CUDA device only, and device is 'cpu'"),
        (["--no-cuda-tf32"], "cuda_tf32: acts on a CUDA device only, and device is 'cpu'"),
    ],
)
def test_a_bad_gpu_setting_stops_the_server_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.run(_parse(["--repo", str(tmp_path), *argv])) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln serve: ") and message in err and err.count("\n") == 1, err


def test_a_gpu_setting_in_the_file_is_refused_on_a_cpu_too(tmp_path: Path) -> None:
    from serving.grpc.config import ConfigError

    (tmp_path / "kiln.yaml").write_text(f"repo: {tmp_path}\ncuda_prefer_nhwc: true\n")
    with pytest.raises(ConfigError, match="cuda_prefer_nhwc: acts on a CUDA device only"):
        load_config(config_file=tmp_path / "kiln.yaml", env={})
    # the timing backend ignores them (it pretends to be the device), and device auto may be a GPU
    load_config(config_file=tmp_path / "kiln.yaml", env={}, overrides={"device": "auto"})
