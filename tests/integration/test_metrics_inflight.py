"""`kiln_inflight_requests` follows the requests a version is handling: scraped from the real
/metrics endpoint while 16 ModelInfer and 4 Classify calls wait on the timing backend (20 ms per
batch of one), it rises above 1, and it is back to 0 once they are answered."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient, build_infer_request, image_message
from serving.grpc.config import ServeConfig
from tests.fuzz.load import metric
from tests.integration.server_fixtures import publish_tiny_model, running_server

LABELS = {"model": "tiny", "version": "1"}


def test_inflight_gauge_rises_under_load_and_returns_to_zero(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=1)
    config = ServeConfig(
        repo=tmp_path, host="127.0.0.1", port=0, metrics_port=0, backend="null", null_base_us=20_000
    )
    with running_server(config) as srv, KilnClient(srv.address, timeout=30) as client:
        port = srv.server.metrics_port
        assert port is not None and metric(port, "kiln_inflight_requests", LABELS) == 0
        request = build_infer_request("tiny", {"input": np.zeros((1, 3, 8, 8), np.float32)})
        calls = [client.inference.ModelInfer.future(request) for _ in range(16)]
        image = np.zeros((8, 8, 3), np.uint8)
        classify_request = cpb.ClassifyRequest(model="tiny", images=[image_message(image)])
        classify = [client.classifier.Classify.future(classify_request) for _ in range(4)]
        peak, end = 0.0, time.monotonic() + 10
        while any(not c.done() for c in calls + classify) and time.monotonic() < end:
            peak = max(peak, metric(port, "kiln_inflight_requests", LABELS))
            time.sleep(0.02)
        assert all(c.result().ByteSize() > 0 for c in calls + classify)
        after = metric(port, "kiln_inflight_requests", LABELS)
    assert peak > 1, peak
    assert after == 0
