"""`kiln bench` against a real model repository (in-process ORT) and a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.dispatch import main
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import publish_tiny_model, running_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root, "tiny")
    return root


def test_engine_mode_prints_a_row_per_batch_size(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--repo", str(repo), "--model", "tiny", "--batch-sizes", "1,4", "--seconds", "0.2"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if "model.onnx" in line]
    assert len(rows) == 2 and "│ 1 " in rows[0] and "│ 4 " in rows[1]


def test_served_mode_drives_a_real_server(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=0)
    with running_server(config) as server:
        code = main(
            [
                "bench",
                "--server",
                server.address,
                "--model",
                "tiny",
                "--concurrency",
                "1,2",
                "--seconds",
                "0.3",
                "--connections",
                "2",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0 and out.count(server.address) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nosuch"], "nosuch"),
        (["--model", "tiny", "--precision", "int8"], "no ONNX artefact of precision 'int8'"),
        (
            ["--model", "tiny", "--batch-sizes", "0"],
            "--batch-sizes must be comma-separated positive integers",
        ),
    ],
)
def test_bad_arguments(repo: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code = main(["bench", "--repo", str(repo), "--seconds", "0.1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("kiln bench: error:")


@pytest.mark.parametrize(
    ("connections", "message"),
    [("-1", "--connections must be >= 0"), ("65", "connections must be in [1, 64]")],
)
def test_bad_connections(capsys: pytest.CaptureFixture[str], connections: str, message: str) -> None:
    """Refused before any channel is opened (the address is never dialled)."""
    code = main(["bench", "--server", "127.0.0.1:1", "--model", "tiny", "--connections", connections])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("kiln bench: error:")
