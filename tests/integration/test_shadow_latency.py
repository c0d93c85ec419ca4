"""A slow candidate is rejected on latency (promotion: shadow, real polling server, real load).

Version 2 has the tiny model's weights, so it agrees on every row, but its graph also runs a chain
of large MatMuls whose result is multiplied by zero: the same answers for far more compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.clients.client import KilnClient
from tests.integration.server_fixtures import CHANNELS, SIZE, build_onnx, publish_tiny_model, running_server
from tests.integration.test_server_lifecycle import Hammer, _wait_until
from tests.integration.test_shadow_rollout import _config, _metric, _states

WIDTH, DEPTH = 1024, 48  # ~100 MFLOP per row: tens of ms where the tiny model takes microseconds


def build_slow_onnx(path: Path, seed: int) -> None:
    """The tiny classifier of `seed` plus a discarded MatMul chain on the input (same answers)."""
    import onnx
    from onnx import helper, numpy_helper

    build_onnx(path, seed)
    model = onnx.load(str(path))
    graph = model.graph
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(WIDTH)  # with tanh between: activations stay bounded, never NaN
    first = rng.normal(scale=0.1, size=(CHANNELS * SIZE * SIZE, WIDTH)).astype(np.float32)
    square = rng.normal(scale=scale, size=(WIDTH, WIDTH)).astype(np.float32)
    graph.initializer.extend(
        [numpy_helper.from_array(first, "heavy_in"), numpy_helper.from_array(square, "heavy_sq"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    )  # fmt: skip
    nodes = [helper.make_node("Flatten", ["input"], ["h_flat"], axis=1),
             helper.make_node("MatMul", ["h_flat", "heavy_in"], ["h_mm0"]),
             helper.make_node("Tanh", ["h_mm0"], ["h0"])]  # fmt: skip
    for i in range(1, DEPTH + 1):
        nodes += [helper.make_node("MatMul", [f"h{i - 1}", "heavy_sq"], [f"h_mm{i}"]),
                  helper.make_node("Tanh", [f"h_mm{i}"], [f"h{i}"])]  # fmt: skip
    nodes += [helper.make_node("ReduceMean", [f"h{DEPTH}"], ["h_mean"], keepdims=0),
              helper.make_node("Mul", ["h_mean", "zero"], ["h_zero"])]  # fmt: skip
    (gemm,) = [n for n in graph.node if n.output[0] == "logits"]
    gemm.output[0] = "logits_fast"
    nodes.append(helper.make_node("Add", ["logits_fast", "h_zero"], ["logits"]))
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def test_a_slow_candidate_is_rejected_on_latency_and_the_old_version_serves_every_request(
    tmp_path: Path,
) -> None:
    publish_tiny_model(tmp_path, seed=1)
    config = _config(tmp_path, shadow_max_latency_ratio=2.0, shadow_min_requests=30)
    with running_server(config) as srv, KilnClient(srv.address) as client, Hammer(srv.address) as hammer:
        _wait_until(lambda: hammer.successes >= 20)
        publish_tiny_model(tmp_path, seed=1, build=build_slow_onnx)  # v2: same answers, slow
        _wait_until(lambda: _states(client).get("2", ("", ""))[0] == "REJECTED", timeout=60)
        served = hammer.successes
        _wait_until(lambda: hammer.successes >= served + 20)
        states = _states(client)
        rejected = _metric(srv, "kiln_model_promotions_total", result="rejected")
    assert hammer.failures == [] and set(hammer.versions) == {"1"}
    assert states["1"][0] == "READY" and "p99 compute time ratio > 2.0" in states["2"][1]
    assert "agreement 1.0000" in states["2"][1] and rejected == 1  # it agreed: latency alone rejected it
