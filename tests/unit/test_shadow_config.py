"""The promotion settings of `kiln serve`: flags, KILN_ variables, --print-config, validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from serving import cli
from serving.grpc.config import ConfigError, ServeConfig, load_config
from serving.grpc.shadow import Rollouts, ShadowPolicy


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


@pytest.mark.parametrize(
    "shadow",
    [{"promotion": "shadow"}, {"model_overrides": {"resnet50": {"promotion": "shadow"}}}],
    ids=["server-wide", "one model"],
)
def test_shadow_promotion_refuses_several_workers(tmp_path: Path, shadow: dict[str, object]) -> None:
    """Each worker would judge the candidate on its own connections and could promote where
    another rejects: refused at start, naming both settings."""
    with pytest.raises(ConfigError, match=r"^workers: promotion: shadow needs workers: 1 "):
        ServeConfig(repo=tmp_path, workers=2, **shadow)  # type: ignore[arg-type]
    assert ServeConfig(repo=tmp_path, workers=1, **shadow).worker_count() == 1  # type: ignore[arg-type]


def test_shadow_promotion_defaults_to_one_worker_on_many_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default workers (one per 4 cores) drops to 1 with shadow promotion instead of failing;
    the core count is patched: this box has 2 cores, the rule matters from 8."""
    monkeypatch.setattr("serving.grpc.config.usable_cores", lambda: 16)
    assert ServeConfig(repo=tmp_path).worker_count() == 4
    assert ServeConfig(repo=tmp_path, promotion="shadow").worker_count() == 1
    overrides = {"resnet50": {"promotion": "shadow"}}
    assert ServeConfig(repo=tmp_path, model_overrides=overrides).worker_count() == 1


# ---- per-model settings (model_overrides) -----------------------------------------------------


def test_model_overrides_from_file_environment_and_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "kiln.yaml"
    config_file.write_text(
        "model_overrides:\n  a: {promotion: shadow, shadow-min-requests: '50'}\n", encoding="utf-8"
    )
    from_file = load_config(config_file=config_file, env={}, overrides={"repo": str(tmp_path)})
    assert from_file.model_overrides == {"a": {"promotion": "shadow", "shadow_min_requests": 50}}
    env = {"KILN_MODEL_OVERRIDES": '{"b": {"latency_target_ms": "25"}}'}
    from_env = load_config(config_file=config_file, env=env, overrides={"repo": str(tmp_path)})
    assert from_env.model_overrides == {"b": {"latency_target_ms": 25.0}}  # replaces the file's
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.setenv("KILN_MODEL_OVERRIDES", "{b: {promotion: shadow}}")
    argv = ["--repo", str(tmp_path), "--model-overrides", "{c: {promotion: shadow}}", "--print-config"]
    assert cli.run(parser.parse_args(argv)) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (
        resolved["model_overrides"] == {"c": {"promotion": "shadow"}} and resolved["promotion"] == "immediate"
    )


def test_a_model_takes_its_overrides_and_the_server_wide_rest(tmp_path: Path) -> None:
    config = ServeConfig(
        repo=tmp_path, promotion="shadow", shadow_min_requests=300, latency_target_ms=10.0,
        model_overrides={
            "a": {"promotion": "immediate"},
            "b": {"shadow_sample": 1.0, "latency_target_ms": None},
        },
    )  # fmt: skip
    a, b, other = config.for_model("a"), config.for_model("b"), config.for_model("other")
    assert (a.promotion, a.latency_target_ms) == ("immediate", 10.0)
    assert (b.promotion, b.shadow_sample, b.shadow_min_requests, b.latency_target_ms) == (
        "shadow",
        1.0,
        300,
        None,
    )
    assert other is config and config.for_model("a") is a  # resolved once
    rollouts = Rollouts(table=None, config=config, metrics=None)  # type: ignore[arg-type]
    assert rollouts.policy("a") is None
    assert rollouts.policy("b") == ShadowPolicy.from_config(b) and rollouts.policy("b").sample == 1.0
    assert rollouts.policy("other") == ShadowPolicy.from_config(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"a": {"promotion": "canary"}},
            "model_overrides.a.promotion: expected one of ['immediate', 'shadow'], got 'canary'",
        ),
        ({"a": {"shadow_sample": 2.0}}, "model_overrides.a.shadow_sample: must be in (0, 1], got 2.0"),
        (
            {"a": {"latency_target_ms": 0.0}},
            "model_overrides.a.latency_target_ms: must be in [0.1, 60000], got 0.0",
        ),
        (
            {"a": {"max_batch_size": 4}},
            "model_overrides.a.max_batch_size: not a per-model setting (those are ",
        ),
        ({"a": "shadow"}, "model_overrides.a: expected a mapping of settings, got 'shadow'"),
    ],
)
def test_bad_model_overrides_are_named(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig(repo=tmp_path, model_overrides=overrides)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_model_overrides_text_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"KILN_MODEL_OVERRIDES": "[a, b]"}, overrides={"repo": str(tmp_path)})
    assert (
        str(info.value)
        == "KILN_MODEL_OVERRIDES: expected a mapping of model name to settings, got ['a', 'b']"
    )
