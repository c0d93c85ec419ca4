"""The promotion settings of `kiln serve`: flags, KILN_ variables, --print-config, validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from serving import cli
from serving.grpc.config import ConfigError, ServeConfig


def test_flags_and_environment_reach_print_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KILN_SHADOW_SAMPLE", "0.5")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--repo", str(tmp_path), "--promotion", "shadow", "--shadow-min-requests", "50", "--print-config"]
    assert cli.run(parser.parse_args(argv)) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["promotion"] == "shadow" and resolved["shadow_sample"] == 0.5
    assert resolved["shadow_min_requests"] == 50 and resolved["shadow_queue_size"] == 16


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"promotion": "canary"}, "promotion: expected one of ['immediate', 'shadow'], got 'canary'"),
        ({"shadow_sample": 0.0}, "shadow_sample: must be in (0, 1], got 0.0"),
        ({"shadow_min_agreement": 1.5}, "shadow_min_agreement: must be in [0.0, 1.0], got 1.5"),
        ({"shadow_queue_size": 0}, "shadow_queue_size: must be in [1, 65536], got 0"),
        ({"shadow_timeout_s": 0.0}, "shadow_timeout_s: must be in [0.1, 604800], got 0.0"),
        ({"prediction_classes": -1}, "prediction_classes: must be in [0, 1000], got -1"),
    ],
)
def test_bad_promotion_settings_are_named(tmp_path: Path, setting: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig(repo=tmp_path, **setting)  # type: ignore[arg-type]
    assert str(info.value) == message
