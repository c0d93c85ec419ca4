"""The same images through `kiln score` and through the real server's Classify: same answers.

Top-1 must agree and every top-k score within 1e-5; an input `kiln score` marks as an error must
be refused by Classify with the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from serving.scoring.job import ScoreConfig, run_score
from tests.integration.scoring_fixtures import BAD_NAMES, make_images, publish_model
from tests.integration.server_fixtures import ServerThread
from tests.integration.test_scoring_local import read_output

TOP_K = 3


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_model(root, "tiny", seed=7)
    return root


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[KilnClient]:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, default_top_k=TOP_K)
    server = ServerThread(config).start()
    try:
        with KilnClient(server.address) as kiln:
            yield kiln
    finally:
        server.stop()


def test_score_equals_classify(repo: Path, client: KilnClient, tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_images(images, 120, size=(20, 14))
    run_score(ScoreConfig(repo=repo, model="tiny", inputs=str(images), output=tmp_path / "out",
                          top_k=TOP_K, shard_size=50, progress=False))  # fmt: skip
    table = read_output(tmp_path / "out")
    good = table.filter(pa.compute.is_null(table.column("error")))
    paths = [Path(p) for p in good.column("path").to_pylist()]
    online = []
    for start in range(0, len(paths), 40):
        response = client.classify("tiny", paths[start : start + 40], top_k=TOP_K)
        assert (response.model, response.version) == ("tiny", "1")
        online += response.results
    assert len(online) == good.num_rows == 120
    for row, result in zip(good.to_pylist(), online, strict=True):
        assert row["indices"][0] == result.predictions[0].index  # same top-1
        assert row["labels"] == [p.label for p in result.predictions]
        np.testing.assert_allclose(row["scores"], [p.score for p in result.predictions], atol=1e-5, rtol=0)
    bad = {r["id"]: r["error"] for r in table.to_pylist() if r["error"] is not None}
    assert sorted(bad) == sorted(BAD_NAMES)
    for name, error in bad.items():
        with pytest.raises(grpc.RpcError) as info:
            client.classify("tiny", [(images / name).read_bytes()], top_k=TOP_K)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == f"image 0: {error}"
