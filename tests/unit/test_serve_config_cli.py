"""`kiln serve` / `kiln classify` argument handling: a bad value is one clear line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from serving import cli
from serving.clients import classify_cli


def _args(module, argv: list[str]) -> argparse.Namespace:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repo", "/nonexistent/models"], "kiln serve: repo: not a directory: /nonexistent/models"),
        (["--port", "99999"], "kiln serve: port: must be in [0, 65535], got 99999"),
        (["--version-policy", "newest"], "kiln serve: version_policy: expected 'latest'"),
        (
            ["--preferred-batch-sizes", "4,x"],
            "kiln serve: --preferred-batch-sizes: expected an integer, got 'x'",
        ),
        (
            ["--tls-cert", "/nonexistent/c.pem"],
            "kiln serve: tls_cert: tls_cert and tls_key must be given together",
        ),
    ],
)
def test_serve_bad_config_exits_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    args = _args(cli, ["--repo", str(tmp_path), *argv])
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_serve_print_config_resolves_flags_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kiln.yaml"
    config.write_text(f"repo: {tmp_path}\ninstances: 2\nmax_queue_delay_us: 50\n")
    monkeypatch.setenv("KILN_MAX_QUEUE_DELAY_US", "75")
    args = _args(
        cli, ["--config", str(config), "--models", "a", "b", "--no-warmup", "--no-metrics", "--print-config"]
    )
    assert cli.run(args) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["instances"] == 2 and resolved["max_queue_delay_us"] == 75
    assert (
        resolved["models"] == ["a", "b"] and resolved["warmup"] is False and resolved["metrics_port"] is None
    )


def test_classify_cli_rejects_missing_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(classify_cli, [str(tmp_path / "nope.jpg"), "--model", "m"])
    assert classify_cli.run(args) == 2
    assert capsys.readouterr().err.strip() == f"kiln classify: image not found: {tmp_path / 'nope.jpg'}"
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert classify_cli.run(_args(classify_cli, [str(image), "--model", "m", "--top-k", "0"])) == 2


def test_event_loop_choice(tmp_path: Path) -> None:
    import uvloop

    from serving.grpc.config import ServeConfig

    assert cli.loop_factory(ServeConfig(repo=tmp_path, event_loop="asyncio")) is None
    for choice in ("auto", "uvloop"):
        factory = cli.loop_factory(ServeConfig(repo=tmp_path, event_loop=choice))
        assert factory is uvloop.new_event_loop
